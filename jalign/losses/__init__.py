"""Preference-optimization losses: pure functions of log-probs returning (losses, metrics)."""

from jalign.losses.dpo import (F_DIVERGENCE_LOSS_TYPES, F_DIVERGENCES, LENGTH_NORMALISED_LOSS_TYPES,
                               LOSS_TYPES, dpo_loss, f_divergence_scores, ld_sequence_logps,
                               log_sum_squared_probs, rdpo_loss, wpo_weights)
from jalign.losses.distill import gkd_loss
from jalign.losses.kto import KTO_LOSS_TYPES, kto_loss, kto_reference_point
from jalign.losses.reference_free import CPO_LOSS_TYPES, cpo_loss, orpo_loss, simpo_loss
from jalign.losses.reward import reward_loss
from jalign.losses.tokens import (length_normalize, masked_mean, masked_sum, sequence_lengths,
                                  sequence_logps)

__all__ = [
    "CPO_LOSS_TYPES", "F_DIVERGENCES", "F_DIVERGENCE_LOSS_TYPES", "KTO_LOSS_TYPES",
    "LENGTH_NORMALISED_LOSS_TYPES", "LOSS_TYPES",
    "cpo_loss", "dpo_loss", "f_divergence_scores", "gkd_loss", "kto_loss", "kto_reference_point",
    "ld_sequence_logps", "length_normalize", "log_sum_squared_probs", "masked_mean",
    "masked_sum", "orpo_loss", "rdpo_loss", "reward_loss", "sequence_lengths",
    "sequence_logps", "simpo_loss", "wpo_weights",
]
