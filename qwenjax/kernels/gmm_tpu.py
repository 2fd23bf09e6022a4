"""Grouped matmul for TPUs: JAX's megablox `gmm`, which carries its own custom_vjp.

megablox needs the row count to be a multiple of its row tile; rows are padded here and the pad sliced off.
Rows past `sum(group_sizes)` are not written by the kernel, in the forward product nor in d lhs: both are
masked to zeros.

The contraction (k) and column (n) dimensions are padded with zeros to multiples of 128. A TPU block's last
dimension must be a multiple of 128 or the whole dimension, and megablox's backward reuses the forward's
tiles with k and n swapped (d lhs contracts over n): a tile equal to a small k is illegal for n unless k == n.
The interpreter accepts either; only lowering for a TPU rejects it (tests/test_tpu_export.py). The models'
dimensions are multiples of 128, so this pads only small test models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

from qwenjax.kernels import gmm_common

_TILE = 128  # row tile (clipped to the row count), contraction and column tile: the TPU's 128 lanes


@jax.custom_vjp
def _mask_grad_rows(x: jax.Array, total: jax.Array) -> jax.Array:
  """Identity whose gradient keeps only rows below `total`."""
  del total
  return x


def _mask_grad_fwd(x, total):
  return x, total


def _mask_grad_bwd(total, g):
  return gmm_common.mask_rows(g, total), None


_mask_grad_rows.defvjp(_mask_grad_fwd, _mask_grad_bwd)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, interpret: bool = False) -> jax.Array:
  """`[m, k] x [groups, k, n] -> [m, n]` in lhs's dtype; rows past `sum(group_sizes)` are zeros."""
  m, k = lhs.shape
  n = rhs.shape[2]
  tm = min(_TILE, -(-m // 8) * 8)
  pad_m, pad_k, pad_n = -m % tm, -k % _TILE, -n % _TILE
  total = jnp.sum(group_sizes)
  if pad_m or pad_k:
    lhs = jnp.pad(lhs, ((0, pad_m), (0, pad_k)))
  if pad_k or pad_n:
    rhs = jnp.pad(rhs, ((0, 0), (0, pad_k), (0, pad_n)))
  # Positional arguments: megablox's custom_vjp marks some of them non-differentiable by position.
  out = megablox.gmm(_mask_grad_rows(lhs, total), rhs, group_sizes, lhs.dtype, (tm, _TILE, _TILE), None, None,
                     False, interpret)[:m, :n]
  return gmm_common.mask_rows(out, total)
