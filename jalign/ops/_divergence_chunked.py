"""Tiled fused divergence in plain JAX: neither model's [N, V] logits are built.

With a = teacher logits, b = student logits of one [tokens, vocab] tile (each
`transform_logits(h @ W)` exactly as `token_logprobs` forms them):

Forward, per token block:
  pass 1 over vocabulary tiles: online float32 log-sum-exps of a and of b. For
    beta in {0, 1} the same pass accumulates the cross term sum_j e^(a_j - m_a)(a_j - b_j)
    (rescaled with the running max), so KL(P_t || P_s) = C / S_a - lse_a + lse_b
    (the reverse KL swaps a and b) without a second pass.
  pass 2 (0 < beta < 1 only): the tiles are recomputed and, with the final LSEs,
    K_t = sum p_t (log p_t - log m) and K_s = sum p_s (log p_s - log m) are summed,
    log m = logaddexp(log beta + log p_t, log(1 - beta) + log p_s).
  JSD_beta = beta K_t + (1 - beta) K_s.

Backward (custom_vjp; residuals: the inputs, both LSEs, K_t and K_s): each tile
is recomputed and, with g the cotangent of the token's divergence,
  mixture:  dD/da = beta p_t (log p_t - log m - K_t),  dD/db = (1-beta) p_s (log p_s - log m - K_s)
  forward:  dD/da = p_t (log p_t - log p_s - D),       dD/db = p_s - p_t
  reverse:  dD/da = p_t - p_s,                         dD/db = p_s (log p_s - log p_t - D)
then through soft-cap (1 - (z / cap)^2) and temperature (1 / T), and contracted
into dh = dz W^T and dW = h^T dz (float32 accumulators). A model whose inputs are
not differentiated (a stop_gradient teacher) skips its two gradient matmuls.
Memory: O(block_tokens * block_vocab) temporaries besides the [H, V] dW
accumulators, which are the gradients themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jalign.ops._chunked import _blocked_loop
from jalign.ops._reference import project_logits, transform_logits

_NEG_BIG = float(jnp.finfo(jnp.float32).min)  # finite initial running max, as in _chunked


@dataclasses.dataclass(frozen=True)
class DivergenceConfig:
    """Static (hashable) settings of one fused-divergence call."""
    beta: float
    temperature: float
    student_softcap: float | None
    teacher_softcap: float | None
    block_tokens: int
    block_vocab: int

    @property
    def mode(self) -> str:
        return {0.0: "forward", 1.0: "reverse"}.get(self.beta, "mixture")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Wanted:
    """Which model's inputs are differentiated; a static leaf of the residuals."""
    student: bool
    teacher: bool


# ---- tile maths shared with the Pallas kernels: [b, v] tiles, [b, 1] columns ----

def teacher_logits(h, w, cfg: DivergenceConfig):
    return transform_logits(project_logits(h, w), cfg.temperature, cfg.teacher_softcap)


def student_logits(h, w, cfg: DivergenceConfig):
    return transform_logits(project_logits(h, w), cfg.temperature, cfg.student_softcap)


def online_lse(max_old, sum_old, z):
    """One online log-sum-exp step: (new max, new sum, rescale factor, e^(z - new max))."""
    max_new = jnp.maximum(max_old, jnp.max(z, axis=-1, keepdims=True))
    scale = jnp.exp(max_old - max_new)
    e = jnp.exp(z - max_new)
    return max_new, sum_old * scale + jnp.sum(e, axis=-1, keepdims=True), scale, e


def log_mixture(lpt, lps, beta: float):
    return jnp.logaddexp(lpt + math.log(beta), lps + math.log1p(-beta))


def mixture_terms(a, b, lse_t, lse_s, beta: float):
    """Per-element p_t (log p_t - log m) and p_s (log p_s - log m) of one tile."""
    lpt, lps = a - lse_t, b - lse_s
    lm = log_mixture(lpt, lps, beta)
    return jnp.exp(lpt) * (lpt - lm), jnp.exp(lps) * (lps - lm)


def tile_dz(a, b, lse_t, lse_s, k_t, k_s, g, cfg: DivergenceConfig):
    """(dD/da, dD/db) of one tile times the cotangent g, before softcap / temperature."""
    lpt, lps = a - lse_t, b - lse_s
    pt, ps = jnp.exp(lpt), jnp.exp(lps)
    if cfg.mode == "forward":
        da, db = pt * (lpt - lps - k_t), ps - pt
    elif cfg.mode == "reverse":
        da, db = pt - ps, ps * (lps - lpt - k_s)
    else:
        lm = log_mixture(lpt, lps, cfg.beta)
        da = cfg.beta * pt * (lpt - lm - k_t)
        db = (1.0 - cfg.beta) * ps * (lps - lm - k_s)
    return g * da, g * db


def through_transform(dz, z, softcap: float | None, temperature: float):
    """d/d(raw logits) from d/d(transformed logits) z = softcap(raw / T)."""
    if softcap is not None:
        dz = dz * (1.0 - jnp.square(z / softcap))
    if temperature != 1.0:
        dz = dz / temperature
    return dz


def finish_kl(cross, sum_p, lse_p, lse_q):
    """KL(P || Q) from the online cross term sum e^(a - m_a)(a - b)."""
    return cross / sum_p - lse_p + lse_q


# ---- forward / backward ----

def _forward(hs, ws, ht, wt, cfg: DivergenceConfig):
    """(divergence, lse_t, lse_s, K_t, K_s), float32 [N] each."""
    n_tokens, vocab = hs.shape[0], ws.shape[1]
    block_t = min(cfg.block_tokens, n_tokens)
    block_v = min(cfg.block_vocab, vocab)
    endpoint = cfg.mode != "mixture"

    def token_block(_, t_start, t_size):
        hs_b = lax.dynamic_slice_in_dim(hs, t_start, t_size, axis=0)
        ht_b = lax.dynamic_slice_in_dim(ht, t_start, t_size, axis=0)

        def tiles(v_start, v_size):
            a = teacher_logits(ht_b, lax.dynamic_slice_in_dim(wt, v_start, v_size, axis=1), cfg)
            b = student_logits(hs_b, lax.dynamic_slice_in_dim(ws, v_start, v_size, axis=1), cfg)
            return a, b

        def lse_pass(state, v_start, v_size):
            max_t, sum_t, max_s, sum_s, cross = state
            a, b = tiles(v_start, v_size)
            max_t, sum_t, scale_t, e_t = online_lse(max_t, sum_t, a)
            max_s, sum_s, scale_s, e_s = online_lse(max_s, sum_s, b)
            if cfg.mode == "forward":
                cross = cross * scale_t + jnp.sum(e_t * (a - b), axis=-1, keepdims=True)
            elif cfg.mode == "reverse":
                cross = cross * scale_s + jnp.sum(e_s * (b - a), axis=-1, keepdims=True)
            return (max_t, sum_t, max_s, sum_s, cross), None

        col = jnp.zeros((t_size, 1), jnp.float32)
        neg = jnp.full((t_size, 1), _NEG_BIG, jnp.float32)
        (max_t, sum_t, max_s, sum_s, cross), _ = _blocked_loop(
            lse_pass, (neg, col, neg, col, col), vocab, block_v)
        lse_t, lse_s = max_t + jnp.log(sum_t), max_s + jnp.log(sum_s)
        if endpoint:
            if cfg.mode == "forward":
                k = finish_kl(cross, sum_t, lse_t, lse_s)
            else:
                k = finish_kl(cross, sum_s, lse_s, lse_t)
            k_t = k_s = div = k
        else:
            def mix_pass(state, v_start, v_size):
                k_t, k_s = state
                terms_t, terms_s = mixture_terms(*tiles(v_start, v_size), lse_t, lse_s, cfg.beta)
                return (k_t + jnp.sum(terms_t, axis=-1, keepdims=True),
                        k_s + jnp.sum(terms_s, axis=-1, keepdims=True)), None

            (k_t, k_s), _ = _blocked_loop(mix_pass, (col, col), vocab, block_v)
            div = cfg.beta * k_t + (1.0 - cfg.beta) * k_s
        return None, tuple(x[:, 0] for x in (div, lse_t, lse_s, k_t, k_s))

    _, outs = _blocked_loop(token_block, None, n_tokens, block_t)
    return outs


def backward(hs, ws, ht, wt, stats, g_N, cfg: DivergenceConfig, wanted: _Wanted):
    """(dhs, dws, dht, dwt) in the inputs' dtypes; None for a model not wanted.

    `stats` = (lse_t, lse_s, K_t, K_s), float32 [N]; `g_N` the divergence's cotangent.
    """
    n_tokens, vocab = hs.shape[0], ws.shape[1]
    block_t = min(cfg.block_tokens, n_tokens)
    block_v = min(cfg.block_vocab, vocab)
    # (model index into (teacher, student), its inputs, its soft-cap) for each wanted model.
    models = [(0, ht, wt, cfg.teacher_softcap)] if wanted.teacher else []
    models += [(1, hs, ws, cfg.student_softcap)] if wanted.student else []
    per_token = (*stats, g_N)

    def token_block(dws, t_start, t_size):
        ht_b = lax.dynamic_slice_in_dim(ht, t_start, t_size, axis=0)
        hs_b = lax.dynamic_slice_in_dim(hs, t_start, t_size, axis=0)
        lse_t, lse_s, k_t, k_s, g = (
            lax.dynamic_slice_in_dim(x, t_start, t_size, axis=0)[:, None] for x in per_token)
        # Materialised [H, b] copies feed dW = h^T dz as plain matmuls (see _chunked).
        h_T = {0: ht_b.T, 1: hs_b.T}

        def vocab_block(carry, v_start, v_size):
            dhs_b, dws = carry
            w_v = (lax.dynamic_slice_in_dim(wt, v_start, v_size, axis=1),
                   lax.dynamic_slice_in_dim(ws, v_start, v_size, axis=1))
            z = (teacher_logits(ht_b, w_v[0], cfg), student_logits(hs_b, w_v[1], cfg))
            dz = tile_dz(*z, lse_t, lse_s, k_t, k_s, g, cfg)
            new_dh, new_dw = [], []
            for (m, h, _, cap), dh_b, dw in zip(models, dhs_b, dws):
                d = through_transform(dz[m], z[m], cap, cfg.temperature).astype(h.dtype)
                new_dh.append(dh_b + lax.dot_general(d, w_v[m], (((1,), (1,)), ((), ())),
                                                     preferred_element_type=jnp.float32))
                tile = lax.dot_general(h_T[m], d, (((1,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)
                old = lax.dynamic_slice_in_dim(dw, v_start, v_size, axis=1)
                new_dw.append(lax.dynamic_update_slice_in_dim(dw, old + tile, v_start, axis=1))
            return (tuple(new_dh), tuple(new_dw)), None

        dh0 = tuple(jnp.zeros((t_size, h.shape[1]), jnp.float32) for _, h, _, _ in models)
        (dhs_b, dws), _ = _blocked_loop(vocab_block, (dh0, dws), vocab, block_v)
        return dws, dhs_b

    dw0 = tuple(jnp.zeros(w.shape, jnp.float32) for _, _, w, _ in models)
    dws, dhs = _blocked_loop(token_block, dw0, n_tokens, block_t)
    grads = [(None, None), (None, None)]
    for (m, h, w, _), dh, dw in zip(models, dhs, dws):
        grads[m] = (dh.astype(h.dtype), dw.astype(w.dtype))
    (dht, dwt), (dhs, dws) = grads
    return dhs, dws, dht, dwt


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(hs, ws, ht, wt, cfg: DivergenceConfig):
    return _forward(hs, ws, ht, wt, cfg)[0]


def _fused_fwd(hs, ws, ht, wt, cfg: DivergenceConfig):
    # symbolic_zeros: primals come wrapped, with whether each is differentiated.
    wanted = _Wanted(student=hs.perturbed or ws.perturbed, teacher=ht.perturbed or wt.perturbed)
    hs, ws, ht, wt = (x.value for x in (hs, ws, ht, wt))
    div, *stats = _forward(hs, ws, ht, wt, cfg)
    return div, (hs, ws, ht, wt, tuple(stats), wanted)


def _fused_bwd(cfg: DivergenceConfig, residuals, g_N):
    hs, ws, ht, wt, stats, wanted = residuals
    if isinstance(g_N, SymbolicZero):
        return None, None, None, None
    return backward(hs, ws, ht, wt, stats, g_N, cfg, wanted)


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def token_divergence_chunked(hs, ws, ht, wt, *, beta: float, temperature: float,
                             student_softcap: float | None, teacher_softcap: float | None,
                             block_tokens: int, block_vocab: int):
    """float32 [N] divergences; see the module docstring."""
    cfg = DivergenceConfig(beta=beta, temperature=temperature, student_softcap=student_softcap,
                           teacher_softcap=teacher_softcap, block_tokens=int(block_tokens),
                           block_vocab=int(block_vocab))
    return _fused(hs, ws, ht, wt, cfg)
