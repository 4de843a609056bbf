"""Backend-neutral plumbing of the Pallas log-prob kernels (TPU and GPU alike).

Pallas kernels are not partitioned by XLA. Under a mesh (`jax.set_mesh`) the op
runs in shard_map: tokens over "data"/"fsdp"/"sequence" (the flattened [B * T]
tokens of batch rows over "data"/"fsdp" and their tokens over "sequence" lie in
that order), the vocabulary over "tensor" when
it divides. Vocabulary shards combine partial target logit / lse / max /
entropy with psum and pmax (`_combine`); autodiff of that combination feeds
each shard's kernels, and the shard_map transpose sums dh over "tensor" and dW
over the token axes.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jalign.ops._reference import valid_targets

TOKEN_AXES = ("data", "fsdp", "sequence")
VOCAB_AXIS = "tensor"


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def vary_alike(*xs):
    """In a caller's check_vma shard_map, operands (so outputs) vary over one axis set."""
    mats = [jax.typeof(x).manual_axis_type for x in xs]
    axes = frozenset().union(*(m.varying for m in mats))
    return tuple(lax.pcast(x, tuple(sorted(axes - m.varying)), to="varying")
                 if axes - m.varying else x for x, m in zip(xs, mats))


def out_struct(shape, dtype, like):
    """Output aval of a kernel whose operands vary like `like` (see vary_alike)."""
    return jax.ShapeDtypeStruct(shape, dtype,
                                manual_axis_type=jax.typeof(like).manual_axis_type)


def _combine(outs, vocab_axis: str):
    """Partial (target logit, lse, max, entropy) of vocabulary shards -> global."""
    tl, lse_s, mx, ent_s = outs
    tl = lax.psum(tl, vocab_axis)  # only the shard holding the target adds a logit
    mx = lax.pmax(lax.stop_gradient(mx), vocab_axis)
    ref = lax.pmax(lax.stop_gradient(lse_s), vocab_axis)
    lse = ref + jnp.log(lax.psum(jnp.exp(lse_s - ref), vocab_axis))
    ent = None
    if ent_s is not None:
        # entropy = lse - E_p[z], and E_p[z] = sum_s exp(lse_s - lse) E_{p_s}[z].
        ent = lse - lax.psum(jnp.exp(lse_s - lse) * (lse_s - ent_s), vocab_axis)
    return tl, lse, mx, ent


def _mesh_axes(vocab: int, token_axes, vocab_axis):
    """Mesh axes (not already manual, size > 1) to split tokens / vocabulary over."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), None, 1
    usable = {a: s for a, s in mesh.shape.items()
              if s > 1 and a not in set(mesh.manual_axes)}
    tok = tuple(a for a in token_axes if a in usable)
    vax = vocab_axis if vocab_axis in usable and vocab % usable[vocab_axis] == 0 else None
    return tok, vax, math.prod(usable[a] for a in tok)


def sharded_outputs(local_fn, h, w, t, *, with_entropy: bool,
                    token_axes=TOKEN_AXES, vocab_axis=VOCAB_AXIS, **kw):
    """`local_fn` per device under the ambient mesh (shard_map), else directly.

    Tokens are padded to a multiple of the token shards (target -1) and the
    outputs sliced back. Returns (target logit, lse, max, entropy or None).
    """
    n, vocab = h.shape[0], w.shape[1]
    tok, vax, n_shards = _mesh_axes(vocab, token_axes, vocab_axis)
    local = functools.partial(local_fn, with_entropy=with_entropy, **kw)
    if not tok and vax is None:
        return local(h, w, t)
    n_p = round_up(n, n_shards)
    if n_p != n:
        h = jnp.pad(h, ((0, n_p - n), (0, 0)))
        t = jnp.pad(t, (0, n_p - n), constant_values=-1)
    tok_spec = tok if tok else None

    def body(h_s, w_s, t_s):
        if vax is None:
            outs = local(h_s, w_s, t_s)
        else:  # targets relative to this shard's first column
            offset = lax.axis_index(vax) * w_s.shape[1]
            outs = _combine(local(h_s, w_s, t_s - offset), vax)
        return outs if with_entropy else outs[:3]

    n_out = 4 if with_entropy else 3
    # check_vma=False: Pallas' interpreter rejects loop carries inside kernels under
    # vma checking (a JAX bug). Without it the transpose psums the cotangents of
    # h over the vocabulary axis and of W over the token axes, and divides the
    # replicated outputs' cotangents before transposing psum: the same gradients.
    outs = jax.shard_map(body, in_specs=(P(tok_spec, None), P(None, vax), P(tok_spec)),
                         out_specs=(P(tok_spec),) * n_out, check_vma=False)(h, w, t)
    outs = tuple(x[:n] for x in outs)
    return outs if with_entropy else (*outs, None)


def finish(tl, lse, mx, ent, t, vocab: int):
    """(logps, lse, entropy, max_logit) from the kernels' outputs."""
    logps = jnp.where(valid_targets(t, vocab), tl - lse, 0.0)
    return logps, lse, ent, mx


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """The static settings every log-prob kernel call has; each backend adds its own."""
    temperature: float
    logit_softcap: float | None
    with_entropy: bool
    vocab: int  # valid (unpadded) vocabulary columns of this shard
    block_tokens: int
    block_vocab: int

    @classmethod
    def create(cls, *, temperature, logit_softcap, with_entropy, vocab, **backend):
        return cls(temperature=float(temperature),
                   logit_softcap=None if logit_softcap is None else float(logit_softcap),
                   with_entropy=bool(with_entropy), vocab=int(vocab), **backend)


def kernel_op(plan, forward, backward):
    """A log-prob kernel's public op from its three pieces (both Pallas backends use it).

    `plan(n, hidden, vocab, dtype, **options) -> cfg` (a frozen config with
    `with_entropy`), `forward(h, w, t, cfg) -> (target logit, lse, max, entropy)` and
    `backward(h, w, t, stats, cfg) -> (dh, dw)` with `stats` = [lse, d target logit,
    d lse] (+ [entropy, d entropy] with entropy): the max logit gets no gradient.
    Returns `token_logprobs(hidden_NxH, unembed_HxV, targets_N, *, temperature,
    logit_softcap, with_entropy, block_tokens, block_vocab, interpret, token_axes,
    vocab_axis) -> (logps, lse, entropy or None, max_logit)`, sharded with
    `sharded_outputs`.
    """
    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def local(h, w, t, cfg):
        return local_fwd(h, w, t, cfg)[0]

    def local_fwd(h, w, t, cfg):
        tl, lse, mx, ent = forward(h, w, t, cfg)
        outs = (tl, lse, mx, ent) if cfg.with_entropy else (tl, lse, mx)
        return outs, (h, w, t, lse, ent)

    def local_bwd(cfg, residuals, cotangents):
        h, w, t, lse, ent = residuals
        stats = [lse, cotangents[0], cotangents[1]]  # cotangents[2]: the max logit
        if cfg.with_entropy:
            stats += [ent, cotangents[3]]
        dh, dw = backward(h, w, t, stats, cfg)
        return dh, dw, None

    local.defvjp(local_fwd, local_bwd)

    def local_outputs(h, w, t, **options):
        """Single-shard op: (target logit, lse, max, entropy or None), float32 [N]."""
        cfg = plan(h.shape[0], h.shape[1], w.shape[1], h.dtype, **options)
        outs = local(*vary_alike(h, w, t), cfg)
        return tuple(outs) if cfg.with_entropy else (*outs, None)

    def token_logprobs(hidden_NxH, unembed_HxV, targets_N, *, temperature: float,
                       logit_softcap: float | None, with_entropy: bool, block_tokens: int,
                       block_vocab: int, interpret=False, token_axes=TOKEN_AXES,
                       vocab_axis=VOCAB_AXIS):
        outs = sharded_outputs(local_outputs, hidden_NxH, unembed_HxV, targets_N,
                               with_entropy=with_entropy, token_axes=token_axes,
                               vocab_axis=vocab_axis, temperature=temperature,
                               logit_softcap=logit_softcap, block_tokens=block_tokens,
                               block_vocab=block_vocab, interpret=interpret)
        return finish(*outs, targets_N, unembed_HxV.shape[1])

    return token_logprobs
