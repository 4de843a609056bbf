"""Pallas TPU (Mosaic) kernels for the fused log-prob; the maths is `_chunked`'s.

Forward, grid (token blocks: parallel, vocab blocks: arbitrary): the [bt, H]
hidden tile stays in VMEM while [H, bv] unembedding tiles stream past; each step
forms a float32 [bt, bv] logits tile and updates an online log-sum-exp, the
target logit (iota compare) and the entropy's running sum of p * z. Per-token
values are [bt, 1] columns: they broadcast over a tile without relayouts.

Backward, two kernels recomputing each tile exactly as the forward (dz: `_dz`):
  dh: grid (token blocks: parallel, vocab: arbitrary), f32 [bt, H] accumulator;
  dW: grid (vocab blocks: parallel, tokens: arbitrary), f32 [H, bv] accumulator.
That is 8NHV FLOPs instead of a single pass's 6NHV: the price of never
revisiting an accumulator in HBM and of a parallel axis in both grids (which
megacore chips split over their two TensorCores).

Blocks are rounded to TPU tiles (tokens to 8/16 rows, vocab to 128 lanes) and
shrunk until the footprint fits VMEM; the VMEM limit is set explicitly. N, V and
H are zero-padded to block multiples: padded tokens get target -1, padded
columns are masked to -inf in the forward; in the backward they meet zero
columns of W (no effect on dh) and their dW is sliced off.

Mosaic kernels are not partitioned by XLA: under a mesh the op runs in the
shard_map wrapper of `_sharded` (tokens over "data"/"fsdp", the vocabulary over
"tensor" when it divides).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jalign.ops._reference import project_logits, transform_logits
from jalign.ops._sharded import KernelConfig, kernel_op, out_struct, round_up

_NEG_BIG = float(jnp.finfo(jnp.float32).min)  # finite initial max: see _chunked
_MiB = 1 << 20
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class TpuConfig(KernelConfig):
    """Static settings of one kernel call (blocks already legal and fitted)."""
    vmem_limit_bytes: int
    interpret: object = False  # False, True (generic interpreter) or pltpu.InterpretParams


def _vmem_capacity() -> int:
    """VMEM bytes of the attached TPU; 64 MiB (v5p, v7x) when none is (AOT) or unknown."""
    try:
        return int(pltpu.get_tpu_info().vmem_capacity_bytes)
    except Exception:  # noqa: BLE001 - no TPU, or a chip JAX does not know
        return 64 * _MiB


def _vmem_bytes(bt: int, bv: int, hidden: int, itemsize: int) -> int:
    """Footprint of the largest kernel (a backward one) for these blocks."""
    tiles_in = 2 * (bt + bv) * hidden * itemsize          # double-buffered h, W tiles
    accumulator = max(bt, bv) * hidden * (4 + 2 * itemsize)  # f32 acc + 2 output buffers
    temporaries = 8 * bt * bv * 4                          # f32 logits-sized values
    columns = 16 * bt * 128 * 4                            # [bt, 1] vectors pad to 128 lanes
    return tiles_in + accumulator + temporaries + columns


def _fit_block(size: int, block: int, unit: int) -> int:
    """`block` rounded up to `unit`; a divisor of `size` (no padding copy) when one
    of at least half the block exists, e.g. vocab 128256 -> 384 for block 512."""
    block = round_up(min(block, size), unit)
    if size % unit == 0:
        for b in range(block, max(unit, block // 2) - 1, -unit):
            if size % b == 0:
                return b
    return block


def plan(n: int, hidden: int, vocab: int, dtype, *, temperature: float,
         logit_softcap: float | None, with_entropy: bool, block_tokens: int,
         block_vocab: int, interpret=False) -> TpuConfig:
    """Legal, VMEM-fitting blocks and the VMEM limit for an [n, hidden] x [hidden, vocab] call."""
    itemsize = jnp.dtype(dtype).itemsize
    sublanes = 8 * max(1, 4 // itemsize)  # bf16 packs 16 rows per tile
    hidden_p = round_up(hidden, 128)
    budget = _vmem_capacity() * 3 // 4
    while True:
        bt = _fit_block(n, block_tokens, sublanes)
        bv = _fit_block(vocab, block_vocab, 128)
        if _vmem_bytes(bt, bv, hidden_p, itemsize) <= budget or max(bt, bv) <= 128:
            break
        if bt >= bv:
            block_tokens = max(128, bt // 2)
        else:
            block_vocab = max(128, bv // 2)
    need = _vmem_bytes(bt, bv, hidden_p, itemsize)
    limit = min(max(32 * _MiB, round_up(need * 5 // 4, _MiB)), _vmem_capacity())
    return TpuConfig.create(temperature=temperature, logit_softcap=logit_softcap,
                            with_entropy=with_entropy, vocab=vocab, block_tokens=bt,
                            block_vocab=bv, vmem_limit_bytes=int(limit), interpret=interpret)


def _logits(h, w, cfg):
    """The logits tile; the forward and both backward kernels call exactly this."""
    return transform_logits(project_logits(h, w), cfg.temperature, cfg.logit_softcap)


def _columns(j, shape, cfg):
    return j * cfg.block_vocab + lax.broadcasted_iota(jnp.int32, shape, 1)


def _forward_kernel(h_ref, w_ref, t_ref, *refs, cfg: TpuConfig):
    tl_ref, lse_ref, max_ref = refs[:3]
    ent_ref = refs[3] if cfg.with_entropy else None
    sum_ref, pz_ref = refs[-2:]  # VMEM scratch
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        max_ref[...] = jnp.full(max_ref.shape, _NEG_BIG, jnp.float32)
        tl_ref[...] = jnp.zeros(tl_ref.shape, jnp.float32)
        sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
        pz_ref[...] = jnp.zeros(pz_ref.shape, jnp.float32)

    z = _logits(h_ref[...], w_ref[...], cfg)
    cols = _columns(j, z.shape, cfg)
    ragged = cfg.vocab % cfg.block_vocab != 0
    z_valid = jnp.where(cols < cfg.vocab, z, -jnp.inf) if ragged else z
    max_old = max_ref[...]
    max_new = jnp.maximum(max_old, jnp.max(z_valid, axis=1, keepdims=True))
    shift = max_old - max_new
    scale = jnp.exp(shift)
    z_centred = z_valid - max_new
    e = jnp.exp(z_centred)
    sum_old = sum_ref[...]
    sum_ref[...] = sum_old * scale + jnp.sum(e, axis=1, keepdims=True)
    max_ref[...] = max_new
    tl_ref[...] += jnp.sum(jnp.where(cols == t_ref[...], z, 0.0), axis=1, keepdims=True)
    if cfg.with_entropy:
        ez = e * z_centred
        if ragged:  # 0 * -inf on masked columns
            ez = jnp.where(cols < cfg.vocab, ez, 0.0)
        pz_ref[...] = scale * (pz_ref[...] + shift * sum_old) + jnp.sum(ez, axis=1, keepdims=True)

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        log_sum = jnp.log(sum_ref[...])
        lse_ref[...] = max_ref[...] + log_sum
        if cfg.with_entropy:
            ent_ref[...] = log_sum - pz_ref[...] / sum_ref[...]


def _dz(h, w, t, stats_ref, j, cfg: TpuConfig):
    """dLoss/dlogits of one tile, in the matmul dtype.

    With cotangents g_tl (target logit), g_lse and g_ent of this call's outputs:
      dz = g_tl onehot(t) + p (g_lse - g_ent (log p + entropy)),  p = exp(z - lse)
    then through softcap (1 - (z / cap)^2) and temperature (1 / T).
    """
    z = _logits(h, w, cfg)
    lse, g_tl, g_lse = stats_ref[:, 0:1], stats_ref[:, 1:2], stats_ref[:, 2:3]
    logp = z - lse
    p = jnp.exp(logp)
    if cfg.with_entropy:
        ent, g_ent = stats_ref[:, 3:4], stats_ref[:, 4:5]
        dz = p * (g_lse - g_ent * (logp + ent))
    else:
        dz = p * g_lse
    dz = dz + jnp.where(_columns(j, z.shape, cfg) == t, g_tl, 0.0)
    if cfg.logit_softcap is not None:
        dz = dz * (1.0 - jnp.square(z / cfg.logit_softcap))
    if cfg.temperature != 1.0:
        dz = dz / cfg.temperature
    return dz.astype(h.dtype)


def _grad_kernel(h_ref, w_ref, t_ref, stats_ref, out_ref, acc_ref, *, cfg: TpuConfig,
                 wrt: str):
    """wrt="h": grid (i, j), acc += dz W^T.  wrt="w": grid (j, i), acc += h^T dz."""
    j = pl.program_id(1 if wrt == "h" else 0)
    step = pl.program_id(1)  # the reduction axis

    @pl.when(step == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    h, w = h_ref[...], w_ref[...]
    dz = _dz(h, w, t_ref[...], stats_ref, j, cfg)
    if wrt == "h":
        acc_ref[...] += lax.dot_general(dz, w, _NT, preferred_element_type=jnp.float32)
    else:
        acc_ref[...] += lax.dot_general(h, dz, _TN, preferred_element_type=jnp.float32)

    @pl.when(step == pl.num_programs(1) - 1)
    def _finish():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _params(cfg: TpuConfig):
    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                vmem_limit_bytes=cfg.vmem_limit_bytes)


def _pad(h, w, t, cfg: TpuConfig):
    """Zero-pads to block multiples (H to 128 lanes); padded targets are -1."""
    (n, hidden), vocab = h.shape, w.shape[1]
    n_p = round_up(n, cfg.block_tokens)
    v_p = round_up(vocab, cfg.block_vocab)
    h_p = round_up(hidden, 128)
    if (n_p, h_p) != (n, hidden):
        h = jnp.pad(h, ((0, n_p - n), (0, h_p - hidden)))
    if (h_p, v_p) != (hidden, vocab):
        w = jnp.pad(w, ((0, h_p - hidden), (0, v_p - vocab)))
    t = jnp.pad(t.astype(jnp.int32), (0, n_p - n), constant_values=-1)
    return h, w, t.reshape(n_p, 1)


def _forward(h, w, t, cfg: TpuConfig):
    """(target logit, lse, max, entropy or None), float32 [N]."""
    n = h.shape[0]
    h, w, t = _pad(h, w, t, cfg)
    (n_p, hidden), v_p = h.shape, w.shape[1]
    bt, bv = cfg.block_tokens, cfg.block_vocab
    column = pl.BlockSpec((bt, 1), lambda i, j: (i, 0))
    n_out = 4 if cfg.with_entropy else 3
    outs = pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        grid=(n_p // bt, v_p // bv),
        in_specs=[pl.BlockSpec((bt, hidden), lambda i, j: (i, 0)),
                  pl.BlockSpec((hidden, bv), lambda i, j: (0, j)), column],
        out_specs=[column] * n_out,
        out_shape=[out_struct((n_p, 1), jnp.float32, h)] * n_out,
        scratch_shapes=[pltpu.VMEM((bt, 1), jnp.float32)] * 2,
        compiler_params=_params(cfg),
        cost_estimate=pl.CostEstimate(
            flops=2 * n_p * hidden * v_p, transcendentals=n_p * v_p,
            bytes_accessed=(h.size + w.size * (n_p // bt)) * h.dtype.itemsize),
        name="token_logprobs_fwd", interpret=cfg.interpret,
    )(h, w, t)
    outs = [x[:n, 0] for x in outs]
    return (*outs, None) if n_out == 3 else tuple(outs)


def _backward(h, w, t, stats_Nxk, cfg: TpuConfig):
    """(dh, dW) in the dtypes of h and W."""
    (n, hidden), vocab = h.shape, w.shape[1]
    h, w, t = _pad(h, w, t, cfg)
    (n_p, hidden_p), v_p = h.shape, w.shape[1]
    stats_Nxk = jnp.pad(stats_Nxk, ((0, n_p - n), (0, 0)))  # padded tokens: all zero
    bt, bv, k = cfg.block_tokens, cfg.block_vocab, stats_Nxk.shape[1]
    nt, nv = n_p // bt, v_p // bv
    cost = pl.CostEstimate(flops=4 * n_p * hidden_p * v_p, transcendentals=n_p * v_p,
                           bytes_accessed=(h.size * nv + w.size * nt) * h.dtype.itemsize)

    def grad(wrt, x, block, grid, tok, voc):  # tok / voc: grid index -> block index
        out_spec = (pl.BlockSpec(block, lambda *g: (tok(*g), 0)) if wrt == "h"
                    else pl.BlockSpec(block, lambda *g: (0, voc(*g))))
        return pl.pallas_call(
            functools.partial(_grad_kernel, cfg=cfg, wrt=wrt), grid=grid,
            in_specs=[pl.BlockSpec((bt, hidden_p), lambda *g: (tok(*g), 0)),
                      pl.BlockSpec((hidden_p, bv), lambda *g: (0, voc(*g))),
                      pl.BlockSpec((bt, 1), lambda *g: (tok(*g), 0)),
                      pl.BlockSpec((bt, k), lambda *g: (tok(*g), 0))],
            out_specs=out_spec, out_shape=out_struct(x.shape, x.dtype, h),
            scratch_shapes=[pltpu.VMEM(block, jnp.float32)], compiler_params=_params(cfg),
            cost_estimate=cost, name=f"token_logprobs_bwd_d{wrt}", interpret=cfg.interpret,
        )(h, w, t, stats_Nxk)

    dh = grad("h", h, (bt, hidden_p), (nt, nv), lambda i, j: i, lambda i, j: j)
    dw = grad("w", w, (hidden_p, bv), (nv, nt), lambda j, i: i, lambda j, i: j)
    return dh[:n, :hidden], dw[:hidden, :vocab]


token_logprobs_pallas_tpu = kernel_op(plan, _forward, lambda h, w, t, stats, cfg: _backward(
    h, w, t, jnp.stack(stats, axis=1).astype(jnp.float32), cfg))
token_logprobs_pallas_tpu.__name__ = "token_logprobs_pallas_tpu"
token_logprobs_pallas_tpu.__doc__ = """Returns (logps_N, lse_N, entropy_N or None, max_logit_N), all float32.

Runs as Mosaic on TPU. Elsewhere pass `interpret` (True, or `pltpu.InterpretParams`)
or trace under `pltpu.force_tpu_interpret_mode()`.
"""
