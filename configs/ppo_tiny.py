"""PPO with a critic on a built-in task, CPU-sized.

    python -m jalign.train --config=configs/ppo_tiny.py --workdir=/tmp/jalign_ppo \
        --config.init_from=/tmp/jalign_quickstart/sft/final_params

Starts the policy from the quickstart's SFT model (`init_from`) and the critic
from its decoder with a fresh value head; `--config.rl.critic_init=` a reward
stage's WORKDIR/final_params starts the critic from a reward model instead.
32 prompts x 1 completion per step, 4 epochs over each rollout batch
(`--config.rl.num_minibatches=4` makes each epoch 4 shuffled minibatches, one
optimizer step each), GAE (gamma 1, lambda 0.95), fixed k3 KL penalty 0.05
(`--config.rl.kl_target` > 0 adapts it). `--config=configs/ppo_tiny.py:test` is
a seconds-long run (2 epochs of 2 minibatches).
"""

import pathlib
import runpy

_common = runpy.run_path(str(pathlib.Path(__file__).with_name("_rl_common.py")))


def get_config(arg: str = ""):
    _, test = _common["parse_variants"](arg, "ppo_tiny", ("ppo",))
    config = _common["tiny_rl_config"]("ppo", prompts=32, group_size=1, test=test,
                                       test_prompts=8, test_group_size=1)
    config.rl.num_iterations = 4
    if test:
        config.rl.num_iterations = 2
        config.rl.num_minibatches = 2
    return config
