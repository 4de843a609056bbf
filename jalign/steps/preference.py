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

from jalign.lora import ADAPTER_SUFFIXES
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


def _rows(batch: Mapping[str, jax.Array], prefix: str) -> Mapping[str, jax.Array]:
    """The rows `prefix + key` of the batch under their plain names (KTO's "kl_" rows)."""
    return {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)} if prefix else batch


def _logp_sums(logps_RxT, view: Mapping[str, jax.Array], num_sequences: int, with_prompt: bool):
    seq_RxT = view["sequence_index"][:, 1:]
    masks = [completion_mask(view)]
    if with_prompt:
        masks.append(view["sequence_index"][:, :-1] == seq_RxT)  # next token, same sequence
    out = []
    for mask_RxT in masks:
        out += [sequence_sums(logps_RxT, mask_RxT, seq_RxT, num_sequences),
                sequence_sums(jnp.ones_like(logps_RxT), mask_RxT, seq_RxT, num_sequences)]
    return tuple(out)


def sequence_logp_sums(logprob_fn: Callable, params, batch: Mapping[str, jax.Array],
                       num_sequences: int, *, prefix: str = "", rng: jax.Array | None = None,
                       with_prompt: bool = False):
    """Summed completion log-probs and completion lengths per sequence ([S], [S]).

    `prefix` reads the rows `prefix + key` of the batch (KTO's "kl_" rows). With
    `with_prompt`, also the sums and counts over every scored token of the sequence,
    prompt included (its first token has no prediction): ([S], [S], [S], [S]).
    """
    view = _rows(batch, prefix)
    logps_RxT = split_logprob_output(logprob_fn(params, view, rng))[0]
    return _logp_sums(logps_RxT, view, num_sequences, with_prompt)


def policy_is_reference(state: TrainState) -> jax.Array:
    """Whether the policy computes exactly the reference's function (bool scalar).

    True when `state.params` equal `state.frozen["reference"]` leaf by leaf (step 1,
    or right after a TR-DPO sync with mixup 1), or, with LoRA, when every adapter's B
    is zero (the adapters add exact zeros to the base, which is the reference). A
    compare over the parameters, no forward pass: the steps then use the policy's own
    log-probs as the reference's, so the implicit rewards are exactly 0. Two compiled
    forwards of the same function differ in the last bits (XLA fuses the
    differentiated one differently: ~1e-6 in float32), which would show as rewards of
    +-1e-6 and a random rewards/accuracies at step 1.
    """
    frozen = state.frozen or {}
    if "reference" in frozen:
        policy, reference = state.params, frozen["reference"]
        if jax.tree.structure(policy) != jax.tree.structure(reference):
            return jnp.asarray(False)
        pairs = list(zip(jax.tree.leaves(policy), jax.tree.leaves(reference)))
        if any(p.shape != r.shape for p, r in pairs):
            return jnp.asarray(False)
        return jnp.stack([jnp.array_equal(p, r) for p, r in pairs]).all()
    if "base" in frozen:
        leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
        names = [str(getattr(path[-1], "key", path[-1])) for path, _ in leaves]
        if not leaves or not all(n.endswith(ADAPTER_SUFFIXES) for n in names):
            return jnp.asarray(False)
        return jnp.stack([(leaf == 0).all() for (_, leaf), n in zip(leaves, names)
                          if n.endswith("_lora_b")]).all()
    return jnp.asarray(False)


def _pair_token_stats(stats: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> dict:
    """TRL's token-level DPO statistics of the policy, as (sum, count) pairs over the
    completion tokens of real pairs: entropy (chosen and rejected), mean_token_accuracy
    (chosen), logits/chosen and logits/rejected (the mean over the vocabulary)."""
    seq_RxT = batch["sequence_index"][:, 1:]
    real_RxT = ((completion_mask(batch) > 0) & (seq_RxT >= 0)
                & (batch["pair_mask"][jnp.maximum(seq_RxT, 0) // 2] > 0))
    chosen_RxT = real_RxT & (seq_RxT % 2 == 0)
    rejected_RxT = real_RxT & (seq_RxT % 2 == 1)

    def mean_over(mask_RxT, values_RxT):
        return (jnp.where(mask_RxT, values_RxT, 0.0).sum(dtype=jnp.float32),
                mask_RxT.sum(dtype=jnp.float32))

    out = {}
    if "entropy" in stats:
        out["entropy"] = mean_over(real_RxT, stats["entropy"])
    if "is_argmax" in stats:
        out["mean_token_accuracy"] = mean_over(chosen_RxT, stats["is_argmax"].astype(jnp.float32))
    if "mean_logit" in stats:
        out["logits/chosen"] = mean_over(chosen_RxT, stats["mean_logit"])
        out["logits/rejected"] = mean_over(rejected_RxT, stats["mean_logit"])
    return out


def _pair_sums(losses_B, metrics, pair_mask_B):
    """A per-pair loss and its (masked-mean) metrics as the update core's sums."""
    count = pair_mask_B.sum()
    sums = {k: v * count for k, v in metrics.items()}
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

    Metrics: the loss's (accuracy, margin, ...; means over real pairs), loss, grad_norm.
    """

    def sum_loss(params, batch):
        scores = score_fn(params, batch)
        kwargs = {"margin": batch["margin"]} if "margin" in batch else {}
        losses, metrics = loss_fn(scores[0::2], scores[1::2], mask=batch["pair_mask"], **kwargs)
        return _pair_sums(losses, metrics, batch["pair_mask"])

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

    With `reference="params"`, while the policy computes the reference's very function
    (step 1; see `policy_is_reference`) the reference log-probs are the policy's own, so
    the implicit rewards and margins are exactly 0 and rewards/accuracies exactly 0.

    Metrics: the loss's (rewards/chosen, rewards/rejected, rewards/accuracies,
    rewards/margins, logps/chosen, logps/rejected for dpo_loss), loss, grad_norm and,
    when `logprob_fn` returns them (`decoder_logprob_fn(model_cfg, with_stats=True)`),
    TRL's token statistics of the policy over completion tokens: entropy (chosen and
    rejected), mean_token_accuracy (chosen), logits/chosen and logits/rejected (the
    logits' mean over the vocabulary).
    """
    if reference not in REFERENCE_MODES:
        raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {reference!r}")
    if ref_sync_every and reference != "params":
        raise ValueError("TR-DPO reference syncing (ref_sync_every > 0) needs reference='params'")

    def reference_logps(state, batch, num_pairs, policy_logps, same):
        if reference == "params":
            ref, _ = sequence_logp_sums(logprob_fn, reference_params(state.frozen), batch,
                                        2 * num_pairs)
            # The same function as the policy: its own log-probs (see policy_is_reference).
            ref = jnp.where(same, policy_logps, jax.lax.stop_gradient(ref))
            return ref[0::2], ref[1::2]
        if reference == "precomputed":
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        zeros = jnp.zeros((num_pairs,), jnp.float32)
        return zeros, zeros

    def sum_loss(params, state, batch, same):
        num_pairs = batch["pair_mask"].shape[0]
        out = logprob_fn(model_params(params, state.frozen), batch, state.step_rng())
        logps_RxT, stats = split_logprob_output(out)
        sums = _logp_sums(logps_RxT, batch, 2 * num_pairs, nll_over_prompt)
        logps, lengths = sums[:2]
        extra = {}
        if nll_over_prompt:
            real = batch["pair_mask"] > 0
            total = jnp.where(real, sums[2][0::2], 0.0).sum()
            count = jnp.maximum(jnp.where(real, sums[3][0::2], 0.0).sum(), 1.0)
            extra["chosen_nll"] = jnp.broadcast_to(-total / count, (num_pairs,))
        ref_c, ref_r = reference_logps(state, batch, num_pairs, jax.lax.stop_gradient(logps), same)
        losses, metrics = loss_fn(logps[0::2], logps[1::2], ref_c, ref_r,
                                  chosen_lengths=jnp.maximum(lengths[0::2], 1.0),
                                  rejected_lengths=jnp.maximum(lengths[1::2], 1.0),
                                  mask=batch["pair_mask"], **extra)
        loss_sum, metric_sums = _pair_sums(losses, metrics, batch["pair_mask"])
        return loss_sum, {**metric_sums, **_pair_token_stats(stats, batch)}

    def step(state: TrainState, batch):
        same = policy_is_reference(state) if reference == "params" else jnp.asarray(False)
        new_state, metrics = gradient_update(
            optimizer, state, lambda p, b: sum_loss(p, state, b, same), batch,
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
    reference point z0 (see jalign.data.preference). With `reference="params"` the
    reference log-probs are the policy's own while the two are the same function (as in
    `make_dpo_step`). Metrics: the loss's, loss, grad_norm.
    """
    if reference not in ("params", "precomputed"):
        raise ValueError(f"KTO reference must be 'params' or 'precomputed', got {reference!r}")

    def sum_loss(params, state, batch, same):
        n = batch["pair_mask"].shape[0]
        params = model_params(params, state.frozen)
        logps, _ = sequence_logp_sums(logprob_fn, params, batch, n, rng=state.step_rng())
        kl_logps, _ = sequence_logp_sums(logprob_fn, params, batch, n, prefix="kl_")
        if reference == "params":
            ref = reference_params(state.frozen)
            ref_logps = sequence_logp_sums(logprob_fn, ref, batch, n)[0]
            ref_kl = sequence_logp_sums(logprob_fn, ref, batch, n, prefix="kl_")[0]
            # The same function as the policy: its own log-probs (see policy_is_reference).
            ref_logps = jnp.where(same, logps, ref_logps)
            ref_kl = jnp.where(same, kl_logps, ref_kl)
        else:
            ref_logps, ref_kl = batch["ref_logps"], batch["ref_kl_logps"]
        desirable = (batch["label"] > 0) & (batch["pair_mask"] > 0)
        losses, metrics = loss_fn(logps, jax.lax.stop_gradient(ref_logps), desirable,
                                  kl_logps=kl_logps, ref_kl_logps=jax.lax.stop_gradient(ref_kl),
                                  mask=batch["pair_mask"])
        return _pair_sums(losses, metrics, batch["pair_mask"])

    def step(state: TrainState, batch):
        same = policy_is_reference(state) if reference == "params" else jnp.asarray(False)
        new_state, metrics = gradient_update(optimizer, state,
                                             lambda p, b: sum_loss(p, state, b, same), batch,
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
