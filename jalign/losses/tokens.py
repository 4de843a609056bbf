"""Per-token helpers: from per-token log-probs [..., T] to per-sequence values [...].

Masking always goes through `jnp.where`, never a multiplication by the mask: a masked
position holding -inf (or any huge value) then contributes exactly 0 to the value and
exactly 0 to the gradient, where `-inf * 0` would give NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jalign.losses._common import f32


def sequence_lengths(mask_BxT) -> jax.Array:
    """Number of valid (nonzero) mask entries over the last axis, float32."""
    return jnp.sum(jnp.asarray(mask_BxT).astype(bool), axis=-1).astype(jnp.float32)


def masked_sum(values_BxT, mask_BxT) -> jax.Array:
    """Sum over the last axis of the valid positions only, in float32."""
    mask_BxT = jnp.asarray(mask_BxT).astype(bool)
    return jnp.sum(jnp.where(mask_BxT, f32(values_BxT), 0.0), axis=-1)


def masked_mean(values_BxT, mask_BxT) -> jax.Array:
    """Mean over the last axis of the valid positions; 0 for an all-masked row."""
    return masked_sum(values_BxT, mask_BxT) / jnp.maximum(sequence_lengths(mask_BxT), 1.0)


def length_normalize(logps_B, lengths_B) -> jax.Array:
    """Per-token average log-prob: logps / max(lengths, 1), float32."""
    return f32(logps_B) / jnp.maximum(f32(lengths_B), 1.0)


def sequence_logps(logps_BxT, mask_BxT, *, average: bool = False) -> jax.Array:
    """Per-sequence log-prob from per-token log-probs.

    Args:
        logps_BxT: per-token log-probs log pi(y_t | x, y_<t), token axis last, any
            leading shape and dtype (computed in float32).
        mask_BxT: completion mask, nonzero where a token counts.
        average: False for the sum over valid tokens (DPO and most losses), True for
            the mean (SimPO, IPO in CPO, ORPO).

    Returns:
        float32 array of the leading shape. Masked positions get exactly zero gradient.
    """
    if average:
        return masked_mean(logps_BxT, mask_BxT)
    return masked_sum(logps_BxT, mask_BxT)
