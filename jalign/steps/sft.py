"""Supervised fine-tuning step: token-level NLL on completion tokens."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import optax

from jalign.state import TrainState, model_params
from jalign.steps.common import completion_mask, gradient_update, split_logprob_output


def make_sft_step(logprob_fn: Callable, optimizer: optax.GradientTransformation, *,
                  grad_accum_steps: int = 1) -> Callable:
    """Returns a pure `step(state, batch) -> (state, metrics)` for SFT.

    Args:
        logprob_fn: `(params, batch, rng=None) -> logps [B, T-1]` (see
            `jalign.steps.common`), e.g. `decoder_logprob_fn(model_cfg, with_stats=True)`.
            If it returns a dict with per-token "entropy" and "is_argmax" next to
            "logps", the entropy and mean_token_accuracy metrics are reported too.
        optimizer: an optax transformation over `state.params`.
        grad_accum_steps: microbatches per step (rows split evenly; the result
            equals the whole batch's).

    The loss is the mean negative log-likelihood over every completion token in the
    batch (TRL's token-level average). `batch` holds int32 [B, T] `tokens`,
    `loss_mask` (1 on completion tokens) and, for jalign's decoder, `segment_ids`
    and `positions` (see jalign.data); packed and padded batches alike.

    Metrics: loss, grad_norm, and with the statistics above mean_token_accuracy and
    entropy (TRL's names; means over completion tokens).
    """

    def sum_loss(params, batch, rng):
        logps, stats = split_logprob_output(logprob_fn(params, batch, rng))
        keep = completion_mask(batch) > 0
        sums = {}
        if "is_argmax" in stats:
            sums["mean_token_accuracy"] = (keep & stats["is_argmax"]).sum().astype(jnp.float32)
        if "entropy" in stats:
            sums["entropy"] = jnp.where(keep, stats["entropy"], 0.0).sum()
        return -jnp.where(keep, logps, 0.0).sum(), sums

    def step(state: TrainState, batch):
        rng = state.step_rng()
        state, metrics = gradient_update(
            optimizer, state, lambda p, b: sum_loss(model_params(p, state.frozen), b, rng), batch,
            count_fn=lambda b: completion_mask(b).sum(), num_microbatches=grad_accum_steps)
        return state.replace(step=state.step + 1), metrics

    return step
