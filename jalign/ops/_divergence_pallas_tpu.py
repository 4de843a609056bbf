"""Pallas TPU (Mosaic) kernels for the fused divergence; the maths is `_divergence_chunked`'s.

Forward, grid (token blocks: parallel, vocab blocks: arbitrary), both models'
[bt, H] hidden tiles resident in VMEM while their [H, bv] unembedding tiles stream:
  "lse" kernel: online log-sum-exps of the teacher (a) and student (b) logits and,
    for beta in {0, 1}, the cross term that finishes the KL in this one pass;
  "mix" kernel (0 < beta < 1): recomputes the tiles and sums K_t, K_s with the
    final LSEs.
Backward, two kernels recomputing both tiles (dz: `tile_dz`), as the log-prob kernel:
  dh: grid (tokens: parallel, vocab: arbitrary), f32 [bt, H] accumulators;
  dW: grid (vocab: parallel, tokens: arbitrary), f32 [H, bv] accumulators;
each for the models being differentiated only (a stop_gradient teacher costs one
matmul per tile, its logits, instead of three).

Blocks are legal TPU tiles shrunk to fit VMEM; N, V, H are zero-padded to block
multiples. Padded vocabulary columns are masked out of the LSEs and the sums;
padded tokens get a zero cotangent. Under a mesh the op runs per token shard in
shard_map ("data"/"fsdp"); the unembeddings are replicated per shard (a
vocabulary-sharded combine, as the log-prob kernel has, is not written yet).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from jalign.ops._divergence_chunked import (
    DivergenceConfig, _Wanted, finish_kl, mixture_terms, online_lse, student_logits,
    teacher_logits, through_transform, tile_dz)
from jalign.ops._pallas_tpu import _fit_block, _vmem_capacity
from jalign.ops._sharded import TOKEN_AXES, _mesh_axes, round_up

_NEG_BIG = float(jnp.finfo(jnp.float32).min)
_MiB = 1 << 20
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class TpuDivergenceConfig(DivergenceConfig):
    vocab: int = 0  # valid (unpadded) columns
    vmem_limit_bytes: int = 32 * _MiB
    interpret: object = False


def _vmem_bytes(bt, bv, hidden_sum, itemsize):
    tiles_in = 2 * (bt + bv) * hidden_sum * itemsize
    accumulators = max(bt, bv) * hidden_sum * (4 + 2 * itemsize)
    temporaries = 14 * bt * bv * 4
    columns = 24 * bt * 128 * 4
    return tiles_in + accumulators + temporaries + columns


def plan(n, hidden_s, hidden_t, vocab, dtypes, *, block_tokens, block_vocab,
         interpret=False, **options) -> TpuDivergenceConfig:
    itemsize = max(jnp.dtype(d).itemsize for d in dtypes)
    sublanes = 8 * max(1, 4 // min(jnp.dtype(d).itemsize for d in dtypes))
    hidden_sum = round_up(hidden_s, 128) + round_up(hidden_t, 128)
    budget = _vmem_capacity() * 3 // 4
    while True:
        bt = _fit_block(n, block_tokens, sublanes)
        bv = _fit_block(vocab, block_vocab, 128)
        if _vmem_bytes(bt, bv, hidden_sum, itemsize) <= budget or max(bt, bv) <= 128:
            break
        if bt >= bv:
            block_tokens = max(128, bt // 2)
        else:
            block_vocab = max(128, bv // 2)
    need = _vmem_bytes(bt, bv, hidden_sum, itemsize)
    limit = min(max(32 * _MiB, round_up(need * 5 // 4, _MiB)), _vmem_capacity())
    return TpuDivergenceConfig(block_tokens=bt, block_vocab=bv, vocab=int(vocab),
                               vmem_limit_bytes=int(limit), interpret=interpret, **options)


def _valid(j, shape, cfg):
    return j * cfg.block_vocab + lax.broadcasted_iota(jnp.int32, shape, 1) < cfg.vocab


def _lse_kernel(hs_ref, ws_ref, ht_ref, wt_ref, lse_t_ref, lse_s_ref, k_ref,
                max_t, sum_t, max_s, sum_s, cross, *, cfg):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        for ref in (max_t, max_s):
            ref[...] = jnp.full(ref.shape, _NEG_BIG, jnp.float32)
        for ref in (sum_t, sum_s, cross):
            ref[...] = jnp.zeros(ref.shape, jnp.float32)

    a = teacher_logits(ht_ref[...], wt_ref[...], cfg)
    b = student_logits(hs_ref[...], ws_ref[...], cfg)
    ragged = cfg.vocab % cfg.block_vocab != 0
    valid = _valid(j, a.shape, cfg) if ragged else None
    mask = (lambda z: jnp.where(valid, z, -jnp.inf)) if ragged else (lambda z: z)
    mt, st, scale_t, e_t = online_lse(max_t[...], sum_t[...], mask(a))
    ms, ss, scale_s, e_s = online_lse(max_s[...], sum_s[...], mask(b))
    max_t[...], sum_t[...], max_s[...], sum_s[...] = mt, st, ms, ss
    # Padded columns: e = 0 there and a = b = 0 (zero W columns), so no 0 * inf.
    if cfg.mode == "forward":
        cross[...] = cross[...] * scale_t + jnp.sum(e_t * (a - b), axis=1, keepdims=True)
    elif cfg.mode == "reverse":
        cross[...] = cross[...] * scale_s + jnp.sum(e_s * (b - a), axis=1, keepdims=True)

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        lse_t = max_t[...] + jnp.log(sum_t[...])
        lse_s = max_s[...] + jnp.log(sum_s[...])
        lse_t_ref[...], lse_s_ref[...] = lse_t, lse_s
        if cfg.mode == "forward":
            k_ref[...] = finish_kl(cross[...], sum_t[...], lse_t, lse_s)
        elif cfg.mode == "reverse":
            k_ref[...] = finish_kl(cross[...], sum_s[...], lse_s, lse_t)
        else:
            k_ref[...] = jnp.zeros(k_ref.shape, jnp.float32)


def _mix_kernel(hs_ref, ws_ref, ht_ref, wt_ref, lse_t_ref, lse_s_ref, k_t_ref, k_s_ref, *, cfg):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        k_t_ref[...] = jnp.zeros(k_t_ref.shape, jnp.float32)
        k_s_ref[...] = jnp.zeros(k_s_ref.shape, jnp.float32)

    a = teacher_logits(ht_ref[...], wt_ref[...], cfg)
    b = student_logits(hs_ref[...], ws_ref[...], cfg)
    terms_t, terms_s = mixture_terms(a, b, lse_t_ref[...], lse_s_ref[...], cfg.beta)
    if cfg.vocab % cfg.block_vocab != 0:
        valid = _valid(j, a.shape, cfg)
        terms_t, terms_s = jnp.where(valid, terms_t, 0.0), jnp.where(valid, terms_s, 0.0)
    k_t_ref[...] += jnp.sum(terms_t, axis=1, keepdims=True)
    k_s_ref[...] += jnp.sum(terms_s, axis=1, keepdims=True)


def _grad_kernel(hs_ref, ws_ref, ht_ref, wt_ref, stats_ref, *refs, cfg, wrt, models):
    """wrt="h": grid (i, j), acc += dz W^T.  wrt="w": grid (j, i), acc += h^T dz.
    `models`: indices into (teacher, student) of the differentiated models."""
    outs, accs = refs[:len(models)], refs[len(models):]
    step = pl.program_id(1)

    @pl.when(step == 0)
    def _init():
        for acc in accs:
            acc[...] = jnp.zeros(acc.shape, jnp.float32)

    h = (ht_ref[...], hs_ref[...])
    w = (wt_ref[...], ws_ref[...])
    z = (teacher_logits(h[0], w[0], cfg), student_logits(h[1], w[1], cfg))
    lse_t, lse_s, k_t, k_s, g = (stats_ref[:, c:c + 1] for c in range(5))
    dz = tile_dz(*z, lse_t, lse_s, k_t, k_s, g, cfg)
    caps = (cfg.teacher_softcap, cfg.student_softcap)
    for m, acc in zip(models, accs):
        d = through_transform(dz[m], z[m], caps[m], cfg.temperature).astype(h[m].dtype)
        if wrt == "h":
            acc[...] += lax.dot_general(d, w[m], _NT, preferred_element_type=jnp.float32)
        else:
            acc[...] += lax.dot_general(h[m], d, _TN, preferred_element_type=jnp.float32)

    @pl.when(step == pl.num_programs(1) - 1)
    def _finish():
        for out, acc in zip(outs, accs):
            out[...] = acc[...].astype(out.dtype)


def _params(cfg):
    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                vmem_limit_bytes=cfg.vmem_limit_bytes)


def _pad(hs, ws, ht, wt, cfg):
    n_p = round_up(hs.shape[0], cfg.block_tokens)
    v_p = round_up(ws.shape[1], cfg.block_vocab)
    out = []
    for h, w in ((hs, ws), (ht, wt)):
        h_p = round_up(h.shape[1], 128)
        out.append(jnp.pad(h, ((0, n_p - h.shape[0]), (0, h_p - h.shape[1]))))
        out.append(jnp.pad(w, ((0, h_p - w.shape[0]), (0, v_p - w.shape[1]))))
    return out


def _in_specs(padded, cfg, tok, voc):
    hs, ws, ht, wt = padded
    bt, bv = cfg.block_tokens, cfg.block_vocab
    return [pl.BlockSpec((bt, hs.shape[1]), lambda *g: (tok(*g), 0)),
            pl.BlockSpec((ws.shape[0], bv), lambda *g: (0, voc(*g))),
            pl.BlockSpec((bt, ht.shape[1]), lambda *g: (tok(*g), 0)),
            pl.BlockSpec((wt.shape[0], bv), lambda *g: (0, voc(*g)))]


def _cost(padded, cfg, matmuls):
    hs, ws, ht, wt = padded
    n_p, v_p = hs.shape[0], ws.shape[1]
    return pl.CostEstimate(
        flops=matmuls * n_p * v_p * (hs.shape[1] + ht.shape[1]), transcendentals=4 * n_p * v_p,
        bytes_accessed=(hs.nbytes + ht.nbytes) * (v_p // cfg.block_vocab)
        + (ws.nbytes + wt.nbytes) * (n_p // cfg.block_tokens))


def _forward(hs, ws, ht, wt, cfg):
    """(divergence, lse_t, lse_s, K_t, K_s), float32 [N]."""
    n = hs.shape[0]
    padded = _pad(hs, ws, ht, wt, cfg)
    n_p, v_p = padded[0].shape[0], padded[1].shape[1]
    bt, bv = cfg.block_tokens, cfg.block_vocab
    grid = (n_p // bt, v_p // bv)
    in_specs = _in_specs(padded, cfg, lambda i, j: i, lambda i, j: j)
    column = pl.BlockSpec((bt, 1), lambda i, j: (i, 0))
    col_shape = jax.ShapeDtypeStruct((n_p, 1), jnp.float32)
    lse_t, lse_s, k = pl.pallas_call(
        functools.partial(_lse_kernel, cfg=cfg), grid=grid, in_specs=in_specs,
        out_specs=[column] * 3, out_shape=[col_shape] * 3,
        scratch_shapes=[pltpu.VMEM((bt, 1), jnp.float32)] * 5, compiler_params=_params(cfg),
        cost_estimate=_cost(padded, cfg, 2), name="token_divergence_lse",
        interpret=cfg.interpret)(*padded)
    if cfg.mode == "mixture":
        k_t, k_s = pl.pallas_call(
            functools.partial(_mix_kernel, cfg=cfg), grid=grid,
            in_specs=in_specs + [column, column], out_specs=[column] * 2,
            out_shape=[col_shape] * 2, compiler_params=_params(cfg),
            cost_estimate=_cost(padded, cfg, 2), name="token_divergence_mix",
            interpret=cfg.interpret)(*padded, lse_t, lse_s)
        div = cfg.beta * k_t + (1.0 - cfg.beta) * k_s
    else:
        k_t = k_s = div = k
    return tuple(x[:n, 0] for x in (div, lse_t, lse_s, k_t, k_s))


def _backward(hs, ws, ht, wt, stats, g_N, cfg, wanted: _Wanted):
    """(dhs, dws, dht, dwt); None for a model not differentiated."""
    n = hs.shape[0]
    models = tuple(m for m, want in ((0, wanted.teacher), (1, wanted.student)) if want)
    if not models:
        return None, None, None, None
    padded = _pad(hs, ws, ht, wt, cfg)
    n_p, v_p = padded[0].shape[0], padded[1].shape[1]
    bt, bv = cfg.block_tokens, cfg.block_vocab
    nt, nv = n_p // bt, v_p // bv
    stats_Nx5 = jnp.pad(jnp.stack([*stats, g_N], axis=1).astype(jnp.float32),
                        ((0, n_p - n), (0, 0)))  # padded tokens: zero cotangent
    h_of = (padded[2], padded[0])  # (teacher, student)
    w_of = (padded[3], padded[1])

    def grad(wrt, grid, tok, voc):
        targets = h_of if wrt == "h" else w_of
        blocks = [(bt, targets[m].shape[1]) if wrt == "h" else (targets[m].shape[0], bv)
                  for m in models]
        out_specs = [pl.BlockSpec(b, (lambda *g: (tok(*g), 0)) if wrt == "h"
                                  else (lambda *g: (0, voc(*g)))) for b in blocks]
        return pl.pallas_call(
            functools.partial(_grad_kernel, cfg=cfg, wrt=wrt, models=models), grid=grid,
            in_specs=_in_specs(padded, cfg, tok, voc)
            + [pl.BlockSpec((bt, 5), lambda *g: (tok(*g), 0))],
            out_specs=out_specs,
            out_shape=[jax.ShapeDtypeStruct(targets[m].shape, targets[m].dtype) for m in models],
            scratch_shapes=[pltpu.VMEM(b, jnp.float32) for b in blocks],
            compiler_params=_params(cfg), cost_estimate=_cost(padded, cfg, 2 + 2 * len(models)),
            name=f"token_divergence_bwd_d{wrt}", interpret=cfg.interpret,
        )(*padded, stats_Nx5)

    dh = grad("h", (nt, nv), lambda i, j: i, lambda i, j: j)
    dw = grad("w", (nv, nt), lambda j, i: i, lambda j, i: j)
    grads = [(None, None), (None, None)]
    originals = ((ht, wt), (hs, ws))
    for m, dh_m, dw_m in zip(models, dh, dw):
        h, w = originals[m]
        grads[m] = (dh_m[:n, :h.shape[1]], dw_m[:w.shape[0], :w.shape[1]])
    (dht, dwt), (dhs, dws) = grads
    return dhs, dws, dht, dwt


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(hs, ws, ht, wt, cfg):
    return _forward(hs, ws, ht, wt, cfg)[0]


def _fused_fwd(hs, ws, ht, wt, cfg):
    wanted = _Wanted(student=hs.perturbed or ws.perturbed, teacher=ht.perturbed or wt.perturbed)
    hs, ws, ht, wt = (x.value for x in (hs, ws, ht, wt))
    div, *stats = _forward(hs, ws, ht, wt, cfg)
    return div, (hs, ws, ht, wt, tuple(stats), wanted)


def _fused_bwd(cfg, residuals, g_N):
    hs, ws, ht, wt, stats, wanted = residuals
    if isinstance(g_N, SymbolicZero):
        return None, None, None, None
    return _backward(hs, ws, ht, wt, stats, g_N, cfg, wanted)


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def token_divergence_pallas_tpu(hs, ws, ht, wt, *, beta, temperature, student_softcap,
                                teacher_softcap, block_tokens, block_vocab, interpret=False,
                                token_axes=TOKEN_AXES):
    """float32 [N] divergences; Mosaic on TPU, elsewhere pass `interpret` or trace
    under `pltpu.force_tpu_interpret_mode()`. Under a mesh: shard_map over tokens."""
    options = dict(beta=beta, temperature=temperature, student_softcap=student_softcap,
                   teacher_softcap=teacher_softcap, block_tokens=block_tokens,
                   block_vocab=block_vocab, interpret=interpret)

    def local(hs, ws, ht, wt):
        cfg = plan(hs.shape[0], hs.shape[1], ht.shape[1], ws.shape[1], (hs.dtype, ht.dtype),
                   **options)
        return _fused(hs, ws, ht, wt, cfg)

    n = hs.shape[0]
    tok, _, n_shards = _mesh_axes(ws.shape[1], token_axes, None)
    if not tok:
        return local(hs, ws, ht, wt)
    n_p = round_up(n, n_shards)
    hs, ht = (jnp.pad(h, ((0, n_p - n), (0, 0))) for h in (hs, ht))
    # check_vma=False as in `_sharded.sharded_outputs` (Pallas' interpreter and vma).
    out = jax.shard_map(local, in_specs=(P(tok, None), P(), P(tok, None), P()),
                        out_specs=P(tok), check_vma=False)(hs, ws, ht, wt)
    return out[:n]
