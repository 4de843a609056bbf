"""What each algorithm brings to the one training loop: a spec, data, a step.

For each `config.algo`, an `Algorithm` reads its config sections once into a
typed spec (`spec(config)`), builds the data, model init and evaluation from the
config (`setup(config, model_cfg, spec, workdir) -> AlgorithmSetup`) and the pure
step (`make_step(config, model_cfg, spec, optimizer)`). The loop in jalign.loop
and the fit check in jalign.aot are the same for every algorithm.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jalign.algorithms import distill, preference, rl, sft
from jalign.algorithms.rl_spec import rl_spec
from jalign.algorithms.common import AlgorithmSetup


@dataclasses.dataclass(frozen=True)
class Algorithm:
    spec: Callable[[Any], Any]
    setup: Callable[..., AlgorithmSetup]
    make_step: Callable[..., Callable]
    rollout_epochs: bool = False  # the step takes rl.num_iterations x rl.num_minibatches updates

    def updates_per_step(self, config) -> int:
        """Optimizer updates one train step takes (the optimizer's schedule counts them)."""
        if not self.rollout_epochs:
            return 1
        return int(config.rl.num_iterations) * int(config.rl.num_minibatches)


_ALGORITHMS = {
    "sft": Algorithm(sft.spec, sft.setup, sft.make_step),
    "reward": Algorithm(preference.reward_spec, preference.reward_setup, preference.reward_step),
    "dpo": Algorithm(preference.pair_spec, preference.dpo_setup, preference.dpo_step),
    "kto": Algorithm(preference.kto_spec, preference.kto_setup, preference.kto_step),
    "grpo": Algorithm(rl_spec, rl.grpo_setup, rl.grpo_step, rollout_epochs=True),
    "rloo": Algorithm(rl_spec, rl.grpo_setup, rl.grpo_step, rollout_epochs=True),
    "online_dpo": Algorithm(rl_spec, rl.grpo_setup, rl.online_dpo_step),
    "ppo": Algorithm(rl_spec, rl.ppo_setup, rl.ppo_step, rollout_epochs=True),
    "distill": Algorithm(distill.spec, distill.setup, distill.make_step),
}
ALGOS = tuple(_ALGORITHMS)


def get_algorithm(name: str) -> Algorithm:
    if name not in _ALGORITHMS:
        raise ValueError(f"config.algo {name!r} is not known; valid: {sorted(_ALGORITHMS)}")
    return _ALGORITHMS[name]
