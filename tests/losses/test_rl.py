"""GRPO / RLOO / PPO objectives against independent NumPy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.losses.rl import (aggregate, clipped_policy_loss, group_advantages, kl_estimate,
                              rloo_advantages)

RNG = np.random.default_rng(0)


def test_group_advantages_match_numpy():
    r = RNG.normal(size=12).astype(np.float32)
    g = r.reshape(3, 4)
    want = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)).ravel()
    np.testing.assert_allclose(group_advantages(r, 4), want, rtol=1e-5)
    np.testing.assert_allclose(group_advantages(r, 4, scale="none"),
                               (g - g.mean(1, keepdims=True)).ravel(), rtol=1e-5)
    np.testing.assert_allclose(group_advantages(r, 4, scale="batch"),
                               (g - g.mean(1, keepdims=True)).ravel() / (r.std(ddof=1) + 1e-4),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(r, 4, scale="prompt")


def test_rloo_is_leave_one_out():
    r = np.array([1.0, 2.0, 3.0, 10.0, 0.0, 2.0], np.float32)
    want = [1 - 2.5, 2 - 2.0, 3 - 1.5, 10 - 1.0, 0 - 6.0, 2 - 5.0]
    np.testing.assert_allclose(rloo_advantages(r, 3), want, rtol=1e-6)


def test_kl_estimators():
    lp = RNG.normal(size=(2, 5)).astype(np.float32)
    ref = RNG.normal(size=(2, 5)).astype(np.float32)
    logr = ref - lp
    np.testing.assert_allclose(kl_estimate(lp, ref, estimator="k1"), -logr, rtol=1e-6)
    np.testing.assert_allclose(kl_estimate(lp, ref, estimator="k2"), 0.5 * logr ** 2, rtol=1e-6)
    np.testing.assert_allclose(kl_estimate(lp, ref, estimator="k3"), np.exp(logr) - 1 - logr,
                               rtol=1e-5)


def _numpy_loss(lp, old, adv, mask, eps_lo, eps_hi, mode, max_len, kl_beta=0.0, ref=None):
    ratio = np.exp(lp - old)
    tok = np.maximum(-adv[:, None] * ratio, -adv[:, None] * np.clip(ratio, 1 - eps_lo, 1 + eps_hi))
    if kl_beta:
        tok = tok + kl_beta * (np.exp(ref - lp) - 1 - (ref - lp))
    tok = tok * mask
    if mode == "grpo":
        return np.mean(tok.sum(1) / mask.sum(1))
    if mode in ("bnpo", "dapo"):
        return tok.sum() / mask.sum()
    return tok.sum() / (lp.shape[0] * max_len)


@pytest.mark.parametrize("mode", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("jit", [False, True])
def test_clipped_policy_loss_matches_numpy(mode, jit):
    b, t = 4, 7
    lp = RNG.normal(scale=0.3, size=(b, t)).astype(np.float32) - 2
    old = lp + RNG.normal(scale=0.3, size=(b, t)).astype(np.float32)
    ref = lp + RNG.normal(scale=0.3, size=(b, t)).astype(np.float32)
    adv = RNG.normal(size=b).astype(np.float32)
    mask = (RNG.random((b, t)) > 0.3).astype(np.float32)
    mask[:, 0] = 1
    fn = lambda *a: clipped_policy_loss(*a, clip_eps_low=0.2, clip_eps_high=0.28,
                                        loss_aggregation=mode, max_completion_length=t,
                                        ref_logps_BxT=ref, kl_beta=0.04)
    fn = jax.jit(fn) if jit else fn
    loss, metrics = fn(lp, old, adv, mask)
    want = _numpy_loss(lp, old, adv, mask, 0.2, 0.28, mode, t, kl_beta=0.04, ref=ref)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert 0 <= float(metrics["policy/clipfrac_avg"]) <= 1


def test_ratio_one_gives_the_policy_gradient_and_masked_tokens_no_gradient():
    b, t = 3, 5
    lp = jnp.asarray(RNG.normal(size=(b, t)), jnp.float32)
    adv = jnp.asarray([1.0, -2.0, 0.5])
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], jnp.float32)
    grad = jax.grad(lambda x: clipped_policy_loss(x, jax.lax.stop_gradient(x), adv, mask,
                                                  loss_aggregation="bnpo")[0])(lp)
    # d/dlogp of -A * exp(logp - sg(logp)) at ratio 1 is -A, averaged over masked tokens.
    want = np.where(mask > 0, -np.asarray(adv)[:, None] / float(mask.sum()), 0.0)
    np.testing.assert_allclose(grad, want, rtol=1e-6)
    assert np.all(np.asarray(grad)[np.asarray(mask) == 0] == 0)


def test_dual_clip_bounds_negative_advantage_loss():
    lp = jnp.asarray([[3.0]])  # ratio e^3 ~ 20
    loss, _ = clipped_policy_loss(lp, jnp.zeros((1, 1)), jnp.asarray([-1.0]), jnp.ones((1, 1)),
                                  dual_clip=3.0, loss_aggregation="bnpo")
    np.testing.assert_allclose(loss, 3.0, rtol=1e-6)


def test_aggregate_rejects_unknown_mode():
    with pytest.raises(ValueError, match="loss aggregation must be one of"):
        aggregate(jnp.ones((1, 2)), jnp.ones((1, 2)), mode="token")


def test_gae_matches_a_python_loop():
    from jalign.losses.rl import gae_advantages
    b, t = 2, 6
    r = RNG.normal(size=(b, t)).astype(np.float32)
    v = RNG.normal(size=(b, t)).astype(np.float32)
    mask = np.array([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]], np.float32)
    adv, ret = gae_advantages(r, v, mask, gamma=0.9, lam=0.8)
    want = np.zeros((b, t), np.float32)
    for i in range(b):
        a = 0.0
        for j in reversed(range(t)):
            if not mask[i, j]:
                a = 0.0
                continue
            nv = v[i, j + 1] if j + 1 < t and mask[i, j + 1] else 0.0
            delta = r[i, j] + 0.9 * nv - v[i, j]
            a = delta + 0.9 * 0.8 * a
            want[i, j] = a
    np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, (want + v) * mask, rtol=1e-5, atol=1e-6)


def test_gae_skips_observation_tokens_between_turns():
    """A multi-turn episode's generated tokens with observations between them: GAE over
    them equals GAE over the same tokens laid out contiguously (one turn's last token
    bootstraps from the next turn's first), and the observation positions get zeros."""
    from jalign.losses.rl import gae_advantages
    t = 10
    r = RNG.normal(size=(1, t)).astype(np.float32)
    v = RNG.normal(size=(1, t)).astype(np.float32)
    mask = np.array([[0, 1, 1, 0, 0, 0, 1, 1, 1, 0]], np.float32)
    adv, ret = gae_advantages(r, v, mask, gamma=0.9, lam=0.8)
    keep = mask[0] > 0
    packed = lambda x: np.pad(x[:, keep], ((0, 0), (0, t - keep.sum())))  # noqa: E731
    want_adv, want_ret = gae_advantages(packed(r), packed(v), packed(mask), gamma=0.9, lam=0.8)
    np.testing.assert_allclose(np.asarray(adv)[:, keep], np.asarray(want_adv)[:, :keep.sum()],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ret)[:, keep], np.asarray(want_ret)[:, :keep.sum()],
                               rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(adv)[:, ~keep] == 0) and np.all(np.asarray(ret)[:, ~keep] == 0)
    # The first turn's advantages see the second turn's rewards.
    r2 = r.copy()
    r2[0, 8] += 1.0
    assert gae_advantages(r2, v, mask, gamma=0.9, lam=0.8)[0][0, 1] != adv[0, 1]


def test_clipped_value_loss_and_whiten():
    from jalign.losses.rl import clipped_value_loss, whiten
    v = np.array([[1.0, 2.0, 0.0]], np.float32)
    old = np.array([[0.0, 2.1, 0.0]], np.float32)
    ret = np.array([[2.0, 2.0, 5.0]], np.float32)
    mask = np.array([[1, 1, 0]], np.float32)
    loss, m = clipped_value_loss(v, old, ret, mask, clip=0.2)
    # token 0: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 3.24 (clipped);
    # token 1: V - V_old = -0.1 is inside the clip, both terms are 0.
    np.testing.assert_allclose(loss, 0.5 * 3.24 / 2, rtol=1e-5)
    np.testing.assert_allclose(m["val/clipfrac_avg"], 0.5)
    w = np.asarray(whiten(jnp.asarray(RNG.normal(size=(3, 4)), jnp.float32), jnp.ones((3, 4))))
    np.testing.assert_allclose([w.mean(), w.std()], [0.0, 1.0], atol=1e-5)
