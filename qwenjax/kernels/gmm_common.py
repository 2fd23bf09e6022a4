"""What the grouped-matmul backends (`gmm_gpu`, `gmm_tpu`) share, below their dispatcher `gmm`.

A leaf module, so that `gmm` can import its backends and they this without an import circle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mask_rows(x: jax.Array, total: jax.Array) -> jax.Array:
  """x with its rows at or past `total` (the sum of the group sizes) set to zero: `gmm.grouped_matmul`'s promise
  for the rows its kernels leave unwritten."""
  rows = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
  return jnp.where(rows < total, x, jnp.zeros((), x.dtype))
