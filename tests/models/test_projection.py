"""model.projection_backward: "cpu_transposed" gives autodiff's derivatives; jvp works."""

import dataclasses

import chex
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.models.config import ModelConfig
from jalign.models.projection import project
from jalign.models.transformer import Decoder

# GQA and an MLP wider than the model, so both weight-gradient layouts are used:
# I <= O (q_proj 32 -> 32, o_proj, gate/up 32 -> 48) and I > O (k/v_proj 32 -> 16,
# down_proj 48 -> 32).
CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=48)
TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)


def _with(cfg, **changes):
    return dataclasses.replace(cfg, **changes)


def _init(cfg):
    return nn.meta.unbox(Decoder(cfg).init(jax.random.key(0), TOKENS[:1, :8])["params"])


def _loss(params, cfg):
    hidden = Decoder(cfg).apply({"params": params}, TOKENS)
    return jnp.mean(jnp.sin(hidden) * hidden)  # not quadratic: the tangents are not trivial


def _random_like(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


# (equation, x shape, w shape): the decoder's projections.
EINSUMS = [
    ("bth,hnd->btnd", (2, 5, 32), (32, 4, 8)),  # q_proj: I = O
    ("bth,hnd->btnd", (2, 5, 32), (32, 2, 8)),  # k/v_proj (GQA): I > O
    ("btnd,ndh->bth", (2, 5, 4, 8), (4, 8, 32)),  # o_proj: two contracted axes
    ("bth,hi->bti", (2, 5, 32), (32, 48)),  # gate/up_proj: I < O
    ("bti,ih->bth", (2, 5, 48), (48, 32)),  # down_proj: I > O
]


@pytest.mark.parametrize("equation,x_shape,w_shape", EINSUMS)
def test_single_projection_derivatives_equal_autodiff(equation, x_shape, w_shape):
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape)
    w = jax.random.normal(kw, w_shape)

    def f(x, w, backward):
        y = project(equation, x, w, backward)
        return jnp.sum(jnp.tanh(y) * jax.random.normal(kc, y.shape))

    for argnums in [(0, 1), (0,), (1,)]:  # one of x, W frozen: a symbolic-zero tangent
        grad_fn = jax.jit(jax.grad(f, argnums), static_argnums=2)
        chex.assert_trees_all_close(grad_fn(x, w, "cpu_transposed"), grad_fn(x, w, "autodiff"),
                                    rtol=1e-5, atol=1e-5)
    tangents = _random_like((x, w), 3)
    want = jax.jvp(lambda x, w: project(equation, x, w, "autodiff"), (x, w), tangents)
    got = jax.jvp(lambda x, w: project(equation, x, w, "cpu_transposed"), (x, w), tangents)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat", ["none", "save_dots"])
def test_decoder_gradients_equal_autodiff(remat):
    params = _init(CFG)
    want = jax.jit(jax.grad(_loss), static_argnums=1)(params, _with(CFG, remat=remat))
    got = jax.jit(jax.grad(_loss), static_argnums=1)(
        params, _with(CFG, remat=remat, projection_backward="cpu_transposed"))
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(got))


def test_lora_adapter_gradients_equal_autodiff():
    """Only the adapters train: the frozen base W has a zero tangent."""
    lora = _with(CFG, lora_rank=4, lora_alpha=8.0, lora_targets=("q_proj", "k_proj", "down_proj"))
    flat = traverse_util.flatten_dict(_init(lora))
    base = {k: v for k, v in flat.items() if "_lora_" not in k[-1]}
    # B starts at zero, which would leave A without a gradient.
    random_b = lambda v: 0.1 * jax.random.normal(jax.random.key(5), v.shape)
    adapters = {k: v if k[-1].endswith("_lora_a") else random_b(v)
                for k, v in flat.items() if "_lora_" in k[-1]}
    assert len(adapters) == 6

    def loss(adapters, cfg):
        return _loss(traverse_util.unflatten_dict({**base, **adapters}), cfg)

    grad_fn = jax.jit(jax.grad(loss), static_argnums=1)
    want = grad_fn(adapters, lora)
    got = grad_fn(adapters, _with(lora, projection_backward="cpu_transposed"))
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
    assert all(float(jnp.abs(g).max()) > 0 for g in want.values())


@pytest.mark.parametrize("backward", ["autodiff", "cpu_transposed"])
def test_jvp_through_the_decoder(backward):
    """Forward mode works under both options: the value is the loss, the tangent is the
    directional derivative (reverse mode's <grad, t>, and a central finite difference)."""
    cfg = _with(CFG, projection_backward=backward)
    params = _init(cfg)
    t = jax.tree.map(lambda d: 0.02 * d, _random_like(params, 2))  # the init's scale
    f = lambda p: _loss(p, cfg)

    @jax.jit
    def derivatives(params, t):
        value, tangent = jax.jvp(f, (params,), (t,))
        by_vjp = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(jax.grad(f)(params)),
                                                     jax.tree.leaves(t)))
        eps = 1e-2
        shifted = lambda s: f(jax.tree.map(lambda p, d: p + s * eps * d, params, t))
        by_difference = (shifted(1) - shifted(-1)) / (2 * eps)
        by_linearize = jax.linearize(f, params)[1](t)
        return value, f(params), tangent, by_vjp, by_difference, by_linearize

    value, want_value, tangent, by_vjp, by_difference, by_linearize = derivatives(params, t)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    np.testing.assert_allclose(tangent, by_vjp, rtol=1e-4)
    np.testing.assert_allclose(tangent, by_difference, rtol=5e-3)
    np.testing.assert_allclose(tangent, by_linearize, rtol=1e-5)


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="model.projection_backward"):
        ModelConfig(projection_backward="transposed")
    assert ModelConfig.from_mapping({"projection_backward": "cpu_transposed"}).projection_backward \
        == "cpu_transposed"
