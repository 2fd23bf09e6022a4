"""Grouped matrix multiplication: the one entry point for the MoE experts' matmuls.

`grouped_matmul(lhs, rhs, group_sizes)` multiplies consecutive row blocks of `lhs` by their own matrix:
rows `[start_g, start_g + group_sizes[g])` by `rhs[g]`. Rows at or past `sum(group_sizes)` come out as zeros,
so callers may pad `lhs` to a static size. Every backend is differentiable in `lhs` and `rhs`:

* `ragged_dot`: `jax.lax.ragged_dot`, everywhere. Slow on GPUs (docs/moe.md has the H100 numbers) and
  expanded densely on the CPU, but the reference the others are tested against.
* `mgpu`: Hopper GPUs. JAX's Mosaic GPU ragged-dot kernels in a custom_vjp (`gmm_gpu`); bf16/f16 only.
* `megablox`: TPUs. JAX's megablox `gmm` (`gmm_tpu`).
* `auto`: `mgpu` on a Hopper GPU when dtype and shapes suit it, `megablox` on a TPU, else `ragged_dot`.

`interpret=True` runs `mgpu` or `megablox` in the Pallas interpreter (CPU tests); `auto` then still picks
`ragged_dot` on the CPU. Kernel modules are imported only when picked, so one backend never loads another's.
The choice is made for `qwenjax.kernels.target_platform()`: inside `kernels.lowering_platform('tpu')`,
`megablox` lowers for a TPU from a CPU host (for `jax.export`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwenjax import kernels
from qwenjax.model_config import MOE_IMPLEMENTATIONS as IMPLEMENTATIONS


def resolve_impl(impl: str, lhs: jax.ShapeDtypeStruct | jax.Array, rhs: jax.ShapeDtypeStruct | jax.Array,
                 interpret: bool = False) -> str:
  """The backend `grouped_matmul` will use for these operands; raises if an explicit choice cannot run."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'unknown grouped-matmul impl {impl!r}; choose one of {IMPLEMENTATIONS}')
  backend = kernels.target_platform()
  if impl == 'auto':
    if backend == 'tpu':
      return 'megablox'
    if backend == 'gpu' and kernels.is_hopper():
      from qwenjax.kernels import gmm_gpu  # pylint: disable=g-import-not-at-top
      if gmm_gpu.unsupported_reason(lhs, rhs) is None:
        return 'mgpu'
    return 'ragged_dot'
  if impl == 'mgpu':
    if not interpret and not (backend == 'gpu' and kernels.is_hopper()):
      raise ValueError(f"grouped-matmul impl 'mgpu' needs a Hopper GPU (kernels are picked for {backend!r}); pass "
                       "interpret=True (model: moe_interpret=True) to run it interpreted, or use 'auto'.")
    from qwenjax.kernels import gmm_gpu  # pylint: disable=g-import-not-at-top
    reason = gmm_gpu.unsupported_reason(lhs, rhs)
    if reason:
      raise ValueError(f"grouped-matmul impl 'mgpu' cannot run here: {reason}. Use 'auto' or 'ragged_dot'.")
  if impl == 'megablox' and not interpret and backend != 'tpu':
    raise ValueError(f"grouped-matmul impl 'megablox' needs a TPU (kernels are picked for {backend!r}); pass "
                     "interpret=True (model: moe_interpret=True) to run it interpreted, or use 'auto'; to lower "
                     "it for a TPU from this machine (jax.export), trace inside "
                     "qwenjax.kernels.lowering_platform('tpu').")
  return impl


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, impl: str = 'auto',
                   interpret: bool = False) -> jax.Array:
  """`[m, k] x [groups, k, n] -> [m, n]` in lhs's dtype; rows past `sum(group_sizes)` are zeros.

  Args:
    lhs: `[m, k]` rows sorted by group.
    rhs: `[groups, k, n]`, same dtype as lhs.
    group_sizes: `[groups]` int32 row counts; their sum may be less than m.
    impl: one of `IMPLEMENTATIONS`.
    interpret: run a Pallas backend in its interpreter.
  """
  if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1] or group_sizes.shape != rhs.shape[:1]:
    raise ValueError(f'expected lhs [m, k], rhs [groups, k, n], group_sizes [groups]; got {lhs.shape}, '
                     f'{rhs.shape}, {group_sizes.shape}')
  group_sizes = group_sizes.astype(jnp.int32)
  impl = resolve_impl(impl, lhs, rhs, interpret)
  if impl == 'ragged_dot':
    return jax.lax.ragged_dot(lhs, rhs.astype(lhs.dtype), group_sizes)
  if impl == 'mgpu':
    from qwenjax.kernels import gmm_gpu  # pylint: disable=g-import-not-at-top
    return gmm_gpu.gmm(lhs, rhs.astype(lhs.dtype), group_sizes, interpret)
  from qwenjax.kernels import gmm_tpu  # pylint: disable=g-import-not-at-top
  return gmm_tpu.gmm(lhs, rhs.astype(lhs.dtype), group_sizes, interpret)
