"""Small shared pieces of the loss modules: dtype handling, metrics, argument checks."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp

# exp() arguments are capped here: e^80 ~ 5.5e34 is still finite in float32 (max ~3.4e38).
EXP_CAP = 80.0


def f32(x):
    """Upcasts an array-like to float32 (None passes through)."""
    if x is None:
        return None
    return jnp.asarray(x).astype(jnp.float32)


def real_rows(mask, shape) -> jax.Array:
    """A bool [B] mask of the real examples (`mask` is bool or 0/1 float), broadcast to `shape`."""
    return jnp.broadcast_to(jnp.asarray(mask).astype(bool), shape)


def batch_mean(x, mask=None) -> jax.Array:
    """A float32 scalar metric with no gradient: the batch mean of `x`.

    With `mask` ([B], bool or 0/1 float) the mean runs over the masked-in rows only, so
    filler rows of a packed batch do not dilute it (0 when no row is masked in).
    """
    x = jax.lax.stop_gradient(x)
    if mask is None:
        return jnp.mean(x).astype(jnp.float32)
    x = f32(x)
    real = real_rows(mask, x.shape)
    # where, not a product: a filler row holding inf or NaN must not leak into the sum.
    total = jnp.sum(jnp.where(real, x, 0.0))
    return total / jnp.maximum(jnp.sum(real.astype(jnp.float32)), 1.0)


def preference_metrics(chosen_rewards_B, rejected_rewards_B, chosen_logps_B,
                       rejected_logps_B, *, mask=None) -> dict[str, jax.Array]:
    """TRL's DPO metric names; every value is a float32 mean over the (masked-in) batch."""
    return {
        "rewards/chosen": batch_mean(chosen_rewards_B, mask),
        "rewards/rejected": batch_mean(rejected_rewards_B, mask),
        "rewards/accuracies": batch_mean((chosen_rewards_B > rejected_rewards_B)
                                         .astype(jnp.float32), mask),
        "rewards/margins": batch_mean(chosen_rewards_B - rejected_rewards_B, mask),
        "logps/chosen": batch_mean(chosen_logps_B, mask),
        "logps/rejected": batch_mean(rejected_logps_B, mask),
    }


def check_choice(argument: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {argument} {value!r}; valid choices are: "
                         f"{', '.join(choices)}.")


def as_name_tuple(names: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(names, str):
        return (names,)
    return tuple(names)


def safe_lengths(lengths_B) -> jax.Array:
    """Token counts clamped at 1, so an empty completion divides by 1, not 0 (as TRL)."""
    return jnp.maximum(f32(lengths_B), 1.0)


def resolve_chosen_nll(chosen_logps_B, chosen_lengths_B, chosen_nll_B, *, who: str,
                       mask=None) -> jax.Array:
    """Per-example NLL term of the SFT-style additions, shape [B].

    If `chosen_nll_B` is given it is used as is (a per-example token-mean NLL).
    Otherwise the NLL is TRL's: the token mean over every chosen completion token of
    the batch, -sum_b logp_b / sum_b L_b, broadcast to every example so that the batch
    mean of the per-example losses equals TRL's batch loss. With `mask` both sums run
    over the real rows only (filler rows get no gradient).
    """
    if chosen_nll_B is not None:
        return jnp.broadcast_to(f32(chosen_nll_B), chosen_logps_B.shape)
    if chosen_lengths_B is None:
        raise ValueError(f"{who} needs the chosen NLL: pass chosen_nll= (per-example "
                         "token-mean NLL) or chosen_lengths= (completion token counts) so "
                         "it can be computed from chosen_logps.")
    logps_B, lengths_B = f32(chosen_logps_B), f32(chosen_lengths_B)
    if mask is not None:
        real = real_rows(mask, logps_B.shape)
        logps_B = jnp.where(real, logps_B, 0.0)
        lengths_B = jnp.where(real, lengths_B, 0.0)
    total_tokens = jnp.maximum(jnp.sum(lengths_B), 1.0)
    nll = -jnp.sum(logps_B) / total_tokens
    return jnp.broadcast_to(nll, chosen_logps_B.shape)
