"""The KV-cache sampler: exact behaviour log-probs, greedy == uncached argmax, filters, stops."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.generate import categorical_from_uniform, filter_logits, generate, left_pad
from jalign.models import attention
from jalign.models.config import ModelConfig
from jalign.models.transformer import Decoder, init_cache, logits_from_hidden, unstack_layers
from jalign.steps.common import shifted_logprobs

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=48)
PARAMS = nn.meta.unbox(Decoder(CFG).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
# Mixed prompt lengths, left-padded (pad 0; EOS 2).
PROMPT, MASK = left_pad([[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]], pad_id=0)


def _batch(tokens, comp_mask):
    tokens, comp_mask = np.asarray(tokens), np.asarray(comp_mask)
    segments = np.concatenate([MASK, comp_mask], 1)
    return {"tokens": tokens, "segment_ids": segments,
            "loss_mask": np.concatenate([np.zeros_like(MASK), comp_mask], 1),
            "positions": np.maximum(np.cumsum(segments, 1) - 1, 0).astype(np.int32)}


def test_sampler_logps_equal_a_full_forward():
    out = generate(PARAMS, CFG, PROMPT, MASK, jax.random.PRNGKey(3), max_new_tokens=10, eos_id=2,
                   pad_id=0)
    logps, mask = shifted_logprobs(PARAMS, CFG, _batch(out.tokens, out.completion_mask))
    p = PROMPT.shape[1]
    forward = np.asarray(logps)[:, p - 1:] * np.asarray(out.completion_mask)
    np.testing.assert_allclose(np.asarray(out.logps), forward, rtol=1e-5, atol=1e-5)
    assert np.asarray(out.completion_mask).sum() > 0


def test_greedy_cache_matches_uncached_argmax_decoding():
    out = generate(PARAMS, CFG, PROMPT, MASK, jax.random.PRNGKey(0), max_new_tokens=6, eos_id=2,
                   pad_id=0, greedy=True)
    tokens, valid = PROMPT.copy(), MASK.copy()
    for _ in range(6):  # reference: full forward over the whole sequence each step
        positions = np.maximum(np.cumsum(valid, 1) - 1, 0)
        hidden = Decoder(CFG).apply({"params": PARAMS}, tokens, positions, valid)
        nxt = np.asarray(logits_from_hidden(hidden[:, -1:], PARAMS, CFG)[:, 0].argmax(-1))
        tokens = np.concatenate([tokens, nxt[:, None]], 1)
        valid = np.concatenate([valid, np.ones_like(nxt)[:, None]], 1)
    got, mask = np.asarray(out.tokens), np.asarray(out.completion_mask)
    for row in range(3):
        n = int(mask[row].sum())
        np.testing.assert_array_equal(got[row, PROMPT.shape[1]:][:n], tokens[row, PROMPT.shape[1]:][:n])


def test_seeded_and_stops():
    kwargs = dict(max_new_tokens=12, eos_id=2, pad_id=0)
    a = generate(PARAMS, CFG, PROMPT, MASK, jax.random.PRNGKey(7), **kwargs)
    b = generate(PARAMS, CFG, PROMPT, MASK, jax.random.PRNGKey(7), **kwargs)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    # Every token is a stop token here: each sequence ends after exactly one token.
    stop = generate(PARAMS, CFG, PROMPT, MASK, jax.random.PRNGKey(7), stop_ids=tuple(range(64)),
                    **kwargs)
    np.testing.assert_array_equal(np.asarray(stop.completion_mask).sum(1), [1, 1, 1])


def test_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda x: np.asarray(x > jnp.finfo(jnp.float32).min)[0].tolist()
    assert keep(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert keep(filter_logits(logits, top_p=0.7)) == [True, True, False, False]
    assert keep(filter_logits(logits, top_p=0.85)) == [True, True, True, False]
    assert keep(filter_logits(logits, min_p=0.2)) == [True, True, True, False]


def test_sampling_on_8_devices_keeps_the_batch_sharded():
    import optax

    from jalign import sharding as shd
    from jalign.models import decoder_init_fn
    from jalign.state import init_train_state

    mesh = shd.make_mesh({"data": 2, "fsdp": 4}, jax.devices()[:8])
    state, _ = init_train_state(decoder_init_fn(CFG), optax.sgd(0.0), mesh, shd.DEFAULT_RULES, seed=0)
    prompts, mask = left_pad([[5 + i, 6, 7 + i % 3] for i in range(16)], pad_id=0)
    rows = shd.data_sharding(mesh, shd.DEFAULT_RULES)
    prompts, mask = jax.device_put(prompts, rows), jax.device_put(mask, rows)
    key = jax.device_put(jax.random.PRNGKey(0), shd.replicated(mesh))
    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES), \
            jax.transfer_guard_device_to_host("disallow"):
        out = generate(state.params, CFG, prompts, mask, key, max_new_tokens=6, eos_id=2, pad_id=0)
    for array in out:
        assert len(array.sharding.device_set) == 8
        # Each device holds 16 / 8 = 2 rows, not the whole batch.
        assert {shard.data.shape[0] for shard in array.addressable_shards} == {2}
    # Same samples as on one device.
    single = generate(jax.device_get(state.params), CFG, np.asarray(prompts), np.asarray(mask),
                      jax.random.PRNGKey(0), max_new_tokens=6, eos_id=2, pad_id=0)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(single.tokens))


def test_inverse_cdf_sampling_hits_each_token_in_proportion():
    probs = np.asarray([0.5, 0.3, 0.15, 0.05, 0.0], np.float32)
    logits = jnp.where(probs > 0, jnp.log(jnp.maximum(probs, 1e-30)), jnp.finfo(jnp.float32).min)
    n = 1000
    u = (np.arange(n, dtype=np.float32) + 1) / n  # an even grid over (0, 1], ends included
    tokens = np.asarray(categorical_from_uniform(jnp.tile(logits, (n, 1)), jnp.asarray(u)))
    counts = np.bincount(tokens, minlength=5)
    np.testing.assert_allclose(counts / n, probs, atol=1.5 / n)
    assert counts[4] == 0  # a masked token is never drawn


def test_sampled_first_tokens_follow_the_policy():
    # One prompt repeated: the first sampled token of every row is a draw from the same
    # (tempered) next-token distribution, which a full forward pass gives exactly.
    rows, temperature = 16384, 0.2
    prompt, mask = np.tile(PROMPT[:1], (rows, 1)), np.tile(MASK[:1], (rows, 1))
    out = generate(PARAMS, CFG, prompt, mask, jax.random.PRNGKey(1), max_new_tokens=1, eos_id=2,
                   pad_id=0, temperature=temperature)
    positions = np.maximum(np.cumsum(MASK[:1], 1) - 1, 0)
    hidden = Decoder(CFG).apply({"params": PARAMS}, PROMPT[:1], positions, MASK[:1])
    logits = logits_from_hidden(hidden[:, -1:], PARAMS, CFG)[0, 0]
    probs = np.asarray(jax.nn.softmax(logits / temperature))
    assert 0.2 < probs.max() < 0.5  # spread, yet peaked enough that a shift would show
    freq = np.bincount(np.asarray(out.tokens)[:, -1], minlength=CFG.vocab_size) / rows
    assert 0.5 * np.abs(freq - probs).sum() < 0.05  # total variation distance
    np.testing.assert_allclose(np.exp(np.asarray(out.logps)[:, 0]),
                               probs[np.asarray(out.tokens)[:, -1]], rtol=1e-4)


def test_cached_decoder_reads_stacked_or_unstacked_layers():
    positions = np.maximum(np.cumsum(MASK, 1) - 1, 0)
    outs = []
    for params in (PARAMS, unstack_layers(PARAMS, CFG)):
        cache = init_cache(CFG, PROMPT.shape[0], PROMPT.shape[1] + 1)
        hidden, cache = Decoder(CFG).apply({"params": params}, PROMPT, positions, MASK,
                                           cache=cache, cache_index=0)
        outs.append((hidden, cache))
    chex.assert_trees_all_close(outs[0], outs[1])
    uncached = Decoder(CFG).apply({"params": PARAMS}, PROMPT, positions, MASK)
    np.testing.assert_allclose(np.asarray(outs[0][0]) * MASK[..., None],
                               np.asarray(uncached) * MASK[..., None], atol=1e-5)


# The blocked decode path ("chunked", as "auto" picks from 1024 cache slots on CPU):
# small key blocks (5) that do not divide the cache (6 + 10 slots), a sliding window
# on alternate layers and soft-capping, against the dense "xla" reference.
BLOCKED = dict(attention_block_kv=5, sliding_window=4, attn_logit_softcap=5.0,
               layer_types=("sliding_attention", "full_attention"))


@pytest.mark.parametrize("greedy", [True, False])
def test_blocked_decode_equals_the_dense_reference(greedy):
    kwargs = dict(max_new_tokens=10, eos_id=2, pad_id=0, greedy=greedy)
    dense = dataclasses.replace(CFG, attention_impl="xla", **BLOCKED)
    blocked = dataclasses.replace(CFG, attention_impl="chunked", **BLOCKED)
    want = generate(PARAMS, dense, PROMPT, MASK, jax.random.PRNGKey(5), **kwargs)
    got = generate(PARAMS, blocked, PROMPT, MASK, jax.random.PRNGKey(5), **kwargs)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(got.completion_mask), np.asarray(want.completion_mask))
    np.testing.assert_allclose(np.asarray(got.logps), np.asarray(want.logps), rtol=1e-5, atol=1e-5)
    # ...and both equal a full forward pass of the blocked model (trainer's log-probs).
    logps, _ = shifted_logprobs(PARAMS, blocked, _batch(got.tokens, got.completion_mask))
    forward = np.asarray(logps)[:, PROMPT.shape[1] - 1:] * np.asarray(got.completion_mask)
    np.testing.assert_allclose(np.asarray(got.logps), forward, rtol=1e-5, atol=1e-5)


def test_decode_reads_only_the_filled_key_blocks():
    b, s, nkv, g, d, block = 2, 40, 2, 2, 8, 8
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, 1, nkv * g, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, nkv, s, d)), jnp.float32) for _ in range(2))
    start = 13  # slot of the new token, in block 1 of 5
    valid = (np.arange(s)[None] <= start) & (np.arange(s)[None] != 3)  # slot 3: padding
    valid = jnp.asarray(np.broadcast_to(valid, (b, s)), jnp.int32)
    # Blocks past the filled one hold NaN: a pass over them would poison the output.
    tail = np.arange(s) >= 2 * block
    k_nan, v_nan = (jnp.where(tail[None, None, :, None], jnp.nan, x) for x in (k, v))
    mask = (valid > 0)[:, None, None, None, :]
    want = attention.xla_attention(q, k, v, mask, scale_divisor=np.sqrt(d), softcap=None,
                                   cached=True)
    for window in (None, 6):
        ref = want if window is None else attention.xla_attention(
            q, k, v, mask & (np.arange(s) > start - window)[None, None, None, None],
            scale_divisor=np.sqrt(d), softcap=None, cached=True)
        got = attention.cached_attention(q, k_nan, v_nan, valid, jnp.int32(start), window=window,
                                         scale=1 / np.sqrt(d), block_kv=block)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)
