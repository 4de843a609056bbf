"""Model behaviour: causality, segment isolation, rope scaling, GQA shapes, remat."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.models.config import ModelConfig
from jalign.models.transformer import Decoder, rope_frequencies

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=48)


def _init(cfg=CFG, t=8):
    return nn.meta.unbox(Decoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, t), jnp.int32))["params"])


def test_output_shape_and_param_count():
    params = _init()
    hidden = Decoder(CFG).apply({"params": params}, jnp.ones((3, 10), jnp.int32))
    chex.assert_shape(hidden, (3, 10, 32))
    assert sum(x.size for x in jax.tree.leaves(params)) == CFG.num_params()


def test_causality_by_gradient():
    """d hidden[t] / d embedding[s] is zero for every s > t."""
    params = _init()
    t = 7
    tokens = jnp.arange(t, dtype=jnp.int32)[None] + 3

    def hidden_of(x_emb):
        p = dict(params, embed=x_emb)
        return Decoder(CFG).apply({"params": p}, tokens)[0]

    jac = np.asarray(jax.jacrev(lambda e: hidden_of(e).sum(-1))(params["embed"]))  # [t, V, H]
    for pos in range(t):
        future_rows = jac[pos][np.asarray(tokens[0, pos + 1:])]
        past_rows = jac[pos][np.asarray(tokens[0, :pos + 1])]
        assert np.all(future_rows == 0), f"position {pos} sees the future"
        assert np.all(np.abs(past_rows).sum(-1) > 0), f"position {pos} ignores its past"


def test_packed_segments_are_isolated():
    """Two sequences packed in one row give the same hidden states as run separately."""
    params = _init(t=12)
    a = jnp.array([5, 6, 7, 8, 9], jnp.int32)
    b = jnp.array([10, 11, 12, 13], jnp.int32)
    packed = jnp.concatenate([a, b, jnp.zeros(3, jnp.int32)])[None]
    segments = jnp.array([[1] * 5 + [2] * 4 + [0] * 3])
    positions = jnp.array([list(range(5)) + list(range(4)) + [0, 0, 0]])
    model = Decoder(CFG)
    h_packed = model.apply({"params": params}, packed, positions, segments)[0]
    h_a = model.apply({"params": params}, a[None])[0]
    h_b = model.apply({"params": params}, b[None])[0]
    np.testing.assert_allclose(h_packed[:5], h_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h_packed[5:9], h_b, rtol=1e-5, atol=1e-5)


def test_llama3_rope_scaling_matches_formula():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = ModelConfig(hidden_size=256, num_heads=2, num_kv_heads=2, rope_theta=10000.0,
                      rope_scaling=scaling)
    got = np.asarray(rope_frequencies(cfg))
    d = cfg.head_size
    want = []
    for i in range(0, d, 2):
        f = 1.0 / 10000.0 ** (i / d)
        wavelen = 2 * math.pi / f
        if wavelen < 64 / 4.0:
            want.append(f)
        elif wavelen > 64 / 1.0:
            want.append(f / 8.0)
        else:
            smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
            want.append((1 - smooth) * f / 8.0 + smooth * f)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert (got < np.asarray(rope_frequencies(ModelConfig(hidden_size=256, num_heads=2,
                                                          num_kv_heads=2)))).any()


@pytest.mark.parametrize("remat", ["full", "offload_dots"])  # save_dots: tests/models/test_projection.py
def test_remat_policies_keep_gradients(remat):
    params = _init()
    tokens = jnp.arange(12, dtype=jnp.int32)[None] % 64

    def loss(p, cfg):
        return (Decoder(cfg).apply({"params": p}, tokens) ** 2).mean()

    base = jax.grad(loss)(params, CFG)
    other = jax.grad(loss)(params, ModelConfig(**{**CFG.to_dict(), "remat": remat}))
    chex.assert_trees_all_close(base, other, rtol=1e-5, atol=1e-6)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="num_heads .* multiple of model.num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="unknown model config key"):
        ModelConfig.from_mapping({"hiden_size": 3})
    with pytest.raises(ValueError, match="model.remat"):
        ModelConfig(remat="sometimes")
