"""jalign: JAX-native preference optimization.

Public pieces: `jalign.losses` (pure preference losses), `jalign.ops.token_logprobs`
(the fused log-prob op), `jalign.steps` (step factories), `jalign.models`,
`jalign.data`, `jalign.tasks`, `jalign.rewards` (verifiable reward functions),
`jalign.state.TrainState`, `jalign.best_of_n` and `jalign.warm` (over-optimisation tools),
and the training entry point `python -m jalign.train` (`--seeds=N`: `jalign.sweep`).
"""

# Before anything touches JAX's backends: on a CPU-only host with libtpu installed (the
# test extra), pick the CPU backend instead of letting libtpu's start-up fail loudly.
from jalign._platform import use_cpu_without_accelerator

use_cpu_without_accelerator()

from jalign import losses, models, ops, rewards, steps  # noqa: E402
from jalign.state import TrainState  # noqa: E402

__version__ = "0.1.0"
__all__ = ["TrainState", "losses", "models", "ops", "rewards", "steps"]
