"""Grouped matmul for Hopper GPUs: JAX's Mosaic GPU ragged-dot kernels paired in a custom_vjp.

`jax.lax.ragged_dot` is slow on Hopper GPUs (docs/moe.md). JAX ships two faster Pallas Mosaic GPU kernels
without gradients; this module pairs them:

    forward   out[rows of g]  = lhs[rows of g] @ rhs[g]          ragged_dot_mgpu.ragged_dot
    d lhs     dlhs[rows of g] = dout[rows of g] @ rhs[g]^T       ragged_dot_mgpu.ragged_dot(transpose_rhs=True)
    d rhs     drhs[g]         = lhs[rows of g]^T @ dout[rows of g]   transposed_ragged_dot_mgpu

Both kernels leave rows past `sum(group_sizes)` unwritten; outputs are masked here. Operands must be bf16 or
f16 with k and n multiples of 128 (`unsupported_reason` says why not otherwise).

`interpret=True` runs the forward kernel (for the forward product and for d lhs) in the Mosaic GPU interpreter
on the CPU (tests only): the stock kernel takes no `interpret` argument, so for the duration of the call its
module's `plgpu.kernel` is swapped for one that interprets. Two things the interpreter of jax 0.10 cannot run
are replaced when interpreting: a transposed wgmma operand (d lhs then transposes rhs in HBM first) and the
transposed kernel's `layout_cast` (d rhs then uses XLA's ragged contraction). The H100 benchmark checks the
real kernels against `jax.lax.ragged_dot`, gradients included.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

from qwenjax.kernels import gmm_common

# Tile sizes (rows, columns, contraction), software-pipeline depth and column-block swizzle. Chosen by
# benchmarks/moe_gpu.py on the H100 (see docs/moe.md).
FORWARD_CONFIG = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=8)
TRANSPOSED_CONFIG = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)
_ALIGN = 128  # k and n must be multiples of this (covers every block size above)


def unsupported_reason(lhs, rhs) -> str | None:
  """Why these `[m, k]` x `[groups, k, n]` operands cannot use the kernels, or None if they can."""
  if jnp.dtype(lhs.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f'the Mosaic GPU kernels take bf16 or f16 operands, not {jnp.dtype(lhs.dtype).name}'
  k, n = rhs.shape[1], rhs.shape[2]
  if k % _ALIGN or n % _ALIGN:
    return f'k ({k}) and n ({n}) must be multiples of {_ALIGN}'
  return None


class _Proxy:
  """A module stand-in that overrides a few attributes and forwards the rest."""

  def __init__(self, module, **overrides):
    self._module, self._overrides = module, overrides

  def __getattr__(self, name):
    return self._overrides[name] if name in self._overrides else getattr(self._module, name)


@contextlib.contextmanager
def _maybe_interpreted(interpret: bool):
  if not interpret:
    yield
    return
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # pylint: disable=g-import-not-at-top
  patched_plgpu = _Proxy(plgpu, kernel=functools.partial(plgpu.kernel, interpret=InterpretGPUParams()))
  saved = ragged_dot_mgpu.plgpu
  try:
    ragged_dot_mgpu.plgpu = patched_plgpu
    yield
  finally:
    ragged_dot_mgpu.plgpu = saved


def _kwargs(fn, config: dict, **extra) -> dict:
  """The config entries `fn` accepts (the stock kernels' signatures move between JAX releases)."""
  params = inspect.signature(fn).parameters
  return {k: v for k, v in {**config, **extra}.items() if k in params}


def _pad_rows(x: jax.Array, multiple: int) -> jax.Array:
  pad = -x.shape[0] % multiple
  return jnp.pad(x, ((0, pad), (0, 0))) if pad else x


def _ragged(lhs, rhs, group_sizes, interpret, transpose_rhs=False):
  """lhs @ rhs[g] per group, or lhs @ rhs[g]^T with transpose_rhs (rhs then `[groups, n, k]`)."""
  m = lhs.shape[0]
  fn = ragged_dot_mgpu.ragged_dot
  # The interpreter cannot read a transposed shared-memory operand in wgmma: transpose in HBM instead.
  if transpose_rhs and (interpret or 'transpose_rhs' not in inspect.signature(fn).parameters):
    rhs, transpose_rhs = jnp.swapaxes(rhs, 1, 2), False
  extra = {'transpose_rhs': True} if transpose_rhs else {}
  with _maybe_interpreted(interpret):
    out = fn(_pad_rows(lhs, FORWARD_CONFIG['block_m']), rhs, group_sizes=group_sizes,
             **_kwargs(fn, FORWARD_CONFIG, **extra))
  return out[:m]


def _transposed(lhs, dout, group_sizes, interpret):
  """lhs[rows of g]^T @ dout[rows of g] for every group: `[groups, k, n]`."""
  if interpret:
    # The transposed kernel's masking uses `plgpu.layout_cast`, which the interpreter cannot run (jax 0.10):
    # interpreted runs take XLA's ragged contraction for this one product.
    dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((0,), (0,)), ((), ())),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    return jax.lax.ragged_dot_general(lhs, dout, group_sizes, dims)
  fn = transposed_ragged_dot_mgpu.transposed_ragged_dot
  return fn(_pad_rows(lhs, _ALIGN), _pad_rows(dout, _ALIGN), group_sizes=group_sizes,
            **_kwargs(fn, TRANSPOSED_CONFIG))


def _mask(x, group_sizes):
  return gmm_common.mask_rows(x, jnp.sum(group_sizes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, interpret: bool = False) -> jax.Array:
  """`[m, k] x [groups, k, n] -> [m, n]`; rows past `sum(group_sizes)` are zeros. Differentiable."""
  return _mask(_ragged(lhs, rhs, group_sizes, interpret), group_sizes)


def _gmm_fwd(lhs, rhs, group_sizes, interpret):
  return gmm(lhs, rhs, group_sizes, interpret), (lhs, rhs, group_sizes)


def _gmm_bwd(interpret, residuals, dout):
  lhs, rhs, group_sizes = residuals
  dout = _mask(dout.astype(lhs.dtype), group_sizes)
  dlhs = _mask(_ragged(dout, rhs, group_sizes, interpret, transpose_rhs=True), group_sizes)
  drhs = _transposed(lhs, dout, group_sizes, interpret).astype(rhs.dtype)
  return dlhs, drhs, None


gmm.defvjp(_gmm_fwd, _gmm_bwd)
