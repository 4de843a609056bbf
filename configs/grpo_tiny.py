"""GRPO (and its Dr. GRPO / DAPO variants) on a built-in task, CPU-sized.

    python -m jalign.train --config=configs/grpo_tiny.py --workdir=/tmp/jalign_grpo \
        --config.init_from=/tmp/jalign_quickstart/sft/final_params

Starts from the quickstart's SFT model (`init_from`). Variants
(`--config=configs/grpo_tiny.py:VARIANT`): grpo (default; group-normalised
advantages, `grpo` aggregation), dr_grpo (no std scaling, `dr_grpo` aggregation),
dapo (clip-higher 0.28, token-level `dapo` aggregation); add `,test` for a
seconds-long run. 8 prompts x 8 completions per step. Sibling configs:
rloo_tiny.py, ppo_tiny.py, online_dpo_tiny.py.
"""

import pathlib
import runpy

_common = runpy.run_path(str(pathlib.Path(__file__).with_name("_rl_common.py")))


def get_config(arg: str = ""):
    variant, test = _common["parse_variants"](arg, "grpo_tiny", ("grpo", "dr_grpo", "dapo"))
    config = _common["tiny_rl_config"]("grpo", prompts=8, group_size=8, test=test,
                                       test_prompts=4, test_group_size=4)
    if variant == "dr_grpo":
        config.rl.scale_rewards = "none"
        config.rl.loss_aggregation = "dr_grpo"
    elif variant == "dapo":
        config.rl.clip_eps_high = 0.28
        config.rl.loss_aggregation = "dapo"
    return config
