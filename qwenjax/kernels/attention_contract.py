"""What every attention kernel computes and accepts: the input checks, the mask, and the count of visible pairs.

The mask, written once here and used by the XLA reference (`qwenjax.attention`), the splash wrapper
(`splash_tpu`) and the GPU kernels (`flash_gpu*`): a query at position q sees a key at position k when

    0 <= q - k < sliding_window        (no window: 0 <= q - k)

which is Hugging Face's `q - sliding_window < k <= q`, and, with packed documents, when both carry the same
segment id. The functions take Python ints, numpy arrays, jax arrays or values traced inside a kernel alike.

A leaf module: it imports nothing from qwenjax, so every kernel and `qwenjax.attention` can import it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_inputs(q, k, v, sliding_window: int | None, segment_ids) -> None:
  """Raises a ValueError naming the problem if the arguments are not those of a causal GQA attention."""
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
    raise ValueError(f'expected q [b, s, h, d] and k, v [b, s, kv_h, d]; got {q.shape}, {k.shape}, {v.shape}')
  if q.shape[2] % k.shape[2]:
    raise ValueError(f'q heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})')
  if sliding_window is not None and (int(sliding_window) != sliding_window or sliding_window < 1):
    raise ValueError(f'sliding_window must be a positive int or None, got {sliding_window}')
  if segment_ids is not None and segment_ids.shape != q.shape[:2]:
    raise ValueError(f'segment_ids must be [batch, seq] = {q.shape[:2]}, got {segment_ids.shape}')


def in_band(q_minus_k, window: int | None, offset=0):
  """True where `0 <= q_minus_k + offset < window`: the causal band, by distance from query to key.

  `offset` is a scalar added to every element of `q_minus_k` without materializing the sum, so a kernel can
  pass a tile's iota difference and its blocks' start difference (two scalar compares per element).
  """
  mask = q_minus_k >= -offset
  if window is not None:
    mask = mask & (q_minus_k < window - offset)
  return mask


def visible(q_pos, k_pos, window: int | None, q_seg=None, k_seg=None):
  """Whether query position `q_pos` sees key position `k_pos` (arrays broadcast, ids compared when given)."""
  mask = in_band(q_pos - k_pos, window)
  if q_seg is not None:
    mask = mask & (q_seg == k_seg)
  return mask


def first_visible(q_pos, window: int | None):
  """The earliest key position a query at `q_pos` sees (without a window 0; with one it may be negative, where
  no key is): for a kernel that reads a range of positions instead of evaluating `visible` on each."""
  if window is None:
    return jnp.zeros_like(q_pos)
  return q_pos - window + 1


def tile_visible(row, col, row_start, col_start, *, rows_are_queries: bool, window: int | None):
  """`visible` over a tile of a blocked kernel, from the tile's local row and column iotas and the first
  positions of its blocks; rows are queries, or keys in a backward kernel's transposed tile. Costs one iota
  difference and two scalar compares per element: positions are never materialized."""
  if rows_are_queries:
    return in_band(row - col, window, row_start - col_start)
  return in_band(col - row, window, col_start - row_start)


def block_visibility(q_first, q_last, k_first, k_last, window: int | None) -> tuple[Any, Any]:
  """(no pair visible, every pair visible) in the block of queries q_first..q_last and keys k_first..k_last
  (inclusive), ignoring documents: only its corners decide, so a blocked kernel skips or leaves unmasked
  whole blocks without evaluating them."""
  none = k_first > q_last  # every key after every query
  every = k_last <= q_first
  if window is not None:
    none = none | (q_first - k_last >= window)  # every key too old for every query
    every = every & (q_last - k_first < window)
  return none, every


def mask(seq_len: int, *, sliding_window: int | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
  """Boolean mask `[batch or 1, seq, seq]`: True where query (row) may see key (column)."""
  pos = jnp.arange(seq_len)
  dense = visible(pos[:, None], pos[None, :], sliding_window)[None]
  if segment_ids is not None:
    dense = dense & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return dense


def chunk_mask(q_offset, q_len: int, seq_len: int, *, sliding_window: int | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
  """`mask`'s rows q_offset .. q_offset + q_len - 1 (q_offset may be traced): `[batch or 1, q_len, seq_len]`,
  for a chunk of queries against the whole sequence of keys (context parallelism); `segment_ids [batch, seq_len]`
  are the whole sequence's."""
  q_pos = q_offset + jnp.arange(q_len)
  dense = visible(q_pos[:, None], jnp.arange(seq_len)[None, :], sliding_window)[None]
  if segment_ids is not None:
    q_ids = jax.lax.dynamic_slice_in_dim(segment_ids, q_offset, q_len, axis=1)
    dense = dense & (q_ids[:, :, None] == segment_ids[:, None, :])
  return dense


def band_pairs(seq_len: int, window: int | None) -> int:
  """Visible (query, key) pairs of one head over one document of `seq_len` tokens: the useful work."""
  if window is None or window >= seq_len:
    return seq_len * (seq_len + 1) // 2
  return window * (window + 1) // 2 + (seq_len - window) * window


def document_lengths(segment_ids: np.ndarray) -> np.ndarray:
  """The lengths of the runs of one id along each row of `[rows, seq]` `segment_ids`: the packed documents (a
  row's padding is one more run)."""
  segment_ids = np.asarray(segment_ids)
  starts = np.ones(segment_ids.shape, bool)
  starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
  return np.diff(np.append(np.flatnonzero(starts), segment_ids.size))


def documents_band_pairs(lengths: np.ndarray, window: int | None) -> int:
  """`band_pairs` summed over documents of these `lengths`, each attending only within itself (at once: a host
  computes it for every training step)."""
  lengths = np.asarray(lengths, np.int64)
  seen = lengths if window is None else np.minimum(lengths, window)  # the first `seen` queries see 1.. keys
  return int(np.sum(seen * (seen + 1) // 2 + (lengths - seen) * seen))
