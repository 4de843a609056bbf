"""Fused per-token divergence between a student's and a teacher's next-token distributions.

    P_t = softmax(z_t),  z_t = softcap_t((teacher_hidden @ teacher_unembed) / T)
    P_s = softmax(z_s),  z_s = softcap_s((student_hidden @ student_unembed) / T)
    M   = beta P_t + (1 - beta) P_s
    JSD_beta(P_t, P_s) = beta KL(P_t || M) + (1 - beta) KL(P_s || M)      0 < beta < 1
                       = KL(P_t || P_s)  (forward KL)                      beta = 0
                       = KL(P_s || P_t)  (reverse KL)                      beta = 1

the generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-Policy
Distillation of Language Models: Learning from Self-Generated Mistakes",
arXiv:2306.13649, eq. 1). The endpoints follow TRL's `GKDTrainer.generalized_jsd_loss`,
which special-cases beta == 0 and beta == 1: the mixture formula itself tends to 0
at both ends (JSD_beta ~ beta KL(P_t || P_s) as beta -> 0 and ~ (1 - beta) KL(P_s || P_t)
as beta -> 1), so the value and its gradients jump at beta = 0 and 1 (by a factor
1 / beta: a caller sweeping beta towards an endpoint sees the loss scale collapse
and then jump). Temperature and soft-cap are applied as
in `token_logprobs` (`_reference.transform_logits`): divide by T first, then
`cap * tanh(z / cap)`; TRL divides the (model-soft-capped) logits by T.

Implementations (`impl=`):
  "xla"        materialises both [N, V] logits; autodiff. Reference / small vocabularies.
  "chunked"    plain-JAX tiles (jalign/ops/_divergence_chunked.py): online log-sum-exps
               for both models, a second pass for the mixture, and a custom_vjp that
               recomputes tiles; memory O(block_tokens * block_vocab).
  "pallas_tpu" Mosaic kernels for the forward and the backward
               (jalign/ops/_divergence_pallas_tpu.py), checked under the TPU interpreter
               and by ahead-of-time compiles for v5e/v5p/v6e, not yet timed on a TPU.
               Under a mesh: shard_map over the token axes, unembeddings replicated.
  "auto"       "chunked" on every backend.
Every implementation but "xla" skips the gradient matmuls of a model whose inputs
are not differentiated (the stop_gradient teacher of distillation).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jalign.ops._divergence_chunked import token_divergence_chunked
from jalign.ops._divergence_pallas_tpu import token_divergence_pallas_tpu
from jalign.ops._reference import project_logits, transform_logits
from jalign.ops.logprobs import BlockSizes

IMPLS = ("auto", "xla", "chunked", "pallas_tpu")
_KERNELS = {"chunked": token_divergence_chunked, "pallas_tpu": token_divergence_pallas_tpu}


def token_divergence_xla(hs_NxH, ws_HxV, ht_NxH, wt_HxV, *, beta: float, temperature: float,
                         student_softcap: float | None, teacher_softcap: float | None):
    """Materialising reference (autodiff): float32 [N] divergences."""
    zs_NxV = transform_logits(project_logits(hs_NxH, ws_HxV), temperature, student_softcap)
    zt_NxV = transform_logits(project_logits(ht_NxH, wt_HxV), temperature, teacher_softcap)
    lps_NxV = jax.nn.log_softmax(zs_NxV, axis=-1)
    lpt_NxV = jax.nn.log_softmax(zt_NxV, axis=-1)
    if beta == 0.0:
        return jnp.sum(jnp.exp(lpt_NxV) * (lpt_NxV - lps_NxV), axis=-1)
    if beta == 1.0:
        return jnp.sum(jnp.exp(lps_NxV) * (lps_NxV - lpt_NxV), axis=-1)
    lm_NxV = jnp.logaddexp(lpt_NxV + math.log(beta), lps_NxV + math.log1p(-beta))
    kl_t_N = jnp.sum(jnp.exp(lpt_NxV) * (lpt_NxV - lm_NxV), axis=-1)
    kl_s_N = jnp.sum(jnp.exp(lps_NxV) * (lps_NxV - lm_NxV), axis=-1)
    return beta * kl_t_N + (1.0 - beta) * kl_s_N


def _check(name, hidden, unembed):
    if unembed.ndim != 2:
        raise ValueError(f"{name}_unembed must be [H, V], got shape {unembed.shape}")
    if hidden.ndim < 1 or hidden.shape[-1] != unembed.shape[0]:
        raise ValueError(f"{name}_hidden's last dim must equal {name}_unembed's first dim (H): "
                         f"hidden {hidden.shape}, unembed {unembed.shape}")
    for what, x in (("hidden", hidden), ("unembed", unembed)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}_{what} must be floating point, got {x.dtype}")


def token_divergence(student_hidden, student_unembed, teacher_hidden, teacher_unembed, *,
                     beta: float, temperature: float = 1.0, impl: str = "auto",
                     block_sizes: BlockSizes | None = None,
                     student_softcap: float | None = None,
                     teacher_softcap: float | None = None):
    """Per-token generalised JSD (GKD) between teacher and student; see the module docstring.

    Args:
      student_hidden: [..., Hs] student final hidden states (any float dtype).
      student_unembed: [Hs, V] student unembedding.
      teacher_hidden: [..., Ht] teacher final hidden states, same leading shape.
      teacher_unembed: [Ht, V] teacher unembedding; same vocabulary V.
      beta: Python float in [0, 1]: 0 is forward KL(P_t || P_s), 1 reverse
        KL(P_s || P_t), in between the mixture JSD (TRL's convention; the value is
        discontinuous at both ends).
      temperature: Python float > 0 dividing both models' logits.
      impl: "auto", "xla", "chunked" or "pallas_tpu" (module docstring).
      block_sizes: tiles for "chunked" / "pallas_tpu" (default
        `BlockSizes.get_default(impl=...)`); sizes need not divide N or V.
      student_softcap, teacher_softcap: None or cap > 0: `cap * tanh(z / cap)` after
        the temperature, as in `token_logprobs`.

    Returns:
      float32 [...] divergences (nats). Differentiable w.r.t. all four inputs;
      gradients come back in each input's dtype. The matmuls run in each model's
      input dtype with float32 accumulation; everything after is float32.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; valid: {', '.join(IMPLS)}")
    impl = "chunked" if impl == "auto" else impl
    hs, ws, ht, wt = (jnp.asarray(x) for x in (student_hidden, student_unembed,
                                               teacher_hidden, teacher_unembed))
    _check("student", hs, ws)
    _check("teacher", ht, wt)
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(f"student and teacher hidden states must have the same leading "
                         f"(token) shape: {hs.shape[:-1]} vs {ht.shape[:-1]}")
    if ws.shape[1] != wt.shape[1]:
        raise ValueError(f"student and teacher vocabularies differ: student V={ws.shape[1]}, "
                         f"teacher V={wt.shape[1]}")
    if ws.shape[1] == 0:
        raise ValueError("empty vocabulary (V == 0)")
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    for name, cap in (("student_softcap", student_softcap), ("teacher_softcap", teacher_softcap)):
        if cap is not None and not cap > 0:
            raise ValueError(f"{name} must be None or > 0, got {cap}")

    lead_shape = hs.shape[:-1]
    # One compute dtype per model for its matmul; autodiff casts cotangents back.
    s_dtype = jnp.result_type(hs.dtype, ws.dtype)
    t_dtype = jnp.result_type(ht.dtype, wt.dtype)
    hs = hs.reshape(-1, ws.shape[0]).astype(s_dtype)
    ws = ws.astype(s_dtype)
    ht = ht.reshape(-1, wt.shape[0]).astype(t_dtype)
    wt = wt.astype(t_dtype)
    options = dict(beta=beta, temperature=float(temperature),
                   student_softcap=None if student_softcap is None else float(student_softcap),
                   teacher_softcap=None if teacher_softcap is None else float(teacher_softcap))
    if hs.shape[0] == 0:
        out_N = jnp.zeros((0,), jnp.float32)
    elif impl == "xla":
        out_N = token_divergence_xla(hs, ws, ht, wt, **options)
    else:
        blocks = block_sizes or BlockSizes.get_default(impl=impl)
        out_N = _KERNELS[impl](hs, ws, ht, wt, block_tokens=blocks.block_tokens,
                               block_vocab=blocks.block_vocab, **options)
    return out_N.reshape(lead_shape)

