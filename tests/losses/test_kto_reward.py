"""KTO and the Bradley-Terry reward-model loss against NumPy formulas."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jalign.losses import kto_loss, kto_reference_point, reward_loss

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=1e-3, atol=1e-3)}


def ls(x):
    return -np.logaddexp(0.0, -x)


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def as_pair(values, dtype):
    x = jnp.asarray(values, jnp.float32).astype(dtype)
    return x, np.asarray(x.astype(jnp.float32), np.float64)


# ---------------------------------------------------------------- KTO


def kto_batch(seed, dtype, b=10):
    rng = np.random.default_rng(seed)
    ref = -rng.uniform(5, 50, b)
    logps, np_logps = as_pair(ref + rng.normal(0, 3, b), dtype)
    ref_logps, np_ref = as_pair(ref, dtype)
    desirable = rng.random(b) < 0.6
    kl_ref = -rng.uniform(5, 50, b)
    kl_logps, np_kl = as_pair(kl_ref + rng.normal(2.0, 1.0, b), dtype)
    ref_kl, np_ref_kl = as_pair(kl_ref, dtype)
    return ((logps, ref_logps, jnp.asarray(desirable), kl_logps, ref_kl),
            (np_logps, np_ref, desirable, np_kl, np_ref_kl))


def np_kto(logps, ref, desirable, z0, beta, w_d, w_u):
    u = logps - ref
    return np.where(desirable, w_d * (1 - sig(beta * (u - z0))),
                    w_u * (1 - sig(beta * (z0 - u))))


class KtoTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(z0_from=("pairs", "given"), dtype=("float32", "bfloat16"))
    def test_against_numpy(self, z0_from, dtype):
        (lp, rp, des, kl, rkl), (n_lp, n_rp, n_des, n_kl, n_rkl) = kto_batch(1, DTYPES[dtype])
        fn = self.variant(functools.partial(kto_loss, beta=0.2, desirable_weight=1.3,
                                            undesirable_weight=0.7))
        z0 = max(0.0, (n_kl - n_rkl).mean())
        assert z0 > 0  # the batch is built so that the clamp is not what is tested here
        if z0_from == "pairs":
            losses, metrics = fn(lp, rp, des, kl_logps=kl, ref_kl_logps=rkl)
        else:
            losses, metrics = fn(lp, rp, des, kl=jnp.float32(z0))
        np.testing.assert_allclose(losses, np_kto(n_lp, n_rp, n_des, z0, 0.2, 1.3, 0.7),
                                   **TOL[dtype])
        rewards = 0.2 * (n_lp - n_rp)
        np.testing.assert_allclose(metrics["kl"], z0, **TOL[dtype])
        np.testing.assert_allclose(metrics["rewards/chosen"], rewards[n_des].mean(), **TOL[dtype])
        np.testing.assert_allclose(metrics["rewards/rejected"], rewards[~n_des].mean(),
                                   **TOL[dtype])
        np.testing.assert_allclose(metrics["logps/rejected"], n_lp[~n_des].mean(), **TOL[dtype])
        self.assertEqual(float(metrics["count/chosen"]), n_des.sum())

    @chex.variants(with_jit=True, without_jit=True)
    def test_apo_zero_unpaired(self):
        (lp, rp, des, _, _), (n_lp, n_rp, n_des, _, _) = kto_batch(2, jnp.float32)
        losses, _ = self.variant(functools.partial(kto_loss, loss_type="apo_zero_unpaired"))(
            lp, rp, des)
        u = n_lp - n_rp
        np.testing.assert_allclose(losses, np.where(n_des, 1 - sig(0.1 * u), sig(0.1 * u)),
                                   rtol=1e-5, atol=1e-6)


def test_kto_reference_point_is_clamped_and_has_no_gradient():
    kl, ref = jnp.array([-5.0, -6.0]), jnp.array([-4.0, -4.0])  # mean log-ratio -1.5 < 0
    assert float(kto_reference_point(kl, ref)) == 0.0
    lp, rp, des = jnp.array([-3.0, -4.0]), jnp.array([-3.5, -3.0]), jnp.array([True, False])
    g = jax.grad(lambda k: kto_loss(lp, rp, des, kl_logps=k, ref_kl_logps=ref)[0].sum())(
        kl + 10.0)  # positive z0: gradient would flow without the stop-gradient
    np.testing.assert_array_equal(g, 0.0)
    g_kl = jax.grad(lambda z: kto_loss(lp, rp, des, kl=z)[0].sum())(jnp.float32(2.0))
    assert float(g_kl) == 0.0


def test_kto_empty_side_and_errors():
    lp = jnp.array([-3.0, -4.0])
    losses, metrics = kto_loss(lp, lp, jnp.array([True, True]), kl=0.0)
    np.testing.assert_allclose(losses, 0.5)
    assert float(metrics["rewards/rejected"]) == 0.0 and float(metrics["count/rejected"]) == 0
    with pytest.raises(ValueError, match=r"exactly one of kl="):
        kto_loss(lp, lp, jnp.array([True, False]))
    with pytest.raises(ValueError, match=r"exactly one of kl="):
        kto_loss(lp, lp, jnp.array([True, False]), kl=0.0, kl_logps=lp, ref_kl_logps=lp)
    with pytest.raises(ValueError, match=r"both kl_logps= and ref_kl_logps="):
        kto_loss(lp, lp, jnp.array([True, False]), kl_logps=lp)
    with pytest.raises(ValueError, match=r"Unknown loss_type 'bco'.*kto, apo_zero_unpaired"):
        kto_loss(lp, lp, jnp.array([True, False]), loss_type="bco", kl=0.0)


def test_kto_large_log_ratios_finite():
    lp = jnp.array([-1e5, 0.0, -1e5, 0.0])
    ref = jnp.array([0.0, -1e5, 0.0, -1e5])
    des = jnp.array([True, True, False, False])
    value, g = jax.value_and_grad(lambda x: kto_loss(x, ref, des, kl=3.0)[0].sum())(lp)
    assert np.isfinite(value) and np.all(np.isfinite(g))


# ---------------------------------------------------------------- reward model


class RewardLossTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(with_margin=(False, True), dtype=("float32", "bfloat16"))
    def test_against_numpy(self, with_margin, dtype):
        rng = np.random.default_rng(3)
        rc, n_rc = as_pair(rng.normal(0.5, 2, 8), DTYPES[dtype])
        rr, n_rr = as_pair(rng.normal(0, 2, 8), DTYPES[dtype])
        margin = rng.uniform(0, 1, 8) if with_margin else None
        fn = self.variant(functools.partial(reward_loss, center_rewards_coefficient=0.01))
        losses, metrics = fn(rc, rr, margin=margin)
        m = margin if with_margin else 0.0
        expected = -ls(n_rc - n_rr - m) + 0.01 * (n_rc + n_rr) ** 2
        np.testing.assert_allclose(losses, expected, **TOL[dtype])
        both = np.concatenate([n_rc, n_rr])
        want = {"accuracy": (n_rc > n_rr).mean(), "margin": (n_rc - n_rr).mean(),
                "min_reward": both.min(), "mean_reward": both.mean(),
                "max_reward": both.max(), "rewards/chosen": n_rc.mean(),
                "rewards/rejected": n_rr.mean()}
        self.assertEqual(set(metrics), set(want))
        for key, value in want.items():
            chex.assert_shape(metrics[key], ())
            chex.assert_type(metrics[key], jnp.float32)
            np.testing.assert_allclose(metrics[key], value, **TOL[dtype], err_msg=key)


def test_reward_loss_gradients_and_large_gaps():
    rc, rr = jnp.array([1e4, -1e4]), jnp.array([-1e4, 1e4])
    value, (gc, gr) = jax.value_and_grad(
        lambda c, r: reward_loss(c, r)[0].sum(), argnums=(0, 1))(rc, rr)
    assert np.isfinite(value) and np.all(np.isfinite(gc)) and np.all(np.isfinite(gr))
    # The badly ranked pair pushes chosen up (negative gradient) and rejected down.
    assert gc[1] < 0 < gr[1]
    np.testing.assert_allclose(reward_loss(jnp.zeros(3), jnp.zeros(3))[0], np.log(2), rtol=1e-6)
