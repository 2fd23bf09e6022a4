"""A decode step's rotary, cache write and attention in one Pallas kernel (Triton on GPU, interpreter on CPU).

A decode step rotates each row's new query heads and key (rotary), writes the key and value into the row's
cache slot, then attends the queries over the cache. Through XLA that is rotary and the projections' bias in
three fusions, three scatters (keys, values, slot positions), two small batched matmuls and a softmax, each
kernel too short to keep a GPU busy. `decode_attention` does it in one kernel, split-K style ("flash
decoding"): program (row, kv head, split) attends the queries of one kv head's group over one range of slots
with an online softmax and writes its partial result; a second small kernel merges them by log-sum-exp
weights, so even one row keeps many multiprocessors reading. The program whose range holds the row's slot
writes the new key and value there, in place (the cache is aliased to the outputs); the new token itself is
attended by split 0 from registers, so no program depends on another's write.

Visibility is `attention_contract`'s, expressed through the positions the cache holds: a slot is seen if it
holds a position in `[lowest, position)` (`lowest` is `attention_contract.first_visible(position, window)`),
and the new token is always seen. The slot written this step held either nothing or a position outside the window
(a ring of `window` slots overwrites the position `window` steps back), so reading it before or after the
write gives the same result.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

LOG2E = math.log2(math.e)
MIN_SLOTS = 16  # the Triton dot needs 16 slots a block at least
HEAD_DIMS = (32, 64, 128, 256)  # rotary splits head_dim in halves, each a Triton dot's contraction (16+)


def supported(head_dim: int, slots: int) -> bool:
  """Whether the kernel takes this cache (else use the XLA path): a power-of-two head_dim of 32+, 16+ slots."""
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


def decode_attention(qkv: jax.Array, cos: jax.Array, sin: jax.Array, key: jax.Array, value: jax.Array,
                     held: jax.Array, position: jax.Array, lowest: jax.Array, *, kv_heads: int,
                     interpret: bool = False, block: int = 64, programs: int = 256):
  """Attention of one new token per row over its cache, with this token's key and value written into it.

  qkv: [batch, heads + 2 * kv_heads, head_dim], this token's projections (bias added, rotary not applied): the
  query heads, then the key heads, then the value heads, as one array so that XLA writes them in one fusion;
  cos, sin: [batch, head_dim // 2] float32, the rotary angles' cosines and sines at each row's position (the
  kernel rotates queries and key in the `rotate_half` layout, in float32, as `rotary.apply_rotary_embedding`);
  key, value: [batch, kv_heads, slots, head_dim], the cache before this step; held: [batch, slots] int32, the
  position each slot holds (-1: none); position: [batch] int32, this token's position (written at slot
  `position % slots`); lowest: [batch] int32, the lowest visible position. Query head i belongs to kv head
  `i // (heads // kv_heads)`. Returns (out [batch, kv_heads, group, head_dim] in qkv's dtype, key, value,
  held) with the caches updated (the key rotated).
  """
  batch, all_heads, head_dim = qkv.shape
  group = (all_heads - 2 * kv_heads) // kv_heads
  slots = key.shape[2]
  if not supported(head_dim, slots):
    raise ValueError(f'decode_attention needs head_dim in {HEAD_DIMS} and >= {MIN_SLOTS} cache slots; got '
                     f'head_dim {head_dim}, {slots} slots (use LayerCache.append + attend).')
  if group < 1 or all_heads != (group + 2) * kv_heads or key.shape[1] != kv_heads:
    raise ValueError(f'qkv holds {all_heads} heads, which is not q heads + 2 x {kv_heads} kv heads with the '
                     f'q heads a multiple of the kv heads (cache: {key.shape[1]} kv heads).')
  rows = max(16, 1 << (group - 1).bit_length())  # the Triton dot needs 16 rows at least; the rest are masked
  half = head_dim // 2
  heads = group * kv_heads
  block, length, splits = plan(batch * kv_heads, slots, block, programs)
  scale = LOG2E / math.sqrt(head_dim)
  dtype = qkv.dtype
  precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None

  def kernel(position_ref, lowest_ref, qkv_ref, cos_ref, sin_ref, key_ref, value_ref, held_ref,
             acc_ref, max_ref, sum_ref, key_out, value_out, held_out):
    head, split = pl.program_id(1), pl.program_id(2)
    pos, low = position_ref[...], lowest_ref[...]
    slot = lax.rem(pos, slots)
    first = split * length
    c, s = cos_ref[...][None], sin_ref[...][None]  # [1, half]

    def rotate(x1, x2):  # float32 halves -> the rotated halves in the input dtype
      return (x1 * c - x2 * s).astype(dtype), (x2 * c + x1 * s).astype(dtype)

    # The group's queries as `rows` rows (those past the group masked to zero), in two halves: the rotation
    # pairs element i with element i + half, and the scores add the halves' two dots.
    valid = lax.broadcasted_iota(jnp.int32, (rows, half), 0) < group
    q_rows = lambda at: qkv_ref.at[pl.ds(head * group, rows), pl.ds(at, half)]
    q_half = lambda at: pltriton.load(q_rows(at), mask=valid, other=0).astype(jnp.float32)
    q1, q2 = rotate(q_half(0), q_half(half))
    k_half = lambda at: qkv_ref[pl.ds(heads + head, 1), pl.ds(at, half)].astype(jnp.float32)
    k1, k2 = rotate(k_half(0), k_half(half))  # [1, half]
    v_row = qkv_ref[pl.ds(heads + kv_heads + head, 1), :]  # [1, head_dim]

    @pl.when(slot // length == split)
    def _write():
      key_out[pl.ds(slot, 1), pl.ds(0, half)] = k1.astype(key_out.dtype)
      key_out[pl.ds(slot, 1), pl.ds(half, half)] = k2.astype(key_out.dtype)
      value_out[pl.ds(slot, 1), :] = v_row.astype(value_out.dtype)

      @pl.when(head == 0)
      def _():
        held_out[pl.ds(slot, 1)] = jnp.full((1,), pos, jnp.int32)

    f32 = lambda x: x.astype(jnp.float32)
    own = (jnp.sum(f32(q1) * f32(k1), axis=1) + jnp.sum(f32(q2) * f32(k2), axis=1)) * scale  # [rows]
    on_first = jnp.full((rows,), split, jnp.int32) == 0  # a vector: Triton selects need matching shapes
    m = jnp.where(on_first, own, -jnp.inf)
    l = jnp.where(on_first, 1.0, 0.0)
    acc = jnp.where(on_first[:, None], f32(v_row), 0.0)
    dot = lambda a, b, dims: lax.dot_general(a, b, (dims, ((), ())), precision=precision,
                                             preferred_element_type=jnp.float32)

    def step(j, carry):
      acc, m, l = carry
      nominal = first + j * block
      start = jnp.minimum(nominal, slots - block)  # the last block ends at `slots`, overlapping the one before
      index = start + lax.broadcasted_iota(jnp.int32, (block,), 0)
      held_block = held_ref[pl.ds(start, block)]
      seen = (index >= nominal) & (index < first + length) & (held_block >= low) & (held_block >= 0) & (
          held_block < pos)
      keys = lambda at: key_ref[pl.ds(start, block), pl.ds(at, half)]
      s = (dot(q1, keys(0), ((1,), (1,))) + dot(q2, keys(half), ((1,), (1,)))) * scale  # [rows, block]
      s = jnp.where(seen[None, :], s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(axis=1))
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      alpha = jnp.exp2(m - m_use)
      p = jnp.exp2(s - m_use[:, None])
      pv = dot(p.astype(value_ref.dtype), value_ref[pl.ds(start, block), :], ((1,), (0,)))
      return acc * alpha[:, None] + pv, m_new, l * alpha + p.sum(axis=1)

    # Slot s only ever holds positions p with p % slots == s. Until a row's position passes `slots` (always, in
    # a full-length cache), the slots that can hold a visible position are [max(lowest, 0), position): skip
    # the rest (the unfilled tail of the cache, all of an idle row's).
    unwrapped = pos <= slots
    lo = jnp.where(unwrapped, jnp.maximum(low, 0), 0) - first
    hi = jnp.minimum(jnp.where(unwrapped, pos, slots) - first, jnp.minimum(length, slots - first))
    acc, m, l = lax.fori_loop(jnp.maximum(lo, 0) // block, pl.cdiv(jnp.maximum(hi, 0), block), step, (acc, m, l))
    acc_ref[...] = acc
    max_ref[...] = m
    sum_ref[...] = l

  row = lambda b, h, s: (b,)
  cache_spec = pl.BlockSpec((None, None, slots, head_dim), lambda b, h, s: (b, h, 0, 0))
  held_spec = pl.BlockSpec((None, slots), lambda b, h, s: (b, 0))
  angle_spec = pl.BlockSpec((None, half), lambda b, h, s: (b, 0))
  in_specs = [pl.BlockSpec((None,), row), pl.BlockSpec((None,), row),
              pl.BlockSpec((None, all_heads, head_dim), lambda b, h, s: (b, 0, 0)), angle_spec, angle_spec,
              cache_spec, cache_spec, held_spec]
  # The partial results hold a power of two of splits (the merge reads them all at once; it masks the rest).
  partial = (batch, kv_heads, 1 << (splits - 1).bit_length(), rows)
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
    kwargs['compiler_params'] = pltriton.CompilerParams(num_warps=4, num_stages=2)
  acc, m, l, key, value, held = pl.pallas_call(
      kernel, grid=(batch, kv_heads, splits), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      input_output_aliases={5: 3, 6: 4, 7: 5}, interpret=interpret, name='decode_attention', **kwargs)(
          position.astype(jnp.int32), lowest.astype(jnp.int32), qkv, cos.astype(jnp.float32),
          sin.astype(jnp.float32), key, value, held.astype(jnp.int32))
  out = merge_splits(acc, m, l, splits=splits, group=group, dtype=dtype, interpret=interpret)
  return out, key, value, held


def merge_splits(acc: jax.Array, m: jax.Array, l: jax.Array, *, splits: int, group: int, dtype,
                 interpret: bool = False) -> jax.Array:
  """Merges the splits' partial results by their log-sum-exp weights, as one kernel (XLA takes three).

  acc: [batch, kv_heads, padded, rows, head_dim] float32, each split's unnormalized sum; m, l: [batch, kv_heads,
  padded, rows], its max score (base 2) and its sum of exponentials; the first `splits` of the `padded` (a
  power of two) and the first `group` rows are real. Split 0 always saw the new token, so every real row's max
  is finite. Returns [batch, kv_heads, group, head_dim] in `dtype`.
  """
  batch, kv_heads, padded, rows, head_dim = acc.shape
  chunk = min(head_dim, 32)  # head_dim columns a program merges
  real = lambda shape: ((lax.broadcasted_iota(jnp.int32, shape, 0) < splits)
                        & (lax.broadcasted_iota(jnp.int32, shape, 1) < group))

  def kernel(acc_ref, max_ref, sum_ref, out_ref):
    load = lambda ref, shape, other: pltriton.load(ref.at[tuple(pl.ds(0, n) for n in shape)],
                                                   mask=real(shape), other=other)
    maxes = load(max_ref, (padded, rows), -jnp.inf)
    top = maxes.max(axis=0)
    weight = jnp.exp2(maxes - jnp.where(top == -jnp.inf, 0.0, top)[None])  # masked entries: 0
    total = (load(sum_ref, (padded, rows), 0.0) * weight).sum(axis=0)
    sums = load(acc_ref, (padded, rows, chunk), 0.0)
    out = (sums * weight[:, :, None]).sum(axis=0) / jnp.where(total == 0, 1.0, total)[:, None]
    in_group = lax.broadcasted_iota(jnp.int32, (rows, chunk), 0) < group
    pltriton.store(out_ref.at[pl.ds(0, rows), :], out.astype(out_ref.dtype), mask=in_group)

  split_spec = pl.BlockSpec((None, None, padded, rows), lambda b, h, c: (b, h, 0, 0))
  kwargs = {}
  if not interpret:
    kwargs['compiler_params'] = pltriton.CompilerParams(num_warps=4, num_stages=1)
  return pl.pallas_call(
      kernel, grid=(batch, kv_heads, head_dim // chunk),
      in_specs=[pl.BlockSpec((None, None, padded, rows, chunk), lambda b, h, c: (b, h, 0, 0, c)), split_spec,
                split_spec],
      out_specs=pl.BlockSpec((None, None, group, chunk), lambda b, h, c: (b, h, 0, c)),
      out_shape=jax.ShapeDtypeStruct((batch, kv_heads, group, head_dim), dtype), interpret=interpret,
      name='decode_merge', **kwargs)(acc, m, l)
