"""Train state as data: a pytree of (step, params, opt_state, rng)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
    """Everything a step needs and a checkpoint saves.

    `frozen` holds trees that are used but not trained (e.g. {"reference": params}
    for DPO): sharded like the params, with no optimizer state.

    The RNG for step k is `jax.random.fold_in(rng, step)`, derived from the state,
    so a resumed run draws the same randomness as an uninterrupted one.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    frozen: Any = None

    def step_rng(self) -> jax.Array:
        return jax.random.fold_in(self.rng, self.step)
