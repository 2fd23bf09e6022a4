"""Grouped matmul for TPUs: JAX's megablox `gmm`, which carries its own custom_vjp.

megablox needs the row count to be a multiple of its row tile; rows are padded here and the pad sliced off.
Rows past `sum(group_sizes)` are not written by the kernel, in the forward product nor in d lhs: both are
masked to zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

from qwenjax.kernels import gmm as gmm_lib

_TILE = 128  # row, contraction and column tile (clipped to the operand size)


@jax.custom_vjp
def _mask_grad_rows(x: jax.Array, total: jax.Array) -> jax.Array:
  """Identity whose gradient keeps only rows below `total`."""
  del total
  return x


def _mask_grad_fwd(x, total):
  return x, total


def _mask_grad_bwd(total, g):
  return gmm_lib.mask_rows(g, total), None


_mask_grad_rows.defvjp(_mask_grad_fwd, _mask_grad_bwd)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, interpret: bool = False) -> jax.Array:
  """`[m, k] x [groups, k, n] -> [m, n]` in lhs's dtype; rows past `sum(group_sizes)` are zeros."""
  m, k = lhs.shape
  n = rhs.shape[2]
  tm = min(_TILE, -(-m // 8) * 8)
  pad = -m % tm
  total = jnp.sum(group_sizes)
  padded = _mask_grad_rows(jnp.pad(lhs, ((0, pad), (0, 0))) if pad else lhs, total)
  # Positional arguments: megablox's custom_vjp marks some of them non-differentiable by position.
  out = megablox.gmm(padded, rhs, group_sizes, lhs.dtype, (tm, min(_TILE, k), min(_TILE, n)), None, None,
                     False, interpret)[:m]
  return gmm_lib.mask_rows(out, total)
