"""Step factories: each returns a pure `step(state, batch) -> (state, metrics)`."""

from jalign.steps.preference import (make_dpo_step, make_kto_step, make_reward_step,
                                     reference_logps_fn, sequence_logps, sequence_sums)
from jalign.steps.sft import make_sft_step

__all__ = ["make_dpo_step", "make_kto_step", "make_reward_step", "make_sft_step",
           "reference_logps_fn", "sequence_logps", "sequence_sums"]
