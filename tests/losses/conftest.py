"""Shared fixtures of the loss tests: random preference batches in float32 / bfloat16."""

import jax.numpy as jnp
import numpy as np


def make_batch(seed: int, dtype, *, batch: int = 8, spread: float = 3.0):
    """A random preference batch as (jax_arrays, float64 numpy copies of the same values).

    The numpy copies are taken after the cast to `dtype`, so a NumPy reference sees the
    exact values the JAX code sees and any remaining difference is arithmetic.
    """
    rng = np.random.default_rng(seed)
    ref_c = -rng.uniform(5.0, 60.0, batch)
    ref_r = -rng.uniform(5.0, 60.0, batch)
    raw = {
        "chosen_logps": ref_c + rng.normal(0.0, spread, batch),
        "rejected_logps": ref_r + rng.normal(0.0, spread, batch),
        "ref_chosen_logps": ref_c,
        "ref_rejected_logps": ref_r,
    }
    jax_arrays = {k: jnp.asarray(v, jnp.float32).astype(dtype) for k, v in raw.items()}
    np_arrays = {k: np.asarray(v.astype(jnp.float32), np.float64) for k, v in jax_arrays.items()}
    lengths = {
        "chosen_lengths": rng.integers(0, 40, batch),  # 0 exercises the clamp at 1
        "rejected_lengths": rng.integers(1, 40, batch),
    }
    jax_arrays.update({k: jnp.asarray(v) for k, v in lengths.items()})
    np_arrays.update({k: v.astype(np.float64) for k, v in lengths.items()})
    return jax_arrays, np_arrays


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def np_sigmoid(x):
    return np.exp(np_log_sigmoid(x))


TOLERANCE = {jnp.float32: dict(rtol=2e-5, atol=2e-5), jnp.bfloat16: dict(rtol=1e-3, atol=1e-3)}
