"""Simple batched generation (full forward per new token) for evaluation.

Prompts are left-padded so every prompt ends at the same position; generation
stops per sequence at EOS. This is an evaluation helper with static shapes, not
the fast KV-cache sampler.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jalign.models.config import ModelConfig
from jalign.models.transformer import Decoder, unembedding


def left_pad(token_lists: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
    """Left-pads token lists into [B, P] tokens and a [B, P] validity mask."""
    length = length or max(len(t) for t in token_lists)
    tokens = np.full((len(token_lists), length), pad_id, np.int32)
    mask = np.zeros((len(token_lists), length), np.int32)
    for i, t in enumerate(token_lists):
        t = list(t)[-length:]
        if t:
            tokens[i, length - len(t):] = t
            mask[i, length - len(t):] = 1
    return tokens, mask


@partial(jax.jit, static_argnames=("config", "max_new_tokens", "eos_id", "pad_id", "greedy"))
def generate(params, config: ModelConfig, prompt_BxP, prompt_mask_BxP, rng, *, max_new_tokens: int,
             eos_id: int, pad_id: int, greedy: bool = False, temperature: float = 1.0):
    """Returns (tokens [B, P+N], completion_mask [B, N]); the mask includes the EOS."""
    b, p = prompt_BxP.shape
    tokens = jnp.concatenate([prompt_BxP, jnp.full((b, max_new_tokens), pad_id, jnp.int32)], 1)
    valid = jnp.concatenate([prompt_mask_BxP, jnp.zeros((b, max_new_tokens), jnp.int32)], 1)
    w_HxV = unembedding(params, config)
    model = Decoder(config)

    def body(i, carry):
        tokens, valid, done = carry
        positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
        hidden = model.apply({"params": params}, tokens, positions, valid)
        logits = jnp.dot(hidden[:, p + i - 1], w_HxV.astype(hidden.dtype),
                         preferred_element_type=jnp.float32)
        if greedy:
            nxt = jnp.argmax(logits, axis=-1)
        else:
            nxt = jax.random.categorical(jax.random.fold_in(rng, i), logits / temperature)
        nxt = jnp.where(done, pad_id, nxt).astype(jnp.int32)
        tokens = tokens.at[:, p + i].set(nxt)
        valid = valid.at[:, p + i].set(jnp.where(done, 0, 1))
        return tokens, valid, done | (nxt == eos_id)

    tokens, valid, _ = jax.lax.fori_loop(0, max_new_tokens, body,
                                         (tokens, valid, jnp.zeros((b,), bool)))
    return tokens, valid[:, p:]


def decode_completions(tokenizer, tokens_BxN, mask_BxN) -> list[str]:
    out = []
    for row, m in zip(np.asarray(tokens_BxN), np.asarray(mask_BxN)):
        ids = [int(t) for t, keep in zip(row, m) if keep and t != tokenizer.eos_id]
        out.append(tokenizer.decode(ids))
    return out
