"""What the flash attention dispatcher (`flash_gpu`) and its two kernel families (`flash_gpu_mosaic`,
`flash_gpu_triton`) share: tile sizes, the softmax's constants, and the block-range arithmetic that decides which
blocks a kernel loads and which it runs without a mask.

A leaf module, so that `flash_gpu` can import its backends and they this without an import circle. The ranges
follow `attention_contract.block_visibility`'s rule, block by block.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

LOG2E = math.log2(math.e)
# Masked scores are -inf. A row with no visible key in a block keeps a running max of -inf; kernels then
# subtract 0 instead (`safe_max`), so exp2 gives exact zeros. A large finite mask value is not safe: with
# the scale folded into an FMA, exp2(s * c - m) sees the rounding error of MASK * c, which can overflow.
MASK_VALUE = -math.inf


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes. Mosaic: `block_q` rows per consumer warpgroup (two per CTA); must be 64 there."""
  block_q: int = 64  # forward and dQ: query rows per warpgroup / program
  block_kv: int = 128  # forward: keys per pipeline step
  block_kv_dq: int = 64  # dQ: keys per pipeline step
  block_q_dkv: int = 64  # dK/dV: query rows per pipeline step
  block_kv_dkv: int = 64  # dK/dV: keys per warpgroup / program
  stages: int = 2  # Mosaic forward: pipeline depth (K/V slots) of the producer warpgroup
  stages_bwd: int = 3  # Mosaic dQ and dK/dV: pipeline depth (tuned on the H100: docs/attention_gpu.md)
  pingpong_bwd: bool = False  # Mosaic dQ and dK/dV: alternate the two warpgroups' matmuls (as the forward)

  def seq_multiple(self, backend: str) -> int:
    """Sequence lengths are padded to a multiple of this."""
    if backend == 'mosaic':
      blocks = (2 * self.block_q, self.block_kv, self.block_kv_dq, self.block_q_dkv, 2 * self.block_kv_dkv)
    else:
      blocks = (self.block_q, self.block_kv, self.block_kv_dq, self.block_q_dkv, self.block_kv_dkv)
    return math.lcm(*blocks)


INTERPRET_BLOCK_SIZES = BlockSizes(block_q=16, block_kv=16, block_kv_dq=16, block_q_dkv=16, block_kv_dkv=16)


# ----------------------------------------------------------------------------------------------------------
# Block ranges. Arguments are non-negative int32 scalars traced inside kernels; bounds that do not depend on
# them stay Python ints (see `fori`). `window=None` means plain causal. Sequence length is a multiple of
# every block size.


def _cdiv(a, b):
  return lax.div(a + (b - 1), b)


def _clip(x, lo, hi):
  return jnp.minimum(jnp.maximum(x, lo), hi)


def is_static(x) -> bool:
  return isinstance(x, int)


def fori(lo, hi, body, carry):
  """`lax.fori_loop` that drops loops with static, empty bounds (Mosaic GPU cannot lower empty scans)."""
  if is_static(lo) and is_static(hi) and lo >= hi:
    return carry
  return lax.fori_loop(lo, hi, body, carry)


def safe_max(m):
  """Running max to subtract inside exp2: 0 for rows that have seen no visible key yet (m = -inf)."""
  return jnp.where(m == -jnp.inf, 0.0, m)


def kv_block_range(q_start, q_rows: int, block_kv: int, window: int | None):
  """Key blocks [lo, hi) holding any key that query rows [q_start, q_start + q_rows) may see."""
  lo = 0 if window is None else lax.div(jnp.maximum(q_start - (window - 1), 0), block_kv)
  hi = _cdiv(q_start + q_rows, block_kv)
  return lo, hi


def kv_full_range(q_start, q_rows: int, block_kv: int, window: int | None, lo, hi):
  """Sub-range [f_lo, f_hi) of [lo, hi) whose every (query, key) pair is visible: no mask needed."""
  if window is None:
    f_lo = lo
  else:
    f_lo = _clip(_cdiv(jnp.maximum(q_start + q_rows - window, 0), block_kv), lo, hi)
  f_hi = _clip(lax.div(q_start + 1, block_kv), f_lo, hi)
  return f_lo, f_hi


def q_block_range(k_start, k_rows: int, block_q: int, window: int | None, num_q_blocks: int):
  """Query blocks [lo, hi) holding any query that sees a key in [k_start, k_start + k_rows)."""
  lo = lax.div(k_start, block_q)
  if window is None:
    hi = num_q_blocks
  else:
    hi = jnp.minimum(lax.div(k_start + (k_rows - 1) + (window - 1), block_q) + 1, num_q_blocks)
  return lo, hi


def q_full_range(k_start, k_rows: int, block_q: int, window: int | None, lo, hi):
  """Sub-range [f_lo, f_hi) of [lo, hi) whose every (query, key) pair is visible."""
  f_lo = _clip(_cdiv(k_start + (k_rows - 1), block_q), lo, hi)
  if window is None:
    f_hi = hi
  else:
    f_hi = _clip(lax.div(k_start + window, block_q), f_lo, hi)
  return f_lo, f_hi


def document_bounds(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(doc_start, doc_end) `[batch, seq]` int32: the first position of each token's document and one past its
  last, for rows whose documents are contiguous runs of non-decreasing ids (as packing gives, the kernel's
  -1 padding after them included).

  Other rows get bounds that skip nothing and put every block across documents: doc_start = -1 - position,
  doc_end = seq + 1 + position, so no two tokens share bounds and the kernels mask every pair.
  """
  seq = segment_ids.shape[1]
  ids = jnp.where(segment_ids < 0, jnp.iinfo(jnp.int32).max, segment_ids)  # padding: one last document
  pos = lax.broadcasted_iota(jnp.int32, ids.shape, 1)
  change = ids[:, 1:] != ids[:, :-1]
  first = jnp.concatenate([jnp.ones_like(change[:, :1]), change], axis=1)
  last = jnp.concatenate([change, jnp.ones_like(change[:, :1])], axis=1)
  doc_start = lax.cummax(jnp.where(first, pos, 0), axis=1)
  doc_end = lax.cummin(jnp.where(last, pos + 1, seq), axis=1, reverse=True)
  runs = jnp.all(ids[:, 1:] >= ids[:, :-1], axis=1, keepdims=True)
  return jnp.where(runs, doc_start, -1 - pos), jnp.where(runs, doc_end, seq + 1 + pos)


def kv_document_range(q_start, q_rows: int, block_kv: int, window: int | None, first_start, last_start):
  """(lo, hi, f_lo, f_hi) for query rows [q_start, q_start + q_rows) of packed documents, given the
  `document_bounds` doc_start of the first and last row: key blocks before the first row's document are
  skipped, and when all rows share one document, the fully visible blocks inside it need no mask."""
  lo, hi = kv_block_range(q_start, q_rows, block_kv, window)
  lo = jnp.maximum(lo, lax.div(jnp.maximum(first_start, 0), block_kv))
  f_lo, f_hi = kv_full_range(q_start, q_rows, block_kv, window, lo, hi)
  f_lo = _clip(jnp.maximum(f_lo, _cdiv(jnp.maximum(first_start, 0), block_kv)), lo, hi)
  f_hi = _clip(f_hi, f_lo, hi)
  one_doc = (first_start == last_start) & (first_start >= 0)  # negative: a row without contiguous documents
  return lo, hi, jnp.where(one_doc, f_lo, hi), jnp.where(one_doc, f_hi, hi)


def q_document_range(k_start, k_rows: int, block_q: int, window: int | None, num_q_blocks: int, first_end,
                     last_end):
  """(lo, hi, f_lo, f_hi) for keys [k_start, k_start + k_rows) of packed documents, given the
  `document_bounds` doc_end of the first and last key: query blocks after the last key's document are
  skipped, and when all keys share one document, the fully visible blocks inside it need no mask."""
  lo, hi = q_block_range(k_start, k_rows, block_q, window, num_q_blocks)
  hi = jnp.minimum(hi, _cdiv(last_end, block_q))
  f_lo, f_hi = q_full_range(k_start, k_rows, block_q, window, lo, hi)
  f_hi = _clip(jnp.minimum(f_hi, lax.div(first_end, block_q)), f_lo, hi)
  one_doc = (first_end == last_end) & (first_end <= num_q_blocks * block_q)  # beyond seq: no contiguous documents
  return lo, hi, jnp.where(one_doc, f_lo, hi), jnp.where(one_doc, f_hi, hi)


def kv_ranges(q_start, q_rows: int, block_kv: int, window: int | None, doc_starts=None):
  """(lo, hi, f_lo, f_hi): the key blocks of query rows [q_start, q_start + q_rows) and their unmasked middle.

  `doc_starts`: with packed documents, the `document_bounds` doc_start of the first and last row."""
  if doc_starts is not None:
    return kv_document_range(q_start, q_rows, block_kv, window, *doc_starts)
  lo, hi = kv_block_range(q_start, q_rows, block_kv, window)
  return (lo, hi) + tuple(kv_full_range(q_start, q_rows, block_kv, window, lo, hi))


def q_ranges(k_start, k_rows: int, block_q: int, window: int | None, num_q_blocks: int, doc_ends=None):
  """(lo, hi, f_lo, f_hi): the query blocks that see keys [k_start, k_start + k_rows) and their unmasked middle.

  `doc_ends`: with packed documents, the `document_bounds` doc_end of the first and last key."""
  if doc_ends is not None:
    return q_document_range(k_start, k_rows, block_q, window, num_q_blocks, *doc_ends)
  lo, hi = q_block_range(k_start, k_rows, block_q, window, num_q_blocks)
  return (lo, hi) + tuple(q_full_range(k_start, k_rows, block_q, window, lo, hi))


def chunk_q_ranges(k_start, k_rows: int, block_q: int, window: int | None, seq_blocks: int, q_offset,
                   chunk_blocks: int, doc_ends=None):
  """`q_ranges` for queries that are a chunk of the sequence (a query offset): the ranges over the whole
  sequence's `seq_blocks` query blocks, as block indices into the chunk of `chunk_blocks` blocks that starts at
  position `q_offset` (a multiple of block_q), clipped to it (blocks outside the chunk are skipped)."""
  ranges = q_ranges(k_start, k_rows, block_q, window, seq_blocks, doc_ends)
  first = lax.div(q_offset, block_q)
  return tuple(_clip(r - first, 0, chunk_blocks) for r in ranges)

def chunk_inputs(segment_ids, q_offset, q_len: int, doc_kind: int):
  """(query rows' ids, their `document_bounds` entry `doc_kind` (0: starts, 1: ends)) for queries that are rows
  q_offset .. of the sequence of `segment_ids` (q_offset: an int32 `[1]` array, or None: all rows)."""
  bounds = document_bounds(segment_ids)[doc_kind]
  if q_offset is None:
    return segment_ids, bounds
  cut = lambda x: lax.dynamic_slice_in_dim(x, q_offset[0], q_len, axis=1)
  return cut(segment_ids), cut(bounds)
