"""GRPO on your own prompts: a JSONL file of {"prompt", "answer", ...} rows, scored by a verifier.

    python scripts/export_task_prompts.py --task=add --out=/tmp/add_prompts
    python -m jalign.train --config=configs/quickstart.py:sft --workdir=/tmp/add_sft \
        --config.data.task=add
    python -m jalign.train --config=configs/grpo_jsonl.py --workdir=/tmp/grpo_jsonl \
        --config.data.path=/tmp/add_prompts/train.jsonl \
        --config.data.eval_path=/tmp/add_prompts/eval.jsonl \
        --config.init_from=/tmp/add_sft/final_params

Rewards: `math_answer` (jalign.rewards: the completion's final number or \\boxed{}
answer equals the row's "answer" column) plus any `python:module.function` in
TRL's convention (`fn(prompts, completions, **columns) -> list[float | None]`).
Held-out prompts (data.eval_path) report reward/greedy, rewards/math_answer/greedy
(held-out exact match) and /sampled. Variants: `:task` draws the same prompts
from the built-in `add` task instead of the files (same seed: the same run,
benchmarks/RESULTS.md "RL on your own prompts"); `:dapo` adds DAPO's dynamic
sampling and clip-higher; `,test` for a seconds-long run.
"""

import pathlib
import runpy

_common = runpy.run_path(str(pathlib.Path(__file__).with_name("_rl_common.py")))


def get_config(arg: str = ""):
    variants = {v for v in arg.split(",") if v}
    unknown = variants - {"task", "dapo", "test"}
    if unknown:
        raise ValueError(f"configs/grpo_jsonl.py: unknown variant(s) {sorted(unknown)}; valid: "
                         "task, dapo, test")
    config = _common["tiny_rl_config"]("grpo", prompts=8, group_size=8, test="test" in variants,
                                       test_prompts=4, test_group_size=4)
    config.data.task = "add"
    config.data.source = "task" if "task" in variants else "jsonl"
    config.rl.reward_sources = "math_answer"
    config.rl.max_new_tokens = 8
    config.eval.max_new_tokens = 8
    if "dapo" in variants:
        config.rl.dynamic_sampling = True
        config.rl.clip_eps_high = 0.28
        config.rl.loss_aggregation = "dapo"
    return config
