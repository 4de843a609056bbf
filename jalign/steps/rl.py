"""Policy-gradient step for the GRPO family and RLOO over rollout batches.

A rollout batch (built by jalign.algorithms.rl from sampled completions) holds
`tokens`, `loss_mask` (completion tokens, EOS included), `segment_ids`,
`positions` [N, T], `advantages` [N], `old_logps` [N, T-1] (the behaviour policy's
log-probs of each next token, aligned like jalign.steps.common.shifted_logprobs)
and, when a KL term is used, `ref_logps` [N, T-1].
"""

from __future__ import annotations

from typing import Callable

import jax
import optax

from jalign.losses.rl import clipped_policy_loss
from jalign.models.config import ModelConfig
from jalign.state import TrainState
from jalign.steps.common import shifted_logprobs


def make_policy_gradient_step(config: ModelConfig, optimizer: optax.GradientTransformation, *,
                              loss_kwargs: dict | None = None, num_iterations: int = 1,
                              schedule: optax.Schedule | None = None,
                              logprob_impl: str = "auto") -> Callable:
    """Returns `step(state, batch) -> (state, metrics)` doing `num_iterations` updates.

    Each update minimises `jalign.losses.rl.clipped_policy_loss` (keyword options in
    `loss_kwargs`: clip_eps_low/high, dual_clip, loss_aggregation, kl_beta,
    kl_estimator, max_completion_length, sequence_level_ratio) on the whole rollout
    batch; with num_iterations > 1 the later updates see importance ratios != 1
    (TRL's `num_iterations`, PPO's epochs).
    """
    loss_kwargs = dict(loss_kwargs or {})
    use_ref = loss_kwargs.get("kl_beta", 0.0) > 0

    def loss(params, batch):
        logps, mask = shifted_logprobs(params, config, batch, logprob_impl=logprob_impl)
        value, metrics = clipped_policy_loss(
            logps, batch["old_logps"], batch["advantages"], mask,
            ref_logps_BxT=batch["ref_logps"] if use_ref else None, **loss_kwargs)
        return value, metrics

    def update(state: TrainState, batch):
        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        metrics = dict(metrics, loss=value, grad_norm=optax.global_norm(grads))
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        return state.replace(params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state), metrics

    def step(state: TrainState, batch):
        state, metrics = update(state, batch)
        for _ in range(num_iterations - 1):
            state, metrics = update(state, batch)
        metrics["num_tokens"] = batch["loss_mask"][:, 1:].sum().astype("float32")
        return state.replace(step=state.step + 1), metrics

    return step
