"""Tiled fused log-prob in plain JAX: never builds the [N, V] logits.

Forward: for each token block, loop over vocabulary blocks keeping an online
float32 log-sum-exp (running max and rescaled sum), the target logit (picked by
an iota compare) and, when asked, the running sum of p * z for the entropy.

Backward (custom_vjp): the residuals are the inputs plus the per-token lse (and
entropy); an entropy that is not differentiated (a metric) adds nothing to it. Each [block_tokens, block_vocab] tile of logits is recomputed exactly
as in the forward, turned into dz = (g_lse - g_logp) p + g_logp onehot(target)
- g_ent p (log p + entropy), pushed through softcap and temperature, and
contracted into dh = dz W^T and dW = h^T dz, both accumulated in float32.
FLOPs: forward 2NHV, backward 6NHV.

Ragged sizes are handled without padding copies: full blocks run in a
`lax.scan`, the remainder block (static, smaller shape) runs once after it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jalign.ops._reference import project_logits, transform_logits, valid_targets

# Finite stand-in for -inf as the initial running max: keeps `(m_old - m_new) * 0`
# at 0 instead of nan on the first vocabulary block.
_NEG_BIG = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass(frozen=True)
class ChunkedConfig:
    """Static (hashable) settings of one chunked call."""
    temperature: float
    logit_softcap: float | None
    block_tokens: int
    block_vocab: int
    with_entropy: bool


def _blocked_loop(body, carry, total: int, block: int):
    """Runs `body(carry, start, size) -> (carry, out_size...)` over [0, total).

    `size` is a static int: `block` for the scanned full blocks, then the
    remainder. Per-block outputs (leading dim `size`) are concatenated.
    """
    n_full, rem = divmod(total, block)
    pieces = []
    if n_full == 1:
        carry, out = body(carry, 0, block)
        pieces.append(out)
    elif n_full > 1:
        def step(c, i):
            return body(c, i * block, block)
        carry, outs = lax.scan(step, carry, jnp.arange(n_full, dtype=jnp.int32))
        pieces.append(jax.tree.map(
            lambda y: y.reshape((n_full * block,) + y.shape[2:]), outs))
    if rem:
        carry, out = body(carry, n_full * block, rem)
        pieces.append(out)
    if len(pieces) == 1:
        return carry, pieces[0]
    return carry, jax.tree.map(lambda *ys: jnp.concatenate(ys, axis=0), *pieces)


def _tile(h_bxH, unembed_HxV, v_start, v_size, cfg: ChunkedConfig):
    """Logits of one tile; the forward and the backward both call exactly this."""
    w_Hxv = lax.dynamic_slice_in_dim(unembed_HxV, v_start, v_size, axis=1)
    logits_bxv = transform_logits(project_logits(h_bxH, w_Hxv),
                                  cfg.temperature, cfg.logit_softcap)
    return w_Hxv, logits_bxv


def _target_mask(targets_b, v_start, v_size):
    cols_v = v_start + lax.iota(jnp.int32, v_size)
    return cols_v[None, :] == targets_b[:, None].astype(jnp.int32)


def _forward(hidden_NxH, unembed_HxV, targets_N, cfg: ChunkedConfig):
    n_tokens = hidden_NxH.shape[0]
    vocab = unembed_HxV.shape[1]
    block_t = min(cfg.block_tokens, n_tokens)
    block_v = min(cfg.block_vocab, vocab)

    def token_block(_, t_start, t_size):
        h_bxH = lax.dynamic_slice_in_dim(hidden_NxH, t_start, t_size, axis=0)
        tgt_b = lax.dynamic_slice_in_dim(targets_N, t_start, t_size, axis=0)

        def vocab_block(state, v_start, v_size):
            max_b, sum_b, target_b, plogit_b = state
            _, z_bxv = _tile(h_bxH, unembed_HxV, v_start, v_size, cfg)
            new_max_b = jnp.maximum(max_b, jnp.max(z_bxv, axis=-1))
            shift_b = max_b - new_max_b
            scale_b = jnp.exp(shift_b)
            zc_bxv = z_bxv - new_max_b[:, None]
            e_bxv = jnp.exp(zc_bxv)
            new_sum_b = sum_b * scale_b + jnp.sum(e_bxv, axis=-1)
            hit_bxv = _target_mask(tgt_b, v_start, v_size)
            target_b = target_b + jnp.sum(jnp.where(hit_bxv, z_bxv, 0.0), axis=-1)
            if cfg.with_entropy:
                # plogit = sum exp(z - max) (z - max), re-based to the new max.
                plogit_b = (scale_b * (plogit_b + shift_b * sum_b)
                            + jnp.sum(e_bxv * zc_bxv, axis=-1))
            return (new_max_b, new_sum_b, target_b, plogit_b), None

        zeros_b = jnp.zeros((t_size,), jnp.float32)
        init = (jnp.full((t_size,), _NEG_BIG, jnp.float32), zeros_b, zeros_b, zeros_b)
        (max_b, sum_b, target_b, plogit_b), _ = _blocked_loop(
            vocab_block, init, vocab, block_v)
        log_sum_b = jnp.log(sum_b)
        lse_b = max_b + log_sum_b
        logp_b = jnp.where(valid_targets(tgt_b, vocab), target_b - lse_b, 0.0)
        entropy_b = log_sum_b - plogit_b / sum_b if cfg.with_entropy else None
        return None, (logp_b, lse_b, entropy_b, max_b)

    _, outs = _blocked_loop(token_block, None, n_tokens, block_t)
    return outs


def _backward(hidden_NxH, unembed_HxV, targets_N, lse_N, entropy_N,
              g_logp_N, g_lse_N, g_entropy_N, cfg: ChunkedConfig):
    n_tokens, hidden = hidden_NxH.shape
    vocab = unembed_HxV.shape[1]
    block_t = min(cfg.block_tokens, n_tokens)
    block_v = min(cfg.block_vocab, vocab)
    compute_dtype = hidden_NxH.dtype
    # Ignored targets have a constant log-prob (0): no gradient flows from it.
    g_logp_N = jnp.where(valid_targets(targets_N, vocab), g_logp_N, 0.0)
    per_token = (targets_N, lse_N, g_logp_N, g_lse_N)
    if cfg.with_entropy:
        per_token += (entropy_N, g_entropy_N)

    def token_block(dw_HxV, t_start, t_size):
        h_bxH = lax.dynamic_slice_in_dim(hidden_NxH, t_start, t_size, axis=0)
        # A materialised [H, b] copy feeds dW = h^T dz as a plain matmul, which
        # XLA:CPU runs through its fast library path; the transposed form does not.
        h_Hxb = h_bxH.T
        tok = [lax.dynamic_slice_in_dim(x, t_start, t_size, axis=0) for x in per_token]
        tgt_b, lse_b, g_logp_b, g_lse_b = tok[:4]

        def vocab_block(carry, v_start, v_size):
            dh_bxH, dw_HxV = carry
            w_Hxv, z_bxv = _tile(h_bxH, unembed_HxV, v_start, v_size, cfg)
            logp_bxv = z_bxv - lse_b[:, None]
            p_bxv = jnp.exp(logp_bxv)
            hit_bxv = _target_mask(tgt_b, v_start, v_size)
            dz_bxv = ((g_lse_b - g_logp_b)[:, None] * p_bxv
                      + jnp.where(hit_bxv, g_logp_b[:, None], 0.0))
            if cfg.with_entropy:
                entropy_b, g_entropy_b = tok[4:]
                # d entropy / dz_j = -p_j (log p_j + entropy)
                dz_bxv = dz_bxv - g_entropy_b[:, None] * p_bxv * (
                    logp_bxv + entropy_b[:, None])
            if cfg.logit_softcap is not None:
                dz_bxv = dz_bxv * (1.0 - jnp.square(z_bxv / cfg.logit_softcap))
            if cfg.temperature != 1.0:
                dz_bxv = dz_bxv / cfg.temperature
            dz_bxv = dz_bxv.astype(compute_dtype)
            dh_bxH = dh_bxH + lax.dot_general(
                dz_bxv, w_Hxv, (((1,), (1,)), ((), ())),
                preferred_element_type=jnp.float32)
            dw_tile_Hxv = lax.dot_general(
                h_Hxb, dz_bxv, (((1,), (0,)), ((), ())),
                preferred_element_type=jnp.float32)
            old_Hxv = lax.dynamic_slice_in_dim(dw_HxV, v_start, v_size, axis=1)
            dw_HxV = lax.dynamic_update_slice_in_dim(
                dw_HxV, old_Hxv + dw_tile_Hxv, v_start, axis=1)
            return (dh_bxH, dw_HxV), None

        init = (jnp.zeros((t_size, hidden), jnp.float32), dw_HxV)
        (dh_bxH, dw_HxV), _ = _blocked_loop(vocab_block, init, vocab, block_v)
        return dw_HxV, dh_bxH

    dw_HxV, dh_NxH = _blocked_loop(
        token_block, jnp.zeros((hidden, vocab), jnp.float32), n_tokens, block_t)
    return dh_NxH.astype(hidden_NxH.dtype), dw_HxV.astype(unembed_HxV.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(hidden_NxH, unembed_HxV, targets_N, cfg: ChunkedConfig):
    logp_N, lse_N, entropy_N, max_N = _forward(hidden_NxH, unembed_HxV, targets_N, cfg)
    return (logp_N, lse_N, max_N, entropy_N) if cfg.with_entropy else (logp_N, lse_N, max_N)


def _fused_fwd(hidden_NxH, unembed_HxV, targets_N, cfg: ChunkedConfig):
    # symbolic_zeros: the primals come wrapped (CustomVJPPrimal).
    hidden_NxH, unembed_HxV, targets_N = (x.value for x in (hidden_NxH, unembed_HxV, targets_N))
    logp_N, lse_N, entropy_N, max_N = _forward(hidden_NxH, unembed_HxV, targets_N, cfg)
    residuals = (hidden_NxH, unembed_HxV, targets_N, lse_N, entropy_N)
    outs = (logp_N, lse_N, max_N, entropy_N) if cfg.with_entropy else (logp_N, lse_N, max_N)
    return outs, residuals


def _fused_bwd(cfg: ChunkedConfig, residuals, cotangents):
    hidden_NxH, unembed_HxV, targets_N, lse_N, entropy_N = residuals
    # cotangents[2] belongs to the max logit, which is not differentiated (the
    # public wrapper stops its gradient).
    g_logp_N, g_lse_N = (jnp.zeros_like(lse_N) if isinstance(g, SymbolicZero) else g
                         for g in cotangents[:2])
    g_entropy_N = cotangents[3] if cfg.with_entropy else None
    if isinstance(g_entropy_N, SymbolicZero):
        # The entropy is only a statistic here (e.g. a logged metric): no entropy term in
        # the backward, which then costs what it costs without the entropy.
        g_entropy_N, cfg = None, dataclasses.replace(cfg, with_entropy=False)
    dh_NxH, dw_HxV = _backward(hidden_NxH, unembed_HxV, targets_N, lse_N, entropy_N,
                               g_logp_N, g_lse_N, g_entropy_N, cfg)
    return dh_NxH, dw_HxV, None


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def token_logprobs_chunked(hidden_NxH, unembed_HxV, targets_N, *, temperature: float,
                           logit_softcap: float | None, with_entropy: bool,
                           block_tokens: int, block_vocab: int):
    """Returns (logps_N, lse_N, entropy_N or None, max_logit_N), all float32."""
    cfg = ChunkedConfig(temperature=float(temperature),
                        logit_softcap=None if logit_softcap is None else float(logit_softcap),
                        block_tokens=int(block_tokens), block_vocab=int(block_vocab),
                        with_entropy=bool(with_entropy))
    outs = _fused(hidden_NxH, unembed_HxV, targets_N, cfg)
    if with_entropy:
        return outs[0], outs[1], outs[3], outs[2]
    return outs[0], outs[1], None, outs[2]
