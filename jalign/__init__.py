"""jalign: JAX-native preference optimization.

Public pieces: `jalign.losses` (pure preference losses), `jalign.ops.token_logprobs`
(the fused log-prob op), `jalign.steps` (step factories), `jalign.models`,
`jalign.data`, `jalign.tasks`, `jalign.state.TrainState`, and the training entry
point `python -m jalign.train`.
"""

from jalign import losses, models, ops, steps
from jalign.state import TrainState

__version__ = "0.1.0"
__all__ = ["TrainState", "losses", "models", "ops", "steps"]
