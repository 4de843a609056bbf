"""Online-RL objectives as pure functions of per-token log-probs: GRPO family, RLOO, PPO.

Shapes: per-token arrays are [B, T] with a completion mask [B, T]; per-sequence
arrays are [B]. Groups (several completions of one prompt) are contiguous:
rewards [num_prompts * group_size] reshape to [num_prompts, group_size].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ADVANTAGE_SCALES = ("group", "batch", "none")
LOSS_AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")
KL_ESTIMATORS = ("k1", "k2", "k3")


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


def clipped_policy_loss(logps_BxT, old_logps_BxT, advantages_B, mask_BxT, *,
                        clip_eps_low: float = 0.2, clip_eps_high: float | None = None,
                        dual_clip: float | None = None, loss_aggregation: str = "grpo",
                        max_completion_length: int | None = None, ref_logps_BxT=None,
                        kl_beta: float = 0.0, kl_estimator: str = "k3",
                        sequence_level_ratio: bool = False):
    """PPO / GRPO clipped surrogate with an optional KL term; returns (loss, metrics).

    Schulman et al. 2017 (PPO, arXiv:1707.06347); GRPO (arXiv:2402.03300); DAPO
    clip-higher (Yu et al. 2025, arXiv:2503.14476): rho = exp(logp - logp_old),
        token loss = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + kl_beta * KL_t.
    dual_clip = c (> 1) bounds the loss of negative advantages by -c A (Ye et al. 2020).
    sequence_level_ratio uses exp(mean_t log-ratio) per sequence (GSPO, arXiv:2507.18071).
    Metrics: policy/clipfrac_avg, policy/approxkl_avg (0.5 mean logratio^2), objective/kl.
    """
    clip_eps_high = clip_eps_low if clip_eps_high is None else clip_eps_high
    mask = mask_BxT.astype(jnp.float32)
    logratio = jnp.where(mask > 0, logps_BxT - old_logps_BxT, 0.0)
    if sequence_level_ratio:
        seq = logratio.sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
        logratio = jnp.where(mask > 0, jnp.broadcast_to(seq[:, None], logratio.shape), 0.0)
    ratio = jnp.exp(jnp.clip(logratio, -20.0, 20.0))
    adv = jnp.asarray(advantages_B, jnp.float32)
    adv = adv if adv.ndim == 2 else adv[:, None]  # per-sequence [B] (GRPO) or per-token [B, T] (PPO)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    token_loss = jnp.maximum(unclipped, clipped)
    if dual_clip is not None:
        token_loss = jnp.where(adv < 0, jnp.minimum(token_loss, -dual_clip * adv), token_loss)
    metrics = {}
    if ref_logps_BxT is not None:
        kl = kl_estimate(logps_BxT, ref_logps_BxT, estimator=kl_estimator)
        token_loss = token_loss + kl_beta * kl
        metrics["objective/kl"] = aggregate(kl, mask, mode="bnpo")
    loss = aggregate(token_loss, mask, mode=loss_aggregation,
                     max_completion_length=max_completion_length)
    clipped_frac = (clipped > unclipped).astype(jnp.float32)
    metrics["policy/clipfrac_avg"] = aggregate(clipped_frac, mask, mode="bnpo")
    metrics["policy/approxkl_avg"] = aggregate(0.5 * jnp.square(logratio), mask, mode="bnpo")
    return loss, metrics


def gae_advantages(rewards_BxT, values_BxT, mask_BxT, *, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over the completion tokens (Schulman et al. 2016).

    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, with V and A
    zero past the last completion token. Returns (advantages, returns = A + V), [B, T],
    zero on masked positions. Tokens are contiguous from the first masked-in position.
    """
    m = mask_BxT.astype(jnp.float32)
    r = jnp.where(m > 0, rewards_BxT, 0.0)
    v = jnp.where(m > 0, values_BxT, 0.0)
    next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
    next_m = jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1)
    delta = r + gamma * next_v * next_m - v

    def back(carry, xs):
        d, nm = xs
        a = d + gamma * lam * carry * nm
        return a, a

    _, adv = jax.lax.scan(back, jnp.zeros(r.shape[0]), (delta.T[::-1], next_m.T[::-1]))
    adv = adv[::-1].T * m
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
