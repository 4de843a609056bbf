"""What each algorithm brings to the one training loop: data, step, evaluation.

An `AlgorithmSetup` is built from the config before training; the loop in
jalign.train is the same for every algorithm.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from jalign.algorithms import preference, rl, sft
from jalign.algorithms.common import AlgorithmSetup


@dataclasses.dataclass(frozen=True)
class Algorithm:
    setup: Callable[..., AlgorithmSetup]
    make_step: Callable[..., Callable]
    rollout_epochs: bool = False  # the step takes rl.num_iterations x rl.num_minibatches updates

    def updates_per_step(self, config) -> int:
        """Optimizer updates one train step takes (the optimizer's schedule counts them)."""
        if not self.rollout_epochs:
            return 1
        return int(config.rl.num_iterations) * int(config.rl.num_minibatches)


_ALGORITHMS = {
    "sft": Algorithm(sft.setup, sft.make_step),
    "reward": Algorithm(preference.reward_setup, preference.reward_step),
    "dpo": Algorithm(preference.dpo_setup, preference.dpo_step),
    "kto": Algorithm(preference.kto_setup, preference.kto_step),
    "grpo": Algorithm(rl.grpo_setup, rl.grpo_step, rollout_epochs=True),
    "rloo": Algorithm(rl.grpo_setup, rl.grpo_step, rollout_epochs=True),
    "online_dpo": Algorithm(rl.online_dpo_setup, rl.online_dpo_step),
    "ppo": Algorithm(rl.ppo_setup, rl.ppo_step, rollout_epochs=True),
}
ALGOS = tuple(_ALGORITHMS)


def get_algorithm(name: str) -> Algorithm:
    if name not in _ALGORITHMS:
        raise ValueError(f"config.algo {name!r} is not known; valid: {sorted(_ALGORITHMS)}")
    return _ALGORITHMS[name]
