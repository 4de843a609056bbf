"""Pallas GPU kernels (Triton backend) for the fused log-prob; the maths is `_chunked`'s.

Backend: JAX 0.10 defaults GPU Pallas to Mosaic GPU, whose kernels are written
per warpgroup with explicit TMA copies and wgmma layouts; the Triton backend
(deprecated but supported, selected here by `triton.CompilerParams`) takes
ordinary blocked Pallas code. We use Triton because that code runs in
`interpret=True` on CPU and lowers to Triton IR without a GPU (tests do both),
and it also serves ROCm. Moving to Mosaic GPU is left for when an H100 can
validate it.

Forward, grid (token blocks,): each program keeps a [bt] online log-sum-exp,
target logit (iota compare), max and entropy sum while it loops over vocabulary
blocks; each [bt, bv] logits tile is a float32 loop over [bt, bk] x [bk, bv]
hidden slices, so no [N, V] array exists.

Backward: a GPU's register file holds neither a [bt, H] dh nor an [H, bv] dW
accumulator, so a fully fused backward must revisit them in memory (atomics or
read-modify-write). Instead a kernel recomputes logits tiles and writes dz for
one vocabulary chunk ([N, chunk] in the matmul dtype, chunk sized to about
256 MiB), and XLA's matmuls (cuBLAS) add dz W^T into a float32 dh and form
h^T dz for that chunk of dW. FLOPs 6NHV, two thirds of them in cuBLAS.

Under a mesh the op runs in the shard_map wrapper of `_sharded`, as the TPU kernels do.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from jalign.ops._reference import transform_logits
from jalign.ops._sharded import KernelConfig, kernel_op, out_struct, round_up, vary_alike

_NEG_BIG = float(jnp.finfo(jnp.float32).min)  # finite initial max: see _chunked
_NN = (((1,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))
_DZ_CHUNK_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class GpuConfig(KernelConfig):
    """Static settings of one call; block sizes are powers of two (Triton)."""
    block_hidden: int
    chunk_vocab: int  # vocabulary columns per backward dz chunk (multiple of block_vocab)
    num_warps: int
    num_stages: int
    interpret: bool


def _pow2_block(size: int, cap: int) -> int:
    """A power of two >= 16 (tl.dot's minimum): cap rounded down, or less for small sizes."""
    return max(16, min(pl.next_power_of_2(max(size, 1)), 1 << (max(cap, 1).bit_length() - 1)))


def plan(n: int, hidden: int, vocab: int, dtype, *, temperature: float,
         logit_softcap: float | None, with_entropy: bool, block_tokens: int,
         block_vocab: int, interpret: bool = False) -> GpuConfig:
    bt = _pow2_block(n, block_tokens)
    bv = _pow2_block(vocab, block_vocab)
    bk = _pow2_block(hidden, 64)
    # Split the vocabulary into equal chunks of whole blocks, each dz chunk about
    # _DZ_CHUNK_BYTES, so padding wastes less than one block per chunk.
    per_chunk = max(bv, _DZ_CHUNK_BYTES // (round_up(n, bt) * jnp.dtype(dtype).itemsize))
    n_chunks = -(-vocab // per_chunk)
    chunk = round_up(-(-vocab // n_chunks), bv)
    return GpuConfig.create(temperature=temperature, logit_softcap=logit_softcap,
                            with_entropy=with_entropy, vocab=vocab, block_tokens=bt,
                            block_vocab=bv, block_hidden=bk, chunk_vocab=chunk,
                            num_warps=4 if bt * bv <= 64 * 128 else 8, num_stages=3,
                            interpret=bool(interpret))


def _logits(h_ref, w_ref, j, cfg: GpuConfig):
    """[bt, bv] tile of vocabulary block j; forward and backward call exactly this."""
    bt, hidden = h_ref.shape
    bk, bv = cfg.block_hidden, cfg.block_vocab

    def step(k, acc):
        h = h_ref[:, pl.ds(k * bk, bk)]
        w = w_ref[pl.ds(k * bk, bk), pl.ds(j * bv, bv)]
        return acc + lax.dot_general(h, w, _NN, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, hidden // bk, step, jnp.zeros((bt, bv), jnp.float32))
    return transform_logits(acc, cfg.temperature, cfg.logit_softcap)


def _forward_kernel(h_ref, w_ref, t_ref, *out_refs, cfg: GpuConfig):
    bt, bv = h_ref.shape[0], cfg.block_vocab
    t = t_ref[...]
    ragged = cfg.vocab % bv != 0

    def step(j, carry):
        max_old, sum_old, tl, pz = carry
        z = _logits(h_ref, w_ref, j, cfg)
        cols = j * bv + jnp.arange(bv, dtype=jnp.int32)[None, :]
        z_valid = jnp.where(cols < cfg.vocab, z, -jnp.inf) if ragged else z
        max_new = jnp.maximum(max_old, jnp.max(z_valid, axis=1))
        shift = max_old - max_new
        scale = jnp.exp(shift)
        z_centred = z_valid - max_new[:, None]
        e = jnp.exp(z_centred)
        tl = tl + jnp.sum(jnp.where(cols == t[:, None], z, 0.0), axis=1)
        if cfg.with_entropy:
            ez = jnp.where(cols < cfg.vocab, e * z_centred, 0.0) if ragged else e * z_centred
            pz = scale * (pz + shift * sum_old) + jnp.sum(ez, axis=1)
        return max_new, sum_old * scale + jnp.sum(e, axis=1), tl, pz

    zeros = jnp.zeros((bt,), jnp.float32)
    init = (jnp.full((bt,), _NEG_BIG, jnp.float32), zeros, zeros, zeros)
    mx, total, tl, pz = lax.fori_loop(0, w_ref.shape[1] // bv, step, init)
    log_sum = jnp.log(total)
    out_refs[0][...] = tl
    out_refs[1][...] = mx + log_sum
    out_refs[2][...] = mx
    if cfg.with_entropy:
        out_refs[3][...] = log_sum - pz / total


def _dz_kernel(h_ref, w_ref, t_ref, *refs, cfg: GpuConfig):
    """dz for one [bt, bv] tile: the formula of `_pallas_tpu._dz`."""
    dz_ref = refs[-1]
    j = pl.program_id(1)
    bv = cfg.block_vocab
    z = _logits(h_ref, w_ref, j, cfg)
    lse, g_tl, g_lse = (r[...][:, None] for r in refs[:3])
    logp = z - lse
    p = jnp.exp(logp)
    if cfg.with_entropy:
        ent, g_ent = (r[...][:, None] for r in refs[3:5])
        dz = p * (g_lse - g_ent * (logp + ent))
    else:
        dz = p * g_lse
    cols = j * bv + jnp.arange(bv, dtype=jnp.int32)[None, :]
    dz = dz + jnp.where(cols == t_ref[...][:, None], g_tl, 0.0)
    if cfg.logit_softcap is not None:
        dz = dz * (1.0 - jnp.square(z / cfg.logit_softcap))
    if cfg.temperature != 1.0:
        dz = dz / cfg.temperature
    dz_ref[...] = dz.astype(dz_ref.dtype)


def _call(kernel, grid, in_specs, out_specs, out_shape, cfg: GpuConfig, name):
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg), grid=grid, in_specs=in_specs,
        out_specs=out_specs, out_shape=out_shape, interpret=cfg.interpret, name=name,
        compiler_params=pltr.CompilerParams(num_warps=cfg.num_warps,
                                            num_stages=cfg.num_stages))


def _pad(h, w, t, cfg: GpuConfig, vocab_multiple: int):
    (n, hidden), vocab = h.shape, w.shape[1]
    n_p, h_p = round_up(n, cfg.block_tokens), round_up(hidden, cfg.block_hidden)
    v_p = round_up(vocab, vocab_multiple)
    if (n_p, h_p) != (n, hidden):
        h = jnp.pad(h, ((0, n_p - n), (0, h_p - hidden)))
    if (h_p, v_p) != (hidden, vocab):
        w = jnp.pad(w, ((0, h_p - hidden), (0, v_p - vocab)))
    return h, w, jnp.pad(t.astype(jnp.int32), (0, n_p - n), constant_values=-1)


def _forward(h, w, t, cfg: GpuConfig):
    n = h.shape[0]
    h, w, t = _pad(h, w, t, cfg, cfg.block_vocab)
    (n_p, hidden), bt = h.shape, cfg.block_tokens
    n_out = 4 if cfg.with_entropy else 3
    vec = pl.BlockSpec((bt,), lambda i: (i,))
    outs = _call(_forward_kernel, (n_p // bt,),
                 [pl.BlockSpec((bt, hidden), lambda i: (i, 0)), pl.no_block_spec, vec],
                 [vec] * n_out, [out_struct((n_p,), jnp.float32, h)] * n_out,
                 cfg, "token_logprobs_fwd")(h, w, t)
    outs = [x[:n] for x in outs]
    return (*outs, None) if n_out == 3 else tuple(outs)


def _backward(h, w, t, stats, cfg: GpuConfig):
    """(dh, dW): a dz kernel per vocabulary chunk, XLA matmuls for the rest."""
    (n, hidden), vocab = h.shape, w.shape[1]
    h, w, t = _pad(h, w, t, cfg, cfg.chunk_vocab)
    (n_p, hidden_p), v_p = h.shape, w.shape[1]
    stats = [jnp.pad(x.astype(jnp.float32), (0, n_p - n)) for x in stats]  # padded: zeros
    bt, bv, chunk = cfg.block_tokens, cfg.block_vocab, cfg.chunk_vocab
    vec = pl.BlockSpec((bt,), lambda i, j: (i,))
    dz_fn = _call(_dz_kernel, (n_p // bt, chunk // bv),
                  [pl.BlockSpec((bt, hidden_p), lambda i, j: (i, 0)),
                   pl.no_block_spec, vec] + [vec] * len(stats),
                  pl.BlockSpec((bt, bv), lambda i, j: (i, j)),
                  out_struct((n_p, chunk), h.dtype, h), cfg, "token_logprobs_dz")

    def step(carry, c):
        dh, dw = carry
        w_c = lax.dynamic_slice_in_dim(w, c * chunk, chunk, axis=1)
        dz = dz_fn(h, w_c, t - c * chunk, *stats)  # targets relative to the chunk
        dh = dh + lax.dot_general(dz, w_c, _NT, preferred_element_type=jnp.float32)
        dw_c = lax.dot_general(h, dz, _TN, preferred_element_type=jnp.float32)
        dw = lax.dynamic_update_slice_in_dim(dw, dw_c.astype(dw.dtype), c * chunk, axis=1)
        return (dh, dw), None

    _, *init = vary_alike(h, jnp.zeros((n_p, hidden_p), jnp.float32),  # carries vary like h
                          jnp.zeros((hidden_p, v_p), w.dtype))
    (dh, dw), _ = lax.scan(step, tuple(init), jnp.arange(v_p // chunk, dtype=jnp.int32))
    return dh[:n, :hidden].astype(h.dtype), dw[:hidden, :vocab]


token_logprobs_pallas_gpu = kernel_op(plan, _forward, _backward)
token_logprobs_pallas_gpu.__name__ = "token_logprobs_pallas_gpu"
token_logprobs_pallas_gpu.__doc__ = """Returns (logps_N, lse_N, entropy_N or None, max_logit_N), all float32.

`interpret=True` runs the kernels with Pallas' interpreter (any backend).
"""
