"""CPO / SimPO / AlphaPO / ORPO against NumPy formulas from the papers (TRL conventions)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jalign.losses import CPO_LOSS_TYPES, cpo_loss, orpo_loss, simpo_loss

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=1e-3, atol=1e-3)}


def make_batch(seed, dtype, b=8, scale=1.0):
    rng = np.random.default_rng(seed)
    len_c, len_r = rng.integers(1, 30, b), rng.integers(1, 30, b)
    # Average log-probs in (-3, -0.01): includes values near 0 where log(1 - p) is delicate.
    pc = -rng.uniform(0.01, 3.0, b) * len_c * scale
    pr = -rng.uniform(0.01, 3.0, b) * len_r * scale
    jx = [jnp.asarray(v, jnp.float32).astype(dtype) for v in (pc, pr)]
    npx = [np.asarray(v.astype(jnp.float32), np.float64) for v in jx]
    return jx, npx, len_c, len_r


def ls(x):
    return -np.logaddexp(0.0, -x)


def np_cpo(loss_type, pc, pr, len_c, len_r, *, beta, eps, gamma, cpo_alpha, alpha):
    if loss_type in ("ipo", "simpo"):
        lc, lr = pc / len_c, pr / len_r
    else:
        lc, lr = pc, pr
    if alpha:
        lc, lr = (1 - np.exp(lc) ** -alpha) / alpha, (1 - np.exp(lr) ** -alpha) / alpha
    d = lc - lr
    if loss_type == "sigmoid":
        loss = -(1 - eps) * ls(beta * d) - eps * ls(-beta * d)
    elif loss_type == "hinge":
        loss = np.maximum(0, 1 - beta * d)
    elif loss_type == "ipo":
        loss = (d - 1 / (2 * beta)) ** 2
    else:
        loss = -(1 - eps) * ls(beta * d - gamma) - eps * ls(gamma - beta * d)
    nll = -pc.sum() / len_c.sum()
    return loss + cpo_alpha * nll, nll


class CpoTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(loss_type=CPO_LOSS_TYPES, alphapo_alpha=(0.0, 0.25),
                           dtype=("float32", "bfloat16"))
    def test_against_numpy(self, loss_type, alphapo_alpha, dtype):
        # Summed log-probs (sigmoid, hinge) are scaled down to keep AlphaPO's p^-alpha moderate.
        scale = 0.1 if alphapo_alpha and loss_type in ("sigmoid", "hinge") else 1.0
        (c, r), (pc, pr), len_c, len_r = make_batch(CPO_LOSS_TYPES.index(loss_type),
                                                    DTYPES[dtype], scale=scale)
        hp = dict(beta=0.7, label_smoothing=0.1, cpo_alpha=0.5)
        fn = self.variant(functools.partial(cpo_loss, loss_type=loss_type, simpo_gamma=0.4,
                                            alphapo_alpha=alphapo_alpha, **hp))
        losses, metrics = fn(c, r, chosen_lengths=len_c, rejected_lengths=len_r)
        expected, nll = np_cpo(loss_type, pc, pr, len_c, len_r, beta=0.7, eps=0.1, gamma=0.4,
                               cpo_alpha=0.5, alpha=alphapo_alpha)
        chex.assert_type(losses, jnp.float32)
        np.testing.assert_allclose(losses, expected, **TOL[dtype])
        np.testing.assert_allclose(metrics["nll_loss"], nll, **TOL[dtype])
        for key in ("rewards/chosen", "rewards/accuracies", "rewards/margins", "logps/chosen"):
            chex.assert_shape(metrics[key], ())


def test_simpo_matches_paper_formula():
    (c, r), (pc, pr), len_c, len_r = make_batch(11, jnp.float32)
    losses, metrics = simpo_loss(c, r, chosen_lengths=len_c, rejected_lengths=len_r)
    # Meng et al. 2024 Eq. 6 with beta 2.5, gamma 1.375.
    expected = -ls(2.5 / len_c * pc - 2.5 / len_r * pr - 1.375)
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/chosen"], (2.5 * pc / len_c).mean(), rtol=1e-5)
    assert "nll_loss" not in metrics


def test_cpo_nll_from_explicit_values_and_errors():
    (c, r), (pc, pr), len_c, len_r = make_batch(12, jnp.float32)
    nll = jnp.linspace(1.0, 2.0, 8)
    losses, _ = cpo_loss(c, r, cpo_alpha=2.0, chosen_nll=nll)
    np.testing.assert_allclose(losses, -ls(0.1 * (pc - pr)) + 2.0 * np.asarray(nll),
                               rtol=1e-5)
    with pytest.raises(ValueError, match=r"Unknown loss_type 'orpo'.*sigmoid, hinge, ipo, simpo"):
        cpo_loss(c, r, loss_type="orpo")
    with pytest.raises(ValueError, match=r"'simpo' uses average log-probs.*chosen_lengths"):
        cpo_loss(c, r, loss_type="simpo")
    with pytest.raises(ValueError, match=r"needs the chosen NLL"):
        cpo_loss(c, r)  # cpo_alpha=1 but no lengths / nll
    cpo_loss(c, r, cpo_alpha=0.0)  # pure preference term needs neither


def np_orpo(pc, pr, len_c, len_r, beta):
    lc, lr = pc / len_c, pr / len_r
    log_odds = (lc - lr) - (np.log1p(-np.exp(lc)) - np.log1p(-np.exp(lr)))
    nll = -pc.sum() / len_c.sum()
    return nll - beta * ls(log_odds), log_odds, nll


class OrpoTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("float32", "bfloat16")
    def test_against_numpy(self, dtype):
        (c, r), (pc, pr), len_c, len_r = make_batch(13, DTYPES[dtype])
        fn = self.variant(functools.partial(orpo_loss, beta=0.25))
        losses, metrics = fn(c, r, chosen_lengths=len_c, rejected_lengths=len_r)
        expected, log_odds, nll = np_orpo(pc, pr, len_c, len_r, 0.25)
        np.testing.assert_allclose(losses, expected, **TOL[dtype])
        np.testing.assert_allclose(metrics["log_odds_chosen"], log_odds.mean(), **TOL[dtype])
        np.testing.assert_allclose(metrics["log_odds_ratio"], ls(log_odds).mean(), **TOL[dtype])
        np.testing.assert_allclose(metrics["nll_loss"], nll, **TOL[dtype])
        np.testing.assert_allclose(metrics["logps/chosen"], (pc / len_c).mean(), **TOL[dtype])


def test_orpo_finite_near_probability_one():
    # Average log-prob 0 (p = 1) makes log(1 - p) = -inf without care.
    c = jnp.array([0.0, -1e-9, -1e-3, -200.0])
    r = jnp.array([-1.0, -1.0, 0.0, -1e-4])
    lengths = jnp.ones(4)

    def total(c, r):
        return orpo_loss(c, r, chosen_lengths=lengths, rejected_lengths=lengths)[0].sum()

    value, grads = jax.value_and_grad(total, argnums=(0, 1))(c, r)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("loss_type, alphapo_alpha", [(t, 0.0) for t in CPO_LOSS_TYPES]
                         + [("sigmoid", 0.5), ("hinge", 0.5), ("simpo", 0.5)])
def test_cpo_large_margins_finite(loss_type, alphapo_alpha):
    # |beta d| = 1e4 (AlphaPO: its exponent hits the cap of 80 and stays finite).
    c, r = jnp.array([-1.0, -1e5]), jnp.array([-1e5, -1.0])
    lengths = jnp.ones(2)

    def total(c, r):
        return cpo_loss(c, r, loss_type=loss_type, beta=0.1, chosen_lengths=lengths,
                        rejected_lengths=lengths, alphapo_alpha=alphapo_alpha)[0].sum()

    value, grads = jax.value_and_grad(total, argnums=(0, 1))(c, r)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)
