"""Online-RL objectives as pure functions of per-token log-probs: GRPO family (GSPO), RLOO, PPO.

Shapes: per-token arrays are [B, T] with a completion mask [B, T]; per-sequence
arrays are [B]. Groups (several completions of one prompt) are contiguous:
rewards [num_prompts * group_size] reshape to [num_prompts, group_size].
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

ADVANTAGE_SCALES = ("group", "batch", "none")
LOSS_AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "sequence_sum")


def group_advantages(rewards_B, group_size: int, *, scale: str = "group", eps: float = 1e-4):
    """GRPO advantages: reward minus its group mean, optionally divided by a std.

    Shao et al. 2024 (DeepSeekMath, arXiv:2402.03300): A_i = (r_i - mean_g r) / (std_g r + eps).
    scale="group" divides by the group std, "batch" by the batch std, "none" not at all
    (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    r = jnp.asarray(rewards_B, jnp.float32)
    if r.shape[0] % group_size:
        raise ValueError(f"{r.shape[0]} rewards do not split into groups of {group_size}")
    grouped = r.reshape(-1, group_size)
    centred = (grouped - grouped.mean(axis=1, keepdims=True)).reshape(-1)
    if scale == "group":
        std = jnp.repeat(grouped.std(axis=1, ddof=1) if group_size > 1 else jnp.zeros(grouped.shape[0]),
                         group_size)
        return centred / (std + eps)
    if scale == "batch":
        return centred / (r.std(ddof=1) + eps)
    return centred


def rloo_advantages(rewards_B, group_size: int):
    """REINFORCE leave-one-out: A_i = r_i - mean_{j != i} r_j within each group.

    Ahmadian et al. 2024, "Back to Basics" (arXiv:2402.14740).
    """
    if group_size < 2:
        raise ValueError("RLOO needs group_size >= 2")
    grouped = jnp.asarray(rewards_B, jnp.float32).reshape(-1, group_size)
    others = (grouped.sum(axis=1, keepdims=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(-1)


def kl_estimate(logps_BxT, ref_logps_BxT, *, estimator: str = "k3"):
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3).

    With logr = log pi_ref - log pi: k1 = -logr, k2 = logr^2 / 2, k3 = exp(logr) - 1 - logr.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    logr = ref_logps_BxT - logps_BxT
    if estimator == "k1":
        return -logr
    if estimator == "k2":
        return 0.5 * jnp.square(logr)
    # Clamp before exp: a masked or far-off token must not overflow to inf.
    logr = jnp.clip(logr, -20.0, 20.0)
    return jnp.exp(logr) - 1.0 - logr


def aggregate(values_BxT, mask_BxT, *, mode: str, max_completion_length: int | None = None):
    """Token losses -> scalar, named as in TRL's GRPOTrainer `loss_type`.

    grpo: mean over sequences of each sequence's token mean; bnpo / dapo: token mean
    over the batch; dr_grpo: token sum / (num sequences * max_completion_length).
    """
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss aggregation must be one of {LOSS_AGGREGATIONS}, got {mode!r}")
    m = mask_BxT.astype(jnp.float32)
    v = jnp.where(m > 0, values_BxT, 0.0)
    if mode == "grpo":
        return jnp.mean(v.sum(-1) / jnp.maximum(m.sum(-1), 1.0))
    if mode in ("bnpo", "dapo"):
        return v.sum() / jnp.maximum(m.sum(), 1.0)
    if max_completion_length is None:
        raise ValueError("dr_grpo aggregation needs max_completion_length")
    return v.sum() / (values_BxT.shape[0] * max_completion_length)


def importance_log_weights(logps_BxT, old_logps_BxT, mask_BxT, *, level: str = "token"):
    """log rho, the log importance ratio pi / pi_old: [B, T] per token or [B, 1] per sequence.

    level="token": log pi(y_t) - log pi_old(y_t) (PPO / GRPO).
    level="sequence": the masked mean over the completion tokens (GSPO, Zheng et al. 2025,
        arXiv:2507.18071), so rho_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|); the gradient reaches
        each token through the mean, 1/|y_i| of the token-level one.
    level="sequence_sum": the masked sum, rho_i = pi(y_i) / pi_old(y_i), the sequence-probability
        ratio TRL 1.16's RLOOTrainer clips (no 1/|y_i| on the gradient).
    Masked tokens contribute zero (and get zero gradient).
    """
    if level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                         f"got {level!r}")
    mask = mask_BxT.astype(jnp.float32)
    logratio = jnp.where(mask > 0, logps_BxT - old_logps_BxT, 0.0)
    if level == "token":
        return logratio
    total = logratio.sum(-1, keepdims=True)
    if level == "sequence_sum":
        return total
    return total / jnp.maximum(mask.sum(-1, keepdims=True), 1.0)


def _resolve_level(importance_sampling_level: str, sequence_level_ratio: bool | None) -> str:
    if sequence_level_ratio is None:
        return importance_sampling_level
    warnings.warn("clipped_policy_loss(sequence_level_ratio=...) is deprecated: pass "
                  "importance_sampling_level='sequence' (GSPO's exp(mean log-ratio), what "
                  "sequence_level_ratio=True computed) or 'sequence_sum' (TRL RLOO's "
                  "exp(sum log-ratio))", DeprecationWarning, stacklevel=3)
    if not sequence_level_ratio:
        return importance_sampling_level
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError("sequence_level_ratio=True means importance_sampling_level='sequence', "
                         f"which contradicts {importance_sampling_level!r}")
    return "sequence"


def _trl_clip_mean(flags, mask):
    # TRL's clip_ratio/* average: over sequences when there is one ratio per sequence,
    # over completion tokens otherwise.
    if flags.shape[1] == 1:
        return jnp.mean(flags)
    return aggregate(jnp.broadcast_to(flags, mask.shape), mask, mode="bnpo")


def clipped_policy_loss(logps_BxT, old_logps_BxT, advantages_B, mask_BxT, *,
                        clip_eps_low: float = 0.2, clip_eps_high: float | None = None,
                        dual_clip: float | None = None, importance_sampling_level: str = "token",
                        loss_aggregation: str = "grpo", max_completion_length: int | None = None,
                        ref_logps_BxT=None, kl_beta: float = 0.0, kl_estimator: str = "k3",
                        use_bias_correction_kl: bool = False,
                        sequence_level_ratio: bool | None = None):
    """PPO / GRPO / GSPO / RLOO clipped surrogate with an optional KL term; returns (loss, metrics).

    Schulman et al. 2017 (PPO, arXiv:1707.06347); GRPO (arXiv:2402.03300); DAPO clip-higher
    (Yu et al. 2025, arXiv:2503.14476). With rho = exp(log w) from `importance_log_weights`
    at `importance_sampling_level` ("token"; "sequence": GSPO, arXiv:2507.18071;
    "sequence_sum": TRL RLOO's sequence-probability ratio; a sequence ratio is broadcast to
    the sequence's tokens):
        token loss = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + kl_beta * KL_t.
    dual_clip = c > 1 bounds the loss of negative advantages by -c A (Ye et al. 2020,
    arXiv:1912.09729); for c > 1 + eps_high it equals TRL GRPO's `delta` (INTELLECT-2).
    KL_t is `kl_estimate(estimator=kl_estimator)`; use_bias_correction_kl multiplies it by rho
    (no stop-gradient), which makes k3's gradient rho (log pi - log pi_ref), the unbiased
    reverse-KL gradient (DeepSeek-V3.2, arXiv:2512.02556; TRL GRPOConfig's
    use_bias_correction_kl, default True there). Log-ratios are capped at +-20 before exp.
    `loss_aggregation` as in `aggregate`. `sequence_level_ratio` is deprecated
    (True = importance_sampling_level="sequence").
    Metrics: policy/clipfrac_avg and policy/approxkl_avg (0.5 mean log w^2), token means;
    TRL's clip_ratio/low_mean, clip_ratio/high_mean, clip_ratio/region_mean (sequence means
    at a sequence level); objective/kl (the KL term as it enters the loss, token mean).
    """
    level = _resolve_level(importance_sampling_level, sequence_level_ratio)
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (it bounds -A rho for A < 0), got {dual_clip!r}")
    if kl_beta and ref_logps_BxT is None:
        raise ValueError("kl_beta != 0 needs ref_logps_BxT")
    clip_eps_high = clip_eps_low if clip_eps_high is None else clip_eps_high
    mask = mask_BxT.astype(jnp.float32)
    log_w = importance_log_weights(logps_BxT, old_logps_BxT, mask, level=level)
    ratio = jnp.exp(jnp.clip(log_w, -20.0, 20.0))  # [B, T] or [B, 1]
    adv = jnp.asarray(advantages_B, jnp.float32)
    adv = adv if adv.ndim == 2 else adv[:, None]  # per-sequence [B] (GRPO) or per-token [B, T] (PPO)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    token_loss = jnp.maximum(unclipped, clipped)
    if dual_clip is not None:
        token_loss = jnp.where(adv < 0, jnp.minimum(token_loss, -dual_clip * adv), token_loss)
    token_loss = jnp.broadcast_to(token_loss, mask.shape)
    metrics = {}
    if ref_logps_BxT is not None:
        kl = kl_estimate(logps_BxT, ref_logps_BxT, estimator=kl_estimator)
        if use_bias_correction_kl:
            kl = kl * ratio
        token_loss = token_loss + kl_beta * kl
        metrics["objective/kl"] = aggregate(kl, mask, mode="bnpo")
    loss = aggregate(token_loss, mask, mode=loss_aggregation,
                     max_completion_length=max_completion_length)
    clipped_frac = jnp.broadcast_to((clipped > unclipped).astype(jnp.float32), mask.shape)
    metrics["policy/clipfrac_avg"] = aggregate(clipped_frac, mask, mode="bnpo")
    metrics["policy/approxkl_avg"] = aggregate(
        jnp.broadcast_to(0.5 * jnp.square(log_w), mask.shape), mask, mode="bnpo")
    low = ((ratio < 1.0 - clip_eps_low) & (adv < 0)).astype(jnp.float32)
    high = ((ratio > 1.0 + clip_eps_high) & (adv > 0)).astype(jnp.float32)
    metrics["clip_ratio/low_mean"] = _trl_clip_mean(low, mask)
    metrics["clip_ratio/high_mean"] = _trl_clip_mean(high, mask)
    metrics["clip_ratio/region_mean"] = _trl_clip_mean(jnp.maximum(low, high), mask)
    return loss, metrics


def gae_advantages(rewards_BxT, values_BxT, mask_BxT, *, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over the completion tokens (Schulman et al. 2016).

    delta_t = r_t + gamma V_{t'} - V_t, A_t = delta_t + gamma lam A_{t'}, where t' is the
    next masked-in (generated) token after t and V, A are zero past the last one. Tokens
    between two generated ones (a multi-turn episode's observations) are skipped: one
    policy turn's last token bootstraps from the next turn's first. Returns (advantages,
    returns = A + V), [B, T], zero on masked positions.
    """
    m = mask_BxT.astype(jnp.float32)
    r = jnp.where(m > 0, rewards_BxT, 0.0)
    v = jnp.where(m > 0, values_BxT, 0.0)

    def back(carry, xs):
        next_v, next_a = carry
        r_t, v_t, m_t = xs
        a = r_t + gamma * next_v - v_t + gamma * lam * next_a
        keep = m_t > 0
        return (jnp.where(keep, v_t, next_v), jnp.where(keep, a, next_a)), jnp.where(keep, a, 0.0)

    zeros = jnp.zeros(r.shape[0])
    _, adv = jax.lax.scan(back, (zeros, zeros), (r.T[::-1], v.T[::-1], m.T[::-1]))
    adv = adv[::-1].T
    return adv, (adv + v) * m


def whiten(values_BxT, mask_BxT, *, shift_mean: bool = True, eps: float = 1e-8):
    """Normalises masked values to unit variance (and zero mean), as PPO does with advantages."""
    m = mask_BxT.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    mean = (values_BxT * m).sum() / n
    var = (jnp.square(values_BxT - mean) * m).sum() / n
    out = (values_BxT - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def clipped_value_loss(values_BxT, old_values_BxT, returns_BxT, mask_BxT, *, clip: float = 0.2):
    """0.5 * mean(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)); returns (loss, metrics)."""
    clipped = old_values_BxT + jnp.clip(values_BxT - old_values_BxT, -clip, clip)
    unclipped_sq = jnp.square(values_BxT - returns_BxT)
    clipped_sq = jnp.square(clipped - returns_BxT)
    loss = 0.5 * aggregate(jnp.maximum(unclipped_sq, clipped_sq), mask_BxT, mode="bnpo")
    frac = aggregate((clipped_sq > unclipped_sq).astype(jnp.float32), mask_BxT, mode="bnpo")
    return loss, {"val/clipfrac_avg": frac}
