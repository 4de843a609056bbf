"""RLOO (REINFORCE leave-one-out) on a built-in task, CPU-sized.

    python -m jalign.train --config=configs/rloo_tiny.py --workdir=/tmp/jalign_rloo \
        --config.init_from=/tmp/jalign_quickstart/sft/final_params

Starts from the quickstart's SFT model (`init_from`). 16 prompts x 4 completions
per step; each completion's baseline is the mean reward of the other three, and a
k1 KL penalty to the reference (beta 0.05) is folded into the sequence reward.
`--config=configs/rloo_tiny.py:test` is a seconds-long run.
"""

import pathlib
import runpy

_common = runpy.run_path(str(pathlib.Path(__file__).with_name("_rl_common.py")))


def get_config(arg: str = ""):
    _, test = _common["parse_variants"](arg, "rloo_tiny", ("rloo",))
    config = _common["tiny_rl_config"]("rloo", prompts=16, group_size=4, test=test,
                                       test_prompts=8, test_group_size=2)
    config.rl.kl_beta = 0.05
    return config
