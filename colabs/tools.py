# %% [markdown]
# # Tool use: multi-turn GRPO with a calculator
#
# The built-in `calc` task asks for the product of a 3-4 digit number and another
# (`4821*937=`): too hard for the tiny model to compute in its head, easy with the
# built-in `calculator` tool. A policy turn that calls it looks like
#
#     <tool_call>{"name":"calculator","arguments":{"expression":"4821*937"}}</tool_call>
#
# (the Hermes / Qwen format; `config.rl.tool_call_format="llama3"` parses bare JSON
# calls instead). The rollout parses the call, runs the tool (with a timeout), renders
# its result as a `tool` message through the tokenizer's chat template, prefills those
# tokens into the policy's KV cache and lets the policy continue: the conversation is
# never re-encoded. The tool-result tokens get loss mask 0. The gold reward is 1 when the
# final assistant turn is the product.
#
# 1. SFT on demonstrations of which half call the tool (the rest answer directly with a
#    near miss), so the SFT model calls it only some of the time.
# 2. GRPO from the SFT model, on multi-turn episodes (`config.rl.max_turns` policy turns).
#
# Both stages are one command, `python -m jalign.train --config=configs/grpo_tools_tiny.py
# --workdir=W`; this notebook runs the same pipeline, then plays a few held-out episodes
# and shows what the policy did. CI runs it small (`JALIGN_NOTEBOOK_SMALL=1`): a few
# steps, where nothing is learned; the full sizes take minutes on a CPU.

# %%
# Setup: on a fresh runtime (e.g. Colab) clone jalign and install it; where jalign
# is installed already this cell does nothing. JALIGN_REPO: the repository to clone.
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

# %%
import importlib.util
import os
import tempfile

import jax

from jalign import pipeline

SMALL = os.environ.get("JALIGN_NOTEBOOK_SMALL") == "1"  # CI runs the notebook small
print("backend:", jax.default_backend(), "devices:", jax.device_count(), "small:", SMALL)


def load_config(arg=""):
    spec = importlib.util.spec_from_file_location(
        "grpo_tools_tiny", os.path.join("..", "configs", "grpo_tools_tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


config = load_config("test" if SMALL else "")
workdir = tempfile.mkdtemp(prefix="jalign_tools_")
print("stages:", config.pipeline.stages, "| GRPO:", config.pipeline.grpo.data.batch_size,
      "prompts x", config.pipeline.grpo.rl.group_size, "episodes, up to", config.rl.max_turns,
      "turns of", config.rl.max_new_tokens, "tokens")

# %% [markdown]
# ## The tool, its schema and a call
#
# A tool is a plain Python function with type hints and a docstring; its JSON schema
# (what a Hugging Face chat template receives as `tools`) comes from them. The built-in
# character-level chat template does not print the schemas (the tiny model learns the
# call from demonstrations); a Qwen- or Llama-style template renders them into the prompt.

# %%
from jalign.tools import ToolExecutor, calculator, function_schema, parse_tool_calls

print(function_schema(calculator))
calls, errors = parse_tool_calls(
    '<tool_call>{"name":"calculator","arguments":{"expression":"4821*937"}}</tool_call>')
executor = ToolExecutor([calculator], timeout_s=1.0)
print(calls, errors, executor.run(calls[0]))
# A malformed call or a failing tool becomes an error observation the model reads:
print(parse_tool_calls('<tool_call>{"name": "calculator"'))
print(executor.run(parse_tool_calls(
    '<tool_call>{"name":"calculator","arguments":{"expression":"1/0"}}</tool_call>')[0][0]))

# %% [markdown]
# ## SFT, then multi-turn GRPO
#
# One call runs both stages (`jalign.pipeline.run_pipeline`, what `python -m jalign.train` does
# with this config). Each stage's held-out evaluation plays the task's held-out prompts as
# episodes, greedy and sampled: `gold_reward/*` is the success rate, `env/tool_calls` the
# calls per episode, `env/turns` the policy turns per episode.

# %%
summary = pipeline.run_pipeline(config, workdir)

# %% [markdown]
# ## What the policy does
#
# Held-out episodes of the final policy, played by the same runner the training used
# (`jalign.algorithms.episodes.EpisodeRunner`), greedy. The loss mask marks the tokens the
# policy generated; the tool's answers and the chat template's framing are not trained on.

# %%
import flax.linen as nn

from jalign.algorithms.episodes import EpisodeRunner, episode_spec, make_environment
from jalign.checkpoint import load_params
from jalign.models.config import ModelConfig
from jalign.models.transformer import decoder_init_fn
from jalign.tasks import get_task
from jalign.tokenizer import builtin_tokenizer

task = get_task(config.data.task)
model_cfg = ModelConfig.from_mapping(config.model)
abstract = nn.meta.unbox(jax.eval_shape(decoder_init_fn(model_cfg), jax.random.PRNGKey(0)))
params = load_params(os.path.join(workdir, "grpo", "final_params"), abstract)
spec = episode_spec(config, task, max_new_tokens=config.eval.max_new_tokens)
runner = EpisodeRunner(model_cfg, builtin_tokenizer(), make_environment(spec), spec, greedy=True)
rows = task.prompt_records(4, seed=config.seed + 1, split="eval")
played = runner.run(params, rows, jax.random.PRNGKey(0))
tok = builtin_tokenizer()
for i, episode in enumerate(played.episodes):
    print(f"--- episode {i}: answer {rows[i]['answer']}, "
          f"gold {task.gold_reward([rows[i]['prompt']], [played.final_turns[i]])[0]:.0f}")
    for message in episode.messages:
        print(f"  {message['role']:>9}: {message['content']}")
n = int(played.batch["segment_ids"][0].sum())
print("\nepisode 0 as trained (^ = a token the policy generated, loss mask 1):")
print(repr(tok.decode(played.batch["tokens"][0][:n], skip_special_tokens=False)))
print("".join("^" if m else " " for m in played.batch["loss_mask"][0][:n]))

# %% [markdown]
# ## Result
#
# Held-out success after SFT and after GRPO (greedy and sampled). At full size GRPO
# learns to call the tool on (almost) every prompt; see benchmarks/RESULTS.md, "Tool use
# (multi-turn GRPO on `calc`)", for three seeds. In CI's small run the numbers mean
# nothing (a few steps from fresh weights).

# %%
rows = summary["table"]
for name in ("sft", "grpo"):
    row = rows[name]
    print(f"{name:>5}: success greedy {row['gold_reward/greedy']:.3f}, "
          f"sampled {row['gold_reward/sampled']:.3f}")
gain = rows["grpo"]["gold_reward/sampled"] - rows["sft"]["gold_reward/sampled"]
print(f"GRPO changed sampled success by {gain:+.3f}" + (" (small CI run)" if SMALL else ""))
