"""KTO: Kahneman-Tversky Optimization on unpaired desirable / undesirable completions."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jalign.losses._common import batch_mean, check_choice, f32, real_rows

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto_reference_point(kl_logps, ref_kl_logps, *, mask=None) -> jax.Array:
    """KTO's reference point z0 from mismatched completions, with no gradient.

    z0 = max(0, mean_B[log pi(y'|x) - log pi_ref(y'|x)]), y' a completion that belongs to
    another prompt of the batch (TRL pairs prompt i with completion i - 1). With `mask`
    ([B'], bool or 0/1 float) the mean runs over the real rows only. Under data
    parallelism, average the mean over all devices before clamping.
    """
    return jnp.maximum(batch_mean(f32(kl_logps) - f32(ref_kl_logps), mask), 0.0)


def kto_loss(logps, ref_logps, desirable, *,
             loss_type: str = "kto",
             beta: float = 0.1,
             desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0,
             kl=None,
             kl_logps=None,
             ref_kl_logps=None,
             mask=None):
    """Kahneman-Tversky Optimization (TRL's KTOTrainer).

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"
    (arXiv:2402.01306). With u = log pi(y|x) - log pi_ref(y|x) and the reference point z0
    (a stop-gradient batch KL estimate, clamped at 0):

        desirable y:    w_D (1 - sigmoid(beta (u - z0)))
        undesirable y:  w_U (1 - sigmoid(beta (z0 - u)))

    loss_type "apo_zero_unpaired" (D'Oosterlinck et al. 2024, arXiv:2408.06266) drops z0:
    desirable 1 - sigmoid(beta u), undesirable sigmoid(beta u).

    The paper advises keeping w_D n_D / (w_U n_U) in [1, 4/3] (n = example counts); that
    is a data choice and is not checked here.

    Args:
        logps, ref_logps: policy / reference summed completion log-probs [B].
        desirable: bool [B], True for a desirable ("chosen") completion.
        loss_type: one of `KTO_LOSS_TYPES`.
        beta: TRL default 0.1.
        desirable_weight, undesirable_weight: w_D and w_U (TRL default 1.0).
        kl: z0 given directly (scalar); clamped at 0, no gradient.
        kl_logps, ref_kl_logps: instead of kl, log-probs [B'] of mismatched completions
            under the policy and the reference; z0 = `kto_reference_point(...)`.
            Exactly one of `kl` and (`kl_logps`, `ref_kl_logps`) is needed for "kto".
        mask: optional [B] bool or 0/1 float, true for the real examples of a padded or
            packed batch (None: all real). A filler row is neither desirable nor
            undesirable: every metric and count covers real rows only, and z0 averages
            the real rows of `kl_logps` (which must then have shape [B], row i belonging
            to example i; a `kl` given directly is used as is). Losses are returned for
            every row (the caller masks them).

    Returns:
        (losses_B, metrics): weighted per-example losses (batch loss = their mean) and
        float32 scalars "kl" (z0), "rewards/chosen" and "rewards/rejected" (mean beta u
        over the desirable / undesirable examples, 0 when there are none),
        "rewards/margins" (their difference), "logps/chosen", "logps/rejected" (likewise),
        "count/chosen", "count/rejected".
    """
    check_choice("loss_type", loss_type, KTO_LOSS_TYPES)
    have_pair = kl_logps is not None or ref_kl_logps is not None
    if loss_type == "kto":
        if (kl is None) == (not have_pair):
            raise ValueError("kto_loss needs the reference point z0: pass exactly one of kl= "
                             "(a scalar) or kl_logps= with ref_kl_logps= (mismatched "
                             "completions).")
        if have_pair and (kl_logps is None or ref_kl_logps is None):
            raise ValueError("kto_loss needs both kl_logps= and ref_kl_logps=.")
        if have_pair and mask is not None and jnp.shape(kl_logps) != jnp.shape(mask):
            raise ValueError(f"kto_loss with mask= averages z0 over the real rows of kl_logps, "
                             f"so they need the mask's shape {jnp.shape(mask)}; got "
                             f"{jnp.shape(kl_logps)}. For another layout pass "
                             "kl=kto_reference_point(kl_logps, ref_kl_logps, mask=...).")
    logps_B = f32(logps)
    u_B = logps_B - f32(ref_logps)
    desirable_B = jnp.asarray(desirable).astype(bool)
    real_B = jnp.ones_like(desirable_B) if mask is None else real_rows(mask, u_B.shape)

    if loss_type == "kto":
        if kl is not None:
            z0 = jax.lax.stop_gradient(jnp.maximum(f32(kl), 0.0))
        else:
            z0 = kto_reference_point(kl_logps, ref_kl_logps, mask=mask)
        # 1 - sigmoid(x) written as sigmoid(-x): no cancellation when x is large.
        chosen_B = jax.nn.sigmoid(-beta * (u_B - z0))
        rejected_B = jax.nn.sigmoid(-beta * (z0 - u_B))
    else:
        z0 = jnp.zeros((), jnp.float32)
        chosen_B = jax.nn.sigmoid(-beta * u_B)
        rejected_B = jax.nn.sigmoid(beta * u_B)
    losses_B = jnp.where(desirable_B, desirable_weight * chosen_B,
                         undesirable_weight * rejected_B)

    rewards_B = beta * u_B
    undesirable_B = jnp.logical_not(desirable_B) & real_B
    desirable_B = desirable_B & real_B
    chosen_reward = batch_mean(rewards_B, desirable_B)
    rejected_reward = batch_mean(rewards_B, undesirable_B)
    metrics = {
        "kl": jnp.asarray(z0, jnp.float32),
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/margins": chosen_reward - rejected_reward,
        "logps/chosen": batch_mean(logps_B, desirable_B),
        "logps/rejected": batch_mean(logps_B, undesirable_B),
        "count/chosen": jnp.sum(desirable_B).astype(jnp.float32),
        "count/rejected": jnp.sum(undesirable_B).astype(jnp.float32),
    }
    return losses_B, metrics
