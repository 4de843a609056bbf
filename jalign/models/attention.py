"""Causal self-attention of the decoder, one function per `model.attention_impl`.

    scores = softcap(q k^T * scale),  softcap(z) = cap * tanh(z / cap)  (Gemma 2)
    out    = softmax(where(allowed, scores, -inf)) v
    allowed[q, k] = k <= q  &  q - k < window  &  segment[q] == segment[k]

`scale` is 1/sqrt(query_pre_attn_scalar or head_dim); `window` is the sliding
window of a sliding layer (Mistral, Gemma 2/3) and unbounded otherwise; segments
keep packed sequences apart (0 = padding, which attends only to padding). Keys
and values have `num_kv_heads` heads, each shared by a group of query heads (GQA).

Implementations:
  "xla"      the dense reference: float32 scores [B, heads, T, S]; with a KV cache
             (the sampler) over all S slots, filled or not, as before.
  "chunked"  plain JAX: query blocks x key blocks with an online softmax, visiting
             only the blocks the causal mask and the window leave; a custom_vjp
             whose backward recomputes each tile (FlashAttention-2, Dao 2023), so
             memory is O(T x block) instead of O(T^2).
  "splash"   JAX's Pallas TPU splash-attention kernels (segment ids, causal or
             local masks, soft-capping), one MQA kernel per key/value head.
  "cudnn"    `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash
             attention (GPU; bf16/fp16; no soft-capping; packed segments as a
             dense boolean mask).
  "auto"     splash on TPU; cudnn on GPU when it can express the config, else
             chunked; on CPU xla below AUTO_CHUNKED_MIN_TOKENS (1024) tokens and
             chunked from there. `resolve_impl` logs what it picked.

Context parallelism (a "sequence" mesh axis > 1, `config.mesh.sequence`): the
tokens of each row are split over the axis; each device all-gathers K and V across
it and attends with its own queries at their global offset ("xla" and "chunked";
"splash" and "cudnn" are refused). An all-gather rather than ring attention:
grouped-query heads make K/V num_heads / num_kv_heads times smaller than Q, the
gather is a single collective (its transpose a single reduce-scatter of dK/dV), and
the kernels run unchanged; see `_attend_context_parallel`.

Cached decoding (jalign.generate), for every option but "xla": the prompt's
prefill attends within the prompt through the option above; each decode step runs
`cached_attention`, key blocks up to the last filled slot with an online softmax.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from jalign.models.config import ATTENTION_IMPLS, ModelConfig, attention_impl_errors

_log = logging.getLogger(__name__)
_NEG_BIG = float(jnp.finfo(jnp.float32).min)  # finite: a fully masked tile stays NaN-free
_SPLASH_LANES = 128  # splash blocks are multiples of the TPU lane width
# Set by `splash_interpret_mode` (CPU tests): JAX's TPU interpreter
# (pltpu.force_tpu_interpret_mode) fails on vmapped kernels in this JAX
# (safe_zip of the batched grid against its dimension semantics), so the splash
# kernels run under Pallas' generic interpreter instead.
_SPLASH_INTERPRET = contextvars.ContextVar("splash_interpret", default=False)


@contextlib.contextmanager
def splash_interpret_mode():
    """Within: "splash" kernels are traced for Pallas' interpreter (runs on CPU)."""
    token = _SPLASH_INTERPRET.set(True)
    try:
        yield
    finally:
        _SPLASH_INTERPRET.reset(token)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile of the "chunked" and "splash" paths: query rows x key columns.

    Sizes larger than the (padded) sequence are clamped; T need not be a multiple.
    """
    block_q: int
    block_kv: int

    def __post_init__(self):
        if self.block_q < 1 or self.block_kv < 1:
            raise ValueError(f"attention block sizes must be positive, got {self}")

    @classmethod
    def get_default(cls, impl: str = "chunked") -> "BlockSizes":
        if impl == "splash":
            return cls(block_q=512, block_kv=512)
        # benchmarks/attention_memory.py (T=4096, CPU): see benchmarks/RESULTS.md.
        return cls(block_q=512, block_kv=512)


class Segments(NamedTuple):
    """What the kernels need instead of a dense mask: the packed segment ids and
    whether this layer slides (a traced bool inside the scanned layer stack)."""
    ids_BxT: jax.Array
    sliding: jax.Array | bool = False


_logged: set = set()


# On CPU, "auto" keeps the dense path below this many tokens: there the [T, T]
# scores are small (4 MiB per head at 1024) and one fused softmax beats the
# blocked loops; from here on the scores dominate a step's memory.
AUTO_CHUNKED_MIN_TOKENS = 1024


def resolve_impl(config: ModelConfig, seq_len: int | None = None,
                 backend: str | None = None, *, context_parallel: bool = False) -> str:
    """`config.attention_impl` with "auto" made concrete for `backend` (default: JAX's)
    and a sequence of `seq_len` tokens (None: long); with `context_parallel` (a
    "sequence" mesh axis) among the options that support it. Logs each new choice once."""
    impl = config.attention_impl
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    if context_parallel:
        chosen = "xla" if backend == "cpu" and seq_len is not None and (
            seq_len < AUTO_CHUNKED_MIN_TOKENS) else "chunked"
    elif backend == "tpu":
        chosen = "splash"
    elif backend in ("gpu", "cuda") and not attention_impl_errors(config, "cudnn"):
        chosen = "cudnn"
    elif backend == "cpu" and seq_len is not None and seq_len < AUTO_CHUNKED_MIN_TOKENS:
        chosen = "xla"
    else:
        chosen = "chunked"
    key = (backend, chosen, context_parallel)
    if key not in _logged:
        _logged.add(key)
        _log.info("model.attention_impl=auto resolved to %r on %s%s%s", chosen, backend,
                  f" (T={seq_len})" if backend == "cpu" else "",
                  " (context parallel)" if context_parallel else "")
    return chosen


# ----------------------------------------------------------------------------- xla

def xla_attention(q_BxTxNxD, k_BxKxSxD, v_BxKxSxD, mask_Bx1x1xTxS, *, scale_divisor: float,
                  softcap: float | None, cached: bool = False):
    """The dense reference; keys/values heads-first [B, K, S, D] as the KV cache lies.
    Scores are divided by `scale_divisor` (sqrt of query_pre_attn_scalar or head_dim)."""
    b, t, nq, d = q_BxTxNxD.shape
    nkv = k_BxKxSxD.shape[1]
    g = nq // nkv
    dt = q_BxTxNxD.dtype
    if not cached:
        # Heads before tokens, as in the cache, so both attention products are plain
        # batched matmuls; over [b, t, heads, d] XLA:CPU copied around each dot.
        q = q_BxTxNxD.transpose(0, 2, 1, 3).reshape(b, nkv, g * t, d)
        scores = jnp.einsum("bkqd,bksd->bkqs", q, k_BxKxSxD, preferred_element_type=jnp.float32)
        scores = scores.reshape(b, nkv, g, t, -1)
    else:
        scores = jnp.einsum("btkgd,bksd->bkgts", q_BxTxNxD.reshape(b, t, nkv, g, d), k_BxKxSxD,
                            preferred_element_type=jnp.float32)
    scores = scores / scale_divisor
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask_Bx1x1xTxS, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    # probs [b, k, g*t, S] @ v [b, k, S, d]: written as an einsum, XLA:CPU picks
    # a dot over v's non-minor axis that took a third of each decode step.
    out = jnp.matmul(probs.reshape(b, nkv, g * t, probs.shape[-1]), v_BxKxSxD)
    return out.reshape(b, nkv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, nq, d)


def dense_mask(segment_ids_BxT, window=None):
    """[B, 1, 1, T, T] bool: causal, same segment, and within `window` when given."""
    t = segment_ids_BxT.shape[1]
    pos = jnp.arange(t)
    allowed = (pos[None, :] <= pos[:, None])[None]
    allowed = allowed & (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])
    if window is not None:
        allowed = allowed & ((pos[:, None] - pos[None, :]) < window)[None]
    return allowed[:, None, None]


# ------------------------------------------------------------------------- chunked

def _pad_tokens(x, axis, size, value=0):
    pad = size - x.shape[axis]
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _tile_mask(q0, k0, bq, bk, seg_q_Bxbq, seg_k_Bxbk, window):
    """[B, 1, 1, bq, bk] allowed entries of the tile whose corner is (q0, k0)."""
    qpos = q0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    kpos = k0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    allowed = (kpos <= qpos) & (qpos - kpos < window)
    allowed = allowed[None] & (seg_q_Bxbq[:, :, None] == seg_k_Bxbk[:, None, :])
    return allowed[:, None, None]


def _scores(q, k, scale, softcap):
    """Raw float32 tile scores and their soft-capped value: [B, K, G, bq, bk]."""
    raw = jnp.einsum("bkgqd,bksd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is None:
        return raw, raw
    return raw, softcap * jnp.tanh(raw / softcap)


def _kv_range(q0, bq, bk, nk, window):
    """Key blocks the query block starting at position q0 can see: causal above, the
    window below."""
    lo = jnp.maximum(0, q0 - window + 1) // bk
    hi = jnp.minimum(nk, (q0 + bq - 1) // bk + 1)
    return lo, hi


def _q_range(k0, bq, bk, nq, window, q_offset):
    """Query blocks (the first at position q_offset) that can see the key block at k0."""
    lo = jnp.maximum(0, k0 - q_offset) // bq
    hi = jnp.clip((k0 + bk - 1 + window - 1 - q_offset) // bq + 1, 0, nq)
    return lo, hi


def _online_softmax_step(carry, s, allowed, v_tile):
    """One key tile of the online softmax: carry (running max m, normaliser l, weighted
    values acc) updated with scores `s` [..., q, k] where `allowed`, values [.., k, D]."""
    m, l, acc = carry
    s = jnp.where(allowed, s, _NEG_BIG)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.where(allowed, jnp.exp(s - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v_tile.dtype), v_tile,
                    preferred_element_type=jnp.float32)
    return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv


def _sl(x, start, size, axis):
    return lax.dynamic_slice_in_dim(x, start, size, axis)


def _chunked_fwd_impl(q, k, v, seg_q, seg_k, q_off, window, *, scale, softcap, bq, bk):
    """q [B, K, G, Tq, D], k/v [B, K, Tk, D], seg_q [B, Tq], seg_k [B, Tk] -> out like q,
    lse [B, K, G, Tq]. Query row r sits at position q_off + r (context parallelism:
    this device's slice of the tokens against all keys)."""
    b, nkv, g, tq, d = q.shape
    nq, nk = tq // bq, k.shape[2] // bk

    def q_block(i):
        qi, seg_qi = _sl(q, i * bq, bq, 3), _sl(seg_q, i * bq, bq, 1)
        q0 = q_off + i * bq

        def kv_step(j, carry):
            kj, vj, seg_kj = _sl(k, j * bk, bk, 2), _sl(v, j * bk, bk, 2), _sl(seg_k, j * bk, bk, 1)
            _, s = _scores(qi, kj, scale, softcap)
            allowed = _tile_mask(q0, j * bk, bq, bk, seg_qi, seg_kj, window)
            return _online_softmax_step(carry, s, allowed, vj)

        init = (jnp.full((b, nkv, g, bq), _NEG_BIG, jnp.float32),
                jnp.zeros((b, nkv, g, bq), jnp.float32),
                jnp.zeros((b, nkv, g, bq, d), jnp.float32))
        lo, hi = _kv_range(q0, bq, bk, nk, window)
        m, l, acc = lax.fori_loop(lo, hi, kv_step, init)
        # A padding row past the keys of its shard sees none (l = 0): zeros, not NaN,
        # which would reach dk / dv through the backward's delta.
        seen = l > 0
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        return out.astype(q.dtype), jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)

    out, lse = lax.map(q_block, jnp.arange(nq))  # [nq, B, K, G, bq, (D)]
    out = jnp.moveaxis(out, 0, 3).reshape(b, nkv, g, tq, d)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, nkv, g, tq)
    return out, lse


def _chunked_bwd_impl(q, k, v, seg_q, seg_k, q_off, window, out, lse, dout, *, scale,
                      softcap, bq, bk):
    b, nkv, g, tq, d = q.shape
    nq, nk = tq // bq, k.shape[2] // bk
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [B, K, G, Tq]

    def kv_block(dq, j):
        kj, vj, seg_kj = _sl(k, j * bk, bk, 2), _sl(v, j * bk, bk, 2), _sl(seg_k, j * bk, bk, 1)

        def q_step(i, carry):
            dq, dk, dv = carry
            qi, doi = _sl(q, i * bq, bq, 3), _sl(dout, i * bq, bq, 3)
            seg_qi = _sl(seg_q, i * bq, bq, 1)
            raw, s = _scores(qi, kj, scale, softcap)
            allowed = _tile_mask(q_off + i * bq, j * bk, bq, bk, seg_qi, seg_kj, window)
            p = jnp.where(allowed, jnp.exp(s - _sl(lse, i * bq, bq, 3)[..., None]), 0.0)
            dv = dv + jnp.einsum("bkgqs,bkgqd->bksd", p.astype(dout.dtype), doi,
                                 preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkgqd,bksd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
            ds = p * (dp - _sl(delta, i * bq, bq, 3)[..., None])
            if softcap is not None:
                ds = ds * (1.0 - jnp.square(s / softcap))  # d softcap(raw) / d raw
            ds = (ds * scale).astype(q.dtype)
            dq_i = jnp.einsum("bkgqs,bksd->bkgqd", ds, kj, preferred_element_type=jnp.float32)
            dq = lax.dynamic_update_slice_in_dim(dq, _sl(dq, i * bq, bq, 3) + dq_i, i * bq, 3)
            dk = dk + jnp.einsum("bkgqs,bkgqd->bksd", ds, qi, preferred_element_type=jnp.float32)
            return dq, dk, dv

        zeros = jnp.zeros((b, nkv, bk, d), jnp.float32)
        lo, hi = _q_range(j * bk, bq, bk, nq, window, q_off)
        dq, dk, dv = lax.fori_loop(lo, hi, q_step, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = lax.scan(kv_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(nk))
    dk = jnp.moveaxis(dk, 0, 2).reshape(b, nkv, nk * bk, d)
    dv = jnp.moveaxis(dv, 0, 2).reshape(b, nkv, nk * bk, d)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _chunked_core(q, k, v, seg_q, seg_k, q_off, window, scale, softcap, bq, bk):
    return _chunked_fwd_impl(q, k, v, seg_q, seg_k, q_off, window, scale=scale,
                             softcap=softcap, bq=bq, bk=bk)[0]


def _chunked_core_fwd(q, k, v, seg_q, seg_k, q_off, window, scale, softcap, bq, bk):
    out, lse = _chunked_fwd_impl(q, k, v, seg_q, seg_k, q_off, window, scale=scale,
                                 softcap=softcap, bq=bq, bk=bk)
    return out, (q, k, v, seg_q, seg_k, q_off, window, out, lse)


def _chunked_core_bwd(scale, softcap, bq, bk, res, dout):
    q, k, v, seg_q, seg_k, q_off, window, out, lse = res
    dq, dk, dv = _chunked_bwd_impl(q, k, v, seg_q, seg_k, q_off, window, out, lse, dout,
                                   scale=scale, softcap=softcap, bq=bq, bk=bk)
    zero_int = lambda x: np.zeros(np.shape(x), jax.dtypes.float0)  # noqa: E731
    return dq, dk, dv, zero_int(seg_q), zero_int(seg_k), zero_int(q_off), zero_int(window)


_chunked_core.defvjp(_chunked_core_fwd, _chunked_core_bwd)


def chunked_attention(q_BxTxNxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxT, *, window=None,
                      scale: float, softcap: float | None = None,
                      block_sizes: BlockSizes | None = None, q_offset=0,
                      segment_ids_BxS=None):
    """Blocked causal attention with an online softmax; memory O(T x block).

    `window` (an int, or a traced int32 scalar) limits each query to the last
    `window` keys; None is unbounded. Context parallelism: the T queries are the
    tokens [q_offset, q_offset + T) (traced int ok) of the S keys, whose segment
    ids are `segment_ids_BxS` (default: the queries' own, S = T).
    """
    b, t, nq, d = q_BxTxNxD.shape
    s, nkv = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
    g = nq // nkv
    blocks = block_sizes or BlockSizes.get_default("chunked")
    bq, bk = min(blocks.block_q, t), min(blocks.block_kv, s)
    unit = math.lcm(bq, bk)
    tqp, tkp = -(-t // unit) * unit, -(-s // unit) * unit
    # Padding tokens form their own segment (-1): real rows never see them.
    seg_q = _pad_tokens(segment_ids_BxT.astype(jnp.int32), 1, tqp, value=-1)
    seg_k = seg_q if segment_ids_BxS is None else _pad_tokens(
        segment_ids_BxS.astype(jnp.int32), 1, tkp, value=-1)
    q = _pad_tokens(q_BxTxNxD, 1, tqp).transpose(0, 2, 1, 3).reshape(b, nkv, g, tqp, d)
    k = _pad_tokens(k_BxSxKxD, 1, tkp).transpose(0, 2, 1, 3)
    v = _pad_tokens(v_BxSxKxD, 1, tkp).transpose(0, 2, 1, 3)
    window = jnp.asarray(tqp + tkp if window is None else window, jnp.int32)
    q_offset = jnp.asarray(q_offset, jnp.int32)
    out = _chunked_core(q, k, v, seg_q, seg_k, q_offset, window, float(scale), softcap, bq, bk)
    return out.reshape(b, nq, tqp, d).transpose(0, 2, 1, 3)[:, :t]


# -------------------------------------------------------------------------- splash

def _splash_one_batch(q_KxGxTxD, k_KxTxD, v_KxTxD, seg_T, *, window, softcap, block):
    """One sequence: an MQA splash kernel per key/value head (its query group)."""
    nkv, g, tp, _ = q_KxGxTxD.shape
    mask = (splash.CausalMask((tp, tp)) if window is None
            else splash.LocalMask((tp, tp), window_size=(window - 1, 0), offset=0))
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              use_fused_bwd_kernel=True)
    kernel = splash.make_splash_mqa_single_device(
        mask=splash.MultiHeadMask([mask] * g), block_sizes=sizes, attn_logits_soft_cap=softcap,
        interpret=_SPLASH_INTERPRET.get())
    segments = splash.SegmentIds(q=seg_T, kv=seg_T)
    return jax.vmap(lambda q, k, v: kernel(q, k, v, segments))(q_KxGxTxD, k_KxTxD, v_KxTxD)


def splash_attention(q_BxTxNxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT, *, sliding=False,
                     window: int | None = None, scale: float, softcap: float | None = None,
                     block_sizes: BlockSizes | None = None):
    """Pallas TPU splash attention; `sliding` (bool or traced) picks the local mask of
    size `window` or the causal one. Under a mesh the batch is split with shard_map."""
    b, t, nq, d = q_BxTxNxD.shape
    nkv = k_BxTxKxD.shape[2]
    g = nq // nkv
    blocks = block_sizes or BlockSizes.get_default("splash")
    block = min(max(blocks.block_q, blocks.block_kv), -(-t // _SPLASH_LANES) * _SPLASH_LANES)
    block = -(-block // _SPLASH_LANES) * _SPLASH_LANES
    tp = -(-t // block) * block
    seg = _pad_tokens(segment_ids_BxT.astype(jnp.int32), 1, tp, value=-1)
    # The kernel takes unscaled logits: fold the scale into q (in float32).
    q = (q_BxTxNxD.astype(jnp.float32) * scale).astype(q_BxTxNxD.dtype)
    q = _pad_tokens(q, 1, tp).transpose(0, 2, 1, 3).reshape(b, nkv, g, tp, d)
    k = _pad_tokens(k_BxTxKxD, 1, tp).transpose(0, 2, 1, 3)
    v = _pad_tokens(v_BxTxKxD, 1, tp).transpose(0, 2, 1, 3)

    def run(q, k, v, seg, sliding):
        def with_window(w):
            one = functools.partial(_splash_one_batch, window=w, softcap=softcap, block=block)
            return jax.vmap(one)(q, k, v, seg)
        if window is None or static_sliding is False:
            return with_window(None)
        if static_sliding is True:
            return with_window(window)
        return lax.cond(sliding, lambda: with_window(window), lambda: with_window(None))

    static_sliding = sliding if isinstance(sliding, bool) else None
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and set(mesh.manual_axes) != set(mesh.axis_names):
        # Mosaic kernels are not partitioned by XLA: in shard_map each device runs its
        # batch rows ("data", "fsdp") and key/value heads ("tensor") when they divide.
        usable = {a: n for a, n in mesh.shape.items() if n > 1 and a not in set(mesh.manual_axes)}
        batch_axes = tuple(a for a in ("data", "fsdp") if a in usable)
        if b % math.prod(usable[a] for a in batch_axes):
            batch_axes = ()
        head_axis = "tensor" if "tensor" in usable and nkv % usable["tensor"] == 0 else None
        P = jax.sharding.PartitionSpec
        rows = batch_axes or None
        run = jax.shard_map(run, in_specs=(P(rows, head_axis),) * 3 + (P(rows), P()),
                            out_specs=P(rows, head_axis), check_vma=False)
    out = run(q, k, v, seg, jnp.asarray(sliding, bool))
    return out.reshape(b, nq, tp, d).transpose(0, 2, 1, 3)[:, :t]


# --------------------------------------------------------------------------- cudnn

def cudnn_attention(q_BxTxNxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT, *, sliding=False,
                    window: int | None = None, scale: float):
    """cuDNN flash attention through `jax.nn.dot_product_attention`."""
    mask = (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])[:, None]

    def run(w):
        return jax.nn.dot_product_attention(
            q_BxTxNxD, k_BxTxKxD, v_BxTxKxD, mask=mask, scale=scale, is_causal=True,
            local_window_size=None if w is None else (w - 1, 0), implementation="cudnn")

    if window is None or sliding is False:
        return run(None)
    if sliding is True:
        return run(window)
    return lax.cond(sliding, lambda: run(window), lambda: run(None))


# ------------------------------------------------------------------- cached decode

class CachedSlots(NamedTuple):
    """Cached decoding: the T new tokens sit at slots [start, start + T) of a KV cache
    whose filled slots are `valid_BxS` > 0 (their own slots included)."""
    valid_BxS: jax.Array
    start: jax.Array | int
    sliding: jax.Array | bool = False


def cached_attention(q_BxTxNxD, k_BxKxSxD, v_BxKxSxD, valid_BxS, start, *, window=None,
                     scale: float, softcap: float | None = None, block_kv: int = 512):
    """New tokens at slots [start, start + T) attend to the valid cache slots at or
    before their own (and within `window` tokens, an int or traced int32; None:
    unbounded). The window counts valid slots, not slots: a multi-turn episode leaves
    empty slots between turns, and a token's distance is the number of tokens between,
    as in the compacted training rows.

    A loop over key blocks from the window's first to the one holding slot
    start + T - 1, with an online softmax, so a decode step reads the filled part
    of the cache only: float32 scores of [B, heads, T, block_kv] instead of
    [B, heads, T, S] over the empty tail. A query with no visible key gets zeros.
    """
    b, t, nq, d = q_BxTxNxD.shape
    nkv, s = k_BxKxSxD.shape[1], k_BxKxSxD.shape[2]
    g = nq // nkv
    bk = min(block_kv, s)
    q = q_BxTxNxD.reshape(b, t, nkv, g, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
    start = jnp.asarray(start, jnp.int32)
    windowed = window is not None
    window = jnp.asarray(s + 1 if window is None else window, jnp.int32)
    q_slot = start + jnp.arange(t, dtype=jnp.int32)
    # Each slot's token index (valid slots counted up to it) for the window's distances.
    token_BxS = jnp.cumsum((valid_BxS > 0).astype(jnp.int32), axis=1)
    q_token_BxT = _sl(token_BxS, start, t, 1)

    def kv_step(j, carry):
        # The last block is shifted back to end at slot S; slots an earlier block
        # already covered (below j * bk) are masked, so none counts twice.
        k0 = jnp.minimum(j * bk, s - bk)
        kj, vj = _sl(k_BxKxSxD, k0, bk, 2), _sl(v_BxKxSxD, k0, bk, 2)
        k_slot = k0 + jnp.arange(bk, dtype=jnp.int32)
        allowed = (k_slot[None, :] <= q_slot[:, None]) & (k_slot[None, :] >= j * bk)  # [T, bk]
        allowed = allowed[None] & (_sl(valid_BxS, k0, bk, 1) > 0)[:, None, :]  # [B, T, bk]
        if windowed:
            k_token_Bxbk = _sl(token_BxS, k0, bk, 1)
            allowed &= q_token_BxT[:, :, None] - k_token_Bxbk[:, None, :] < window
        _, sc = _scores(q, kj, scale, softcap)  # [B, K, G, T, bk]
        return _online_softmax_step(carry, sc, allowed[:, None, None], vj)

    init = (jnp.full((b, nkv, g, t), _NEG_BIG, jnp.float32),
            jnp.zeros((b, nkv, g, t), jnp.float32), jnp.zeros((b, nkv, g, t, d), jnp.float32))
    lo = 0
    if windowed:  # the first block holding a slot within the window of the first query
        first_BxS = token_BxS > (q_token_BxT[:, :1] - window)
        lo = jnp.min(jnp.argmax(first_BxS, axis=1)) // bk
    hi = (start + t - 1) // bk + 1
    _, l, acc = lax.fori_loop(lo, hi, kv_step, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, nq, d).astype(q_BxTxNxD.dtype)


def attend_cached(q_BxTxNxD, k_BxKxSxD, v_BxKxSxD, slots: CachedSlots, config: ModelConfig):
    """`cached_attention` with the config's scale, soft-cap, window and key block."""
    window, sliding = config.sliding_window, slots.sliding
    if window is None or sliding is False:
        window = None
    elif sliding is not True:
        window = jnp.where(sliding, window, k_BxKxSxD.shape[2] + 1)
    return cached_attention(
        q_BxTxNxD, k_BxKxSxD, v_BxKxSxD, slots.valid_BxS, slots.start, window=window,
        scale=1.0 / math.sqrt(config.query_pre_attn_scalar or config.head_size),
        softcap=config.attn_logit_softcap,
        block_kv=config.attention_block_kv or BlockSizes.get_default("chunked").block_kv)


# ------------------------------------------------------------------------ dispatch

def attend(q_BxTxNxD, k_BxTxKxD, v_BxTxKxD, segments: Segments, config: ModelConfig, *,
           impl: str | None = None, block_sizes: BlockSizes | None = None,
           context_parallel: bool = True):
    """Causal self-attention of one layer with the config's scale, soft-cap and window.

    Under a mesh with a "sequence" axis (and `context_parallel`, the training and
    scoring pass; not the sampler's prefill) each device attends with its slice of
    the queries to the keys and values gathered across the axis
    (`_attend_context_parallel`)."""
    n_seq = sequence_shards() if context_parallel else 1
    impl = impl or resolve_impl(config, q_BxTxNxD.shape[1], context_parallel=n_seq > 1)
    if block_sizes is None and (config.attention_block_q or config.attention_block_kv):
        default = BlockSizes.get_default(impl)
        block_sizes = BlockSizes(config.attention_block_q or default.block_q,
                                 config.attention_block_kv or default.block_kv)
    if impl not in ATTENTION_IMPLS or impl == "auto":
        raise ValueError(f"attention impl {impl!r}; valid: {ATTENTION_IMPLS}")
    scale_divisor = math.sqrt(config.query_pre_attn_scalar or config.head_size)
    scale = 1.0 / scale_divisor
    softcap, window, sliding = config.attn_logit_softcap, config.sliding_window, segments.sliding
    if n_seq > 1:
        error = context_parallel_error(impl)
        if error:
            raise ValueError(error)
        return _attend_context_parallel(
            q_BxTxNxD, k_BxTxKxD, v_BxTxKxD, segments, config, impl=impl, n_seq=n_seq,
            block_sizes=block_sizes)
    if impl == "chunked":
        if window is not None and sliding is not False:
            t = q_BxTxNxD.shape[1]
            window = window if sliding is True else jnp.where(sliding, window, t + 1)
        else:
            window = None
        return chunked_attention(q_BxTxNxD, k_BxTxKxD, v_BxTxKxD, segments.ids_BxT,
                                 window=window, scale=scale, softcap=softcap,
                                 block_sizes=block_sizes)
    if impl == "splash":
        return splash_attention(q_BxTxNxD, k_BxTxKxD, v_BxTxKxD, segments.ids_BxT,
                                sliding=sliding, window=window, scale=scale, softcap=softcap,
                                block_sizes=block_sizes)
    if impl == "cudnn":
        return cudnn_attention(q_BxTxNxD, k_BxTxKxD, v_BxTxKxD, segments.ids_BxT,
                               sliding=sliding, window=window, scale=scale)
    mask = dense_mask(segments.ids_BxT)
    if window is not None and sliding is not False:
        mask = jnp.where(sliding, dense_mask(segments.ids_BxT, window), mask)
    return xla_attention(q_BxTxNxD, k_BxTxKxD.transpose(0, 2, 1, 3),
                         v_BxTxKxD.transpose(0, 2, 1, 3), mask, scale_divisor=scale_divisor,
                         softcap=softcap)


# ------------------------------------------------------------ context parallelism

SEQUENCE_AXIS = "sequence"
# The options that attend with a slice of the queries at an offset into all keys.
CONTEXT_PARALLEL_IMPLS = ("auto", "xla", "chunked")


def context_parallel_error(impl: str) -> str | None:
    """Why `model.attention_impl=impl` cannot run with a "sequence" mesh axis > 1."""
    if impl in CONTEXT_PARALLEL_IMPLS:
        return None
    return (f"config.mesh.sequence > 1 (context parallelism) needs config.model.attention_impl "
            f"in {CONTEXT_PARALLEL_IMPLS}, got {impl!r}: the {impl} kernels take a static causal "
            "mask aligned at token 0, not a shard's queries at an offset into all keys. Use "
            "attention_impl=chunked, or config.mesh.sequence=1")


def sequence_shards() -> int:
    """Size of the ambient mesh's "sequence" axis (1 without a mesh, without the axis,
    or inside a shard_map already manual over it)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or SEQUENCE_AXIS not in mesh.axis_names or (
            SEQUENCE_AXIS in set(mesh.manual_axes)):
        return 1
    return int(mesh.shape[SEQUENCE_AXIS])


def _offset_mask(seg_q_BxT, seg_k_BxS, q_offset, window):
    """[B, 1, 1, T, S] dense mask of queries at positions q_offset + [0, T) over S keys."""
    qpos = q_offset + jnp.arange(seg_q_BxT.shape[1], dtype=jnp.int32)
    kpos = jnp.arange(seg_k_BxS.shape[1], dtype=jnp.int32)
    allowed = (kpos[None, :] <= qpos[:, None]) & (qpos[:, None] - kpos[None, :] < window)
    allowed = allowed[None] & (seg_q_BxT[:, :, None] == seg_k_BxS[:, None, :])
    return allowed[:, None, None]


def _attend_context_parallel(q_BxTxNxD, k_BxTxKxD, v_BxTxKxD, segments: Segments,
                             config: ModelConfig, *, impl: str, n_seq: int,
                             block_sizes: BlockSizes | None):
    """Attention with the tokens split over the "sequence" mesh axis (shard_map).

    K/V all-gather, not ring attention: each device gathers the keys and values of
    every shard of its rows (one all-gather per layer; its transpose, a
    reduce-scatter, returns dK / dV) and attends with its own T / n queries at their
    global offset. Grouped-query heads make K and V num_heads / num_kv_heads times
    smaller than Q (4x for Llama 3 8B), so gathering them moves less than a ring
    passes around, in one collective XLA can overlap, and every option whose kernel
    takes a query offset works unchanged. The price is the gathered K/V of one layer,
    2 x T x kv_heads x head_dim per row, in memory; a ring bounds that by T / n but
    needs n steps of point-to-point sends. Causal and packed-segment masks use global
    token indices and the full row's segment ids, so segments that cross a shard
    boundary and sliding windows attend as on one device.
    """
    b, t, nq, d = q_BxTxNxD.shape
    nkv = k_BxTxKxD.shape[2]
    if t % n_seq:
        raise ValueError(
            f"context parallelism: {t} tokens per row do not split over config.mesh.sequence="
            f"{n_seq}; pad rows to a multiple of it (config.data.pad_to_multiple_of, "
            "data.max_length or data.bucket_boundaries)")
    mesh = jax.sharding.get_abstract_mesh()
    usable = {a: n for a, n in mesh.shape.items() if n > 1 and a not in set(mesh.manual_axes)}
    rows = tuple(a for a in ("data", "fsdp") if a in usable)
    if b % math.prod(usable[a] for a in rows):
        rows = ()
    heads = "tensor" if "tensor" in usable and nkv % usable["tensor"] == 0 else None
    scale_divisor = math.sqrt(config.query_pre_attn_scalar or config.head_size)
    window, sliding = config.sliding_window, segments.sliding
    unbounded = 2 * t + 1  # more than any query-key distance
    if window is None or sliding is False:
        window = unbounded
    elif sliding is not True:
        window = jnp.where(sliding, window, unbounded)
    window = jnp.asarray(window, jnp.int32)

    def local(q, k, v, seg_k, window):
        tl = q.shape[1]
        q_offset = lax.axis_index(SEQUENCE_AXIS) * tl
        k = lax.all_gather(k, SEQUENCE_AXIS, axis=1, tiled=True)
        v = lax.all_gather(v, SEQUENCE_AXIS, axis=1, tiled=True)
        seg_q = lax.dynamic_slice_in_dim(seg_k, q_offset, tl, 1)
        if impl == "chunked":
            return chunked_attention(q, k, v, seg_q, window=window, scale=1.0 / scale_divisor,
                                     softcap=config.attn_logit_softcap,
                                     block_sizes=block_sizes, q_offset=q_offset,
                                     segment_ids_BxS=seg_k)
        mask = _offset_mask(seg_q, seg_k, q_offset, window)
        return xla_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask,
                             scale_divisor=scale_divisor, softcap=config.attn_logit_softcap)

    P = jax.sharding.PartitionSpec
    tokens = P(rows or None, SEQUENCE_AXIS, heads)
    run = jax.shard_map(local, in_specs=(tokens, tokens, tokens, P(rows or None), P()),
                        out_specs=tokens, check_vma=False)
    return run(q_BxTxNxD, k_BxTxKxD, v_BxTxKxD, segments.ids_BxT.astype(jnp.int32), window)
