"""Online (iterative) DPO on a built-in task, CPU-sized.

    python -m jalign.train --config=configs/online_dpo_tiny.py --workdir=/tmp/jalign_online_dpo \
        --config.init_from=/tmp/jalign_quickstart/sft/final_params

Starts from the quickstart's SFT model (`init_from`). Each step samples 8
completions for each of 8 prompts from the current policy, ranks them with the
gold reward and takes a sigmoid-DPO step (beta 0.5; any `--config.dpo.loss_type`)
on best vs. worst, against the starting model as reference.
`--config=configs/online_dpo_tiny.py:test` is a seconds-long run.
"""

import pathlib
import runpy

_common = runpy.run_path(str(pathlib.Path(__file__).with_name("_rl_common.py")))


def get_config(arg: str = ""):
    _, test = _common["parse_variants"](arg, "online_dpo_tiny", ("online_dpo",))
    config = _common["tiny_rl_config"]("online_dpo", prompts=8, group_size=8, test=test,
                                       test_prompts=8, test_group_size=2)
    config.dpo.beta = 0.5
    return config
