"""clipped_policy_loss against TRL 1.16's GRPO / GSPO / RLOO objectives, values and gradients.

The references are written out here in float64 NumPy from the papers and from what TRL 1.16
computes (GRPOTrainer._compute_loss, RLOOTrainer._compute_loss), with the gradient w.r.t. the
per-token log-probs derived by hand, so they share no code with jalign.losses.rl.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.losses.rl import clipped_policy_loss, importance_log_weights

EPS_LOW, EPS_HIGH = 0.2, 0.28


def _batch(seed, b=8, t=9, level="token"):
    rng = np.random.default_rng(seed)
    lp = rng.normal(-2.0, 0.5, size=(b, t))
    ref = lp + rng.normal(scale=0.3, size=(b, t))
    adv = rng.normal(size=b)
    adv[:2] = [1.0, -1.0]
    lengths = rng.integers(1, t + 1, size=b)
    lengths[0], lengths[1] = 1, t  # ragged, including a one-token and a full-length completion
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float64)
    # Each sequence's log-ratio drifts by a shift in [-0.7, 0.7] (per token, or spread over the
    # tokens for the summed ratio), so ratios land inside and outside the clip range.
    shift = rng.uniform(-0.7, 0.7, size=(b, 1))
    shift = shift / lengths[:, None] if level == "sequence_sum" else shift
    noise = rng.normal(scale=0.35 if level == "token" else 0.05, size=(b, t))
    old = lp - shift + noise
    return lp, old, ref, adv, mask


def _weights(mask, mode, max_len):
    """d loss / d token_loss of each aggregation (TRL GRPOTrainer's loss_type)."""
    b = mask.shape[0]
    if mode == "grpo":
        return mask / mask.sum(1, keepdims=True) / b
    if mode in ("bnpo", "dapo"):
        return mask / mask.sum()
    return mask / (b * max_len)  # dr_grpo


def _reference(lp, old, ref, adv, mask, *, level, mode, beta=0.0, bias_corr=False, dual=None):
    """(loss, d loss / d lp, per-sequence-or-token clipped flags) in float64."""
    lengths = mask.sum(1, keepdims=True)
    logr = (lp - old) * mask
    if level == "token":
        log_w, dlogw = logr, mask  # d log w_t / d lp_t (diagonal)
    elif level == "sequence":  # GSPO: mean log-ratio
        log_w, dlogw = logr.sum(1, keepdims=True) / lengths, mask / lengths
    else:  # RLOO: log pi(y) - log pi_old(y)
        log_w, dlogw = logr.sum(1, keepdims=True), mask
    r = np.exp(log_w)
    a = adv[:, None]
    pol = np.maximum(-a * r, -a * np.clip(r, 1 - EPS_LOW, 1 + EPS_HIGH))
    clipped = ((a > 0) & (r > 1 + EPS_HIGH)) | ((a < 0) & (r < 1 - EPS_LOW))
    active = ~clipped  # the unclipped term -A rho is the loss
    if dual is not None:
        capped = (a < 0) & (r > dual)
        pol = np.where(capped, -dual * a, pol)
        active &= ~capped
    dpol_dlogw = np.where(active, -a * r, 0.0)
    if dual is not None:
        assert capped.any(), "the test needs a dual-clipped ratio"
        # TRL GRPOConfig delta (INTELLECT-2): rho capped at delta in the unclipped term only.
        # The same piecewise function for delta > 1 + eps_high, hence the same gradient.
        trl = -np.minimum(np.minimum(r, dual) * a, np.clip(r, 1 - EPS_LOW, 1 + EPS_HIGH) * a)
        np.testing.assert_allclose(pol, trl, rtol=1e-12)
    w = _weights(mask, mode, lp.shape[1])
    logr_ref = ref - lp
    k3 = np.exp(logr_ref) - 1 - logr_ref
    dk3 = 1 - np.exp(logr_ref)  # d k3 / d lp
    kl_w = r if bias_corr else np.ones_like(r)
    loss = (w * (pol + beta * k3 * kl_w)).sum()
    # Chain rule: every token loss of a sequence shares a sequence-level log w.
    if level == "token":
        g_logw = w * dpol_dlogw + (beta * w * k3 * r if bias_corr else 0.0)
    else:
        g_logw = (w.sum(1, keepdims=True) * dpol_dlogw
                  + (beta * (w * k3).sum(1, keepdims=True) * r if bias_corr else 0.0))
    grad = g_logw * dlogw + beta * w * kl_w * dk3
    return loss, grad * mask, clipped


def _jalign(lp, old, ref, adv, mask, **kw):
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    fn = lambda x: clipped_policy_loss(x, f32(old), f32(adv), f32(mask), clip_eps_low=EPS_LOW,
                                       clip_eps_high=EPS_HIGH, max_completion_length=lp.shape[1],
                                       ref_logps_BxT=f32(ref), **kw)
    (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(f32(lp))
    return loss, grad, metrics


def _check(seed, *, level, mode, beta=0.0, bias_corr=False, dual=None):
    lp, old, ref, adv, mask = _batch(seed, level=level)
    want, want_grad, clipped = _reference(lp, old, ref, adv, mask, level=level, mode=mode,
                                          beta=beta, bias_corr=bias_corr, dual=dual)
    loss, grad, metrics = _jalign(lp, old, ref, adv, mask, importance_sampling_level=level,
                                  loss_aggregation=mode, kl_beta=beta,
                                  use_bias_correction_kl=bias_corr, dual_clip=dual)
    assert clipped.any() and not clipped.all(), "the test needs both clipped and free ratios"
    np.testing.assert_allclose(loss, want, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(grad, want_grad, rtol=2e-4, atol=1e-7)
    assert np.all(np.asarray(grad)[mask == 0] == 0)
    # TRL's clip_ratio/region_mean: token mean per token, sequence mean per sequence.
    want_frac = clipped.mean() if level != "token" else (clipped * mask).sum() / mask.sum()
    np.testing.assert_allclose(metrics["clip_ratio/region_mean"], want_frac, rtol=1e-6)
    assert float(metrics["policy/clipfrac_avg"]) > 0
    return loss, grad


@pytest.mark.parametrize("mode", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("bias_corr", [False, True])
def test_token_level_grpo_with_k3_kl(mode, bias_corr):
    _check(1, level="token", mode=mode, beta=0.04, bias_corr=bias_corr)


def test_bias_corrected_kl_changes_the_gradient_even_on_policy():
    # TRL: the ratio multiplying k3 is not detached, so at rho = 1 the KL gradient becomes
    # (log pi - log pi_ref) instead of 1 - pi_ref / pi.
    lp, _, ref, adv, mask = _batch(2)
    plain = _jalign(lp, lp, ref, adv, mask, kl_beta=0.1)
    corrected = _jalign(lp, lp, ref, adv, mask, kl_beta=0.1, use_bias_correction_kl=True)
    np.testing.assert_allclose(plain[0], corrected[0], rtol=1e-6)
    assert not np.allclose(plain[1], corrected[1], rtol=1e-3)
    _check(2, level="token", mode="bnpo", beta=0.1, bias_corr=True)


@pytest.mark.parametrize("mode", ["grpo", "bnpo"])
@pytest.mark.parametrize("bias_corr", [False, True])
def test_gspo_sequence_level(mode, bias_corr):
    _check(3, level="sequence", mode=mode, beta=0.04, bias_corr=bias_corr)


@pytest.mark.parametrize("mode", ["grpo", "bnpo"])
def test_rloo_sequence_probability_ratio(mode):
    _check(4, level="sequence_sum", mode=mode)


def test_rloo_equals_trl_per_sequence_mean():
    # RLOOTrainer: loss = mean_i -min(S_i A_i, clip(S_i) A_i), S_i = exp(sum_t m (lp - old)).
    lp, old, _, adv, mask = _batch(5, level="sequence_sum")
    s = np.exp(((lp - old) * mask).sum(1))
    want = np.mean(-np.minimum(s * adv, np.clip(s, 1 - EPS_LOW, 1 + EPS_HIGH) * adv))
    loss, _, metrics = _jalign(lp, old, lp, adv, mask, importance_sampling_level="sequence_sum")
    np.testing.assert_allclose(loss, want, rtol=2e-5)
    low = ((s < 1 - EPS_LOW) & (adv < 0)).mean()
    np.testing.assert_allclose(metrics["clip_ratio/low_mean"], low, rtol=1e-6)


@pytest.mark.parametrize("level", ["token", "sequence", "sequence_sum"])
def test_dual_clip_with_every_level(level):
    _check(6, level=level, mode="grpo", dual=1.5)


def test_sequence_mean_and_sum_agree_on_policy_but_gradients_differ_by_length():
    lp, _, _, adv, mask = _batch(7)
    _, g_mean, _ = _jalign(lp, lp, lp, adv, mask, importance_sampling_level="sequence")
    l_sum, g_sum, _ = _jalign(lp, lp, lp, adv, mask, importance_sampling_level="sequence_sum")
    l_mean, _, _ = _jalign(lp, lp, lp, adv, mask, importance_sampling_level="sequence")
    np.testing.assert_allclose(l_mean, l_sum, rtol=1e-6)
    np.testing.assert_allclose(g_sum, g_mean * mask.sum(1, keepdims=True), rtol=1e-5, atol=1e-8)


def test_masked_tokens_get_no_gradient_even_at_minus_inf():
    lp, old, ref, adv, mask = _batch(8)
    lp = np.where(mask > 0, lp, -np.inf)
    for level in ("token", "sequence", "sequence_sum"):
        loss, grad, _ = _jalign(lp, old, ref, adv, mask, importance_sampling_level=level,
                                kl_beta=0.04, use_bias_correction_kl=True)
        assert np.isfinite(float(loss)) and np.all(np.isfinite(grad))
        assert np.all(np.asarray(grad)[mask == 0] == 0)


def test_importance_log_weights_and_the_deprecated_flag():
    lp, old, _, adv, mask = _batch(9)
    logr = (lp - old) * mask
    np.testing.assert_allclose(importance_log_weights(lp, old, mask, level="sequence_sum")[:, 0],
                               logr.sum(1), rtol=1e-5)
    np.testing.assert_allclose(importance_log_weights(lp, old, mask, level="sequence")[:, 0],
                               logr.sum(1) / mask.sum(1), rtol=1e-5)
    with pytest.raises(ValueError, match="importance_sampling_level must be one of"):
        importance_log_weights(lp, old, mask, level="sentence")
    with pytest.warns(DeprecationWarning, match="sequence_level_ratio"):
        old_way = _jalign(lp, old, lp, adv, mask, sequence_level_ratio=True)
    new_way = _jalign(lp, old, lp, adv, mask, importance_sampling_level="sequence")
    np.testing.assert_array_equal(old_way[0], new_way[0])
    np.testing.assert_array_equal(old_way[1], new_way[1])
    with pytest.raises(ValueError, match="contradicts"):
        _jalign(lp, old, lp, adv, mask, sequence_level_ratio=True,
                importance_sampling_level="sequence_sum")
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        _jalign(lp, old, lp, adv, mask, dual_clip=0.9)
