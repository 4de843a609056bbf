"""DPO and its TRL loss_type variants, f-divergence scores, R-DPO, WPO and LD-DPO helpers.

Notation used in the docstrings: u_c = log pi(y_c) - log pi_ref(y_c) and u_r likewise
(per-sequence summed completion log-probs), s(.) the f-divergence score, D = s(u_c) - s(u_r),
z = beta D, eps = label_smoothing, ls = log-sigmoid, L_c, L_r completion token counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import math

import jax
import jax.numpy as jnp

from jalign.losses._common import (EXP_CAP, as_name_tuple, check_choice, f32,
                                   preference_metrics, real_rows, resolve_chosen_nll,
                                   safe_lengths)
from jalign.losses.tokens import masked_mean, sequence_lengths

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
              "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
              "sigmoid_norm")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# Loss types built on D = s(u_c) - s(u_r); the others reject a non-default f-divergence.
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust",
                           "discopop", "sft")
LENGTH_NORMALISED_LOSS_TYPES = ("ipo", "sigmoid_norm")
# Sorting the batch would pair a weight with another example's loss.
_UNWEIGHTABLE_LOSS_TYPES = ("aot", "aot_unpaired")


def _f_divergence_parts(logratios_B, f_divergence: str, f_alpha: float):
    """(s0(u), c): the score f'(e^u) split into a u-dependent part and its constant c."""
    u = f32(logratios_B)
    if f_divergence == "forward_kl":
        return -jnp.exp(jnp.minimum(-u, EXP_CAP)), 1.0
    if f_divergence == "js_divergence":
        return jax.nn.log_sigmoid(u), math.log(2.0)
    if f_divergence == "alpha_divergence" and abs(f_alpha - 1.0) >= 1e-6:
        scale = 1.0 / (f_alpha - 1.0)
        return jnp.exp(jnp.minimum((f_alpha - 1.0) * u, EXP_CAP)) * scale, -scale
    return u, 0.0


def f_divergence_scores(logratios_B, *, f_divergence: str = "reverse_kl",
                        f_alpha: float = 0.5) -> jax.Array:
    """The f-DPO score s(u) = f'(pi/pi_ref) of a policy/reference log-ratio u (TRL 1.16).

    Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization
    with Diverse Divergence Constraints" (arXiv:2309.16240): DPO's log-ratio becomes
    f'(pi/pi_ref), constants included, as TRL 1.16 computes it:

        reverse_kl        s(u) = u
        forward_kl        s(u) = 1 - exp(-u)
        js_divergence     s(u) = log 2 + log sigmoid(u)
        alpha_divergence  s(u) = (exp((a - 1) u) - 1) / (a - 1),   a = f_alpha (a = 1: reverse_kl)

    The constants cancel in D = s(u_c) - s(u_r), so `dpo_loss` leaves them out there
    (no float32 round-off from adding then subtracting them); they do not cancel in the
    length-normalised s(u_c)/L_c - s(u_r)/L_r of ipo and sigmoid_norm, which keep them.
    Exponents are capped at 80 so that the score stays finite in float32 (TRL caps the
    alpha-divergence exponent the same way).
    """
    check_choice("f_divergence", f_divergence, F_DIVERGENCES)
    s0, constant = _f_divergence_parts(logratios_B, f_divergence, f_alpha)
    return s0 + constant


class _Pair(NamedTuple):
    logps_c: jax.Array
    logps_r: jax.Array
    ref_c: jax.Array
    ref_r: jax.Array
    u_c: jax.Array
    u_r: jax.Array
    s_c: jax.Array  # scores without their constant (it cancels in s_c - s_r)
    s_r: jax.Array
    s_constant: float  # the f-divergence's additive constant, for length-normalised losses
    len_c: jax.Array | None
    len_r: jax.Array | None
    nll: jax.Array | None
    mask: jax.Array | None


def _smoothed_sigmoid(z, eps):
    return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def _normalised_delta(p: _Pair):
    """s(u_c)/L_c - s(u_r)/L_r with the full scores: the constant c adds c (1/L_c - 1/L_r)."""
    return (p.s_c + p.s_constant) / p.len_c - (p.s_r + p.s_constant) / p.len_r


def _sorted_gap(a_B, b_B, mask_B):
    """AOT's quantile matching: the k-th smallest a minus the k-th smallest b.

    With a mask, real rows are matched among themselves and filler rows among
    themselves (two-key sort, real first), and the gap of rank k is stored at the row of
    the k-th real a. The real rows thus hold exactly the gaps of the real-only batch (in
    another order; the batch mean does not see the order) and filler rows hold filler.
    """
    if mask_B is None:
        return jnp.sort(a_B) - jnp.sort(b_B)
    filler_B = jnp.logical_not(mask_B)
    order_a = jnp.lexsort((a_B, filler_B))
    order_b = jnp.lexsort((b_B, filler_B))
    gap_sorted = a_B[order_a] - b_B[order_b]
    return jnp.zeros_like(gap_sorted).at[order_a].set(gap_sorted)


def _per_pair_loss(name: str, p: _Pair, *, beta: float, eps: float, discopop_tau: float):
    z = beta * (p.s_c - p.s_r)
    if name == "sigmoid":
        return -jax.nn.log_sigmoid(z)
    if name == "hinge":
        return jax.nn.relu(1.0 - z)
    if name == "ipo":
        # TRL normalises IPO by length (agreed with the IPO authors); Eq. 17 of the paper.
        return (_normalised_delta(p) - 1.0 / (2.0 * beta)) ** 2
    if name == "sigmoid_norm":
        return -jax.nn.log_sigmoid(beta * _normalised_delta(p))
    if name == "exo_pair":
        return (jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - jnp.log1p(-eps))
                + jax.nn.sigmoid(-z) * (jax.nn.log_sigmoid(-z) - jnp.log(eps)))
    if name == "nca_pair":
        zc, zr = beta * p.u_c, beta * p.u_r
        return (-jax.nn.log_sigmoid(zc) - 0.5 * jax.nn.log_sigmoid(-zc)
                - 0.5 * jax.nn.log_sigmoid(-zr))
    if name == "robust":
        return (-(1.0 - eps) * jax.nn.log_sigmoid(z)
                + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)
    if name == "bco_pair":
        return -jax.nn.log_sigmoid(beta * p.u_c) - jax.nn.log_sigmoid(-beta * p.u_r)
    if name == "sppo_hard":
        return (p.u_c - 0.5 / beta) ** 2 + (p.u_r + 0.5 / beta) ** 2
    if name == "aot":
        d = _sorted_gap(p.logps_c - p.logps_r, p.ref_c - p.ref_r, p.mask)
        return _smoothed_sigmoid(beta * d, eps)
    if name == "aot_unpaired":
        d = _sorted_gap(p.u_c, p.u_r, p.mask)
        return _smoothed_sigmoid(beta * d, eps)
    if name == "apo_zero":
        return jax.nn.sigmoid(-beta * p.u_c) + jax.nn.sigmoid(beta * p.u_r)
    if name == "apo_down":
        return jax.nn.sigmoid(beta * p.u_c) + jax.nn.sigmoid(-beta * (p.u_c - p.u_r))
    if name == "discopop":
        # m e^{-z} written as exp(log m - z): the product of sigma(z/tau) -> 0 and
        # e^{-z} -> inf would be 0 * inf = NaN at large negative margins.
        log_m = jax.nn.log_sigmoid(z / discopop_tau)
        one_minus_m = jax.nn.sigmoid(-z / discopop_tau)
        return -jax.nn.log_sigmoid(z) * one_minus_m + jnp.exp(log_m - z)
    if name == "sft":
        return p.nll
    raise AssertionError(name)  # unreachable: names are validated first


def _validate(loss_types, loss_weights, *, f_divergence, label_smoothing, weights,
              chosen_lengths, rejected_lengths, chosen_nll_given):
    if not loss_types:
        raise ValueError(f"loss_type is empty; valid choices are: {', '.join(LOSS_TYPES)}.")
    for name in loss_types:
        check_choice("loss_type", name, LOSS_TYPES)
    check_choice("f_divergence", f_divergence, F_DIVERGENCES)
    if loss_weights is None:
        loss_weights = (1.0,) * len(loss_types)
    loss_weights = tuple(loss_weights)
    if len(loss_weights) != len(loss_types):
        raise ValueError(f"loss_weights has {len(loss_weights)} entries but loss_type has "
                         f"{len(loss_types)} ({', '.join(loss_types)}); give one weight per "
                         "loss type.")
    if f_divergence != "reverse_kl":
        bad = [n for n in loss_types if n not in F_DIVERGENCE_LOSS_TYPES]
        if bad:
            raise ValueError(f"f_divergence={f_divergence!r} is not supported by loss_type "
                             f"{', '.join(bad)}; the f-divergence losses are: "
                             f"{', '.join(F_DIVERGENCE_LOSS_TYPES)} (or use "
                             "f_divergence='reverse_kl').")
    if "exo_pair" in loss_types and not 0.0 < label_smoothing < 1.0:
        raise ValueError("loss_type 'exo_pair' needs 0 < label_smoothing < 1 (the EXO paper "
                         f"suggests 1e-3); got {label_smoothing}.")
    if "robust" in loss_types and not 0.0 <= label_smoothing < 0.5:
        raise ValueError("loss_type 'robust' needs 0 <= label_smoothing < 0.5; got "
                         f"{label_smoothing}.")
    needs_lengths = [n for n in loss_types if n in LENGTH_NORMALISED_LOSS_TYPES]
    if needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss_type {', '.join(needs_lengths)} is length-normalised: pass "
                         "chosen_lengths= and rejected_lengths= (completion token counts). "
                         f"Length-normalised loss types: "
                         f"{', '.join(LENGTH_NORMALISED_LOSS_TYPES)}.")
    if "sft" in loss_types and chosen_lengths is None and not chosen_nll_given:
        raise ValueError("loss_type 'sft' needs chosen_nll= or chosen_lengths=.")
    if weights is not None:
        bad = [n for n in loss_types if n in _UNWEIGHTABLE_LOSS_TYPES]
        if bad:
            raise ValueError(f"weights= cannot be used with loss_type {', '.join(bad)}: these "
                             "losses sort the batch, which misaligns per-pair weights. "
                             f"Valid loss types with weights: "
                             f"{', '.join(n for n in LOSS_TYPES if n not in bad)}.")
    return loss_weights


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             loss_type: str | Sequence[str] = "sigmoid",
             loss_weights: Sequence[float] | None = None,
             beta: float = 0.1,
             label_smoothing: float = 0.0,
             f_divergence: str = "reverse_kl",
             f_alpha: float = 0.5,
             discopop_tau: float = 0.05,
             chosen_lengths=None,
             rejected_lengths=None,
             chosen_nll=None,
             weights=None,
             mask=None):
    """Direct Preference Optimization and the TRL (1.16) family of pairwise losses.

    Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
    Secretly a Reward Model" (arXiv:2305.18290). The default loss is

        loss = -log sigmoid(beta * D),  D = s(u_c) - s(u_r),  u = log pi(y) - log pi_ref(y).

    Per-pair losses by `loss_type` (z = beta D, eps = label_smoothing, ls = log-sigmoid):

        sigmoid       -ls(z)                                        (DPO)
        hinge         max(0, 1 - z)                                 (SLiC, arXiv:2305.10425)
        ipo           (s_c/L_c - s_r/L_r - 1/(2 beta))^2            (IPO, arXiv:2310.12036)
        sigmoid_norm  -ls(beta (s_c/L_c - s_r/L_r))                 (length-normalised DPO)
        exo_pair      sig(z)(ls(z) - log(1-eps)) + sig(-z)(ls(-z) - log eps)
                                                                    (EXO, arXiv:2402.00856)
        nca_pair      -ls(beta u_c) - ls(-beta u_c)/2 - ls(-beta u_r)/2
                                                                    (NCA, arXiv:2402.05369)
        robust        (-(1-eps) ls(z) + eps ls(-z)) / (1 - 2 eps)   (rDPO, arXiv:2403.00409)
        bco_pair      -ls(beta u_c) - ls(-beta u_r)                 (BCO, arXiv:2404.04656)
        sppo_hard     (u_c - 1/(2 beta))^2 + (u_r + 1/(2 beta))^2   (SPPO, arXiv:2405.00675)
        aot           d = sort_B(logpi_c - logpi_r) - sort_B(logref_c - logref_r);
                      -(1-eps) ls(beta d) - eps ls(-beta d)         (AOT, arXiv:2406.05882)
        aot_unpaired  as aot with d = sort_B(u_c) - sort_B(u_r)
        apo_zero      1 - sig(beta u_c) + sig(beta u_r)             (APO, arXiv:2408.06266)
        apo_down      sig(beta u_c) + 1 - sig(beta (u_c - u_r))
        discopop      m = sig(z / tau): (1 - m)(-ls(z)) + m exp(-z) (DiscoPOP, arXiv:2406.08414)
        sft           chosen NLL (see `chosen_nll`)

    Several loss types may be mixed, e.g. MPO (arXiv:2411.10442):
    `loss_type=("sigmoid", "bco_pair", "sft"), loss_weights=(0.8, 0.2, 1.0)` returns
    sum_k w_k loss_k per pair, so the batch mean equals TRL's sum_k w_k mean(loss_k).

    Args:
        chosen_logps, rejected_logps: policy per-sequence summed completion log-probs [B].
        ref_chosen_logps, ref_rejected_logps: same under the reference model [B].
        loss_type: a name from `LOSS_TYPES` or a sequence of them.
        loss_weights: one weight per loss type (default all 1).
        beta: inverse temperature (IPO's tau). TRL default 0.1.
        label_smoothing: eps of robust, exo_pair (must be > 0 there) and aot.
        f_divergence: one of `F_DIVERGENCES`; see `f_divergence_scores`. Only the loss
            types in `F_DIVERGENCE_LOSS_TYPES` accept a value other than reverse_kl.
        f_alpha: the alpha of alpha_divergence (TRL's f_alpha_divergence_coef).
        discopop_tau: DiscoPOP temperature (TRL default 0.05).
        chosen_lengths, rejected_lengths: completion token counts [B] (clamped at 1);
            needed by ipo and sigmoid_norm, and by sft when `chosen_nll` is not given.
        chosen_nll: optional per-example NLL [B] for the sft term. If None, sft is TRL's
            token-mean NLL over all chosen tokens of the batch,
            -sum(chosen_logps) / sum(chosen_lengths), broadcast over the batch. (With
            LD-DPO-scaled chosen_logps pass chosen_nll explicitly.)
        weights: optional per-pair weights [B] (e.g. `wpo_weights`), multiplied into every
            loss term, with no gradient. Not allowed with aot/aot_unpaired.
        mask: optional [B] bool or 0/1 float, true for the real pairs of a padded or
            packed batch (None: all real). Metrics are means over the real pairs; the
            sft term's batch token mean counts real pairs only; aot / aot_unpaired sort
            the real pairs among themselves (see `_sorted_gap`; the loss of rank k sits
            on a real row, not necessarily the pair that produced it). Per-pair losses
            are returned for every row, filler included: the caller masks them
            (e.g. sum(losses * mask) / sum(mask)).

    Returns:
        (losses_B, metrics): float32 per-pair losses (the batch loss is their mean) and
        TRL's metrics rewards/chosen, rewards/rejected, rewards/accuracies,
        rewards/margins, logps/chosen, logps/rejected (float32 means over the real
        pairs; rewards are beta * u, whatever the loss type).

    Raises:
        ValueError: unknown names, mismatched weights, exo_pair with label_smoothing 0,
            an f-divergence on a loss that does not use it, missing lengths.
    """
    loss_types = as_name_tuple(loss_type)
    loss_weights = _validate(loss_types, loss_weights, f_divergence=f_divergence,
                             label_smoothing=label_smoothing, weights=weights,
                             chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                             chosen_nll_given=chosen_nll is not None)
    logps_c, logps_r = f32(chosen_logps), f32(rejected_logps)
    ref_c, ref_r = f32(ref_chosen_logps), f32(ref_rejected_logps)
    u_c, u_r = logps_c - ref_c, logps_r - ref_r
    s_c, s_constant = _f_divergence_parts(u_c, f_divergence, f_alpha)
    s_r, _ = _f_divergence_parts(u_r, f_divergence, f_alpha)
    pair = _Pair(
        logps_c=logps_c, logps_r=logps_r, ref_c=ref_c, ref_r=ref_r, u_c=u_c, u_r=u_r,
        s_c=s_c, s_r=s_r, s_constant=s_constant,
        len_c=None if chosen_lengths is None else safe_lengths(chosen_lengths),
        len_r=None if rejected_lengths is None else safe_lengths(rejected_lengths),
        nll=(resolve_chosen_nll(logps_c, chosen_lengths, chosen_nll, who="loss_type 'sft'",
                                mask=mask)
             if "sft" in loss_types else None),
        mask=None if mask is None else real_rows(mask, u_c.shape))

    losses_B = jnp.zeros_like(u_c)
    for name, loss_weight in zip(loss_types, loss_weights):
        losses_B = losses_B + loss_weight * _per_pair_loss(
            name, pair, beta=beta, eps=label_smoothing, discopop_tau=discopop_tau)
    if weights is not None:
        losses_B = losses_B * jax.lax.stop_gradient(f32(weights))
    metrics = preference_metrics(beta * u_c, beta * u_r, logps_c, logps_r, mask=mask)
    return losses_B, metrics


def rdpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
              chosen_lengths, rejected_lengths, beta: float = 0.1, alpha: float = 0.0,
              weights=None, mask=None):
    """Length-regularised DPO (R-DPO).

    Park et al. 2024, "Disentangling Length from Quality in Direct Preference
    Optimization" (arXiv:2403.19159). Solving the KL-regularised problem for the
    length-penalised reward r(x, y) - alpha |y| gives

        loss = -log sigmoid(beta D + alpha (L_c - L_r)),   D = u_c - u_r.

    A positive alpha lowers the loss of pairs whose chosen answer is longer, which takes
    away the pressure to grow the log-ratio of long answers (the length exploitation).
    alpha = 0 is sigmoid DPO.

    Args:
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps: summed
            completion log-probs [B].
        chosen_lengths, rejected_lengths: completion token counts [B].
        beta: DPO inverse temperature.
        alpha: length-penalty coefficient (the paper sweeps about 0.005 to 0.05).
        weights: optional per-pair weights [B], no gradient.
        mask: optional [B] bool or 0/1 float, true for real pairs (None: all real); the
            metrics are means over the real pairs. Losses are returned for every row.

    Returns:
        (losses_B, metrics) with `dpo_loss`'s metric names.
    """
    logps_c, logps_r = f32(chosen_logps), f32(rejected_logps)
    u_c = logps_c - f32(ref_chosen_logps)
    u_r = logps_r - f32(ref_rejected_logps)
    length_gap = f32(chosen_lengths) - f32(rejected_lengths)
    losses_B = -jax.nn.log_sigmoid(beta * (u_c - u_r) + alpha * length_gap)
    if weights is not None:
        losses_B = losses_B * jax.lax.stop_gradient(f32(weights))
    return losses_B, preference_metrics(beta * u_c, beta * u_r, logps_c, logps_r, mask=mask)


def log_sum_squared_probs(logits_BxTxV) -> jax.Array:
    """log sum_v p_v^2 per position, from logits: lse(2 z) - 2 lse(z), float32 [B, T]."""
    z = f32(logits_BxTxV)
    return (jax.nn.logsumexp(2.0 * z, axis=-1) - 2.0 * jax.nn.logsumexp(z, axis=-1))


def wpo_weights(logps_BxT, log_sum_sq_probs_BxT, mask_BxT) -> jax.Array:
    """Per-sequence WPO weight, with no gradient.

    Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization"
    (arXiv:2406.11827), Eq. 2 with the sampling-aligned normalisation TRL uses:

        w(y) = exp( mean_t [ log p(y_t) - log sum_v p_v^2 ] )   over completion tokens.

    A pair is weighted by w(y_c) w(y_r): pass `wpo_weights(chosen...) *
    wpo_weights(rejected...)` as `dpo_loss(..., weights=...)`.

    Args:
        logps_BxT: per-token policy log-probs of the completion tokens.
        log_sum_sq_probs_BxT: per-token log sum_v p_v^2 (see `log_sum_squared_probs`).
        mask_BxT: completion mask.

    Returns:
        float32 weights [B] (stop-gradient).
    """
    diff_BxT = f32(logps_BxT) - f32(log_sum_sq_probs_BxT)
    return jax.lax.stop_gradient(jnp.exp(masked_mean(diff_BxT, mask_BxT)))


def ld_sequence_logps(chosen_logps_BxT, chosen_mask_BxT, rejected_logps_BxT,
                      rejected_mask_BxT, *, ld_alpha: float):
    """LD-DPO summed log-probs: tokens past the shorter response's length scaled by ld_alpha.

    Liu et al. 2024, "Length Desensitization in Direct Preference Optimization"
    (arXiv:2409.06411). With l_p = min(L_c, L_r) completion tokens shared by the pair,

        logp(y) = sum_{t <= l_p} log p(y_t) + ld_alpha * sum_{t > l_p} log p(y_t),

    where t counts completion tokens (mask entries), so left padding or a prompt prefix
    in the same row does not shift the split. Apply it to the policy and the reference
    per-token log-probs alike, then pass the results to `dpo_loss`.

    Returns:
        (chosen_logps_B, rejected_logps_B), float32. Masked positions get zero gradient.
    """
    shared_B = jnp.minimum(sequence_lengths(chosen_mask_BxT),
                           sequence_lengths(rejected_mask_BxT))

    def one(logps_BxT, mask_BxT):
        mask_BxT = jnp.asarray(mask_BxT).astype(bool)
        position_BxT = jnp.cumsum(mask_BxT, axis=-1)  # 1-based index among valid tokens
        scale_BxT = jnp.where(position_BxT <= shared_B[..., None], 1.0, ld_alpha)
        return jnp.sum(jnp.where(mask_BxT, f32(logps_BxT), 0.0) * scale_BxT, axis=-1)

    return one(chosen_logps_BxT, chosen_mask_BxT), one(rejected_logps_BxT, rejected_mask_BxT)
