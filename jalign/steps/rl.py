"""Policy-gradient steps over rollout batches: GRPO family / RLOO, and PPO with a critic.

A rollout batch (built by jalign.algorithms.rl from sampled completions) holds
`tokens`, `loss_mask` (completion tokens, EOS included), `segment_ids`,
`positions` [N, T], `advantages` [N], `old_logps` [N, T-1] (the behaviour policy's
log-probs of each next token, aligned like a log-prob function's output)
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
from jalign.state import TrainState, model_params
from jalign.steps.common import completion_mask, gradient_update, split_logprob_output


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
    """One optimizer step (the shared core) on `loss(params, batch, rng) -> (mean, metrics)`.
    With LoRA the gradients are taken w.r.t. the adapters over the frozen base."""
    def update(state: TrainState, batch):
        rng = state.step_rng()

        def sum_loss(params, batch):
            return loss(model_params(params, state.frozen), batch, rng)
        return gradient_update(optimizer, state, sum_loss, batch,
                               count_fn=lambda _: 1.0)  # the loss is already a mean
    return update


def _finish_step(state: TrainState, metrics, **replace):
    return state.replace(step=state.step + 1, **replace), metrics


def make_policy_gradient_step(logprob_fn: Callable, optimizer: optax.GradientTransformation, *,
                              loss_kwargs: dict | None = None, num_iterations: int = 1,
                              num_minibatches: int = 1) -> Callable:
    """Returns `step(state, batch) -> (state, metrics)` doing `num_iterations` epochs.

    Args:
        logprob_fn: `(params, batch, rng=None) -> logps [N, T-1]` (see
            `jalign.steps.common`), e.g. `decoder_logprob_fn(model_cfg)`.
        loss_kwargs: keyword options of `jalign.losses.rl.clipped_policy_loss`
            (clip_eps_low/high, dual_clip, loss_aggregation, kl_beta, kl_estimator,
            use_bias_correction_kl, importance_sampling_level, max_completion_length).
        num_iterations, num_minibatches: epochs over the rollout batch and shuffled
            minibatches per epoch, one update each (see `run_epochs`); later updates
            see importance ratios != 1 (TRL's `num_iterations`).

    The batch is the rollout layout of this module's docstring (`ref_logps` only
    when `kl_beta` > 0). Metrics: clipped_policy_loss's, loss, grad_norm (last
    epoch, averaged over its minibatches).
    """
    _check_counts(num_iterations, num_minibatches)
    loss_kwargs = dict(loss_kwargs or {})
    use_ref = loss_kwargs.get("kl_beta", 0.0) > 0

    def loss(params, batch, rng):
        logps = split_logprob_output(logprob_fn(params, batch, rng))[0]
        return clipped_policy_loss(
            logps, batch["old_logps"], batch["advantages"], completion_mask(batch),
            ref_logps_BxT=batch["ref_logps"] if use_ref else None, **loss_kwargs)

    update = _make_update(loss, optimizer)

    def step(state: TrainState, batch):
        state, metrics = run_epochs(update, state, batch, num_iterations=num_iterations,
                                    num_minibatches=num_minibatches)
        return _finish_step(state, metrics)

    return step


def adaptive_kl_coef(coef, observed_kl, *, target: float, horizon: float, n_steps: float):
    """Ziegler et al. 2019: coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon."""
    error = jnp.clip(observed_kl / target - 1.0, -0.2, 0.2)
    return coef * (1.0 + error * n_steps / horizon)


def decoder_value_fn(config: ModelConfig) -> Callable:
    """jalign's scalar model as a value function `(params, batch) -> values [N, T]`."""
    return lambda params, batch: token_values(params, config, batch)


def make_ppo_step(logprob_fn: Callable, value_fn: Callable,
                  optimizer: optax.GradientTransformation, *,
                  clip_eps: float = 0.2, value_clip: float = 0.2, vf_coef: float = 0.1,
                  entropy_coef: float = 0.0, dual_clip: float | None = None,
                  num_iterations: int = 4, num_minibatches: int = 1,
                  kl_target: float | None = None, kl_horizon: float = 10000.0) -> Callable:
    """PPO with a critic: `state.params = {"policy": ..., "critic": ...}`.

    Args:
        logprob_fn: the policy's `(params["policy"], batch, rng=None) -> logps [N, T-1]`;
            it must return a dict with per-token "entropy" next to "logps" when
            `entropy_coef` != 0 (`decoder_logprob_fn(model_cfg, with_stats=True)`).
        value_fn: the critic's `(params["critic"], batch) -> values [N, T]` (the value
            of the prefix ending at each token), e.g. `decoder_value_fn(model_cfg)`.
        clip_eps, dual_clip, value_clip, vf_coef, entropy_coef: the clipped surrogate,
            its dual clip, the clipped value loss and the loss weights.
        num_iterations, num_minibatches: see `run_epochs`.
        kl_target, kl_horizon: with `kl_target`, the KL coefficient in
            `state.frozen["kl_coef"]` adapts once per rollout batch (Ziegler et al. 2019).

    The rollout batch adds `advantages` [N, T-1] (whitened GAE), `returns` and
    `old_values` [N, T-1], `old_logps` and each sequence's KL to the reference `kl`
    [N]. Each update minimises clipped policy loss + vf_coef * clipped value loss -
    entropy_coef * entropy. Metrics: TRL's PPO names (loss/policy_avg,
    loss/value_avg, objective/entropy, objective/kl_coef, ...), loss, grad_norm.
    """
    _check_counts(num_iterations, num_minibatches)

    def loss(params, batch, rng):
        logps, stats = split_logprob_output(logprob_fn(params["policy"], batch, rng))
        mask = completion_mask(batch)
        policy_loss, metrics = clipped_policy_loss(
            logps, batch["old_logps"], batch["advantages"], mask, clip_eps_low=clip_eps,
            dual_clip=dual_clip, loss_aggregation="bnpo")
        values = value_fn(params["critic"], batch)[:, :-1]
        value_loss, value_metrics = clipped_value_loss(values, batch["old_values"], batch["returns"],
                                                       mask, clip=value_clip)
        total = policy_loss + vf_coef * value_loss
        metrics = {**metrics, **value_metrics, "loss/policy_avg": policy_loss,
                   "loss/value_avg": value_loss}
        if "entropy" in stats:
            entropy = aggregate(stats["entropy"], mask, mode="bnpo")
            total = total - entropy_coef * entropy
            metrics["objective/entropy"] = entropy
        elif entropy_coef:
            raise ValueError("entropy_coef != 0 needs a logprob_fn that returns per-token "
                             "'entropy' (decoder_logprob_fn(..., with_stats=True))")
        return total, metrics

    update = _make_update(loss, optimizer)

    def step(state: TrainState, batch):
        state, metrics = run_epochs(update, state, batch, num_iterations=num_iterations,
                                    num_minibatches=num_minibatches)
        frozen = dict(state.frozen)
        metrics["objective/kl_coef"] = frozen["kl_coef"]
        if kl_target is not None:
            n = batch["loss_mask"].shape[0]
            frozen["kl_coef"] = adaptive_kl_coef(frozen["kl_coef"], batch["kl"].mean(), target=kl_target,
                                                 horizon=kl_horizon, n_steps=n)
        return _finish_step(state, metrics, frozen=frozen)

    return step
