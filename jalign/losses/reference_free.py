"""Reference-free preference losses: CPO (sigmoid / hinge / ipo / simpo), SimPO, AlphaPO, ORPO.

Inputs are always per-sequence *summed* completion log-probs plus token counts; the
losses that work on average per-token log-probs divide by the counts themselves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jalign.losses._common import (EXP_CAP, batch_mean, check_choice, f32, preference_metrics,
                                   resolve_chosen_nll, safe_lengths)

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
# These compare average per-token log-probs (TRL: average_log_prob for ipo and simpo).
_AVERAGED_CPO_LOSS_TYPES = ("ipo", "simpo")


def _alphapo_reward(logps_B, alpha: float):
    """AlphaPO's reward shape (1 - p^(-alpha)) / alpha with p = e^l, i.e. -expm1(-alpha l)/alpha.

    The exponent is capped at 80 so that a very negative (summed) l stays finite.
    """
    return -jnp.expm1(jnp.minimum(-alpha * logps_B, EXP_CAP)) / alpha


def cpo_loss(chosen_logps, rejected_logps, *,
             loss_type: str = "sigmoid",
             beta: float = 0.1,
             label_smoothing: float = 0.0,
             simpo_gamma: float = 0.5,
             cpo_alpha: float = 1.0,
             alphapo_alpha: float = 0.0,
             chosen_lengths=None,
             rejected_lengths=None,
             chosen_nll=None,
             mask=None):
    """Contrastive Preference Optimization, with SimPO and AlphaPO as options (TRL's CPOTrainer).

    Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM
    Performance in Machine Translation" (arXiv:2401.08417);
    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward" (arXiv:2405.14734);
    Gupta et al. 2025, "AlphaPO: Reward Shape Matters for LLM Alignment" (arXiv:2501.03884).

    With l = log pi(y) (summed; averaged over the completion tokens for ipo and simpo),
    optionally reshaped by AlphaPO, l -> (1 - e^(-alpha l)) / alpha, and d = l_c - l_r:

        sigmoid   -(1 - eps) ls(beta d) - eps ls(-beta d)
        hinge     max(0, 1 - beta d)
        ipo       (d - 1/(2 beta))^2
        simpo     -(1 - eps) ls(beta d - gamma) - eps ls(-(beta d - gamma))

    and the per-example loss adds cpo_alpha * NLL(chosen). SimPO is loss_type="simpo"
    with cpo_alpha=0 (see `simpo_loss`); CPO-SimPO keeps cpo_alpha > 0.

    Args:
        chosen_logps, rejected_logps: policy per-sequence summed completion log-probs [B].
        loss_type: one of `CPO_LOSS_TYPES`.
        beta: TRL default 0.1 (SimPO's paper uses 2.0 to 2.5).
        label_smoothing: eps of sigmoid and simpo.
        simpo_gamma: SimPO target margin gamma (TRL default 0.5).
        cpo_alpha: weight of the chosen NLL (TRL default 1.0).
        alphapo_alpha: AlphaPO's alpha; 0 disables the reshaping.
        chosen_lengths, rejected_lengths: completion token counts [B]; required by ipo and
            simpo, and by the NLL term when `chosen_nll` is not given.
        chosen_nll: optional per-example NLL [B]; default is TRL's token mean over all
            chosen tokens of the batch, -sum(chosen_logps) / sum(chosen_lengths).
        mask: optional [B] bool or 0/1 float, true for the real pairs of a padded or
            packed batch (None: all real). Metrics are means over the real pairs and the
            batch token-mean NLL counts real pairs only; losses are returned for every
            row (the caller masks them).

    Returns:
        (losses_B, metrics): metrics as `dpo_loss` (rewards are beta * l, after any
        AlphaPO reshaping; logps are the l the loss compared) plus "nll_loss".
    """
    check_choice("loss_type", loss_type, CPO_LOSS_TYPES)
    averaged = loss_type in _AVERAGED_CPO_LOSS_TYPES
    if averaged and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"cpo_loss with loss_type {loss_type!r} uses average log-probs: "
                         "pass chosen_lengths= and rejected_lengths=. Loss types that "
                         f"average: {', '.join(_AVERAGED_CPO_LOSS_TYPES)}.")
    logps_c, logps_r = f32(chosen_logps), f32(rejected_logps)
    if averaged:
        l_c, l_r = logps_c / safe_lengths(chosen_lengths), logps_r / safe_lengths(rejected_lengths)
    else:
        l_c, l_r = logps_c, logps_r
    if alphapo_alpha != 0.0:
        r_c, r_r = _alphapo_reward(l_c, alphapo_alpha), _alphapo_reward(l_r, alphapo_alpha)
    else:
        r_c, r_r = l_c, l_r
    d = r_c - r_r
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses_B = -(1 - eps) * jax.nn.log_sigmoid(beta * d) - eps * jax.nn.log_sigmoid(-beta * d)
    elif loss_type == "hinge":
        losses_B = jax.nn.relu(1.0 - beta * d)
    elif loss_type == "ipo":
        losses_B = (d - 1.0 / (2.0 * beta)) ** 2
    else:  # simpo
        z = beta * d - simpo_gamma
        losses_B = -(1 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)

    nll_B = jnp.zeros_like(losses_B)
    if cpo_alpha != 0.0:
        nll_B = resolve_chosen_nll(logps_c, chosen_lengths, chosen_nll,
                                   who=f"cpo_loss with cpo_alpha={cpo_alpha}", mask=mask)
        losses_B = losses_B + cpo_alpha * nll_B
    metrics = preference_metrics(beta * r_c, beta * r_r, l_c, l_r, mask=mask)
    metrics["nll_loss"] = batch_mean(nll_B, mask)
    return losses_B, metrics


def simpo_loss(chosen_logps, rejected_logps, *, chosen_lengths, rejected_lengths,
               beta: float = 2.5, gamma: float = 1.375, label_smoothing: float = 0.0,
               mask=None):
    """SimPO: reference-free, length-normalised, with a target reward margin.

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward" (arXiv:2405.14734), Eq. 6:

        loss = -log sigmoid(beta/L_c log pi(y_c) - beta/L_r log pi(y_r) - gamma).

    Defaults are the paper's Llama-3-Instruct setting (beta 2.5, gamma/beta 0.55).
    Same as `cpo_loss(..., loss_type="simpo", cpo_alpha=0)`; `mask` ([B], true for real
    pairs) makes the metrics means over the real pairs, as there.
    """
    losses_B, metrics = cpo_loss(chosen_logps, rejected_logps, loss_type="simpo", beta=beta,
                                 simpo_gamma=gamma, label_smoothing=label_smoothing,
                                 cpo_alpha=0.0, chosen_lengths=chosen_lengths,
                                 rejected_lengths=rejected_lengths, mask=mask)
    del metrics["nll_loss"]
    return losses_B, metrics


def _log1mexp(x):
    """log(1 - e^x) for x < 0, accurate at both ends (Maechler 2012)."""
    x = jnp.minimum(x, -1e-7)  # an average log-prob of exactly 0 would give log(0)
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_loss(chosen_logps, rejected_logps, *, chosen_lengths, rejected_lengths,
              beta: float = 0.1, chosen_nll=None, mask=None):
    """Odds-Ratio Preference Optimization.

    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model" (arXiv:2403.07691). With average per-token log-probs l = log pi(y) / L,

        log_odds = (l_c - l_r) - (log(1 - e^l_c) - log(1 - e^l_r))
        loss     = NLL(chosen) - beta * log sigmoid(log_odds)        (beta = lambda, 0.1)

    Args:
        chosen_logps, rejected_logps: policy per-sequence summed completion log-probs [B].
        chosen_lengths, rejected_lengths: completion token counts [B].
        beta: weight of the odds-ratio term (TRL default 0.1).
        chosen_nll: optional per-example NLL [B]; default is TRL's batch token-mean NLL
            of the chosen completions.
        mask: optional [B] bool or 0/1 float, true for the real pairs (None: all real).
            Metrics are means over the real pairs and the batch token-mean NLL counts
            real pairs only; losses are returned for every row (the caller masks them).

    Returns:
        (losses_B, metrics): `dpo_loss`'s metric names (rewards beta * l, logps the
        averages), plus "nll_loss", "log_odds_ratio" (mean log sigmoid(log_odds)) and
        "log_odds_chosen" (mean log_odds), as TRL logs them.
    """
    logps_c, logps_r = f32(chosen_logps), f32(rejected_logps)
    l_c = logps_c / safe_lengths(chosen_lengths)
    l_r = logps_r / safe_lengths(rejected_lengths)
    log_odds_B = (l_c - l_r) - (_log1mexp(l_c) - _log1mexp(l_r))
    ratio_B = jax.nn.log_sigmoid(log_odds_B)
    nll_B = resolve_chosen_nll(logps_c, chosen_lengths, chosen_nll, who="orpo_loss", mask=mask)
    losses_B = nll_B - beta * ratio_B
    metrics = preference_metrics(beta * l_c, beta * l_r, l_c, l_r, mask=mask)
    metrics["nll_loss"] = batch_mean(nll_B, mask)
    metrics["log_odds_ratio"] = batch_mean(ratio_B, mask)
    metrics["log_odds_chosen"] = batch_mean(log_odds_B, mask)
    return losses_B, metrics
