"""The sampler: jitted prefill + KV-cache decode with static shapes.

Prompts are left-padded so every prompt ends at the same slot; one prefill pass
fills the cache, then a `lax.while_loop` (`decode_steps`) decodes one token per
step for every sequence, stopping per sequence at EOS or a stop token and ending
once every sequence has stopped. Multi-turn rollouts (jalign.algorithms.episodes)
run the same loop again from the cache after prefilling each observation. Sampling supports
temperature, top-k, top-p and min-p; each token inverts the CDF of the filtered
distribution at a uniform drawn before the loop (so the loop generates no random
bits). The returned behaviour log-probs are those of the tempered (unfiltered)
policy, i.e. exactly what a full forward pass of the same params gives for the
sampled tokens, so importance ratios start at 1.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jalign.models.config import ModelConfig
from jalign.models.transformer import Decoder, init_cache, logits_from_hidden, unstack_layers


class Samples(NamedTuple):
    tokens: jax.Array           # [B, P + N] prompt (left-padded) followed by the completion
    completion_mask: jax.Array  # [B, N] 1 on generated tokens up to and including EOS
    logps: jax.Array            # [B, N] behaviour log-probs of the generated tokens (0 after the end)


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


def filter_logits(logits_BxV, *, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    """Masks (to -inf) tokens outside the top-k, the top-p nucleus and the min-p floor."""
    neg = jnp.finfo(jnp.float32).min
    if top_k:
        kth = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth, neg, logits_BxV)
    probs = jax.nn.softmax(logits_BxV, axis=-1)
    if min_p > 0.0:
        floor = min_p * probs.max(axis=-1, keepdims=True)
        logits_BxV = jnp.where(probs < floor, neg, logits_BxV)
    if top_p < 1.0:
        order = jnp.argsort(-probs, axis=-1)
        sorted_p = jnp.take_along_axis(probs, order, axis=-1)
        # Keep a token while the mass before it is below top_p (the first always stays).
        keep_sorted = (jnp.cumsum(sorted_p, axis=-1) - sorted_p) < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(order.shape[0])[:, None], order].set(keep_sorted)
        logits_BxV = jnp.where(keep, logits_BxV, neg)
    return logits_BxV


def categorical_from_uniform(logits_BxV, u_B):
    """Samples one token per row by inverting the CDF of softmax(logits) at u in (0, 1].

    The same distribution as `jax.random.categorical`, but from one uniform per row
    instead of a Gumbel draw per vocabulary entry, so a decode loop can draw all its
    uniforms before the loop (threefry inside the loop cost more than the model step on
    CPU). Masked tokens (probability 0) are never chosen since u > 0.
    """
    cdf_BxV = jnp.cumsum(jax.nn.softmax(logits_BxV, axis=-1), axis=-1)
    # Scaling by the total absorbs the rounding of the cumulative sum.
    below = cdf_BxV < u_B[:, None] * cdf_BxV[:, -1:]
    return jnp.sum(below, axis=-1, dtype=jnp.int32)


def _argmax(x_BxV):
    """`jnp.argmax(x, -1)` (first maximum) as two plain reductions: XLA:CPU's fused
    (value, index) reduction took 4x as long at decode sizes."""
    is_max = x_BxV == x_BxV.max(axis=-1, keepdims=True)
    first = jnp.min(jnp.where(is_max, jnp.arange(x_BxV.shape[-1]), x_BxV.shape[-1]), axis=-1)
    return jnp.minimum(first, x_BxV.shape[-1] - 1)  # NaN rows: no maximum found


def decode_steps(params, config: ModelConfig, cache, h_last_BxH, pos_B, done_B, start, limit,
                 u_NxB, *, eos_id: int, pad_id: int, greedy: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0, stop_ids: tuple[int, ...] = (), variables=None):
    """The decode loop every sampler shares: up to `limit` (<= N, the uniforms' length)
    tokens per row into cache slots [start, start + steps), stopping early once every row
    is done (EOS or a stop token; rows done on entry only write masked padding).

    `h_last_BxH` is each row's last hidden state, `pos_B` its last position. Returns
    (cache, h_last, pos, done, tokens [B, N], mask [B, N], logps [B, N], steps): the
    generated tokens (pad after a row's end), 1 on generated tokens up to and including
    the stop, their behaviour log-probs (tempered, unfiltered; 0 elsewhere) and the
    number of slots used.
    """
    model = Decoder(config)
    if variables is None:
        variables = {"params": unstack_layers(params, config)}
    n, b = u_NxB.shape
    stops = jnp.asarray((eos_id,) + tuple(stop_ids), jnp.int32)
    limit = jnp.minimum(jnp.asarray(limit, jnp.int32), n)

    def cond(carry):
        i, done = carry[0], carry[4]
        return (i < limit) & ~jnp.all(done)

    def body(carry):
        i, cache, h_last, pos, done, tokens, mask, logps = carry
        logits = logits_from_hidden(h_last[:, None], params, config)[:, 0] / temperature
        logp_all = jax.nn.log_softmax(logits, axis=-1)
        if greedy:
            nxt = _argmax(logits)
        else:
            filtered = filter_logits(logits, top_k=top_k, top_p=top_p, min_p=min_p)
            nxt = categorical_from_uniform(filtered, u_NxB[i])
        nxt = jnp.where(done, pad_id, nxt).astype(jnp.int32)
        live = (~done).astype(jnp.int32)
        tokens = tokens.at[:, i].set(nxt)
        mask = mask.at[:, i].set(live)
        logps = logps.at[:, i].set(jnp.where(done, 0.0, jnp.take_along_axis(
            logp_all, nxt[:, None], axis=-1)[:, 0]))
        pos = pos + live
        hidden, cache = model.apply(variables, nxt[:, None], pos[:, None], live[:, None],
                                    cache=cache, cache_index=start + i)
        done = done | jnp.isin(nxt, stops)
        return i + 1, cache, hidden[:, 0], pos, done, tokens, mask, logps

    init = (jnp.int32(0), cache, h_last_BxH, pos_B, done_B, jnp.full((b, n), pad_id, jnp.int32),
            jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n), jnp.float32))
    i, cache, h_last, pos, done, tokens, mask, logps = jax.lax.while_loop(cond, body, init)
    return cache, h_last, pos, done, tokens, mask, logps, i


@partial(jax.jit, static_argnames=("config", "max_new_tokens", "eos_id", "pad_id", "greedy",
                                   "top_k", "stop_ids"))
def generate(params, config: ModelConfig, prompt_BxP, prompt_mask_BxP, rng, *, max_new_tokens: int,
             eos_id: int, pad_id: int, greedy: bool = False, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             stop_ids: tuple[int, ...] = ()) -> Samples:
    """Samples up to `max_new_tokens` per prompt with a KV cache; see `Samples`."""
    b, p = prompt_BxP.shape
    # Split the stacked layers once, outside the loop (XLA does not hoist the slices).
    variables = {"params": unstack_layers(params, config)}
    cache = init_cache(config, b, p + max_new_tokens)
    positions = jnp.maximum(jnp.cumsum(prompt_mask_BxP, axis=1) - 1, 0)
    hidden, cache = Decoder(config).apply(variables, prompt_BxP, positions, prompt_mask_BxP,
                                          cache=cache, cache_index=0)
    u_NxB = 1.0 - jax.random.uniform(rng, (max_new_tokens, b))  # in (0, 1]
    out = decode_steps(params, config, cache, hidden[:, -1], positions[:, -1],
                       jnp.zeros((b,), bool), p, max_new_tokens, u_NxB, eos_id=eos_id,
                       pad_id=pad_id, greedy=greedy, temperature=temperature, top_k=top_k,
                       top_p=top_p, min_p=min_p, stop_ids=stop_ids, variables=variables)
    tokens, mask, logps = out[4:7]
    return Samples(jnp.concatenate([prompt_BxP, tokens], axis=1), mask, logps)


def decode_completions(tokenizer, tokens_BxN, mask_BxN) -> list[str]:
    out = []
    for row, m in zip(np.asarray(tokens_BxN), np.asarray(mask_BxN)):
        ids = [int(t) for t, keep in zip(row, m) if keep and t != tokenizer.eos_id]
        out.append(tokenizer.decode(ids))
    return out
