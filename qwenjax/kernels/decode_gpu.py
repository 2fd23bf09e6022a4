"""One decode step's attention and cache write in one Pallas kernel (Triton backend on GPU, interpreter on CPU).

A decode step writes each row's new key and value into its cache slot, then attends one query token per row
over the cache. Through XLA that is three scatters (keys, values, slot positions), two small batched matmuls
and a softmax: six kernels a layer, each too short to keep a GPU busy. `decode_attention` does it in one
kernel plus a small combine, split-K style ("flash decoding"): program (row, kv head, split) attends the
queries of one kv head's group over one range of slots with an online softmax and writes its partial result;
the splits are merged by log-sum-exp weights afterwards, so even one row keeps many multiprocessors reading.
The program whose range holds the row's slot writes the new key and value there, in place (the cache is
aliased to the outputs); the new token itself is attended by split 0 from registers, so no program depends
on another's write.

Visibility is `attention_contract`'s, expressed through the positions the cache holds: a slot is seen if it
holds a position in `[lowest, position)` (`lowest = position - window + 1`, or 0 without a window), and the
new token is always seen. The slot written this step held either nothing or a position outside the window
(a ring of `window` slots overwrites the position `window` steps back), so reading it before or after the
write gives the same result.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

LOG2E = math.log2(math.e)
MIN_SLOTS = 16  # the Triton dot needs 16 slots a block at least
HEAD_DIMS = (16, 32, 64, 128, 256)


def supported(head_dim: int, slots: int) -> bool:
  """Whether the kernel takes this cache (else use the XLA path): a power-of-two head_dim, 16+ slots."""
  return head_dim in HEAD_DIMS and slots >= MIN_SLOTS


def plan(rows: int, slots: int, block: int = 64, programs: int = 256) -> tuple[int, int, int]:
  """(block, split length, splits): slots per loop step, per program, and programs per (row, kv head).

  Enough splits that `rows` (batch x kv heads) times splits is about `programs`, each split a whole number of
  blocks.
  """
  block = min(block, 1 << (slots.bit_length() - 1))  # a power of two <= slots
  blocks = pl.cdiv(slots, block)
  splits = max(1, min(blocks, pl.cdiv(programs, rows)))
  length = pl.cdiv(blocks, splits) * block
  return block, length, pl.cdiv(slots, length)


def decode_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array, key: jax.Array, value: jax.Array,
                     held: jax.Array, position: jax.Array, lowest: jax.Array, *, interpret: bool = False,
                     block: int = 64, programs: int = 256):
  """Attention of one new token per row over its cache, with this token's key and value written into it.

  q: [batch, kv_heads, group, head_dim], the queries of each kv head's group (rotary applied);
  k_new, v_new: [batch, kv_heads, head_dim]; key, value: [batch, kv_heads, slots, head_dim], the cache before
  this step; held: [batch, slots] int32, the position each slot holds (-1: none); position: [batch] int32,
  this token's position (written at slot `position % slots`); lowest: [batch] int32, the lowest visible
  position. Returns (out [batch, kv_heads, group, head_dim] in q's dtype, key, value, held) with the caches
  updated.
  """
  batch, kv_heads, group, head_dim = q.shape
  slots = key.shape[2]
  if not supported(head_dim, slots):
    raise ValueError(f'decode_attention needs head_dim in {HEAD_DIMS} and >= {MIN_SLOTS} cache slots; got '
                     f'head_dim {head_dim}, {slots} slots (use LayerCache.append + attend).')
  rows = max(16, 1 << (group - 1).bit_length())  # the Triton dot needs 16 rows at least
  q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
  block, length, splits = plan(batch * kv_heads, slots, block, programs)
  scale = LOG2E / math.sqrt(head_dim)
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

  def kernel(position_ref, lowest_ref, q_ref, k_new_ref, v_new_ref, key_ref, value_ref, held_ref,
             out_ref, max_ref, sum_ref, key_out, value_out, held_out):
    head, split = pl.program_id(1), pl.program_id(2)
    pos, low = position_ref[...], lowest_ref[...]
    slot = lax.rem(pos, slots)
    first = split * length
    k_row, v_row = k_new_ref[...], v_new_ref[...]

    @pl.when(slot // length == split)
    def _write():
      key_out[pl.ds(slot, 1), :] = k_row[None].astype(key_out.dtype)
      value_out[pl.ds(slot, 1), :] = v_row[None].astype(value_out.dtype)

      @pl.when(head == 0)
      def _():
        held_out[pl.ds(slot, 1)] = jnp.full((1,), pos, jnp.int32)

    qs = q_ref[...]
    own = jnp.sum(qs.astype(jnp.float32) * k_row.astype(jnp.float32)[None], axis=1) * scale  # [rows]
    on_first = jnp.full((rows,), split, jnp.int32) == 0  # a vector: Triton selects need matching shapes
    m = jnp.where(on_first, own, -jnp.inf)
    l = jnp.where(on_first, 1.0, 0.0)
    acc = jnp.where(on_first[:, None], v_row.astype(jnp.float32)[None], 0.0)

    def step(j, carry):
      acc, m, l = carry
      nominal = first + j * block
      start = jnp.minimum(nominal, slots - block)  # the last block ends at `slots`, overlapping the one before
      index = start + lax.broadcasted_iota(jnp.int32, (block,), 0)
      held_block = held_ref[pl.ds(start, block)]
      seen = (index >= nominal) & (index < first + length) & (held_block >= low) & (held_block >= 0) & (
          held_block < pos)
      s = lax.dot_general(qs, key_ref[pl.ds(start, block), :], (((1,), (1,)), ((), ())), precision=precision,
                          preferred_element_type=jnp.float32) * scale  # [rows, block]
      s = jnp.where(seen[None, :], s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(axis=1))
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      alpha = jnp.exp2(m - m_use)
      p = jnp.exp2(s - m_use[:, None])
      pv = lax.dot_general(p.astype(value_ref.dtype), value_ref[pl.ds(start, block), :],
                           (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)
      return acc * alpha[:, None] + pv, m_new, l * alpha + p.sum(axis=1)

    # Slot s only ever holds positions p with p % slots == s. Until a row's position passes `slots` (always, in
    # a full-length cache), the slots that can hold a visible position are [max(lowest, 0), position): skip
    # the rest (the unfilled tail of the cache, all of an idle row's).
    unwrapped = pos <= slots
    lo = jnp.where(unwrapped, jnp.maximum(low, 0), 0) - first
    hi = jnp.minimum(jnp.where(unwrapped, pos, slots) - first, jnp.minimum(length, slots - first))
    acc, m, l = lax.fori_loop(jnp.maximum(lo, 0) // block, pl.cdiv(jnp.maximum(hi, 0), block), step, (acc, m, l))
    out_ref[...] = acc
    max_ref[...] = m
    sum_ref[...] = l

  row = lambda b, h, s: (b,)
  cache_spec = pl.BlockSpec((None, None, slots, head_dim), lambda b, h, s: (b, h, 0, 0))
  held_spec = pl.BlockSpec((None, slots), lambda b, h, s: (b, 0))
  in_specs = [pl.BlockSpec((None,), row), pl.BlockSpec((None,), row),
              pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0)),
              pl.BlockSpec((None, None, head_dim), lambda b, h, s: (b, h, 0)),
              pl.BlockSpec((None, None, head_dim), lambda b, h, s: (b, h, 0)),
              cache_spec, cache_spec, held_spec]
  partial = (batch, kv_heads, splits, rows)
  out_specs = [pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
               pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
               pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
               cache_spec, cache_spec, held_spec]
  out_shape = [jax.ShapeDtypeStruct((*partial, head_dim), jnp.float32),
               jax.ShapeDtypeStruct(partial, jnp.float32), jax.ShapeDtypeStruct(partial, jnp.float32),
               jax.ShapeDtypeStruct(key.shape, key.dtype), jax.ShapeDtypeStruct(value.shape, value.dtype),
               jax.ShapeDtypeStruct(held.shape, jnp.int32)]
  kwargs = {}
  if not interpret:
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
    kwargs['compiler_params'] = pltriton.CompilerParams(num_warps=4, num_stages=2)
  acc, m, l, key, value, held = pl.pallas_call(
      kernel, grid=(batch, kv_heads, splits), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      input_output_aliases={5: 3, 6: 4, 7: 5}, interpret=interpret, name='decode_attention', **kwargs)(
          position.astype(jnp.int32), lowest.astype(jnp.int32), q, k_new, v_new, key, value,
          held.astype(jnp.int32))
  # Merge the splits: each holds an unnormalized sum and its max in base 2; split 0 always saw the new token.
  weight = jnp.exp2(m - m.max(axis=2, keepdims=True))  # [batch, kv_heads, splits, rows]
  out = (acc * weight[..., None]).sum(axis=2) / (l * weight).sum(axis=2)[..., None]
  return out[:, :, :group].astype(q.dtype), key, value, held
