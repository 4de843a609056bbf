"""Fused hidden-states -> per-token log-probs: the only place jalign forms logits.

    logits = softcap((hidden @ unembed) / temperature)
    logps[i] = logits[i, t_i] - logsumexp_j logits[i, j]
    softcap(z) = cap * tanh(z / cap)            (when `logit_softcap` is set)

The matmul runs in the inputs' dtype with float32 accumulation and output;
everything after it is float32 (a bf16 log-sum-exp is ~0.03 nats off per token,
enough to move PPO ratios across a 0.2 clip).

Implementations (`impl=`):
  "xla"      materialises [N, V] logits; autodiff. Reference / small vocabularies.
  "chunked"  plain-JAX tiles with an online log-sum-exp and a custom_vjp that
             recomputes logits tile by tile; memory O(block_tokens * block_vocab).
  "pallas_tpu"  Mosaic kernels (jalign/ops/_pallas_tpu.py); shard_map under a mesh.
  "pallas_gpu"  Triton kernels plus XLA matmuls (jalign/ops/_pallas_gpu.py).
  "auto"     "chunked" on every backend for now: the Pallas kernels are checked in
             interpret mode and (TPU) by ahead-of-time Mosaic compiles, but not yet
             timed on hardware (benchmarks/logprobs_gpu.py, benchmarks/RESULTS.md).

Context parallelism: [B, T, H] hidden states split along T over a "sequence" mesh
axis are scored per device on its own tokens (shard_map), not gathered whole.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jalign.ops._chunked import token_logprobs_chunked
from jalign.ops._pallas_gpu import token_logprobs_pallas_gpu
from jalign.ops._pallas_tpu import token_logprobs_pallas_tpu
from jalign.ops._reference import project_logits, token_logprobs_xla

IMPLS = ("auto", "xla", "chunked", "pallas_tpu", "pallas_gpu")
_KERNELS = {"chunked": token_logprobs_chunked, "pallas_tpu": token_logprobs_pallas_tpu,
            "pallas_gpu": token_logprobs_pallas_gpu}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the fused op: tokens per block and vocabulary columns per block.

    Sizes larger than the problem are clamped; N and V need not be multiples.
    """
    block_tokens: int
    block_vocab: int

    def __post_init__(self):
        if self.block_tokens < 1 or self.block_vocab < 1:
            raise ValueError(f"block sizes must be positive, got {self}")

    @classmethod
    def get_default(cls, backend: str | None = None, impl: str = "chunked") -> "BlockSizes":
        if impl == "pallas_tpu":
            # Legal Mosaic tiles; ~40 MiB of VMEM at H=4096 bf16 (shrunk to fit when larger).
            return cls(block_tokens=512, block_vocab=512)
        if impl == "pallas_gpu":
            # Triton tiles (powers of two); untuned: no GPU measurement yet.
            return cls(block_tokens=64, block_vocab=128)
        backend = backend or jax.default_backend()
        if backend == "cpu":
            # Tuned with benchmarks/logprobs.py (N=8192, H=1024, V=32k/128k, f32).
            return cls(block_tokens=1024, block_vocab=4096)
        # Untuned for the chunked path on accelerators; Pallas kernels bring their own.
        return cls(block_tokens=2048, block_vocab=8192)


class TokenLogprobs(NamedTuple):
    """Returned when any `return_*` flag is set; unrequested fields are None.

    logps:     log p(target), float32 [...]; 0 where the target is outside [0, V).
    lse:       log-sum-exp of the (tempered, soft-capped) logits, float32 [...].
    entropy:   -sum_v p_v log p_v, float32 [...]; differentiable.
    max_logit: max_v of the (tempered, soft-capped) logits, float32 [...]; no gradient.
    mean_logit: mean_v of the (tempered) logits, float32 [...]; no gradient.
    """
    logps: jax.Array
    lse: jax.Array | None
    entropy: jax.Array | None
    max_logit: jax.Array | None = None
    mean_logit: jax.Array | None = None


def _resolve_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; valid: {', '.join(IMPLS)}")
    if impl == "auto":
        return "chunked"
    return impl


def token_logprobs(hidden_NxH, unembed_HxV, targets_N, *, temperature: float = 1.0,
                   logit_softcap: float | None = None, return_lse: bool = False,
                   return_entropy: bool = False, return_max_logit: bool = False,
                   return_mean_logit: bool = False, impl: str = "auto",
                   block_tokens: int | None = None, block_vocab: int | None = None):
    """Log-probabilities of `targets` under softmax(softcap((hidden @ unembed) / T)).

    Args:
      hidden_NxH: [..., H] final hidden states (any float dtype, e.g. bf16).
      unembed_HxV: [H, V] unembedding matrix.
      targets_N: [...] integer token ids, same leading shape as `hidden_NxH`.
        Ids outside [0, V) (e.g. -100) are ignored: their log-prob is 0 and no
        gradient flows from it (lse / entropy are still computed for them).
      temperature: Python float > 0 dividing the logits (static).
      logit_softcap: None or Python float cap > 0: `cap * tanh(logits / cap)`.
      return_lse: also return the per-token log-sum-exp.
      return_entropy: also return the per-token entropy of the distribution.
      return_max_logit: also return the per-token maximum (tempered, soft-capped)
        logit, without gradient. `logps == max_logit - lse` exactly when the
        target is the arg-max token (token accuracy without building logits).
      return_mean_logit: also return the per-token mean over the vocabulary of the
        logits, without gradient. The mean is linear in the logits, so it is
        `hidden @ mean_v(unembed[:, v]) / T`: exact, one [H] vector, no [N, V]
        work. A soft-cap is not linear, so with `logit_softcap` this raises.
      impl: "auto", "xla", "chunked", "pallas_tpu" or "pallas_gpu" (see module
        docstring).
      block_tokens, block_vocab: tile sizes for "chunked" and the Pallas kernels
        (default: `BlockSizes.get_default(impl=...)`).

    Returns:
      float32 log-probs with the leading shape of `targets_N` when no `return_*`
      flag is set; otherwise a `TokenLogprobs` with None for the fields not
      asked for.
      Gradients flow to `hidden_NxH` and `unembed_HxV` in their own dtypes.
    """
    impl = _resolve_impl(impl)
    hidden_NxH = jnp.asarray(hidden_NxH)
    unembed_HxV = jnp.asarray(unembed_HxV)
    targets_N = jnp.asarray(targets_N)
    if unembed_HxV.ndim != 2:
        raise ValueError(f"unembed must be [H, V], got shape {unembed_HxV.shape}")
    if hidden_NxH.ndim < 1 or hidden_NxH.shape[-1] != unembed_HxV.shape[0]:
        raise ValueError(
            f"hidden's last dim must equal unembed's first dim (H): hidden "
            f"{hidden_NxH.shape}, unembed {unembed_HxV.shape}")
    if targets_N.shape != hidden_NxH.shape[:-1]:
        raise ValueError(
            f"targets shape {targets_N.shape} must equal hidden's leading dims "
            f"{hidden_NxH.shape[:-1]}")
    if unembed_HxV.shape[1] == 0:
        raise ValueError("unembed has an empty vocabulary (V == 0)")
    if not jnp.issubdtype(targets_N.dtype, jnp.integer):
        raise ValueError(f"targets must be integers, got {targets_N.dtype}")
    for name, x in (("hidden", hidden_NxH), ("unembed", unembed_HxV)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"logit_softcap must be None or > 0, got {logit_softcap}")
    if return_mean_logit and logit_softcap is not None:
        raise ValueError("return_mean_logit needs logit_softcap=None: the mean of soft-capped "
                         "logits is not a function of the mean logit")

    kwargs = dict(temperature=temperature, logit_softcap=logit_softcap, return_lse=return_lse,
                  return_entropy=return_entropy, return_max_logit=return_max_logit,
                  return_mean_logit=return_mean_logit, impl=impl, block_tokens=block_tokens,
                  block_vocab=block_vocab)
    split = _sequence_split(hidden_NxH)
    if split is not None:
        return _over_sequence_shards(hidden_NxH, unembed_HxV, targets_N, *split, **kwargs)

    lead_shape = targets_N.shape
    hidden_size, vocab = unembed_HxV.shape
    # One compute dtype for the matmul; autodiff casts the cotangents back.
    dtype = jnp.result_type(hidden_NxH.dtype, unembed_HxV.dtype)
    h_NxH = hidden_NxH.reshape(-1, hidden_size).astype(dtype)
    w_HxV = unembed_HxV.astype(dtype)
    t_N = targets_N.reshape(-1)

    if h_NxH.shape[0] == 0:
        logps_N = lse_N = entropy_N = max_N = jnp.zeros((0,), jnp.float32)
    elif impl == "xla":
        logps_N, lse_N, entropy_N, max_N = token_logprobs_xla(
            h_NxH, w_HxV, t_N, temperature=temperature, logit_softcap=logit_softcap,
            with_entropy=return_entropy)
    else:
        default = BlockSizes.get_default(impl=impl)
        blocks = BlockSizes(block_tokens or default.block_tokens,
                            block_vocab or default.block_vocab)
        logps_N, lse_N, entropy_N, max_N = _KERNELS[impl](
            h_NxH, w_HxV, t_N, temperature=temperature, logit_softcap=logit_softcap,
            with_entropy=return_entropy, block_tokens=blocks.block_tokens,
            block_vocab=blocks.block_vocab)

    logps = logps_N.reshape(lead_shape)
    if not (return_lse or return_entropy or return_max_logit or return_mean_logit):
        return logps
    mean_logit = None
    if return_mean_logit:
        h_NxH, w_HxV = jax.lax.stop_gradient((h_NxH, w_HxV))
        mean_w_Hx1 = jnp.mean(w_HxV.astype(jnp.float32), axis=1, keepdims=True)
        mean_logit = (project_logits(h_NxH.astype(jnp.float32), mean_w_Hx1)[:, 0]
                      / temperature).reshape(lead_shape)
    return TokenLogprobs(
        logps=logps,
        lse=lse_N.reshape(lead_shape) if return_lse else None,
        entropy=entropy_N.reshape(lead_shape) if return_entropy else None,
        max_logit=(jax.lax.stop_gradient(max_N).reshape(lead_shape)
                   if return_max_logit else None),
        mean_logit=mean_logit)


def _sequence_split(hidden_BxTxH):
    """(row axes, sequence shards) when [B, T, H] hidden states lie token-split over a
    "sequence" mesh axis (context parallelism) that this op can follow, else None.

    Flattening [B, T] with T split is not a split of the flattened tokens: GSPMD
    would gather every row whole onto every device and each would compute all of
    its logits. Not with a "tensor" axis > 1 (the vocabulary-split path combines
    partial statistics, jalign.ops._sharded); GSPMD keeps that case correct.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if hidden_BxTxH.ndim != 3 or mesh.empty or "sequence" not in mesh.axis_names:
        return None
    usable = {a: n for a, n in mesh.shape.items() if n > 1 and a not in set(mesh.manual_axes)}
    if usable.get("sequence", 1) == 1 or "tensor" in usable:
        return None
    rows = tuple(a for a in ("data", "fsdp") if a in usable)
    if hidden_BxTxH.shape[0] % math.prod(usable[a] for a in rows):
        rows = ()
    return rows, usable["sequence"]


def _over_sequence_shards(hidden_BxTxH, unembed_HxV, targets_BxT, rows, shards, **kwargs):
    """`token_logprobs` per device on its rows' slice of tokens (shard_map); T is padded
    to a multiple of the shards with ignored targets and the outputs sliced back."""
    t = targets_BxT.shape[1]
    pad = -t % shards
    if pad:
        hidden_BxTxH = jnp.pad(hidden_BxTxH, ((0, 0), (0, pad), (0, 0)))
        targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)), constant_values=-1)
    tokens = P(rows or None, "sequence")
    # check_vma=False as in jalign.ops._sharded: the transpose sums dW over the token axes.
    out = jax.shard_map(lambda h, w, tg: token_logprobs(h, w, tg, **kwargs),
                        in_specs=(tokens, P(), tokens), out_specs=tokens,
                        check_vma=False)(hidden_BxTxH, unembed_HxV, targets_BxT)
    return jax.tree.map(lambda x: x[:, :t], out)
