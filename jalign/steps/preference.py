"""Reward-model, DPO-family and KTO steps over preference batches.

Batches follow jalign.data.preference_batches: rows of `tokens`, `loss_mask`,
`segment_ids`, `positions` [R, T] plus `sequence_index` [R, T] (2p for pair p's
chosen tokens, 2p+1 for its rejected ones, -1 on padding) and `pair_mask` [B]
(1 for real pairs, 0 for filler slots). Padded and packed (padding-free) batches
are handled alike: per-sequence sums are segment sums over `sequence_index`, so
one forward pass covers chosen and rejected, and every metric counts real pairs
only (the losses' `mask=`), so a packed and a padded batch of the same pairs give
the same metrics.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from jalign.models.config import ModelConfig
from jalign.models.heads import sequence_scores
from jalign.state import TrainState, model_params, reference_params
from jalign.steps.common import completion_mask, gradient_update, split_logprob_output


def sequence_sums(values_RxT, mask_RxT, sequence_index_RxT, num_sequences: int):
    """Sums of `values` over the masked tokens of each sequence: [num_sequences]."""
    keep = (mask_RxT > 0) & (sequence_index_RxT >= 0)
    ids = jnp.where(keep, sequence_index_RxT, num_sequences).ravel()
    out = jax.ops.segment_sum(jnp.where(keep, values_RxT, 0.0).ravel(), ids,
                              num_segments=num_sequences + 1)
    return out[:num_sequences]


def sequence_logp_sums(logprob_fn: Callable, params, batch: Mapping[str, jax.Array],
                       num_sequences: int, *, prefix: str = "", rng: jax.Array | None = None,
                       with_prompt: bool = False):
    """Summed completion log-probs and completion lengths per sequence ([S], [S]).

    `prefix` reads the rows `prefix + key` of the batch (KTO's "kl_" rows). With
    `with_prompt`, also the sums and counts over every scored token of the sequence,
    prompt included (its first token has no prediction): ([S], [S], [S], [S]).
    """
    view = {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)} if prefix else batch
    logps_RxT = split_logprob_output(logprob_fn(params, view, rng))[0]
    seq_RxT = view["sequence_index"][:, 1:]
    masks = [completion_mask(view)]
    if with_prompt:
        masks.append(view["sequence_index"][:, :-1] == seq_RxT)  # next token, same sequence
    out = []
    for mask_RxT in masks:
        out += [sequence_sums(logps_RxT, mask_RxT, seq_RxT, num_sequences),
                sequence_sums(jnp.ones_like(logps_RxT), mask_RxT, seq_RxT, num_sequences)]
    return tuple(out)


def _pair_sums(losses_B, metrics, pair_mask_B, num_tokens):
    """A per-pair loss and its (masked-mean) metrics as the update core's sums."""
    count = pair_mask_B.sum()
    sums = {k: v * count for k, v in metrics.items()}
    sums.update(num_tokens=num_tokens)
    return jnp.where(pair_mask_B > 0, losses_B, 0.0).sum(), sums


def _real_pairs(batch):
    return batch["pair_mask"].sum()


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


def decoder_score_fn(config: ModelConfig) -> Callable:
    """jalign's scalar model as a score function `(params, batch) -> scores [2B]`: each
    sequence's score at its last token, in `sequence_index` order."""
    return lambda params, batch: sequence_scores(params, config, batch,
                                                 2 * batch["pair_mask"].shape[0])


def make_reward_step(score_fn: Callable, optimizer: optax.GradientTransformation, *,
                     loss_fn: Callable, grad_accum_steps: int = 1) -> Callable:
    """Bradley-Terry reward-model step.

    Args:
        score_fn: `(params, batch) -> scores [2B]` (sequence 2p = pair p's chosen,
            2p+1 its rejected), e.g. `decoder_score_fn(model_cfg)`.
        loss_fn: `(chosen_rewards, rejected_rewards, *, mask, [margin]) -> (losses_B,
            metrics)`, e.g. `functools.partial(jalign.losses.reward_loss,
            center_rewards_coefficient=0.01)`; the optional per-pair margin is read
            from `batch["margin"]` when present.
        grad_accum_steps: microbatches of consecutive pairs (padded batches).

    Metrics: the loss's (accuracy, margin, ...; means over real pairs), loss,
    num_tokens, grad_norm.
    """

    def sum_loss(params, batch):
        scores = score_fn(params, batch)
        kwargs = {"margin": batch["margin"]} if "margin" in batch else {}
        losses, metrics = loss_fn(scores[0::2], scores[1::2], mask=batch["pair_mask"], **kwargs)
        num_tokens = (batch["segment_ids"] > 0).sum().astype(jnp.float32)
        return _pair_sums(losses, metrics, batch["pair_mask"], num_tokens)

    def step(state: TrainState, batch):
        state, metrics = gradient_update(
            optimizer, state, lambda p, b: sum_loss(model_params(p, state.frozen), b), batch,
            count_fn=_real_pairs, num_microbatches=grad_accum_steps, split=pair_microbatches)
        return state.replace(step=state.step + 1), metrics

    return step


REFERENCE_MODES = ("params", "precomputed", "none")


def make_dpo_step(logprob_fn: Callable, optimizer: optax.GradientTransformation, *,
                  loss_fn: Callable, reference: str = "params", ref_sync_every: int = 0,
                  ref_sync_mixup: float = 1.0, grad_accum_steps: int = 1,
                  nll_over_prompt: bool = False) -> Callable:
    """DPO-family step: one forward over chosen and rejected, any pairwise loss.

    Args:
        logprob_fn: `(params, batch, rng=None) -> logps [R, T-1]` (see
            `jalign.steps.common`), e.g. `decoder_logprob_fn(model_cfg)`.
        loss_fn: `(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
            *, chosen_lengths, rejected_lengths, mask) -> (losses_B, metrics)`, e.g. a
            partial of `jalign.losses.dpo_loss` (any loss_type), or a reference-free
            loss wrapped to ignore the reference (SimPO, CPO, ORPO). `mask` is
            `batch["pair_mask"]`: metrics must count real pairs only.
        reference:
          "params"      -- reference log-probs from `state.frozen["reference"]` (a
                           frozen tree sharded like the policy, no optimizer state;
                           with LoRA the base model, adapters disabled);
          "precomputed" -- from `batch["ref_chosen_logps"]` / `batch["ref_rejected_logps"]`;
          "none"        -- reference-free losses: zeros are passed.
        ref_sync_every, ref_sync_mixup: TR-DPO (Gorbatovski et al. 2024): every N > 0
            steps the reference becomes `mixup * policy + (1 - mixup) * reference`.
        grad_accum_steps: microbatches of consecutive pairs (padded batches).
        nll_over_prompt: pass `chosen_nll` to `loss_fn`: the token-mean NLL of the real
            chosen sequences over prompt and completion tokens (TRL's ORPO / CPO NLL);
            by default the loss computes its NLL from the completion log-probs.

    Metrics: the loss's (rewards/chosen, rewards/rejected, rewards/accuracies,
    rewards/margins, logps/chosen, logps/rejected for dpo_loss), loss, num_tokens
    (completion tokens), grad_norm.
    """
    if reference not in REFERENCE_MODES:
        raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {reference!r}")
    if ref_sync_every and reference != "params":
        raise ValueError("TR-DPO reference syncing (ref_sync_every > 0) needs reference='params'")

    def reference_logps(state, batch, num_pairs):
        if reference == "params":
            ref, _ = sequence_logp_sums(logprob_fn, reference_params(state.frozen), batch,
                                        2 * num_pairs)
            ref = jax.lax.stop_gradient(ref)
            return ref[0::2], ref[1::2]
        if reference == "precomputed":
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        zeros = jnp.zeros((num_pairs,), jnp.float32)
        return zeros, zeros

    def sum_loss(params, state, batch):
        num_pairs = batch["pair_mask"].shape[0]
        sums = sequence_logp_sums(logprob_fn, model_params(params, state.frozen), batch,
                                  2 * num_pairs, rng=state.step_rng(), with_prompt=nll_over_prompt)
        logps, lengths = sums[:2]
        extra = {}
        if nll_over_prompt:
            real = batch["pair_mask"] > 0
            total = jnp.where(real, sums[2][0::2], 0.0).sum()
            count = jnp.maximum(jnp.where(real, sums[3][0::2], 0.0).sum(), 1.0)
            extra["chosen_nll"] = jnp.broadcast_to(-total / count, (num_pairs,))
        ref_c, ref_r = reference_logps(state, batch, num_pairs)
        losses, metrics = loss_fn(logps[0::2], logps[1::2], ref_c, ref_r,
                                  chosen_lengths=jnp.maximum(lengths[0::2], 1.0),
                                  rejected_lengths=jnp.maximum(lengths[1::2], 1.0),
                                  mask=batch["pair_mask"], **extra)
        return _pair_sums(losses, metrics, batch["pair_mask"], lengths.sum())

    def step(state: TrainState, batch):
        new_state, metrics = gradient_update(
            optimizer, state, lambda p, b: sum_loss(p, state, b), batch,
            count_fn=_real_pairs, num_microbatches=grad_accum_steps, split=pair_microbatches)
        new_state = new_state.replace(step=state.step + 1)
        if ref_sync_every:
            sync = (new_state.step % ref_sync_every) == 0
            mixed = jax.tree.map(
                lambda p, r: jnp.where(sync, ref_sync_mixup * p + (1 - ref_sync_mixup) * r, r)
                .astype(r.dtype), new_state.params, state.frozen["reference"])
            new_state = new_state.replace(frozen=dict(state.frozen, reference=mixed))
        return new_state, metrics

    return step


def make_kto_step(logprob_fn: Callable, optimizer: optax.GradientTransformation, *,
                  loss_fn: Callable, reference: str = "params") -> Callable:
    """KTO step over unpaired batches.

    Args:
        logprob_fn: as for `make_dpo_step`.
        loss_fn: `(logps, ref_logps, desirable, *, kl_logps, ref_kl_logps, mask)`, e.g.
            a partial of `jalign.losses.kto_loss`.
        reference: "params" (`state.frozen["reference"]`) or "precomputed"
            (`batch["ref_logps"]`, `batch["ref_kl_logps"]`).

    The batch holds B rows (`sequence_index` = the example's slot), `label` [B]
    (1 desirable), `pair_mask` [B] and the mismatched `kl_*` rows for KTO's
    reference point z0 (see jalign.data.preference). Metrics: the loss's, loss,
    num_tokens, grad_norm.
    """
    if reference not in ("params", "precomputed"):
        raise ValueError(f"KTO reference must be 'params' or 'precomputed', got {reference!r}")

    def sum_loss(params, state, batch):
        n = batch["pair_mask"].shape[0]
        params = model_params(params, state.frozen)
        logps, lengths = sequence_logp_sums(logprob_fn, params, batch, n, rng=state.step_rng())
        kl_logps, _ = sequence_logp_sums(logprob_fn, params, batch, n, prefix="kl_")
        if reference == "params":
            ref = reference_params(state.frozen)
            ref_logps = sequence_logp_sums(logprob_fn, ref, batch, n)[0]
            ref_kl = sequence_logp_sums(logprob_fn, ref, batch, n, prefix="kl_")[0]
        else:
            ref_logps, ref_kl = batch["ref_logps"], batch["ref_kl_logps"]
        desirable = (batch["label"] > 0) & (batch["pair_mask"] > 0)
        losses, metrics = loss_fn(logps, jax.lax.stop_gradient(ref_logps), desirable,
                                  kl_logps=kl_logps, ref_kl_logps=jax.lax.stop_gradient(ref_kl),
                                  mask=batch["pair_mask"])
        return _pair_sums(losses, metrics, batch["pair_mask"], lengths.sum())

    def step(state: TrainState, batch):
        new_state, metrics = gradient_update(optimizer, state,
                                             lambda p, b: sum_loss(p, state, b), batch,
                                             count_fn=_real_pairs)
        return new_state.replace(step=state.step + 1), metrics

    return step


def reference_logps_fn(logprob_fn: Callable, *, paired: bool = True) -> Callable[[Any, Mapping], dict]:
    """(params, batch) -> the reference log-probs a precompute pass stores next to the data."""

    def fn(params, batch):
        n = batch["pair_mask"].shape[0]
        if paired:
            logps, _ = sequence_logp_sums(logprob_fn, params, batch, 2 * n)
            return {"ref_chosen_logps": logps[0::2], "ref_rejected_logps": logps[1::2]}
        return {"ref_logps": sequence_logp_sums(logprob_fn, params, batch, n)[0],
                "ref_kl_logps": sequence_logp_sums(logprob_fn, params, batch, n, prefix="kl_")[0]}

    return fn
