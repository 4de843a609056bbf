# %% [markdown]
# # Reward hacking: optimising a length-biased reward model
#
# A reward model learns from human-like labels; if the labeller liked longer answers
# regardless of quality, the model learns "longer is better" too. Optimise a policy
# hard against such a proxy and the proxy keeps rising while the true (gold) quality
# falls: reward-model overoptimisation, or Goodharting.
#
# The built-in `sentiment` task makes this measurable: the prompt is the start of a
# review (`review: the film was `), a good completion is a few distinct positive
# words, and the task's programmatic **gold reward** penalises fillers, repeats and
# padding beyond six words. Its candidate generator includes long padded answers
# (`good and great, it was a bit long`), bait for a labeller with a length bias.
#
# 1. SFT on demonstrations, half of them imperfect.
# 2. A reward model (the **proxy**) on preference pairs labelled with
#    `data.length_bias=1.0`: the labeller's margin is
#    `gold_a - gold_b + 1.0 * (len_a - len_b) / max(len_a, len_b)`.
# 3. GRPO against the proxy alone, scoring checkpoints along the way: proxy reward,
#    gold reward, completion length and KL to the SFT model.
# 4. The same GRPO run with a length-regularised reward,
#    `proxy - 2.0 * len(completion) / 40`, a user Python callable combined with the
#    reward model through `rl.reward_sources` / `rl.reward_weights`.
#
# The last cell prints the numbers and says plainly what happened. On a 2-core CPU
# the full size takes about 5 minutes; CI runs it small (`JALIGN_NOTEBOOK_SMALL=1`,
# about 3 CPU-minutes), with fewer steps and a weaker proxy: its curves are noisier.
#
# On Colab, first install jalign from the repository:
# `!pip install -q git+https://github.com/<you>/jalign` (or `pip install -e .` in a clone).

# %%
import json
import os
import tempfile

import jax

SMALL = os.environ.get("JALIGN_NOTEBOOK_SMALL") == "1"  # CI runs the notebook small
backend = jax.default_backend()
ACCELERATOR = backend in ("gpu", "tpu")
print("backend:", backend, "devices:", jax.device_count(), "small:", SMALL)

# Steps per stage and rollout sizes. An accelerator affords bigger batches and more
# evaluation prompts (smoother curves); the CPU sizes were tuned to show the effect
# (the accelerator sizes have not been tuned).
SIZES = dict(sft_steps=150, reward_steps=100, rl_steps=40, every=8, prompts=8, group=4,
             eval_prompts=64) if SMALL else dict(
    sft_steps=200, reward_steps=150, rl_steps=60, every=10, prompts=8, group=4, eval_prompts=64)
if ACCELERATOR and not SMALL:
    SIZES.update(sft_steps=400, reward_steps=300, rl_steps=80, prompts=16, group=8, eval_prompts=256)
LENGTH_BIAS = 1.0     # the labeller's preference for longer answers
PENALTY = 2.0         # weight of -len(completion) / 40 in the mitigated reward
print(SIZES)

# %%
from jalign.config_utils import base_config
from jalign.loop import run

workdir = tempfile.mkdtemp(prefix="jalign_reward_hacking_")


def task_config(algo: str, steps: int):
    config = base_config()
    config.algo = algo
    config.data.task = "sentiment"
    config.data.max_length = 96
    config.data.max_prompt_length = 48
    config.train.num_steps = steps
    config.train.log_every = 10
    config.train.eval_every = steps
    config.train.checkpoint_every = steps
    config.eval.num_prompts = SIZES["eval_prompts"]
    config.eval.batch_size = SIZES["eval_prompts"]
    config.eval.max_new_tokens = 40
    config.mesh.fsdp = -1  # all devices of this runtime (CPU, GPU or TPU)
    return config


sft = task_config("sft", SIZES["sft_steps"])
sft.data.demo_quality = 0.5
sft.optimizer.learning_rate = 3e-3
sft.optimizer.warmup_steps = 20
sft_summary = run(sft, os.path.join(workdir, "sft"))
sft_params = os.path.join(workdir, "sft", "final_params")

reward = task_config("reward", SIZES["reward_steps"])
reward.init_from = sft_params
reward.data.length_bias = LENGTH_BIAS
reward.optimizer.learning_rate = 1e-3
reward_summary = run(reward, os.path.join(workdir, "reward"))
proxy_params = os.path.join(workdir, "reward", "final_params")

# %% [markdown]
# The proxy's accuracy is measured on held-out pairs labelled by the gold reward
# alone (no length bias): well above chance, so it is a useful reward model, but it
# has learned the labeller's taste for length along with the task.

# %%
print("SFT held-out gold reward (sampled):", round(sft_summary["final"]["gold_reward/sampled"], 3))
print("proxy accuracy on gold-labelled held-out pairs:",
      round(reward_summary["final"]["eval_accuracy"], 3))

# %% [markdown]
# ## GRPO against the proxy, with and without a length penalty
#
# `rl.reward_sources` combines reward sources with `rl.reward_weights`: `model` is
# the trained reward model at `rl.reward_model`, `python:module.function` any batched
# function in TRL's convention, `(prompts, completions, **columns) -> floats` (it may
# name only the columns it uses, here none). A function defined in this notebook is
# importable as `__main__.length_penalty`. No KL penalty (`rl.kl_beta=0`): the point
# is to watch what unconstrained optimisation does to the gold reward.
#
# A checkpoint is kept every few steps; afterwards each one is scored.


# %%
def length_penalty(prompts, completions):
    """-len/40 per completion: about -1 for the longest answers the task allows."""
    return [-len(c) / 40.0 for c in completions]


def grpo_config(sources: str, weights):
    config = task_config("grpo", SIZES["rl_steps"])
    config.init_from = sft_params
    config.rl.reward_sources = sources
    config.rl.reward_weights = weights
    config.rl.reward_model = proxy_params
    config.rl.group_size = SIZES["group"]
    config.rl.max_new_tokens = 40
    config.rl.kl_beta = 0.0
    config.data.batch_size = SIZES["prompts"]
    config.optimizer.learning_rate = 1e-4
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "constant"
    config.train.eval_every = 0          # scored below, with the proxy too
    config.train.eval_at_start = False
    config.train.log_every = 5
    config.train.checkpoint_every = SIZES["every"]
    config.train.keep_checkpoints = 1000  # keep every checkpoint along the run
    return config


RUNS = {"biased proxy": grpo_config("model", [1.0]),
        "proxy + length penalty": grpo_config("model,python:__main__.length_penalty",
                                              [1.0, PENALTY])}
for name, config in RUNS.items():
    print(f"=== {name} ===")
    run(config, os.path.join(workdir, name.replace(" ", "_")))

# %% [markdown]
# ## Scoring the checkpoints
#
# For each checkpoint: sample one completion per held-out prompt and compute the
# proxy reward (the reward model alone, also for the mitigated run), the gold
# reward, the length in characters, and the KL to the SFT model (the sum over the
# completion of `log pi - log pi_sft`, averaged over prompts). The training loop's
# own evaluation reports gold, KL and length too; here the proxy is needed on the
# same samples.

# %%
import flax.linen as nn
import numpy as np
import orbax.checkpoint as ocp

from jalign import checkpoint
from jalign.algorithms.rl_inputs import reward_model_fn
from jalign.algorithms.rl_spec import rl_spec
from jalign.generate import decode_completions, generate, left_pad
from jalign.models import ModelConfig
from jalign.steps.common import shifted_logprobs
from jalign.tasks import get_task
from jalign.tokenizer import builtin_tokenizer
from jalign.models import decoder_init_fn

model_cfg = ModelConfig.from_mapping(sft.model)
tokenizer = builtin_tokenizer()
task = get_task("sentiment")
proxy = RUNS["biased proxy"]
proxy_fn = reward_model_fn(rl_spec(proxy), model_cfg, tokenizer,  # the reward model alone
                           proxy.data.max_length)
prompts = task.prompts(SIZES["eval_prompts"], seed=1, split="eval")
abstract = nn.meta.unbox(jax.eval_shape(decoder_init_fn(model_cfg), jax.random.PRNGKey(0)))
sft_weights = checkpoint.load_params(sft_params, abstract)


@jax.jit
def sequence_logps(params, batch):
    logps, mask = shifted_logprobs(params, model_cfg, batch)
    return (logps * mask).sum(-1)


def score(params, seed=0):
    encoded = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
    width = -(-max(map(len, encoded)) // 16) * 16
    prompt, mask = left_pad(encoded, tokenizer.pad_id, width)
    tokens, completion_mask, _ = generate(
        params, model_cfg, prompt, mask, jax.random.PRNGKey(seed), max_new_tokens=40,
        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, greedy=False, temperature=1.0)
    texts = decode_completions(tokenizer, tokens[:, width:], completion_mask)
    segments = np.concatenate([mask, np.asarray(completion_mask)], 1)
    batch = {"tokens": tokens, "segment_ids": segments,
             "loss_mask": np.concatenate([np.zeros_like(mask), completion_mask], 1),
             "positions": np.maximum(np.cumsum(segments, 1) - 1, 0).astype(np.int32)}
    kl = sequence_logps(params, batch) - sequence_logps(sft_weights, batch)
    return {"proxy": float(np.mean(proxy_fn(prompts, texts))),
            "gold": float(task.gold_reward(prompts, texts).mean()),
            "length": float(np.mean([len(t) for t in texts])),
            "kl": float(np.mean(kl))}, texts


start, start_texts = score(sft_weights)
curves, samples = {}, {}
for name in RUNS:
    manager = checkpoint.make_manager(os.path.join(workdir, name.replace(" ", "_"), "checkpoints"),
                                      keep=1000)
    rows = [dict(step=0, **start)]
    for step in manager.all_steps():
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        metrics, texts = score(state["state"]["params"])
        rows.append(dict(step=step, **metrics))
    curves[name], samples[name] = rows, texts
    for row in rows:
        print(f"{name:<24}", {k: round(v, 3) for k, v in row.items()})

# %% [markdown]
# What the policies write at the end, against the SFT model's answers to the same prompts:

# %%
for i in range(6):
    print(f"{prompts[i]!r}")
    print(f"    SFT:                    {start_texts[i]!r}")
    for name in RUNS:
        print(f"    {name + ':':<24}{samples[name][i]!r}")

# %%
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
for name, rows in curves.items():
    kl = [r["kl"] for r in rows]
    for ax, key in zip(axes, ("proxy", "gold", "length")):
        ax.plot(kl, [r[key] for r in rows], marker="o", label=name)
for ax, title in zip(axes, ("proxy reward (reward model)", "gold reward", "length (characters)")):
    ax.set_title(title)
    ax.set_xlabel("KL to the SFT model")
    ax.set_xscale("symlog", linthresh=1.0)
axes[1].legend()
fig.tight_layout()
fig.savefig(os.path.join(workdir, "reward_hacking.png"), dpi=110)

# %% [markdown]
# ## The numbers
#
# For each run: the SFT start, the checkpoint with the highest gold reward, and the
# end. "Hacked" means that from the gold peak to the end the proxy rose while the
# gold reward fell (by more than 0.05) and the KL grew.

# %%
def points(rows):
    peak = max(rows, key=lambda r: r["gold"])
    return {"start": rows[0], "peak gold": peak, "end": rows[-1]}


print(f"{'run':<24}{'point':<11}{'step':>5}{'proxy':>9}{'gold':>8}{'length':>8}{'KL':>8}")
for name, rows in curves.items():
    for label, r in points(rows).items():
        print(f"{name:<24}{label:<11}{r['step']:>5}{r['proxy']:>9.3f}{r['gold']:>8.3f}"
              f"{r['length']:>8.1f}{r['kl']:>8.2f}")
print()
falls = {}
for name, rows in curves.items():
    p = points(rows)
    peak, end = p["peak gold"], p["end"]
    falls[name] = peak["gold"] - end["gold"]
    hacked = (end["proxy"] > peak["proxy"] and falls[name] > 0.05 and end["kl"] > peak["kl"])
    print(f"{name}: from the gold peak (step {peak['step']}, KL {peak['kl']:.2f}) to the end "
          f"(KL {end['kl']:.2f}) the proxy went {peak['proxy']:.3f} -> {end['proxy']:.3f} and the "
          f"gold reward {peak['gold']:.3f} -> {end['gold']:.3f}: "
          + ("gold FELL while the proxy ROSE at high KL (reward hacking)." if hacked else
             "no such divergence (not hacked by this definition)."))
biased, mitigated = falls["biased proxy"], falls["proxy + length penalty"]
print(f"Gold fall from peak to end: biased proxy {biased:.3f}, with the length penalty "
      f"{mitigated:.3f} -> the mitigation's fall was "
      + ("SMALLER." if mitigated < biased else "NOT smaller."))
ends = {name: rows[-1] for name, rows in curves.items()}
print(f"(KL at the end: biased {ends['biased proxy']['kl']:.2f}, mitigated "
      f"{ends['proxy + length penalty']['kl']:.2f}; the penalty also slows the drift from the SFT "
      "model, so compare the gold-vs-KL curves above as well.)")
