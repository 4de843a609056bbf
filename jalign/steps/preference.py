"""Reward-model, DPO-family and KTO steps over preference batches.

Batches follow jalign.data.preference: rows of `tokens`, `loss_mask`,
`segment_ids`, `positions` plus `sequence_index` (2*pair for chosen tokens,
2*pair+1 for rejected ones, -1 on padding) and `pair_mask` [B]. Padded and
packed (padding-free) batches are handled alike: per-sequence sums are segment
sums over `sequence_index`, so one forward pass covers chosen and rejected.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from jalign.models.config import ModelConfig
from jalign.models.heads import sequence_scores
from jalign.state import TrainState
from jalign.steps.common import model_params, reference_params, shifted_logprobs


def sequence_sums(values_RxT, mask_RxT, sequence_index_RxT, num_sequences: int):
    """Sums of `values` over the masked tokens of each sequence: [num_sequences]."""
    keep = (mask_RxT > 0) & (sequence_index_RxT >= 0)
    ids = jnp.where(keep, sequence_index_RxT, num_sequences).ravel()
    out = jax.ops.segment_sum(jnp.where(keep, values_RxT, 0.0).ravel(), ids,
                              num_segments=num_sequences + 1)
    return out[:num_sequences]


def sequence_logps(params, config: ModelConfig, batch: Mapping[str, jax.Array], num_sequences: int,
                   *, prefix: str = "", logprob_impl: str = "auto",
                   dropout_rng: jax.Array | None = None):
    """Summed completion log-probs and completion lengths per sequence ([S], [S])."""
    view = {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)} if prefix else batch
    logps_RxT, mask_RxT = shifted_logprobs(params, config, view, logprob_impl=logprob_impl,
                                           dropout_rng=dropout_rng)
    seq_RxT = view["sequence_index"][:, 1:]
    return (sequence_sums(logps_RxT, mask_RxT, seq_RxT, num_sequences),
            sequence_sums(jnp.ones_like(logps_RxT), mask_RxT, seq_RxT, num_sequences))


def _pair_mean(losses_B, pair_mask_B):
    return jnp.sum(losses_B * pair_mask_B) / jnp.maximum(pair_mask_B.sum(), 1.0)


def _apply(optimizer, state: TrainState, grads, metrics, schedule, **replace):
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads))
    if schedule is not None:
        metrics["learning_rate"] = schedule(state.step)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state, **replace), metrics


def pair_microbatches(batch: Mapping[str, jax.Array], num: int) -> dict[str, jax.Array]:
    """A padded pair batch (rows 2i, 2i+1 = pair i) as `num` microbatches of consecutive
    pairs: every array gains a leading [num] axis; sequence numbers restart per microbatch."""
    pairs, rows = batch["pair_mask"].shape[0], batch["tokens"].shape[0]
    if rows != 2 * pairs:
        raise ValueError("config.optimizer.grad_accum_steps > 1 over preference pairs needs "
                         "padded batches (config.data.packing=False): a packed row holds "
                         "segments of several pairs")
    if pairs % num:
        raise ValueError(f"{pairs} pairs per batch do not split into "
                         f"config.optimizer.grad_accum_steps={num} microbatches")
    micro = {k: v.reshape((num, v.shape[0] // num) + v.shape[1:]) for k, v in batch.items()}
    offsets = (2 * (pairs // num) * jnp.arange(num))[:, None, None]
    seq = micro["sequence_index"]
    micro["sequence_index"] = jnp.where(seq >= 0, seq - offsets, seq)
    return micro


def accumulate_pair_gradients(loss: Callable, params, batch, num: int):
    """`value_and_grad(loss, has_aux=True)(params, batch)` taken over `num` microbatches.

    `loss(params, batch) -> (mean over the real pairs (pair_mask), metrics)` with
    per-batch-mean metrics (and "num_tokens", a sum). Pair-weighted accumulation gives
    the full batch's loss and gradients for every per-pair loss (not for losses that
    compare pairs across the batch, e.g. loss_type aot).
    """
    grad_fn = jax.value_and_grad(lambda p, mb: _weighted(loss, p, mb), has_aux=True)
    if num == 1:
        return jax.value_and_grad(loss, has_aux=True)(params, batch)
    micro = pair_microbatches(batch, num)
    first = grad_fn(params, jax.tree.map(lambda x: x[0], micro))

    def body(carry, mb):
        return jax.tree.map(jnp.add, carry, grad_fn(params, mb)), None

    ((value, (metrics, weight)), grads), _ = jax.lax.scan(
        body, first, jax.tree.map(lambda x: x[1:], micro))
    weight = jnp.maximum(weight, 1.0)
    metrics = {k: v if k == "num_tokens" else v / num for k, v in metrics.items()}
    return (value / weight, metrics), jax.tree.map(lambda g: g / weight, grads)


def _weighted(loss, params, batch):
    value, metrics = loss(params, batch)
    weight = batch["pair_mask"].sum()
    return value * weight, (metrics, weight)


def make_reward_step(config: ModelConfig, optimizer: optax.GradientTransformation, *,
                     loss_fn: Callable, schedule: optax.Schedule | None = None,
                     grad_accum_steps: int = 1) -> Callable:
    """Bradley-Terry reward-model step: `loss_fn(chosen_rewards, rejected_rewards)`.

    `loss_fn` is e.g. `functools.partial(jalign.losses.reward_loss,
    center_rewards_coefficient=0.01)`; the optional per-pair margin is read from
    `batch["margin"]` when present. Scores are read at each sequence's last token.
    """

    def loss(params, batch):
        num_pairs = batch["pair_mask"].shape[0]
        scores = sequence_scores(params, config, batch, 2 * num_pairs)
        kwargs = {"margin": batch["margin"]} if "margin" in batch else {}
        losses, metrics = loss_fn(scores[0::2], scores[1::2], **kwargs)
        num_tokens = (batch["segment_ids"] > 0).sum().astype(jnp.float32)
        return _pair_mean(losses, batch["pair_mask"]), dict(metrics, num_tokens=num_tokens)

    def step(state: TrainState, batch):
        (value, metrics), grads = accumulate_pair_gradients(
            lambda p, b: loss(model_params(p, state.frozen), b), state.params, batch,
            grad_accum_steps)
        return _apply(optimizer, state, grads, dict(metrics, loss=value), schedule)

    return step


def make_dpo_step(config: ModelConfig, optimizer: optax.GradientTransformation, *,
                  loss_fn: Callable, reference: str = "params", ref_sync_every: int = 0,
                  ref_sync_mixup: float = 1.0, schedule: optax.Schedule | None = None,
                  logprob_impl: str = "auto", grad_accum_steps: int = 1) -> Callable:
    """DPO-family step: one forward over chosen and rejected, any pairwise loss.

    `loss_fn(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
    chosen_lengths, rejected_lengths) -> (losses_B, metrics)`, e.g. a partial of
    `jalign.losses.dpo_loss` (any loss_type), or a reference-free loss wrapped to
    ignore the reference (SimPO, CPO, ORPO).

    reference:
      "params"      -- reference log-probs from `state.frozen["reference"]`
                       (a frozen tree sharded like the policy, no optimizer state);
      "precomputed" -- from `batch["ref_chosen_logps"]` / `batch["ref_rejected_logps"]`;
      "none"        -- reference-free losses: zeros are passed.
    TR-DPO (Gorbatovski et al. 2024): with `ref_sync_every` = N > 0 the reference
    is replaced every N steps by `mixup * policy + (1 - mixup) * reference`.
    `grad_accum_steps` > 1 takes the gradient over that many microbatches of pairs
    (padded batches; see `accumulate_pair_gradients`).
    """
    if reference not in ("params", "precomputed", "none"):
        raise ValueError(f"reference must be 'params', 'precomputed' or 'none', got {reference!r}")
    if ref_sync_every and reference != "params":
        raise ValueError("TR-DPO reference syncing (ref_sync_every > 0) needs reference='params'")
    if ref_sync_every and config.lora_rank:
        raise ValueError("TR-DPO reference syncing (config.dpo.ref_sync_every > 0) does not apply "
                         "to LoRA runs, whose reference is the base model (model.lora_rank > 0)")

    def reference_logps(state, batch, num_pairs):
        if reference == "params":
            ref, _ = sequence_logps(reference_params(state.frozen), config, batch, 2 * num_pairs,
                                    logprob_impl=logprob_impl)
            ref = jax.lax.stop_gradient(ref)
            return ref[0::2], ref[1::2]
        if reference == "precomputed":
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        zeros = jnp.zeros((num_pairs,), jnp.float32)
        return zeros, zeros

    def loss(params, state, batch):
        num_pairs = batch["pair_mask"].shape[0]
        logps, lengths = sequence_logps(model_params(params, state.frozen), config, batch,
                                        2 * num_pairs, logprob_impl=logprob_impl,
                                        dropout_rng=state.step_rng())
        ref_c, ref_r = reference_logps(state, batch, num_pairs)
        losses, metrics = loss_fn(logps[0::2], logps[1::2], ref_c, ref_r,
                                  chosen_lengths=jnp.maximum(lengths[0::2], 1.0),
                                  rejected_lengths=jnp.maximum(lengths[1::2], 1.0))
        metrics = dict(metrics, num_tokens=lengths.sum())
        return _pair_mean(losses, batch["pair_mask"]), metrics

    def step(state: TrainState, batch):
        (value, metrics), grads = accumulate_pair_gradients(
            lambda p, b: loss(p, state, b), state.params, batch, grad_accum_steps)
        new_state, metrics = _apply(optimizer, state, grads, dict(metrics, loss=value), schedule)
        if ref_sync_every:
            sync = (new_state.step % ref_sync_every) == 0
            mixed = jax.tree.map(
                lambda p, r: jnp.where(sync, ref_sync_mixup * p + (1 - ref_sync_mixup) * r, r)
                .astype(r.dtype), new_state.params, state.frozen["reference"])
            new_state = new_state.replace(frozen=dict(state.frozen, reference=mixed))
        return new_state, metrics

    return step


def make_kto_step(config: ModelConfig, optimizer: optax.GradientTransformation, *,
                  loss_fn: Callable, reference: str = "params",
                  schedule: optax.Schedule | None = None, logprob_impl: str = "auto") -> Callable:
    """KTO step over unpaired batches (`label` [B], mismatched `kl_*` rows for z0).

    `loss_fn(logps, ref_logps, desirable, *, kl_logps, ref_kl_logps)`, e.g. a
    partial of `jalign.losses.kto_loss`. reference is "params" or "precomputed"
    (`batch["ref_logps"]`, `batch["ref_kl_logps"]`).
    """
    if reference not in ("params", "precomputed"):
        raise ValueError(f"KTO reference must be 'params' or 'precomputed', got {reference!r}")

    def loss(params, state, batch):
        n = batch["pair_mask"].shape[0]
        params = model_params(params, state.frozen)
        logps, lengths = sequence_logps(params, config, batch, n, logprob_impl=logprob_impl,
                                        dropout_rng=state.step_rng())
        kl_logps, _ = sequence_logps(params, config, batch, n, prefix="kl_",
                                     logprob_impl=logprob_impl)
        if reference == "params":
            ref = reference_params(state.frozen)
            ref_logps = sequence_logps(ref, config, batch, n, logprob_impl=logprob_impl)[0]
            ref_kl = sequence_logps(ref, config, batch, n, prefix="kl_", logprob_impl=logprob_impl)[0]
        else:
            ref_logps, ref_kl = batch["ref_logps"], batch["ref_kl_logps"]
        desirable = (batch["label"] > 0) & (batch["pair_mask"] > 0)
        losses, metrics = loss_fn(logps, jax.lax.stop_gradient(ref_logps), desirable,
                                  kl_logps=kl_logps, ref_kl_logps=jax.lax.stop_gradient(ref_kl))
        return _pair_mean(losses, batch["pair_mask"]), dict(metrics, num_tokens=lengths.sum())

    def step(state: TrainState, batch):
        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state.params, state, batch)
        return _apply(optimizer, state, grads, dict(metrics, loss=value), schedule)

    return step


def reference_logps_fn(config: ModelConfig, *, paired: bool = True,
                       logprob_impl: str = "auto") -> Callable[[Any, Mapping], dict]:
    """(params, batch) -> the reference log-probs a precompute pass stores next to the data."""

    def fn(params, batch):
        n = batch["pair_mask"].shape[0]
        if paired:
            logps, _ = sequence_logps(params, config, batch, 2 * n, logprob_impl=logprob_impl)
            return {"ref_chosen_logps": logps[0::2], "ref_rejected_logps": logps[1::2]}
        return {"ref_logps": sequence_logps(params, config, batch, n, logprob_impl=logprob_impl)[0],
                "ref_kl_logps": sequence_logps(params, config, batch, n, prefix="kl_",
                                               logprob_impl=logprob_impl)[0]}

    return fn
