"""Policy-gradient steps over rollout batches: GRPO family / RLOO, and PPO with a critic.

A rollout batch (built by jalign.algorithms.rl from sampled completions) holds
`tokens`, `loss_mask` (completion tokens, EOS included), `segment_ids`,
`positions` [N, T], `advantages` [N], `old_logps` [N, T-1] (the behaviour policy's
log-probs of each next token, aligned like jalign.steps.common.shifted_logprobs)
and, when a KL term is used, `ref_logps` [N, T-1].
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jalign.losses.rl import aggregate, clipped_policy_loss, clipped_value_loss
from jalign.models.config import ModelConfig
from jalign.models.heads import token_values
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


def adaptive_kl_coef(coef, observed_kl, *, target: float, horizon: float, n_steps: float):
    """Ziegler et al. 2019: coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon."""
    error = jnp.clip(observed_kl / target - 1.0, -0.2, 0.2)
    return coef * (1.0 + error * n_steps / horizon)


def make_ppo_step(config: ModelConfig, optimizer: optax.GradientTransformation, *,
                  clip_eps: float = 0.2, value_clip: float = 0.2, vf_coef: float = 0.1,
                  entropy_coef: float = 0.0, dual_clip: float | None = None,
                  num_iterations: int = 4, kl_target: float | None = None,
                  kl_horizon: float = 10000.0, schedule: optax.Schedule | None = None,
                  logprob_impl: str = "auto") -> Callable:
    """PPO with a critic: `state.params = {"policy": decoder, "critic": scalar model}`.

    The rollout batch adds `advantages` [N, T-1] (whitened GAE), `returns` and
    `old_values` [N, T-1], `old_logps` and each sequence's KL to the reference `kl` [N].
    Each of `num_iterations` epochs minimises clipped policy loss + vf_coef * clipped
    value loss - entropy_coef * entropy over the batch. With `kl_target`, the KL
    coefficient in `state.frozen["kl_coef"]` adapts (Ziegler et al. 2019).
    """

    def loss(params, batch):
        logps, mask, stats = shifted_logprobs(params["policy"], config, batch,
                                              logprob_impl=logprob_impl, with_stats=True)
        policy_loss, metrics = clipped_policy_loss(
            logps, batch["old_logps"], batch["advantages"], mask, clip_eps_low=clip_eps,
            dual_clip=dual_clip, loss_aggregation="bnpo")
        values = token_values(params["critic"], config, batch)[:, :-1]
        value_loss, value_metrics = clipped_value_loss(values, batch["old_values"], batch["returns"],
                                                       mask, clip=value_clip)
        entropy = aggregate(stats["entropy"], mask, mode="bnpo")
        total = policy_loss + vf_coef * value_loss - entropy_coef * entropy
        return total, {**metrics, **value_metrics, "loss/policy_avg": policy_loss,
                       "loss/value_avg": value_loss, "objective/entropy": entropy}

    def update(state, batch):
        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        metrics = dict(metrics, loss=value, grad_norm=optax.global_norm(grads))
        return state.replace(params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state), metrics

    def step(state: TrainState, batch):
        metrics = None
        for _ in range(num_iterations):
            state, metrics = update(state, batch)
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        frozen = dict(state.frozen)
        metrics["objective/kl_coef"] = frozen["kl_coef"]
        if kl_target is not None:
            n = batch["loss_mask"].shape[0]
            frozen["kl_coef"] = adaptive_kl_coef(frozen["kl_coef"], batch["kl"].mean(), target=kl_target,
                                                 horizon=kl_horizon, n_steps=n)
        metrics["num_tokens"] = batch["loss_mask"][:, 1:].sum().astype(jnp.float32)
        return state.replace(step=state.step + 1, frozen=frozen), metrics

    return step
