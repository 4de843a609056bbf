"""Scalar heads on the decoder (reward models, later value models).

A scalar model's params are {"decoder": decoder params, "score_head": [H], "score_bias": []}.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jalign.models.config import ModelConfig
from jalign.models.transformer import Decoder


def scalar_model_init_fn(config: ModelConfig):
    """rng -> boxed params of a decoder with a scalar head (zero-initialised head)."""
    def init(rng):
        decoder = Decoder(config).init(rng, jnp.zeros((1, 8), jnp.int32))["params"]
        head = nn.LogicallyPartitioned(jnp.zeros((config.hidden_size,), config.weight_dtype),
                                       ("embed",))
        bias = nn.LogicallyPartitioned(jnp.zeros((), jnp.float32), ())
        return {"decoder": decoder, "score_head": head, "score_bias": bias}
    return init


def last_token_mask(sequence_index_RxT):
    """1 where a token is the last of its sequence (the next token belongs to another)."""
    nxt = jnp.concatenate([sequence_index_RxT[:, 1:],
                           jnp.full_like(sequence_index_RxT[:, :1], -1)], axis=1)
    return (sequence_index_RxT >= 0) & (nxt != sequence_index_RxT)


def sequence_scores(params, config: ModelConfig, batch, num_sequences: int):
    """Scalar score of each sequence, read at its last (non-padding) token: [num_sequences]."""
    hidden = Decoder(config).apply({"params": params["decoder"]}, batch["tokens"],
                                   batch["positions"], batch["segment_ids"])
    scores_RxT = jnp.einsum("rth,h->rt", hidden.astype(jnp.float32),
                            params["score_head"].astype(jnp.float32)) + params["score_bias"]
    seq = batch["sequence_index"]
    last = last_token_mask(seq)
    ids = jnp.where(last, seq, num_sequences).ravel()
    summed = jax.ops.segment_sum(jnp.where(last, scores_RxT, 0.0).ravel(), ids,
                                 num_segments=num_sequences + 1)
    return summed[:num_sequences]


def token_values(params, config: ModelConfig, batch):
    """Per-token scalar outputs [B, T] (a critic's value of the prefix ending at each token)."""
    hidden = Decoder(config).apply({"params": params["decoder"]}, batch["tokens"],
                                   batch["positions"], batch["segment_ids"])
    return jnp.einsum("rth,h->rt", hidden.astype(jnp.float32),
                      params["score_head"].astype(jnp.float32)) + params["score_bias"]
