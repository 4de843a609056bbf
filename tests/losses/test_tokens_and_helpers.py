"""Per-token helpers (masking, lengths) and the DPO helpers built on them: WPO, LD-DPO, R-DPO."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jalign.losses import (dpo_loss, ld_sequence_logps, length_normalize, log_sum_squared_probs,
                           masked_mean, rdpo_loss, sequence_lengths, sequence_logps, wpo_weights)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=1e-3, atol=1e-3)}


def token_batch(seed, dtype, b=4, t=9):
    """Per-token log-probs with ragged right padding, and a prompt prefix masked off."""
    rng = np.random.default_rng(seed)
    logps = jnp.asarray(-rng.exponential(1.5, (b, t)), jnp.float32).astype(dtype)
    lengths = rng.integers(0, t - 1, b)
    starts = rng.integers(0, 2, b)
    pos = np.arange(t)[None]
    mask = (pos >= starts[:, None]) & (pos < (starts + lengths)[:, None])
    # A float 0/1 mask, as the steps pass it (x * mask with a float mask is where NaNs come from).
    np_logps = np.asarray(logps.astype(jnp.float32), np.float64)
    return logps, jnp.asarray(mask, jnp.float32), np_logps, mask


def ls(x):
    return -np.logaddexp(0.0, -x)


# ---------------------------------------------------------------- tokens


class TokensTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(average=(False, True), dtype=("float32", "bfloat16"))
    def test_sequence_logps(self, average, dtype):
        logps, mask, np_logps, np_mask = token_batch(1, DTYPES[dtype])
        out = self.variant(functools.partial(sequence_logps, average=average))(logps, mask)
        chex.assert_shape(out, (4,))
        chex.assert_type(out, jnp.float32)
        total = np.array([row[m].sum() for row, m in zip(np_logps, np_mask)])
        count = np_mask.sum(-1)
        expected = total / np.maximum(count, 1) if average else total
        np.testing.assert_allclose(out, expected, **TOL[dtype])
        np.testing.assert_array_equal(self.variant(sequence_lengths)(mask), count)
        np.testing.assert_allclose(self.variant(length_normalize)(total, count),
                                   total / np.maximum(count, 1), rtol=1e-6)


@pytest.mark.parametrize("fill", (-np.inf, -1e30, np.nan))
@pytest.mark.parametrize("average", (False, True))
def test_masked_positions_get_exactly_zero_gradient(fill, average):
    logps, mask, _, np_mask = token_batch(2, jnp.float32)
    poisoned = jnp.where(mask, logps, fill)
    lengths = sequence_lengths(mask)

    def total(x):
        seq = sequence_logps(x, mask, average=average)
        losses, _ = dpo_loss(seq[:2], seq[2:], jnp.zeros(2), jnp.zeros(2),
                             loss_type=("sigmoid", "ipo"), chosen_lengths=lengths[:2],
                             rejected_lengths=lengths[2:])
        return losses.sum()

    value, grad = jax.value_and_grad(total)(poisoned)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.asarray(grad)[~np_mask], 0.0)
    assert np.all(np.asarray(grad)[np_mask] != 0.0)  # and the valid tokens do learn


def test_all_masked_row_is_zero_not_nan():
    x = jnp.full((2, 3), -jnp.inf)
    mask = jnp.array([[0, 0, 0], [1, 0, 0]])
    np.testing.assert_array_equal(masked_mean(jnp.where(mask > 0, 0.5, x), mask), [0.0, 0.5])


# ---------------------------------------------------------------- WPO


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


class WpoTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("float32", "bfloat16")
    def test_weights_from_logits(self, dtype):
        rng = np.random.default_rng(3)
        logits = jnp.asarray(rng.normal(0, 2, (4, 9, 11)), jnp.float32).astype(DTYPES[dtype])
        np_logits = np.asarray(logits.astype(jnp.float32), np.float64)
        targets = rng.integers(0, 11, (4, 9))
        _, mask, _, np_mask = token_batch(4, jnp.float32)
        logp_all = np_log_softmax(np_logits)
        np_logps = np.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
        # w = exp(mean_t [log p_t - log sum_v p_v^2])
        log_sum_p2 = np.log((np.exp(logp_all) ** 2).sum(-1))
        expected = np.array([np.exp((lp - q)[m].mean()) if m.any() else 1.0
                             for lp, q, m in zip(np_logps, log_sum_p2, np_mask)])
        lsp = self.variant(log_sum_squared_probs)(logits)
        np.testing.assert_allclose(lsp, log_sum_p2, **TOL[dtype])
        w = self.variant(wpo_weights)(jnp.asarray(np_logps, jnp.float32), lsp, mask)
        np.testing.assert_allclose(w, expected, **{k: 5 * v for k, v in TOL[dtype].items()})


def test_wpo_weights_have_no_gradient():
    logps, mask, _, _ = token_batch(5, jnp.float32)
    g = jax.grad(lambda x: wpo_weights(x, jnp.full_like(x, -1.0), mask).sum())(logps)
    np.testing.assert_array_equal(g, 0.0)


# ---------------------------------------------------------------- LD-DPO


def np_ld(np_logps, np_mask, other_mask, alpha):
    out = []
    for row, m, om in zip(np_logps, np_mask, other_mask):
        shared = min(m.sum(), om.sum())
        tokens = row[m]  # completion tokens in order
        out.append(tokens[:shared].sum() + alpha * tokens[shared:].sum())
    return np.array(out)


class LdDpoTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(ld_alpha=(0.0, 0.3, 1.0), dtype=("float32", "bfloat16"))
    def test_against_numpy(self, ld_alpha, dtype):
        lc, mc, np_lc, np_mc = token_batch(6, DTYPES[dtype])
        lr, mr, np_lr, np_mr = token_batch(7, DTYPES[dtype])
        fn = self.variant(functools.partial(ld_sequence_logps, ld_alpha=ld_alpha))
        out_c, out_r = fn(lc, mc, lr, mr)
        np.testing.assert_allclose(out_c, np_ld(np_lc, np_mc, np_mr, ld_alpha), **TOL[dtype])
        np.testing.assert_allclose(out_r, np_ld(np_lr, np_mr, np_mc, ld_alpha), **TOL[dtype])


def test_ld_alpha_one_is_the_plain_sum_and_masked_grad_is_zero():
    lc, mc, _, np_mc = token_batch(8, jnp.float32)
    lr, mr, _, _ = token_batch(9, jnp.float32)
    c, r = ld_sequence_logps(lc, mc, lr, mr, ld_alpha=1.0)
    np.testing.assert_allclose(c, sequence_logps(lc, mc), rtol=1e-6)
    np.testing.assert_allclose(r, sequence_logps(lr, mr), rtol=1e-6)
    poisoned = jnp.where(mc, lc, -jnp.inf)
    value, g = jax.value_and_grad(
        lambda x: ld_sequence_logps(x, mc, lr, mr, ld_alpha=0.5)[0].sum())(poisoned)
    clean = ld_sequence_logps(lc, mc, lr, mr, ld_alpha=0.5)[0].sum()
    np.testing.assert_allclose(value, clean, rtol=1e-6)  # -inf * 0 would be NaN
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(np.asarray(g)[~np_mc], 0.0)


# ---------------------------------------------------------------- R-DPO


class RdpoTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("float32", "bfloat16")
    def test_against_numpy(self, dtype):
        rng = np.random.default_rng(10)
        arrays = [jnp.asarray(-rng.uniform(5, 50, 6), jnp.float32).astype(DTYPES[dtype])
                  for _ in range(4)]
        pc, pr, rc, rr = [np.asarray(a.astype(jnp.float32), np.float64) for a in arrays]
        len_c, len_r = rng.integers(1, 40, 6), rng.integers(1, 40, 6)
        fn = self.variant(functools.partial(rdpo_loss, beta=0.2, alpha=0.03))
        losses, metrics = fn(*arrays, chosen_lengths=len_c, rejected_lengths=len_r)
        # Park et al. 2024: -log sigmoid(beta D + alpha (|y_w| - |y_l|))
        expected = -ls(0.2 * ((pc - rc) - (pr - rr)) + 0.03 * (len_c - len_r))
        np.testing.assert_allclose(losses, expected, **TOL[dtype])
        np.testing.assert_allclose(metrics["rewards/chosen"], 0.2 * (pc - rc).mean(),
                                   **TOL[dtype])


def test_rdpo_penalises_length_and_reduces_to_dpo():
    z = jnp.zeros(2)
    lengths_c, lengths_r = jnp.array([50, 10]), jnp.array([10, 50])
    plain, _ = rdpo_loss(z, z, z, z, chosen_lengths=lengths_c, rejected_lengths=lengths_r)
    np.testing.assert_allclose(plain, np.log(2), rtol=1e-6)
    losses, _ = rdpo_loss(z, z, z, z, chosen_lengths=lengths_c, rejected_lengths=lengths_r,
                          alpha=0.01)
    # A longer chosen answer already "explains" the preference: lower loss, less push.
    assert losses[0] < np.log(2) < losses[1]
