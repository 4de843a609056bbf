"""Pallas kernels ("pallas_tpu", "pallas_gpu") vs the XLA reference, in interpret mode.

TPU kernels run through the public `token_logprobs` under
`pltpu.force_tpu_interpret_mode` with race detection and NaN-filled
uninitialised memory; GPU (Triton) kernels with `interpret=True`. Real Mosaic
compiles are in test_tpu_aot.py.
"""

import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import NamedSharding, PartitionSpec as P

from jalign.ops import TokenLogprobs, token_logprobs
from jalign.ops import _pallas_gpu, _pallas_tpu
from jalign.sharding import make_mesh

IMPLS = ["pallas_tpu", "pallas_gpu"]
# Small blocks so every case crosses several token and vocabulary blocks
# (TPU tiles: 16 bf16 / 8 f32 rows x 128 lanes; Triton: powers of two).
BLOCKS = {"pallas_tpu": dict(block_tokens=16, block_vocab=128),
          "pallas_gpu": dict(block_tokens=16, block_vocab=64)}
TPU_INTERPRET = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
RETURN_ALL = dict(return_lse=True, return_entropy=True, return_max_logit=True)


def _inputs(n, h, v, *, seed=0, dtype=jnp.float32, scale=1.0):
    k_h, k_w, k_t = jax.random.split(jax.random.key(seed), 3)
    hidden = (scale * jax.random.normal(k_h, (n, h))).astype(dtype)
    unembed = (jax.random.normal(k_w, (h, v)) / np.sqrt(h)).astype(dtype)
    return hidden, unembed, jax.random.randint(k_t, (n,), 0, v)


@contextlib.contextmanager
def _interpreting(impl):
    """TPU kernels traced and run under the TPU interpreter, every kernel checked
    for races; other impls as they are. Block on results inside the context."""
    if impl != "pallas_tpu":
        yield
        return
    # Private module: the interpreter keeps one race state per kernel run and has
    # no public query, so record each state as it is made.
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interp
    states, make_state = [], interp.RaceDetectionState
    interp.RaceDetectionState = lambda *a, **k: states.append(make_state(*a, **k)) or states[-1]
    try:
        with pltpu.force_tpu_interpret_mode(TPU_INTERPRET):
            yield
    finally:
        interp.RaceDetectionState = make_state
    assert len(states) >= 3, "forward and both backward kernels should have run"
    assert not any(state.races_found for state in states)


def _logprobs_fn(impl, targets, **kw):
    """h, w -> TokenLogprobs for any impl; pallas_gpu through its interpreter."""
    if impl != "pallas_gpu":
        return lambda h, w: token_logprobs(h, w, targets, impl=impl, **BLOCKS.get(impl, {}),
                                           **RETURN_ALL, **kw)

    def fn(h, w):
        dtype = jnp.result_type(h.dtype, w.dtype)
        logps, lse, ent, mx = _pallas_gpu.token_logprobs_pallas_gpu(
            h.astype(dtype), w.astype(dtype), targets, temperature=kw.get("temperature", 1.0),
            logit_softcap=kw.get("logit_softcap"), with_entropy=True, interpret=True,
            **BLOCKS[impl])
        return TokenLogprobs(logps, lse, ent, jax.lax.stop_gradient(mx))
    return fn


def _out_and_vjp(fn, hidden, unembed, seed=1):
    """Outputs and the VJP for random cotangents on every output, jitted."""
    leaves, treedef = jax.tree.flatten(jax.eval_shape(fn, hidden, unembed))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    cot = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype)
                                       for k, x in zip(keys, leaves)])

    @jax.jit
    def run(h, w):
        out, vjp_fn = jax.vjp(fn, h, w)
        return out, vjp_fn(cot)
    return jax.block_until_ready(run(hidden, unembed))


def _assert_matches_xla(impl, hidden, unembed, targets, *, tol=1e-5, **kw):
    with jax.default_matmul_precision("highest"):
        want, want_grads = _out_and_vjp(_logprobs_fn("xla", targets, **kw), hidden, unembed)
        with _interpreting(impl):
            got, grads = _out_and_vjp(_logprobs_fn(impl, targets, **kw), hidden, unembed)
    chex.assert_trees_all_close(got, want, rtol=tol, atol=tol)
    for g, g_want, primal in zip(grads, want_grads, (hidden, unembed)):
        assert g.dtype == primal.dtype and g.shape == primal.shape
        scale = float(jnp.max(jnp.abs(g_want.astype(jnp.float32)))) + 1e-6
        np.testing.assert_allclose(np.asarray(g, np.float32) / scale,
                                   np.asarray(g_want, np.float32) / scale, rtol=tol, atol=tol)
    return got


@pytest.mark.parametrize("impl", IMPLS)
def test_ragged_sizes_block_edges_and_ignored_targets(impl):
    n, v = 37, 300  # neither a multiple of the blocks
    hidden, unembed, targets = _inputs(n, 24, v)
    special = [0, 63, 64, 65, 127, 128, 129, 255, 256, v - 1, -100, -1, v]
    targets = targets.at[:len(special)].set(jnp.asarray(special))
    out = _assert_matches_xla(impl, hidden, unembed, targets)
    np.testing.assert_array_equal(np.asarray(out.logps)[10:13], 0.0)  # -100, -1, V


@pytest.mark.parametrize("impl", IMPLS)
def test_softcap_and_temperature(impl):
    hidden, unembed, targets = _inputs(24, 32, 256, scale=3.0)
    _assert_matches_xla(impl, hidden, unembed, targets, temperature=0.7, logit_softcap=2.5)


@pytest.mark.parametrize("impl", IMPLS)
def test_very_large_logits_stay_finite(impl):
    hidden, unembed, targets = _inputs(16, 16, 200, scale=100.0)
    out = _assert_matches_xla(impl, hidden, unembed, targets, tol=1e-4)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_inputs(impl):
    hidden, unembed, targets = _inputs(33, 32, 260, dtype=jnp.bfloat16)
    out = _assert_matches_xla(impl, hidden, unembed, targets, tol=2e-2)
    assert out.logps.dtype == jnp.float32 and out.lse.dtype == jnp.float32


@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_targets_get_no_gradient(impl):
    hidden, unembed, targets = _inputs(20, 16, 130)
    ignored = np.arange(20) % 3 == 0
    targets = jnp.where(ignored, -100, targets)
    fn = _logprobs_fn(impl, targets)
    grad_fn = jax.jit(jax.grad(lambda h: jnp.sum(fn(h, unembed).logps)))
    with _interpreting(impl):
        grad_h = np.asarray(grad_fn(hidden))
    np.testing.assert_array_equal(grad_h[ignored], 0.0)
    assert np.abs(grad_h[~ignored]).max(axis=1).min() > 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("vocab", [260, 257], ids=["vocab_sharded", "vocab_replicated"])
def test_mesh_shard_map_matches_single_device(impl, vocab):
    """Tokens over data x fsdp (N padded to 4 shards), vocabulary over tensor when
    it divides, on 8 CPU devices; Pallas' generic interpreter (the TPU one
    synchronises simulated devices with thread barriers, too slow here)."""
    mesh = make_mesh(dict(data=2, fsdp=2, tensor=2))
    hidden, unembed, targets = _inputs(50, 16, vocab, seed=3)
    targets = targets.at[:5].set(jnp.asarray([0, 129, 130, vocab - 1, -100]))
    kernel = (_pallas_tpu.token_logprobs_pallas_tpu if impl == "pallas_tpu"
              else _pallas_gpu.token_logprobs_pallas_gpu)

    def fn(h, w):
        logps, lse, ent, mx = kernel(h, w, targets, temperature=0.8, logit_softcap=4.0,
                                     with_entropy=True, interpret=True, **BLOCKS[impl])
        return TokenLogprobs(logps, lse, ent, jax.lax.stop_gradient(mx))

    with jax.set_mesh(mesh):
        h_sharded = jax.device_put(hidden, NamedSharding(mesh, P()))
        w_sharded = jax.device_put(unembed, NamedSharding(mesh, P(None, "tensor")
                                                          if vocab % 2 == 0 else P()))
        assert "shard_map" in str(jax.make_jaxpr(fn)(h_sharded, w_sharded))
        got, grads = _out_and_vjp(fn, h_sharded, w_sharded)
    with jax.default_matmul_precision("highest"):
        want, want_grads = _out_and_vjp(
            _logprobs_fn("xla", targets, temperature=0.8, logit_softcap=4.0), hidden, unembed)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(grads, want_grads, rtol=1e-5, atol=1e-5)


def test_gpu_kernels_lower_to_triton_without_a_gpu():
    hidden, unembed, targets = _inputs(100, 96, 1000, dtype=jnp.bfloat16)
    fn = lambda h, w: _pallas_gpu.token_logprobs_pallas_gpu(
        h, w, targets, temperature=1.0, logit_softcap=30.0, with_entropy=True,
        block_tokens=64, block_vocab=128)[0].sum()
    lowered = jax.jit(jax.grad(fn, argnums=(0, 1))).trace(hidden, unembed).lower(
        lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 2  # forward, dz


def test_tpu_plan_is_legal_and_fits_vmem():
    for n, hidden, vocab, dtype in [(8192, 8192, 131072, jnp.float32),
                                    (1000, 1000, 50257, jnp.bfloat16), (5, 24, 7, jnp.float32)]:
        cfg = _pallas_tpu.plan(n, hidden, vocab, dtype, temperature=1.0, logit_softcap=None,
                               with_entropy=False, block_tokens=512, block_vocab=512)
        sublanes = 16 if dtype == jnp.bfloat16 else 8
        assert cfg.block_tokens % sublanes == 0 and cfg.block_vocab % 128 == 0
        need = _pallas_tpu._vmem_bytes(cfg.block_tokens, cfg.block_vocab,
                                       -(-hidden // 128) * 128, jnp.dtype(dtype).itemsize)
        assert need <= cfg.vmem_limit_bytes <= _pallas_tpu._vmem_capacity()
