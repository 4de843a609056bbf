"""Pieces every step factory shares: log-prob functions, the gradient-update core.

A step factory takes a *log-prob function*, so it works with any model:

    logprob_fn(params, batch, rng=None) -> logps_BxT  float32 [B, T-1]

Position t of the result scores token t+1 of `batch["tokens"]` given tokens <= t
(the step masks it with `batch["loss_mask"][:, 1:]`). `rng` is a PRNG key for
training-time randomness (e.g. LoRA dropout); a function without dropout ignores
it. `decoder_logprob_fn` is jalign's, for its decoder; `colabs/embed.py` shows one
for a user's own Flax model.

The update core: a step writes its objective as a *sum* over examples plus
additive statistics, `sum_loss_fn(params, batch) -> (loss_sum, sums)`, and names
its normaliser, `count_fn(batch)` (tokens for SFT, real pairs for DPO, 1 for a
loss that is already a mean). `gradient_update` divides by the count and takes the
gradient over one or several microbatches (sums add up, so k microbatches give the
big batch's result) and applies the optimizer. A statistic with its own
denominator (a mean over tokens in a per-pair step) is given as a
`(numerator, denominator)` pair of sums.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from jalign.models.config import ModelConfig
from jalign.models.transformer import Decoder, unembedding
from jalign.ops import token_logprobs
from jalign.state import TrainState

def shifted_logprobs(params: Any, config: ModelConfig, batch: Mapping[str, jax.Array], *,
                     logprob_impl: str = "auto", with_stats: bool = False,
                     dropout_rng: jax.Array | None = None, temperature: float = 1.0):
    """jalign's decoder: per-token log-probs of each next token [B, T-1] float32, plus a mask.

    Position t of the result scores token t+1 given tokens <= t. The mask is
    `loss_mask[:, 1:]`, so prompt tokens and segment starts are never scored.
    With `with_stats`, also returns the entropy, whether the target was the arg-max
    token (for the mean_token_accuracy metric) and the mean over the vocabulary of
    the logits (TRL's logits/chosen; None for a soft-capped model, see
    `token_logprobs`), without building logits. The entropy is differentiable (PPO's
    entropy bonus); the others carry no gradient.
    `dropout_rng` switches on LoRA dropout (training forward passes only).
    `temperature` T scores under softmax(logits / T), the distribution a sampler at T
    draws from (RL: the trainer's log-probs match the behaviour log-probs, as TRL and
    verl divide the logits by the sampling temperature). The model soft-caps before the
    temperature, the op after it, so the op gets the cap c / T: (c/T) tanh((z/T) / (c/T))
    = c tanh(z/c) / T.
    """
    rngs = {"dropout": dropout_rng} if dropout_rng is not None and config.lora_dropout else {}
    hidden_BxTxH = Decoder(config).apply({"params": params}, batch["tokens"],
                                         batch.get("positions"), batch.get("segment_ids"),
                                         rngs=rngs)
    targets_BxT = batch["tokens"][:, 1:]
    mask_BxT = batch["loss_mask"][:, 1:].astype(jnp.float32)
    hidden_BxTxH, cap = hidden_BxTxH[:, :-1], config.final_logit_softcap
    scaling = dict(temperature=temperature, logit_softcap=None if cap is None else cap / temperature)
    if not with_stats:
        return token_logprobs(hidden_BxTxH, unembedding(params, config), targets_BxT,
                              impl=logprob_impl, **scaling), mask_BxT
    out = token_logprobs(hidden_BxTxH, unembedding(params, config), targets_BxT,
                         return_entropy=True, return_max_logit=True, return_lse=True,
                         return_mean_logit=cap is None, impl=logprob_impl, **scaling)
    # The target is the arg-max exactly when its logit equals the maximum logit,
    # i.e. log p(target) == max_logit - lse (up to float rounding).
    is_argmax_BxT = out.logps >= (out.max_logit - out.lse) - 1e-5
    stats = {"entropy": out.entropy, "is_argmax": is_argmax_BxT}
    if out.mean_logit is not None:
        stats["mean_logit"] = out.mean_logit
    return out.logps, mask_BxT, stats


def decoder_logprob_fn(config: ModelConfig, *, logprob_impl: str = "auto",
                       with_stats: bool = False, temperature: float = 1.0) -> Callable:
    """jalign's decoder as a log-prob function `(params, batch, rng=None) -> logps [B, T-1]`.

    With `with_stats` it returns a dict {"logps", "entropy", "is_argmax", "mean_logit"}
    instead (the SFT and DPO steps read the extra per-token statistics for their
    metrics when present; "mean_logit" is absent for a soft-capped model).
    `temperature`: log-probs under softmax(logits / T) (`shifted_logprobs`; RL steps
    pass the sampling temperature).
    """
    def fn(params, batch, rng=None):
        out = shifted_logprobs(params, config, batch, logprob_impl=logprob_impl,
                               with_stats=with_stats, dropout_rng=rng, temperature=temperature)
        if with_stats:
            return {"logps": out[0], **out[2]}
        return out[0]
    return fn


def split_logprob_output(out) -> tuple[jax.Array, dict[str, jax.Array]]:
    """A log-prob function's output as (logps [B, T-1], per-token stats dict)."""
    if isinstance(out, Mapping):
        return out["logps"], {k: v for k, v in out.items() if k != "logps"}
    return out, {}


def input_token_count(batch: Mapping[str, jax.Array]) -> jax.Array:
    """Non-padding tokens of every row the model reads (prompt and completion; a KTO
    batch's "kl_" rows too): the positions of every `*segment_ids` array that are > 0,
    or every token when the batch has no segment ids. int32 scalar (TRL's num_tokens
    counts these, cumulatively)."""
    segments = [v for k, v in batch.items() if k.endswith("segment_ids")]
    if not segments:
        return jnp.asarray(batch["tokens"].size, jnp.int32)
    return sum((s > 0).sum(dtype=jnp.int32) for s in segments)


def completion_mask(batch: Mapping[str, jax.Array]) -> jax.Array:
    """The scored positions of a log-prob function's output: `loss_mask[:, 1:]`, float32."""
    return batch["loss_mask"][:, 1:].astype(jnp.float32)


def split_rows(batch: Mapping[str, jax.Array], num: int) -> dict[str, jax.Array]:
    """[B, ...] -> [num, B/num, ...] for every array in the batch."""
    def split(x):
        if x.shape[0] % num:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by "
                             f"config.optimizer.grad_accum_steps={num}")
        return x.reshape((num, x.shape[0] // num) + x.shape[1:])
    return {k: split(v) for k, v in batch.items()}


def accumulate_gradients(sum_loss_fn: Callable, params: Any, batch: Mapping[str, jax.Array],
                         num_microbatches: int, split: Callable = split_rows):
    """Summed `(loss_sum, sums)` and gradients of `sum_loss_fn` over microbatches.

    `split(batch, num)` gives every array a leading [num] axis (`split_rows`, or a
    split that keeps related rows together, such as a pair's chosen and rejected).
    Since everything is a sum, k microbatches give the same result as one batch.
    """
    grad_fn = jax.value_and_grad(sum_loss_fn, has_aux=True)
    if num_microbatches == 1:
        return grad_fn(params, batch)
    micro = split(batch, num_microbatches)

    def body(carry, mb):
        return jax.tree.map(jnp.add, carry, grad_fn(params, mb)), None

    first = grad_fn(params, jax.tree.map(lambda x: x[0], micro))
    out, _ = jax.lax.scan(body, first, jax.tree.map(lambda x: x[1:], micro))
    return out


def gradient_update(optimizer: optax.GradientTransformation, state: TrainState,
                    sum_loss_fn: Callable, batch: Mapping[str, jax.Array], *,
                    count_fn: Callable, num_microbatches: int = 1, split: Callable = split_rows):
    """The one optimizer update every step uses.

    `sum_loss_fn(params, batch) -> (loss_sum, sums)` is taken w.r.t. `state.params`
    (with LoRA: the adapters; the closure merges them over the frozen base with
    `model_params`); `count_fn(batch)` is the normaliser, a function of the batch only
    (completion tokens for SFT, real pairs for preference steps, 1 for a loss that is
    already a mean). Each microbatch's loss sum is divided by the whole batch's count
    before differentiating, so one batch and k microbatches are the same sum. Returns
    the state with new params and optimizer state (its `step` unchanged: a train step
    may take several updates) and the metrics: `loss` = loss_sum / count, every entry
    of `sums` divided by the count (a `(numerator, denominator)` pair: numerator /
    denominator, 0 when the denominator is 0) and `grad_norm` (before clipping).
    """
    count = jnp.maximum(jnp.asarray(count_fn(batch), jnp.float32), 1.0)

    def mean_loss(params, microbatch):
        loss_sum, sums = sum_loss_fn(params, microbatch)
        return loss_sum / count, sums

    (loss, sums), grads = accumulate_gradients(mean_loss, state.params, batch,
                                               num_microbatches, split)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    metrics = {k: v[0] / jnp.maximum(v[1], 1e-30) if isinstance(v, tuple) else v / count
               for k, v in sums.items()}
    metrics.update(loss=loss, grad_norm=optax.global_norm(grads))
    return state.replace(params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state), metrics
