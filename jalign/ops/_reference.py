"""Plain-XLA reference for `token_logprobs`: materialises the [N, V] logits.

Differentiated by ordinary autodiff. Used as the ground truth in tests and as
the `impl="xla"` option for small vocabularies where a single matmul is fastest.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def project_logits(hidden_NxH, unembed_HxV):
    """hidden @ unembed in the inputs' dtype, accumulated and returned in float32."""
    return lax.dot_general(hidden_NxH, unembed_HxV, (((1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)


def transform_logits(logits, temperature: float, logit_softcap: float | None):
    """Temperature, then optional softcap `cap * tanh(z / cap)`; float32 in and out.

    Shared by every implementation so that they agree bit-for-bit on this step.
    """
    if temperature != 1.0:
        logits = logits / temperature
    if logit_softcap is not None:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    return logits


def valid_targets(targets_N, vocab_size: int):
    """Targets outside [0, V) (e.g. -100 for ignored tokens) get log-prob 0."""
    return (targets_N >= 0) & (targets_N < vocab_size)


def token_logprobs_xla(hidden_NxH, unembed_HxV, targets_N, *, temperature: float,
                       logit_softcap: float | None, with_entropy: bool):
    """Returns (logps_N, lse_N, entropy_N or None, max_logit_N), all float32."""
    vocab_size = unembed_HxV.shape[1]
    logits_NxV = transform_logits(project_logits(hidden_NxH, unembed_HxV),
                                  temperature, logit_softcap)
    logprobs_NxV = jax.nn.log_softmax(logits_NxV, axis=-1)
    valid_N = valid_targets(targets_N, vocab_size)
    safe_targets_N = jnp.where(valid_N, targets_N, 0)
    logps_N = jnp.take_along_axis(logprobs_NxV, safe_targets_N[:, None], axis=-1)[:, 0]
    logps_N = jnp.where(valid_N, logps_N, 0.0)
    lse_N = jax.nn.logsumexp(logits_NxV, axis=-1)
    entropy_N = None
    if with_entropy:
        entropy_N = -jnp.sum(jnp.exp(logprobs_NxV) * logprobs_NxV, axis=-1)
    return logps_N, lse_N, entropy_N, jnp.max(logits_NxV, axis=-1)
