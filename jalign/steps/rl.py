"""Policy-gradient steps over rollout batches: GRPO family / RLOO, and PPO with a critic.

A rollout batch (built by jalign.algorithms.rl from sampled completions) holds
`tokens`, `loss_mask` (completion tokens, EOS included), `segment_ids`,
`positions` [N, T], `advantages` [N], `old_logps` [N, T-1] (the behaviour policy's
log-probs of each next token, aligned like jalign.steps.common.shifted_logprobs)
and, when a KL term is used, `ref_logps` [N, T-1].

Both steps run `num_iterations` epochs over the rollout batch; with
`num_minibatches` = k > 1 each epoch shuffles the batch and takes k optimizer
steps on [N / k] minibatches (PPO's "several epochs of minibatches"; TRL's
`num_mini_batches`). The shuffle's RNG is derived from the state, so a resumed
run shuffles alike. Metrics are those of the last epoch, averaged over its
minibatches (the first epoch's ratios are exactly 1, so its clip fraction and
approximate KL say nothing).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jalign.losses.rl import aggregate, clipped_policy_loss, clipped_value_loss
from jalign.models.config import ModelConfig
from jalign.models.heads import token_values
from jalign.state import TrainState
from jalign.steps.common import model_params, shifted_logprobs


# Folded into the step RNG for the minibatch shuffle (the rollout uses 17).
_SHUFFLE_STREAM = 29


def run_epochs(update: Callable, state: TrainState, batch, *, num_iterations: int,
               num_minibatches: int):
    """`num_iterations` epochs of `num_minibatches` shuffled minibatches, one update each.

    `update(state, minibatch) -> (state, metrics)`. With one minibatch every epoch
    sees the whole batch in its order. Returns the state after all updates and the
    last epoch's metrics averaged over its minibatches.
    """
    n = batch["loss_mask"].shape[0]
    if n % num_minibatches:
        raise ValueError(f"the rollout batch of {n} sequences does not split into "
                         f"config.rl.num_minibatches={num_minibatches} equal minibatches")
    if num_minibatches == 1:
        # Unrolled: epochs are few, and this compiles to exactly the program of
        # calling `update` num_iterations times (bit-identical results).
        state, metrics = jax.lax.scan(lambda s, _: update(s, batch), state, length=num_iterations,
                                      unroll=True)
        return state, jax.tree.map(lambda m: m[-1], metrics)

    rng = jax.random.fold_in(state.step_rng(), _SHUFFLE_STREAM)
    rows_ExN = jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(rng, e), n))(
        jnp.arange(num_iterations))
    rows_UxM = rows_ExN.reshape(num_iterations * num_minibatches, n // num_minibatches)

    def minibatch(x, rows_M):  # stays split over the batch axes, like the rollout batch
        x = jnp.take(x, rows_M, axis=0)
        return nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))

    def body(state, rows_M):
        return update(state, jax.tree.map(lambda x: minibatch(x, rows_M), batch))

    state, metrics = jax.lax.scan(body, state, rows_UxM)
    return state, jax.tree.map(lambda m: m[-num_minibatches:].mean(0), metrics)


def _check_counts(num_iterations: int, num_minibatches: int) -> None:
    if num_iterations < 1 or num_minibatches < 1:
        raise ValueError(f"config.rl.num_iterations ({num_iterations}) and config.rl.num_minibatches "
                         f"({num_minibatches}) must be at least 1")


def _make_update(loss, optimizer):
    """One optimizer step on `loss(params, batch, dropout_rng)`. With LoRA the
    gradients are taken w.r.t. the adapters over the frozen base."""
    def update(state: TrainState, batch):
        (value, metrics), grads = jax.value_and_grad(
            lambda p: loss(model_params(p, state.frozen), batch, state.step_rng()),
            has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        metrics = dict(metrics, loss=value, grad_norm=optax.global_norm(grads))
        return state.replace(params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state), metrics
    return update


def make_policy_gradient_step(config: ModelConfig, optimizer: optax.GradientTransformation, *,
                              loss_kwargs: dict | None = None, num_iterations: int = 1,
                              num_minibatches: int = 1, schedule: optax.Schedule | None = None,
                              logprob_impl: str = "auto") -> Callable:
    """Returns `step(state, batch) -> (state, metrics)` doing `num_iterations` epochs.

    Each update minimises `jalign.losses.rl.clipped_policy_loss` (keyword options in
    `loss_kwargs`: clip_eps_low/high, dual_clip, loss_aggregation, kl_beta,
    kl_estimator, max_completion_length, sequence_level_ratio) on the rollout batch
    or, with `num_minibatches` > 1, on each of its shuffled minibatches in turn (see
    `run_epochs`); later updates see importance ratios != 1 (TRL's `num_iterations`).
    """
    _check_counts(num_iterations, num_minibatches)
    loss_kwargs = dict(loss_kwargs or {})
    use_ref = loss_kwargs.get("kl_beta", 0.0) > 0

    def loss(params, batch, rng):
        logps, mask = shifted_logprobs(params, config, batch, logprob_impl=logprob_impl,
                                       dropout_rng=rng)
        value, metrics = clipped_policy_loss(
            logps, batch["old_logps"], batch["advantages"], mask,
            ref_logps_BxT=batch["ref_logps"] if use_ref else None, **loss_kwargs)
        return value, metrics

    update = _make_update(loss, optimizer)

    def step(state: TrainState, batch):
        state, metrics = run_epochs(update, state, batch, num_iterations=num_iterations,
                                    num_minibatches=num_minibatches)
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
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
                  num_iterations: int = 4, num_minibatches: int = 1,
                  kl_target: float | None = None,
                  kl_horizon: float = 10000.0, schedule: optax.Schedule | None = None,
                  logprob_impl: str = "auto") -> Callable:
    """PPO with a critic: `state.params = {"policy": decoder, "critic": scalar model}`.

    The rollout batch adds `advantages` [N, T-1] (whitened GAE), `returns` and
    `old_values` [N, T-1], `old_logps` and each sequence's KL to the reference `kl` [N].
    Each of `num_iterations` epochs minimises clipped policy loss + vf_coef * clipped
    value loss - entropy_coef * entropy over the batch, or over each of its
    `num_minibatches` shuffled minibatches in turn (see `run_epochs`). With
    `kl_target`, the KL coefficient in `state.frozen["kl_coef"]` adapts once per
    rollout batch (Ziegler et al. 2019).
    """
    _check_counts(num_iterations, num_minibatches)

    def loss(params, batch, rng):
        logps, mask, stats = shifted_logprobs(params["policy"], config, batch, dropout_rng=rng,
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

    update = _make_update(loss, optimizer)

    def step(state: TrainState, batch):
        state, metrics = run_epochs(update, state, batch, num_iterations=num_iterations,
                                    num_minibatches=num_minibatches)
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
