"""token_logprobs: chunked vs the XLA reference (values and VJPs), and memory."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.ops import TokenLogprobs, token_logprobs

# Small blocks so every case crosses several token and vocab block boundaries.
BLOCKS = dict(block_tokens=8, block_vocab=16)


def _inputs(n, h, v, *, seed=0, dtype=jnp.float32, scale=1.0, ignore_frac=0.0):
    k_h, k_w, k_t, k_m = jax.random.split(jax.random.key(seed), 4)
    hidden = (scale * jax.random.normal(k_h, (n, h))).astype(dtype)
    unembed = (jax.random.normal(k_w, (h, v)) / np.sqrt(h)).astype(dtype)
    targets = jax.random.randint(k_t, (n,), 0, v)
    if ignore_frac:
        targets = jnp.where(jax.random.uniform(k_m, (n,)) < ignore_frac, -100, targets)
    return hidden, unembed, targets


def _vjp_both(hidden, unembed, targets, *, seed=1, **kw):
    """Outputs and VJPs (random cotangents) of xla and chunked at highest precision."""
    results = []
    with jax.default_matmul_precision("highest"):
        for impl in ("xla", "chunked"):
            extra = BLOCKS if impl == "chunked" else {}
            fn = lambda h, w: token_logprobs(h, w, targets, impl=impl, **kw, **extra)
            leaves, treedef = jax.tree.flatten(jax.eval_shape(fn, hidden, unembed))
            keys = jax.random.split(jax.random.key(seed), len(leaves))
            cot = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype)
                                               for k, x in zip(keys, leaves)])

            @jax.jit
            def out_and_vjp(h, w, cot, fn=fn):
                out, vjp_fn = jax.vjp(fn, h, w)
                return out, vjp_fn(cot)
            results.append(out_and_vjp(hidden, unembed, cot))
    return results


def _assert_match(hidden, unembed, targets, *, rtol=1e-5, atol=1e-5, **kw):
    (out_x, grads_x), (out_c, grads_c) = _vjp_both(hidden, unembed, targets, **kw)
    chex.assert_trees_all_close(out_c, out_x, rtol=rtol, atol=atol)
    for g_c, g_x, primal in zip(grads_c, grads_x, (hidden, unembed)):
        assert g_c.dtype == primal.dtype and g_c.shape == primal.shape
        scale = float(jnp.max(jnp.abs(g_x.astype(jnp.float32)))) + 1e-6
        chex.assert_trees_all_close(g_c.astype(jnp.float32) / scale,
                                    g_x.astype(jnp.float32) / scale, rtol=rtol, atol=atol)
    return out_c, grads_c


@pytest.mark.parametrize("n,v", [(37, 101), (8, 16), (64, 48), (5, 7)])
def test_chunked_matches_xla_on_ragged_sizes(n, v):
    hidden, unembed, targets = _inputs(n, 24, v)
    _assert_match(hidden, unembed, targets, return_lse=True, return_entropy=True)


def test_targets_on_block_edges():
    n, v = 40, 67  # vocab blocks [0,16) ... [64,67)
    edges = np.array([0, v - 1, 15, 16, 17, 31, 32, 63, 64, 65, 66, 1])
    targets = jnp.asarray(np.resize(edges, n))
    hidden, unembed, _ = _inputs(n, 16, v)
    _assert_match(hidden, unembed, targets)


@pytest.mark.parametrize("kw", [dict(temperature=0.6), dict(logit_softcap=2.5),
                                dict(temperature=1.7, logit_softcap=4.0)],
                         ids=["temperature", "softcap", "both"])
def test_temperature_and_softcap(kw):
    hidden, unembed, targets = _inputs(29, 16, 50, scale=3.0)
    _assert_match(hidden, unembed, targets, return_lse=True, return_entropy=True, **kw)


def test_very_large_logits_stay_finite_and_match():
    hidden, unembed, targets = _inputs(21, 16, 45, scale=100.0)
    out, grads = _assert_match(hidden, unembed, targets, rtol=1e-4, atol=1e-4,
                               return_lse=True, return_entropy=True)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((out, grads)))


def test_ignored_targets_give_zero_logp_and_zero_grad():
    hidden, unembed, targets = _inputs(30, 16, 40, ignore_frac=0.4)
    targets = targets.at[0].set(40).at[1].set(-1)  # V and -1 are out of range too
    ignored = (targets < 0) | (targets >= 40)
    out, _ = _assert_match(hidden, unembed, targets)
    np.testing.assert_array_equal(np.asarray(out)[np.asarray(ignored)], 0.0)

    for impl in ("xla", "chunked"):
        def masked_sum(h):
            logps = token_logprobs(h, unembed, targets, impl=impl, **BLOCKS)
            return jnp.sum(jnp.where(ignored, 0.0, logps))
        grad_h = jax.jit(jax.grad(masked_sum))(hidden)
        np.testing.assert_array_equal(np.asarray(grad_h)[np.asarray(ignored)], 0.0)
        assert float(jnp.abs(grad_h[~ignored]).max()) > 0


def test_bfloat16_inputs():
    hidden, unembed, targets = _inputs(33, 32, 70, dtype=jnp.bfloat16)
    out, grads = _assert_match(hidden, unembed, targets, rtol=2e-2, atol=2e-2,
                               return_lse=True)
    assert out.logps.dtype == jnp.float32 and out.lse.dtype == jnp.float32
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
    # The forward is float32 after the matmul: it equals a float32 computation
    # on the bf16 values up to accumulation order.
    ref = token_logprobs(hidden.astype(jnp.float32), unembed.astype(jnp.float32), targets)
    np.testing.assert_allclose(out.logps, ref, rtol=1e-4, atol=1e-4)


def test_leading_batch_dims_under_jit():
    hidden, unembed, targets = _inputs(2 * 3 * 7, 16, 33)
    hidden_BxTxH = hidden.reshape(2, 3, 7, 16)
    targets_BxT = targets.reshape(2, 3, 7)
    fn = jax.jit(lambda h, w: token_logprobs(h, w, targets_BxT, return_entropy=True,
                                             impl="chunked", **BLOCKS))
    out = fn(hidden_BxTxH, unembed)
    assert isinstance(out, TokenLogprobs) and out.lse is None
    chex.assert_shape([out.logps, out.entropy], (2, 3, 7))
    flat = token_logprobs(hidden, unembed, targets, impl="xla", return_entropy=True)
    chex.assert_trees_all_close(out.logps.reshape(-1), flat.logps, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(out.entropy.reshape(-1), flat.entropy, rtol=1e-5, atol=1e-5)
    grad_fn = jax.jit(jax.grad(lambda h: token_logprobs(h, unembed, targets_BxT).sum()))
    chex.assert_shape(grad_fn(hidden_BxTxH), (2, 3, 7, 16))


def test_logps_are_normalised_and_default_return_is_array():
    hidden, unembed, _ = _inputs(3, 8, 11)
    all_targets = jnp.broadcast_to(jnp.arange(11), (3, 11))
    hidden_3x11xH = jnp.broadcast_to(hidden[:, None, :], (3, 11, 8))
    logps = token_logprobs(hidden_3x11xH, unembed, all_targets, block_vocab=4)
    assert isinstance(logps, jax.Array) and logps.dtype == jnp.float32
    np.testing.assert_allclose(jax.nn.logsumexp(logps, axis=-1), 0.0, atol=1e-5)


def test_bad_arguments_raise():
    hidden, unembed, targets = _inputs(4, 8, 10)
    with pytest.raises(ValueError, match="last dim"):
        token_logprobs(hidden[:, :7], unembed, targets)
    with pytest.raises(ValueError, match="leading dims"):
        token_logprobs(hidden, unembed, targets[:3])
    with pytest.raises(ValueError, match="valid: auto, xla, chunked"):
        token_logprobs(hidden, unembed, targets, impl="nope")
    with pytest.raises(ValueError, match="integers"):
        token_logprobs(hidden, unembed, targets.astype(jnp.float32))


def test_chunked_never_builds_token_by_vocab_arrays():
    n, h, v = 2048, 64, 32768
    args = (jax.ShapeDtypeStruct((n, h), jnp.float32),
            jax.ShapeDtypeStruct((h, v), jnp.float32),
            jax.ShapeDtypeStruct((n,), jnp.int32))

    def loss(hidden, unembed, targets):
        out = token_logprobs(hidden, unembed, targets, impl="chunked",
                             return_lse=True, return_entropy=True)
        return jnp.sum(out.logps) + jnp.sum(out.lse) + jnp.sum(out.entropy)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    assert f"f32[{n},{v}]" not in compiled.as_text()
    assert compiled.memory_analysis().temp_size_in_bytes < n * v * 4 / 4


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_max_logit_marks_the_argmax(impl):
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.normal(size=(37, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 300)), jnp.float32)
    logits = np.asarray(h) @ np.asarray(w)
    targets = rng.integers(0, 300, 37)
    targets[::3] = logits.argmax(-1)[::3]  # a third of the targets are the arg-max
    out = token_logprobs(h, w, jnp.asarray(targets), return_max_logit=True, return_lse=True,
                         impl=impl, block_tokens=8, block_vocab=64)
    np.testing.assert_allclose(out.max_logit, logits.max(-1), rtol=1e-5)
    is_argmax = np.asarray(out.logps >= out.max_logit - out.lse - 1e-5)
    np.testing.assert_array_equal(is_argmax, targets == logits.argmax(-1))
    # No gradient flows through the max logit.
    g = jax.grad(lambda x: token_logprobs(x, w, jnp.asarray(targets), return_max_logit=True,
                                          impl=impl).max_logit.sum())(h)
    assert not np.any(np.asarray(g))


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_mean_logit_is_the_mean_of_the_full_logits(impl):
    hidden, unembed, targets = _inputs(37, 16, 70, seed=3)
    kw = BLOCKS if impl == "chunked" else {}
    out = token_logprobs(hidden, unembed, targets, return_mean_logit=True, temperature=0.7,
                         impl=impl, **kw)
    logits = np.asarray(hidden, np.float64) @ np.asarray(unembed, np.float64) / 0.7
    np.testing.assert_allclose(out.mean_logit, logits.mean(-1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="logit_softcap"):
        token_logprobs(hidden, unembed, targets, return_mean_logit=True, logit_softcap=30.0)


def test_an_entropy_that_is_only_a_statistic_leaves_the_gradient_unchanged():
    """The entropy read as a metric (no cotangent) changes neither the log-prob gradient nor
    a differentiated entropy's (the chunked backward skips the term only when unused)."""
    hidden, unembed, targets = _inputs(40, 16, 50, seed=4)

    def loss(h, w, *, stats: bool, entropy_weight: float = 0.0):
        if not stats:
            return token_logprobs(h, w, targets, impl="chunked", **BLOCKS).sum(), 0.0
        out = token_logprobs(h, w, targets, return_entropy=True, return_max_logit=True,
                             impl="chunked", **BLOCKS)
        return (out.logps.sum() + entropy_weight * out.entropy.sum(),
                jax.lax.stop_gradient(out.entropy.mean()))

    with jax.default_matmul_precision("highest"):
        plain = jax.grad(loss, argnums=(0, 1), has_aux=True)(hidden, unembed, stats=False)[0]
        metric = jax.grad(loss, argnums=(0, 1), has_aux=True)(hidden, unembed, stats=True)[0]
        bonus = jax.grad(loss, argnums=(0, 1), has_aux=True)(hidden, unembed, stats=True,
                                                             entropy_weight=0.5)[0]
        xla = jax.grad(lambda h, w: (lambda o: o.logps.sum() + 0.5 * o.entropy.sum())(
            token_logprobs(h, w, targets, return_entropy=True, impl="xla")),
            argnums=(0, 1))(hidden, unembed)
    chex.assert_trees_all_close(metric, plain, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(bonus, xla, rtol=1e-4, atol=1e-6)
    assert not np.allclose(bonus[0], plain[0])
