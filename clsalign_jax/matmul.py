"""A dense projection `x_BTD @ w_DF` whose backward pass is laid out for XLA CPU.

Shape suffixes: B batch, T rows, D input width, F output width.

Autodiff of `einsum("btd,df->btf")` gives the weight gradient as a dot that contracts the
[B·T] axis of both x and the output gradient. XLA CPU's matmul libraries want the lhs
contracting axis minor, so it transposes one operand, and it picks the output gradient: for
the MLP that is a [B·T, 1536] array, often fused with the SiLU backward into a strided loop
(15 % of the SmolLM2 training step went to such transposes when this was measured). Transposing x
ourselves moves that copy to the narrow side ([B·T, 576]) and lets the gradient feed the
matmul as it lies. The values are the same dots in the same order, so results are identical.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def dense(x_BTD: jax.Array, w_DF: jax.Array) -> jax.Array:
  return jnp.einsum("btd,df->btf", x_BTD, w_DF)


def _dense_fwd(x_BTD, w_DF):
  return dense(x_BTD, w_DF), (x_BTD, w_DF)


def _dense_bwd(res, g_BTF):
  x_BTD, w_DF = res
  B, T, D = x_BTD.shape
  # `+ 0` keeps the transpose a value of its own rather than a layout XLA may fold back into
  # the dot (and then choose to transpose g instead).
  xt_DK = x_BTD.reshape(B * T, D).T + 0
  dw_DF = jax.lax.dot_general(xt_DK, g_BTF.reshape(B * T, -1), (((1,), (0,)), ((), ())))
  dx_BTD = jnp.einsum("btf,df->btd", g_BTF, w_DF)
  return dx_BTD, dw_DF.astype(w_DF.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)
