"""Generalised knowledge distillation (GKD): the token-level loss over per-token divergences.

The per-token divergence between the student's and the teacher's next-token
distributions comes from the fused op (`jalign.ops.token_divergence`, which never
builds either model's logits); this module turns it into the training objective.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jalign.losses._common import f32


def gkd_loss(divergence_BxT, mask_BxT) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-sequence sums of the generalised JSD over completion tokens.

    GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models",
    arXiv:2306.13649) minimises, over the completion tokens y_t of a sequence
    (sampled from the student with probability lambda, else the dataset's),

        L = sum_t D_beta(p_T(. | y_<t) || p_S(. | y_<t)),
        D_beta(P_T || P_S) = beta KL(P_T || M) + (1 - beta) KL(P_S || M),
        M = beta P_T + (1 - beta) P_S,

    with both distributions softened by the same temperature. beta = 0 is the
    forward KL(P_T || P_S), beta = 1 the reverse KL(P_S || P_T) (TRL's GKDTrainer
    convention, which this follows). The training loss is the token-level mean over
    the batch, sum(L) / (completion tokens in the batch), as TRL's
    `generalized_jsd_loss` with "batchmean" over unmasked labels; the caller divides.

    Args:
        divergence_BxT: [B, T] per-token D_beta (float, >= 0), position t scoring token t+1.
        mask_BxT: [B, T] 1 on completion tokens, 0 elsewhere. A masked position
            contributes exactly 0 to the value and to the gradient (even if it holds
            inf / NaN).

    Returns:
        (loss_sums_B, metrics): the per-sequence sums of D_beta over its completion
        tokens, float32 [B], and {"loss": the token-level mean over the batch (no
        gradient; 0 for a batch without completion tokens)}.
    """
    keep_BxT = jnp.asarray(mask_BxT).astype(bool)
    sums_B = jnp.where(keep_BxT, f32(divergence_BxT), 0.0).sum(-1)
    mean = sums_B.sum() / jnp.maximum(keep_BxT.sum(), 1).astype(jnp.float32)
    return sums_B, {"loss": jax.lax.stop_gradient(mean)}
