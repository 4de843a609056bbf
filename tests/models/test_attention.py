"""model.attention_impl: every kernel equals the dense "xla" reference, values and gradients.

"chunked" runs as it is; "splash" under Pallas' interpreter
(`attention.splash_interpret_mode`; real Mosaic compiles are in tests/test_aot.py);
"cudnn" needs a GPU, so only its config-time refusals are tested here.
"""

import dataclasses
import logging

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.models import attention
from jalign.models.config import ModelConfig
from jalign.models.transformer import Decoder

TOL = dict(rtol=1e-5, atol=1e-5)
SMALL = attention.BlockSizes(block_q=8, block_kv=16)  # several blocks, unequal, T=37 ragged

# name: (T, query heads, kv heads, config overrides, packed segments, sliding)
CASES = {
    "causal_gqa": (32, 4, 2, {}, False, False),
    "packed_segments_mqa": (32, 4, 1, {}, True, False),
    "sliding_window": (32, 4, 4, dict(sliding_window=5), False, True),
    "softcap_query_pre_attn_scalar": (32, 4, 2, dict(attn_logit_softcap=2.0,
                                                     query_pre_attn_scalar=3.0), False, False),
    # T=37: not a multiple of either block; the window switched per layer (traced).
    "ragged_T_everything": (37, 4, 2, dict(sliding_window=9, attn_logit_softcap=3.0,
                                           query_pre_attn_scalar=20.0), True, "on"),
    "ragged_T_window_off": (37, 4, 2, dict(sliding_window=9), True, "off"),
}


def _inputs(t, nq, nkv, packed, b=2, d=8, seed=0):
    kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (b, t, nq, d))
    k = jax.random.normal(kk, (b, t, nkv, d))
    v = jax.random.normal(kv, (b, t, nkv, d))
    cot = jax.random.normal(kc, (b, t, nq, d))
    seg = np.ones((b, t), np.int32)
    if packed:  # two sequences and padding (0) in row 0, three sequences in row 1
        seg[0, t // 3:] = 2
        seg[0, t - 5:] = 0
        seg[1, t // 4:] = 2
        seg[1, t // 2:] = 3
    return q, k, v, cot, jnp.asarray(seg)


def _value_and_grads(impl, cfg, q, k, v, cot, segments, block_sizes=None):
    def loss(q, k, v):
        out = attention.attend(q, k, v, segments, cfg, impl=impl, block_sizes=block_sizes)
        return jnp.sum(out * cot), out
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def _case(name):
    t, nq, nkv, overrides, packed, sliding = CASES[name]
    cfg = ModelConfig(hidden_size=8 * nq, num_heads=nq, num_kv_heads=nkv, head_dim=8, **overrides)
    q, k, v, cot, seg = _inputs(t, nq, nkv, packed)
    sliding = {"on": jnp.asarray(True), "off": jnp.asarray(False)}.get(sliding, sliding)
    return cfg, (q, k, v, cot, attention.Segments(seg, sliding))


@pytest.mark.parametrize("name", list(CASES))
def test_chunked_equals_xla(name):
    cfg, args = _case(name)
    want_out, want_grads = _value_and_grads("xla", cfg, *args)
    fn = jax.jit(lambda *a: _value_and_grads("chunked", cfg, *a, block_sizes=SMALL))
    out, grads = fn(*args)
    chex.assert_trees_all_close(out, want_out, **TOL)
    chex.assert_trees_all_close(grads, want_grads, **TOL)


def _decoder_cfg(impl, **kw):
    base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                intermediate_size=48, sliding_window=6, layer_types=("sliding_attention",
                                                                     "full_attention"),
                attn_logit_softcap=4.0, query_pre_attn_scalar=12.0, rope_local_theta=100.0,
                attention_block_q=8, attention_block_kv=8)
    return ModelConfig(**{**base, **kw, "attention_impl": impl})


def _decoder_batch(t=29):
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 64, (2, t)).astype(np.int32)
    seg = np.ones((2, t), np.int32)
    seg[0, 11:] = 2
    seg[0, t - 3:] = 0
    positions = np.concatenate([np.arange(11), np.arange(t - 11)])[None].repeat(2, 0)
    positions[1] = np.arange(t)
    return tokens, positions.astype(np.int32), seg


def _decoder_loss_and_grads(cfg, params, batch):
    # A mean, as training losses are: summed, the float32 rounding of two summation
    # orders reaches 2e-5 relative on O(1) entries of O(100) gradients.
    def loss(p):
        hidden = Decoder(cfg).apply({"params": p}, *batch)
        return jnp.mean(hidden * jnp.cos(jnp.arange(hidden.shape[-1])))
    return jax.value_and_grad(loss)(params)


def test_decoder_chunked_equals_xla_through_the_params():
    """A whole Decoder (packed rows, alternating sliding layers, soft-cap, GQA), remat'd."""
    remat = "full"
    xla_cfg = _decoder_cfg("xla", remat=remat)
    params = nn.meta.unbox(Decoder(xla_cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
                           ["params"])
    batch = _decoder_batch()
    want = _decoder_loss_and_grads(xla_cfg, params, batch)
    got = jax.jit(lambda p: _decoder_loss_and_grads(_decoder_cfg("chunked", remat=remat), p,
                                                    batch))(params)
    chex.assert_trees_all_close(got, want, **TOL)


def test_chunked_temporaries_are_linear_in_T():
    """Forward + backward of chunked attention at T=4096 plans far less than one
    float32 [heads, T, T] score matrix (the xla path holds several)."""
    t, nq, d = 4096, 4, 64
    q = jax.ShapeDtypeStruct((1, t, nq, d), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, t, 2, d), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, t), jnp.int32)
    cfg = ModelConfig(hidden_size=nq * d, num_heads=nq, num_kv_heads=2, head_dim=d)

    def temp_bytes(impl):
        def loss(q, k, v, seg):
            return jnp.sum(attention.attend(q, k, v, attention.Segments(seg), cfg, impl=impl))
        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return fn.lower(q, kv, kv, seg).compile().memory_analysis().temp_size_in_bytes

    scores = nq * t * t * 4
    chunked, xla = temp_bytes("chunked"), temp_bytes("xla")
    assert chunked < scores / 6, (chunked, scores)  # 34 MiB vs 256 MiB here
    assert xla >= scores, (xla, scores)


SPLASH_CASES = ["packed_segments_mqa", "ragged_T_everything"]


@pytest.mark.parametrize("name", SPLASH_CASES)
def test_splash_equals_xla_under_the_interpreter(name):
    """Causal + segments + GQA + window (traced per layer) + soft-cap; T padded to 128."""
    cfg, args = _case(name)
    want_out, want_grads = _value_and_grads("xla", cfg, *args)
    with attention.splash_interpret_mode():
        out, grads = _value_and_grads("splash", cfg, *args,
                                      block_sizes=attention.BlockSizes(128, 128))
        jax.block_until_ready(grads)
    chex.assert_trees_all_close(out, want_out, **TOL)
    chex.assert_trees_all_close(grads, want_grads, **TOL)


def test_decoder_splash_equals_xla_under_the_interpreter():
    xla_cfg = _decoder_cfg("xla")
    params = nn.meta.unbox(Decoder(xla_cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
                           ["params"])
    batch = _decoder_batch()
    want = _decoder_loss_and_grads(xla_cfg, params, batch)
    cfg = _decoder_cfg("splash", attention_block_q=128, attention_block_kv=128)
    with attention.splash_interpret_mode():
        got = jax.block_until_ready(_decoder_loss_and_grads(cfg, params, batch))
    chex.assert_trees_all_close(got, want, **TOL)


def test_cudnn_refuses_what_it_cannot_express_at_config_time():
    ok = dict(dtype="bfloat16", hidden_size=64, num_heads=4, num_kv_heads=2)
    ModelConfig(attention_impl="cudnn", sliding_window=8, query_pre_attn_scalar=3.0, **ok)
    with pytest.raises(ValueError, match=r"attention_impl='cudnn' cannot express attention logit "
                                         r"soft-capping \(model.attn_logit_softcap"):
        ModelConfig(attention_impl="cudnn", attn_logit_softcap=50.0, **ok)
    with pytest.raises(ValueError, match="attention_impl='cudnn' needs model.dtype bfloat16"):
        ModelConfig(attention_impl="cudnn", **{**ok, "dtype": "float32"})
    with pytest.raises(ValueError, match="attention_impl='cudnn' needs a head size"):
        ModelConfig(attention_impl="cudnn", head_dim=12, **ok)
    with pytest.raises(ValueError, match="model.attention_impl must be one of"):
        ModelConfig(attention_impl="flash")
    with pytest.raises(ValueError, match="model.attention_block_q must be"):
        ModelConfig(attention_block_q=0)


def test_auto_resolves_per_backend_and_says_so(caplog):
    bf16 = ModelConfig(dtype="bfloat16")
    attention._logged.clear()
    with caplog.at_level(logging.INFO, logger="jalign.models.attention"):
        assert attention.resolve_impl(bf16, 4096, "cpu") == "chunked"
        assert attention.resolve_impl(bf16, 128, "cpu") == "xla"  # [T, T] is small there
        assert attention.resolve_impl(bf16, 128, "tpu") == "splash"
        assert attention.resolve_impl(bf16, 128, "gpu") == "cudnn"
        # cuDNN cannot soft-cap, nor run float32: auto takes chunked there, never a kernel
        # that would drop a feature.
        assert attention.resolve_impl(dataclasses.replace(bf16, attn_logit_softcap=50.0),
                                      128, "gpu") == "chunked"
        assert attention.resolve_impl(ModelConfig(), 128, "gpu") == "chunked"
    assert "model.attention_impl=auto resolved to 'splash' on tpu" in caplog.text
    assert attention.resolve_impl(ModelConfig(attention_impl="xla"), 8192, "tpu") == "xla"
