"""The decoder's projections, `einsum(equation, x, W)`, and their optional backward pass.

`ModelConfig.projection_backward` picks how the weight gradient is computed:

* "autodiff" (default): plain `jnp.einsum`; JAX derives every rule. Portable.
* "cpu_transposed": the same forward, with dW computed as a plain matmul over a
  materialised transposed copy of the smaller of x and dy. On XLA:CPU autodiff's
  dW = x^T dy made XLA write dy (e.g. the [tokens, 688] MLP gradients) transposed
  inside the elementwise backward fusions: the option saves about 13% of the CPU time
  of the DPO benchmark step (benchmarks/RESULTS.md, "The projection backward as an
  option"). It gives autodiff's gradients up to float rounding on every backend,
  but helps only XLA:CPU.

"cpu_transposed" is a `jax.custom_jvp`, not a `custom_vjp`: the rule is forward-mode,
written so that JAX's transpose of its tangent map is the backward above. So
`jax.grad`, `jax.jvp`, `jax.linearize` and remat all work under either option.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jalign.models.config import PROJECTION_BACKWARDS


def contracted_axes(equation: str) -> int:
    """How many of w's leading axes `equation` contracts with x's trailing ones;
    0 when the equation is not of that form (e.g. "bth,hnd->btnd" gives 1)."""
    inputs, out = equation.split("->")
    x_sub, w_sub = inputs.split(",")
    n_in = sum(ch in x_sub for ch in w_sub)
    ok = n_in and x_sub.endswith(w_sub[:n_in]) and out == x_sub[:-n_in] + w_sub[n_in:]
    return n_in if ok else 0


def project(equation: str, x: jax.Array, w: jax.Array, backward: str = "autodiff") -> jax.Array:
    """`einsum(equation, x, w)`, differentiated as `backward` says (see the module doc).

    Equations that do not contract x's trailing axes with w's leading ones always
    use autodiff.
    """
    if backward not in PROJECTION_BACKWARDS:
        raise ValueError(f"model.projection_backward must be one of {PROJECTION_BACKWARDS}, "
                         f"got {backward!r}")
    if backward == "autodiff" or not contracted_axes(equation):
        return jnp.einsum(equation, x, w)
    return _transposed_dw(equation, x, w)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _transposed_dw(equation, x, w):
    return jnp.einsum(equation, x, w)


def _transposed_dw_jvp(equation, primals, tangents):
    x, w = primals
    dx, dw = tangents
    y = jnp.einsum(equation, x, w)
    dx = None if isinstance(dx, SymbolicZero) else dx
    dw = None if isinstance(dw, SymbolicZero) else dw  # zero for a frozen W (LoRA's base)
    if dx is None and dw is None:
        return y, jnp.zeros_like(y)
    return y, _tangent(contracted_axes(equation), x, w, dx, dw).astype(y.dtype)


@functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable,
                   static_argnums=(0,))
def _tangent(n_in: int, x, w, dx, dw):
    """y' = x' W + x W' as [N, I] x [I, O] matmuls (dx or dw None: that term is zero),
    written so that the transpose, the backward pass, is dx = dy W^T as one dot and
    dW = copy(x^T) dy when I <= O, else dW = (copy(dy^T) x)^T: the copy is of the
    smaller operand.

    The `optimization_barrier` keeps the copy materialised: folded into the dot,
    XLA:CPU picks the slow layouts again. The checkpoint makes the backward pass
    derive the reshapes and the copy from x and W themselves, which are saved once
    for all the projections that read them (q, k, v; gate, up), not once per
    projection.
    """
    x_NxI = x.reshape(-1, math.prod(x.shape[x.ndim - n_in:]))
    i = x_NxI.shape[1]
    w_IxO = w.reshape(i, -1)
    dy_NxO = 0
    if dx is not None:
        dy_NxO = jnp.dot(dx.reshape(x_NxI.shape), w_IxO)
    if dw is not None:
        dw_IxO = dw.reshape(w_IxO.shape)
        if i <= w_IxO.shape[1]:
            xt_IxN = jax.lax.optimization_barrier(x_NxI.T)
            dy_NxO += jax.lax.dot_general(xt_IxN, dw_IxO, (((0,), (0,)), ((), ())))
        else:
            dyt_OxN = jax.lax.dot_general(dw_IxO, x_NxI, (((0,), (1,)), ((), ())))
            dy_NxO += jax.lax.optimization_barrier(dyt_OxN).T
    return dy_NxO.reshape(x.shape[:x.ndim - n_in] + w.shape[n_in:])


_transposed_dw.defjvp(_transposed_dw_jvp, symbolic_zeros=True)
