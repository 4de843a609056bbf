"""Step factories: each returns a pure `step(state, batch) -> (state, metrics)`.

Every factory takes the model as a function (`logprob_fn(params, batch, rng=None)
-> per-token log-probs`, a score or value function for scalar heads), so it works
with any JAX model; `decoder_logprob_fn`, `decoder_score_fn` and
`decoder_value_fn` supply jalign's decoder. Each factory's docstring lists the
batch keys it reads and the metrics it returns.
"""

from jalign.state import model_params, reference_params
from jalign.steps.common import decoder_logprob_fn, gradient_update
from jalign.steps.distill import decoder_divergence_fn, make_distill_step
from jalign.steps.preference import (decoder_score_fn, make_dpo_step, make_kto_step,
                                     make_reward_step, reference_logps_fn, sequence_logp_sums,
                                     sequence_sums)
from jalign.steps.rl import (adaptive_kl_coef, decoder_value_fn, make_policy_gradient_step,
                             make_ppo_step, run_epochs)
from jalign.steps.sft import make_sft_step

__all__ = ["adaptive_kl_coef", "decoder_divergence_fn", "decoder_logprob_fn", "decoder_score_fn",
           "decoder_value_fn", "gradient_update", "make_distill_step", "make_dpo_step",
           "make_kto_step", "make_policy_gradient_step", "make_ppo_step", "make_reward_step",
           "make_sft_step", "model_params", "reference_logps_fn", "reference_params",
           "run_epochs", "sequence_logp_sums", "sequence_sums"]
