"""The loss's two passes over a chunk of logits as Pallas kernels (Triton on GPU, interpreter on CPU).

After the LM head's matmul writes a chunk of logits, the loss reads them twice: once for each row's
logsumexp, once to write the softmax gradient. Through XLA:GPU both run below memory bandwidth at Qwen2's
vocabulary, the logsumexp far below: 151,936 = 128 x 1187 columns, and XLA splits that row reduction into
unaligned pieces (docs/training.md has the measurements). These kernels read a row in aligned blocks:

* `logsumexp`: one program per row, an online max and sum of exponentials over its blocks (one exp per
  element).
* `softmax_grad`: one program per (row, block of columns): `weight * (softmax * (1 + 2 z_coef lse) -
  onehot(target))`, the gradient of `weight * (lse - logit[target] + z_coef * lse^2)`.

Both take `[rows, vocab]` logits of any float dtype and work in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

LOG2E = math.log2(math.e)


def _block_mask(j, block: int, vocab: int):
  columns = j * block + lax.broadcasted_iota(jnp.int32, (block,), 0)
  return columns, columns < vocab


def _params(num_warps: int, interpret: bool) -> dict:
  return {} if interpret else {'compiler_params': pltriton.CompilerParams(num_warps=num_warps, num_stages=1)}


def logsumexp(logits: jax.Array, *, block: int = 4096, num_warps: int = 4, interpret: bool = False) -> jax.Array:
  """logsumexp over the last axis of `[rows, vocab]` logits, in float32: `[rows]`."""
  rows, vocab = logits.shape

  def kernel(x_ref, out_ref):
    def step(j, carry):
      m, s = carry  # base-2 running max and sum of 2^(x - m)
      _, valid = _block_mask(j, block, vocab)
      x = pltriton.load(x_ref.at[pl.ds(j * block, block)], mask=valid, other=-jnp.inf)
      x = x.astype(jnp.float32) * LOG2E
      m_new = jnp.maximum(m, jnp.max(x))
      shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row of -inf so far: nothing to rescale
      return m_new, s * jnp.exp2(m - shift) + jnp.sum(jnp.exp2(x - shift))

    init = (jnp.float32(-jnp.inf), jnp.float32(0.0))
    m, s = lax.fori_loop(0, pl.cdiv(vocab, block), step, init)
    out_ref[...] = (m + jnp.log2(s)) / LOG2E

  return pl.pallas_call(
      kernel, grid=(rows,), in_specs=[pl.BlockSpec((None, vocab), lambda r: (r, 0))],
      out_specs=pl.BlockSpec((None,), lambda r: (r,)), out_shape=jax.ShapeDtypeStruct((rows,), jnp.float32),
      interpret=interpret, name='logsumexp', **_params(num_warps, interpret))(logits)


def softmax_grad(logits: jax.Array, lse: jax.Array, targets: jax.Array, weights: jax.Array, *, z_coef: float,
                 dtype, block: int = 4096, num_warps: int = 4, interpret: bool = False) -> jax.Array:
  """`weights * (softmax(logits) * (1 + 2 z_coef lse) - onehot(targets))` as `[rows, vocab]` of `dtype`.

  logits: `[rows, vocab]`; lse: `[rows]` float32, their logsumexp; targets: `[rows]` int; weights: `[rows]`.
  """
  rows, vocab = logits.shape

  def kernel(x_ref, lse_ref, t_ref, w_ref, out_ref):
    j = pl.program_id(1)
    columns, valid = _block_mask(j, block, vocab)
    lse, w = lse_ref[...], w_ref[...]
    x = pltriton.load(x_ref.at[pl.ds(j * block, block)], mask=valid, other=0.0).astype(jnp.float32)
    probs = jnp.exp2(x * LOG2E - lse * LOG2E)
    grad = w * (probs * (1.0 + 2.0 * z_coef * lse) - jnp.where(columns == t_ref[...], 1.0, 0.0))
    pltriton.store(out_ref.at[pl.ds(j * block, block)], grad.astype(out_ref.dtype), mask=valid)

  row = pl.BlockSpec((None,), lambda r, j: (r,))
  whole = pl.BlockSpec((None, vocab), lambda r, j: (r, 0))
  return pl.pallas_call(
      kernel, grid=(rows, pl.cdiv(vocab, block)), in_specs=[whole, row, row, row], out_specs=whole,
      out_shape=jax.ShapeDtypeStruct((rows, vocab), dtype), interpret=interpret, name='softmax_grad',
      **_params(num_warps, interpret))(
          logits, lse.astype(jnp.float32), targets.astype(jnp.int32), weights.astype(jnp.float32))
