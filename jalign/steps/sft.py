"""Supervised fine-tuning step: token-level NLL on completion tokens."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jalign.models.config import ModelConfig
from jalign.state import TrainState
from jalign.steps.common import accumulate_gradients, model_params, shifted_logprobs


def make_sft_step(config: ModelConfig, optimizer: optax.GradientTransformation, *,
                  schedule: optax.Schedule | None = None, grad_accum_steps: int = 1,
                  logprob_impl: str = "auto") -> Callable:
    """Returns a pure `step(state, batch) -> (state, metrics)` for SFT.

    The loss is the mean negative log-likelihood over every completion token in
    the batch (TRL's token-level average). `batch` holds `tokens`, `loss_mask`,
    `segment_ids` and `positions`, each [B, T] (see jalign.data). Packed and padded
    batches are handled alike: only positions with loss_mask 1 are scored.

    Metrics: loss, num_tokens, mean_token_accuracy, entropy, grad_norm,
    learning_rate (TRL's names).
    """

    def sum_loss(params, batch, rng):
        logps, mask, stats = shifted_logprobs(params, config, batch, logprob_impl=logprob_impl,
                                              with_stats=True, dropout_rng=rng)
        sums = {
            "count": mask.sum(),
            "correct": jnp.where(mask > 0, stats["is_argmax"], False).sum().astype(jnp.float32),
            "entropy": jnp.where(mask > 0, stats["entropy"], 0.0).sum(),
        }
        return -jnp.where(mask > 0, logps, 0.0).sum(), sums

    def step(state: TrainState, batch):
        rng = state.step_rng()
        (loss_sum, sums), grads = accumulate_gradients(
            lambda p, b: sum_loss(model_params(p, state.frozen), b, rng), state.params, batch,
            grad_accum_steps)
        count = jnp.maximum(sums["count"], 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss_sum / count,
            "num_tokens": sums["count"],
            "mean_token_accuracy": sums["correct"] / count,
            "entropy": sums["entropy"] / count,
            "grad_norm": optax.global_norm(grads),
        }
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return step
