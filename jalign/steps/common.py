"""Pieces shared by every step factory: policy log-probs and gradient accumulation."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jalign import lora
from jalign.models.config import ModelConfig
from jalign.models.transformer import Decoder, unembedding
from jalign.ops import token_logprobs


def model_params(params: Any, frozen: Mapping[str, Any] | None) -> Any:
    """The model's params as a loss sees them: with LoRA, the trained adapters over
    `frozen["base"]` (a dict union; gradients reach only the adapters)."""
    if frozen and "base" in frozen:
        return lora.merge(frozen["base"], params)
    return params


def reference_params(frozen: Mapping[str, Any], subtree: str | None = None) -> Any:
    """The frozen reference: `frozen["reference"]`, or with LoRA the base model with
    its adapters disabled (`frozen["base"]`, or its `subtree`), so no copy exists."""
    if "reference" in frozen:
        return frozen["reference"]
    base = frozen["base"]
    return base[subtree] if subtree else base


def shifted_logprobs(params: Any, config: ModelConfig, batch: Mapping[str, jax.Array], *,
                     logprob_impl: str = "auto", with_stats: bool = False,
                     dropout_rng: jax.Array | None = None):
    """Per-token log-probs of each next token: [B, T-1] float32, plus a mask.

    Position t of the result scores token t+1 given tokens <= t. The mask is
    `loss_mask[:, 1:]`, so prompt tokens and segment starts are never scored.
    With `with_stats`, also returns the entropy and whether the target was the
    arg-max token (for the mean_token_accuracy metric), without building logits.
    `dropout_rng` switches on LoRA dropout (training forward passes only).
    """
    rngs = {"dropout": dropout_rng} if dropout_rng is not None and config.lora_dropout else {}
    hidden_BxTxH = Decoder(config).apply({"params": params}, batch["tokens"],
                                         batch.get("positions"), batch.get("segment_ids"),
                                         rngs=rngs)
    targets_BxT = batch["tokens"][:, 1:]
    mask_BxT = batch["loss_mask"][:, 1:].astype(jnp.float32)
    if not with_stats:
        return token_logprobs(hidden_BxTxH[:, :-1], unembedding(params, config), targets_BxT,
                              logit_softcap=config.final_logit_softcap, impl=logprob_impl), mask_BxT
    out = token_logprobs(hidden_BxTxH[:, :-1], unembedding(params, config), targets_BxT,
                         return_entropy=True, return_max_logit=True, return_lse=True,
                         logit_softcap=config.final_logit_softcap, impl=logprob_impl)
    # The target is the arg-max exactly when its logit equals the maximum logit,
    # i.e. log p(target) == max_logit - lse (up to float rounding).
    is_argmax_BxT = out.logps >= (out.max_logit - out.lse) - 1e-5
    return out.logps, mask_BxT, {"entropy": out.entropy, "is_argmax": is_argmax_BxT}


def split_microbatches(batch: Mapping[str, jax.Array], num: int) -> dict[str, jax.Array]:
    """[B, ...] -> [num, B/num, ...] for every array in the batch."""
    def split(x):
        if x.shape[0] % num:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by "
                             f"config.optimizer.grad_accum_steps={num}")
        return x.reshape((num, x.shape[0] // num) + x.shape[1:])
    return {k: split(v) for k, v in batch.items()}


def accumulate_gradients(sum_loss_fn: Callable, params: Any, batch: Mapping[str, jax.Array],
                         num_microbatches: int):
    """Gradients of a loss written as (sum over examples, sums dict) over microbatches.

    `sum_loss_fn(params, batch) -> (loss_sum, sums)` where `sums` is a dict of
    additive statistics (it must contain "count", the normaliser). Returns the
    summed (loss, sums) and summed gradients; since everything is a sum,
    accumulating k microbatches gives the same result as one big batch.
    """
    grad_fn = jax.value_and_grad(sum_loss_fn, has_aux=True)
    if num_microbatches == 1:
        return grad_fn(params, batch)
    micro = split_microbatches(batch, num_microbatches)

    def body(carry, mb):
        (loss, sums), grads = grad_fn(params, mb)
        acc_loss, acc_sums, acc_grads = carry
        return (acc_loss + loss, jax.tree.map(jnp.add, acc_sums, sums),
                jax.tree.map(jnp.add, acc_grads, grads)), None

    first = jax.tree.map(lambda x: x[0], micro)
    rest = jax.tree.map(lambda x: x[1:], micro)
    (loss, sums), grads = grad_fn(params, first)
    (loss, sums, grads), _ = jax.lax.scan(body, (loss, sums, grads), rest)
    return (loss, sums), grads
