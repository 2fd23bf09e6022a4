"""Causal and sliding-window attention on TPU through JAX's splash attention kernel.

`jax.experimental.pallas.ops.tpu.splash_attention` already has what we need: a flash-attention forward and a
custom_vjp backward (separate dq and dk/dv kernels), grouped-query heads (k, v `[kv_heads, seq, head_dim]`),
segment ids, and block-sparse masks whose fully-masked blocks are never loaded or computed. This module only
adapts it to the model's layout and semantics:

* layout: the model's `[batch, seq, heads, head_dim]` becomes splash's `[heads, seq, head_dim]`, vmapped over batch;
* scale: splash does not scale q, so q is multiplied by 1/sqrt(head_dim) first;
* mask: `BandMask`, splash's `LocalMask` with window `(window - 1, 0)` (Hugging Face's `q - window < k <= q`;
  `(None, 0)` is plain causal) whose host-side block metadata is built in O(blocks), not O(seq_len^2);
* lengths: the sequence is padded to a multiple of the block size. Causality keeps every real query away from
  the padding keys, and every padded query row keeps at least its own key (an empty row would be 0/0 in the
  softmax); with segment ids the padding gets an id of its own;
* caching: building a mask's block metadata is host-side numpy work, so kernels are cached by
  (heads, padded length, window, block sizes, interpret).

Context parallelism (`splash_attention_zigzag`, called per device by `qwenjax.attention.context_attention`): the
queries are the device's two chunks of the zig-zag order (`qwenjax.context`), the keys the whole sequence. The
mask is `BandMask` over the zig-zag query order (splash's `q_sequence`: each query row's position, given by the
caller), built with splash's own `q_seq_shards`, so each device's block metadata skips exactly the blocks outside
its chunks' bands; the device takes its share of that metadata by its index on the context axes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from qwenjax.kernels import attention_contract

# Splash's kv blocks must be multiples of the TPU lane width.
LANES = 128
# Largest block used by default: big enough to keep the MXU busy, small enough that a 4096-token window still
# skips most blocks. Not tuned on a TPU (none was available): see docs/attention_tpu.md.
MAX_BLOCK = 512


def default_block_sizes(seq_len: int) -> splash.BlockSizes:
  """One square block size for the forward and both backward kernels: min(512, seq_len rounded up to 128)."""
  block = min(MAX_BLOCK, _round_up(seq_len, LANES))
  return splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _block_multiple(block_sizes: splash.BlockSizes) -> int:
  sizes = [block_sizes.block_q, block_sizes.block_kv, block_sizes.block_q_dkv, block_sizes.block_kv_dkv,
           block_sizes.block_q_dq, block_sizes.block_kv_dq]
  return math.lcm(*[s for s in sizes if s])


class BandMask(splash.LocalMask):
  """Causal mask with an optional window (`q - window < k <= q`) that answers whole blocks in O(1).

  Splash builds its block metadata on the host by evaluating the mask on every (q block, kv block) pair, for
  the forward, dq and dkv kernels: O(seq_len^2) numpy work, seconds to minutes at long sequences with the
  stock `LocalMask` (timings in docs/attention_tpu.md). Blocks wholly inside or outside the band
  (`attention_contract.block_visibility`) are constant, so they come back as broadcast scalars with O(1)
  `any()`/`all()`; only the partial blocks along the band's edges are evaluated. The metadata is identical
  (tests/test_attention.py), and the kernel uses the inherited `mask_function`, so the TPU runs exactly
  `LocalMask`.
  """

  def __init__(self, seq_len: int, sliding_window: int | None, q_positions: np.ndarray | None = None):
    """`q_positions`: each query row's position in the sequence (splash's `q_sequence`; default: row i is at i),
    e.g. the zig-zag order of context parallelism."""
    self.sliding_window = None if sliding_window is None or sliding_window >= seq_len else sliding_window
    left = None if self.sliding_window is None else self.sliding_window - 1
    rows = seq_len if q_positions is None else len(q_positions)
    super().__init__((rows, seq_len), window_size=(left, 0), offset=0)
    if q_positions is not None:
      self.q_sequence = np.asarray(q_positions, np.int32)
    # Runs of consecutive positions: rows q0..q1-1 are positions q_sequence[q0] + 0, 1, ... when no run breaks.
    self._runs = np.concatenate([[0], np.cumsum(np.diff(self.q_sequence) != 1)])

  def __getitem__(self, idx):
    q_slice, kv_slice = idx
    if isinstance(q_slice, slice) and isinstance(kv_slice, slice):
      q0, q1, _ = q_slice.indices(self.shape[0])
      k0, k1, _ = kv_slice.indices(self.shape[1])
      shape = (q1 - q0, k1 - k0)
      if q1 > q0 and k1 > k0 and self._runs[q0] == self._runs[q1 - 1]:
        first, last = int(self.q_sequence[q0]), int(self.q_sequence[q1 - 1])
        none, every = attention_contract.block_visibility(first, last, k0, k1 - 1, self.sliding_window)
        if none or every:
          return _ConstantBlock.of(bool(every), shape)
    return super().__getitem__(idx)


class _ConstantBlock(np.ndarray):
  """A read-only block of one boolean value whose whole-array `any()` / `all()` cost O(1), not O(block)."""

  @classmethod
  def of(cls, value: bool, shape: tuple[int, int]) -> '_ConstantBlock':
    return np.broadcast_to(np.bool_(value), shape).view(cls)

  def any(self, *args, **kwargs):
    if args or kwargs or not self.size:
      return super().any(*args, **kwargs)
    return bool(self.flat[0])

  def all(self, *args, **kwargs):
    if args or kwargs or not self.size:
      return super().all(*args, **kwargs)
    return bool(self.flat[0])


@functools.lru_cache(maxsize=32)
def _kernel(num_heads: int, seq_len: int, sliding_window: int | None, block_sizes: splash.BlockSizes,
            interpret: bool, shards: int = 1, q_positions: bytes | None = None
            ) -> splash.splash_attention_kernel.SplashAttentionKernel:
  """Splash kernel for `num_heads` query heads sharing one causal (or local) mask over `seq_len` positions;
  with `shards` > 1 the query rows are at `q_positions` (int32 bytes: hashable, for the cache), and the metadata
  is built per query shard (splash's `q_seq_shards`; take a shard's with `_shard_of`)."""
  positions = None if q_positions is None else np.frombuffer(q_positions, np.int32)
  mask = BandMask(seq_len, sliding_window, positions)
  # The kernel's mask metadata becomes jnp arrays: build them concretely even when called under jit, so the
  # cached kernel never holds a tracer.
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mha(
        splash.MultiHeadMask([mask] * num_heads), block_sizes=block_sizes, head_shards=1, q_seq_shards=shards,
        interpret=interpret)


def _shard_of(kernel, shard, shards: int):
  """The kernel of query shard `shard` (may be traced) of a kernel built with `q_seq_shards=shards`: its mask
  metadata cut along the query axis, as `SplashAttentionKernel.manual_sharding_spec` would give it to a
  shard_map over the query sequence."""
  def cut(info):
    if info is None:
      return None

    def along(x, axis):
      if x is None:
        return None
      size = x.shape[axis] // shards
      return jax.lax.dynamic_slice_in_dim(x, shard * size, size, axis)

    return info._replace(data_next=along(info.data_next, 1), mask_next=along(info.mask_next, 1),
                         block_mask=along(info.block_mask, 1), q_sequence=along(info.q_sequence, 0))

  return type(kernel)(cut(kernel.fwd_mask_info), cut(kernel.dq_mask_info), cut(kernel.dkv_mask_info),
                      **kernel.kwargs)


def chunk_block_sizes(chunk: int) -> splash.BlockSizes:
  """Square blocks for context parallelism's chunks of `chunk` tokens (a multiple of 128): the largest of
  512, 256, 128 that divides the chunk, so no block straddles two chunks."""
  block = next(b for b in (MAX_BLOCK, 256, LANES) if chunk % b == 0)
  return splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    sliding_window: int | None = None,
    segment_ids: jax.Array | None = None,
    interpret: bool = False,
    block_sizes: splash.BlockSizes | None = None,
) -> jax.Array:
  """Causal grouped-query attention as `attention_contract` defines it.

  Args:
    q: `[batch, seq, q_heads, head_dim]`.
    k, v: `[batch, seq, kv_heads, head_dim]`; q_heads must be a multiple of kv_heads.
    sliding_window: a query sees the last `sliding_window` keys, itself included (None: all earlier keys).
    segment_ids: `[batch, seq]` int document ids; attention stays inside a document.
    interpret: run the Pallas kernels in the interpreter (on CPU, for tests).
    block_sizes: splash block sizes (all set, backward included); default `default_block_sizes(seq)`.

  Returns:
    `[batch, seq, q_heads, head_dim]` in q's dtype.
  """
  attention_contract.check_inputs(q, k, v, sliding_window, segment_ids)
  _, seq_len, num_heads, head_dim = q.shape
  if k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f'splash attention needs q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}')
  block_sizes = block_sizes or default_block_sizes(seq_len)
  if not block_sizes.has_backward_blocks:
    raise ValueError('block_sizes must set the backward blocks (block_q_dkv, block_kv_dkv, block_q_dq, ...): '
                     'splash cannot differentiate without them; see default_block_sizes')
  padded = _round_up(seq_len, _block_multiple(block_sizes))
  pad = padded - seq_len

  # Splash takes q unscaled; scale in float32, then back to q's dtype.
  q = (q.astype(jnp.float32) * head_dim**-0.5).astype(q.dtype)
  # [batch, seq, heads, dim] -> [batch, heads, seq, dim], padded along seq.
  q, k, v = (jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (q, k, v))
  if segment_ids is not None:
    # Padding is its own document: real queries never reach it anyway (it lies in their future), and each
    # padded query keeps at least itself. Without segment ids causality alone does both.
    segment_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)),
                          constant_values=jnp.iinfo(jnp.int32).min)

  kernel = _kernel(num_heads, padded, sliding_window, block_sizes, interpret)

  def one_row(q, k, v, ids):
    return kernel(q, k, v, segment_ids=None if ids is None else splash.SegmentIds(q=ids, kv=ids))

  out = jax.vmap(one_row)(q, k, v, segment_ids)
  return out[:, :, :seq_len].transpose(0, 2, 1, 3)


def splash_attention_zigzag(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: np.ndarray,
    shard,
    shards: int,
    sliding_window: int | None = None,
    q_segment_ids: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    interpret: bool = False,
) -> jax.Array:
  """One device's attention under context parallelism (inside a shard_map over the context axes).

  Args:
    q: `[batch, 2 * chunk, q_heads, head_dim]`: this device's two chunks of the zig-zag order (`qwenjax.context`).
    k, v: `[batch, seq, kv_heads, head_dim]`: the whole sequence, in sequence order (all-gathered).
    q_positions: `[seq]` (numpy) the position of every place of the zig-zag order, all devices' queries.
    shard: this device's index on the context axes (traced); shards: their size; seq = 2 * shards * chunk and
      chunk a multiple of 128.
    sliding_window: as `splash_attention`.
    q_segment_ids: `[batch, 2 * chunk]` document ids of this device's queries; segment_ids: `[batch, seq]` of the
      whole sequence (both or neither).
    interpret: run the Pallas kernels in the interpreter (on CPU, for tests).

  Returns:
    `[batch, 2 * chunk, q_heads, head_dim]` in q's dtype.
  """
  _, rows, num_heads, head_dim = q.shape
  seq_len = k.shape[1]
  chunk = seq_len // (2 * shards)
  if rows != 2 * chunk or chunk % LANES or len(q_positions) != seq_len:
    raise ValueError(f'splash under context parallelism needs q of this device\'s 2 chunks of a multiple of '
                     f'{LANES} tokens each; got {rows} rows of a {seq_len}-token sequence over {shards} shards')
  if k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f'splash attention needs q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}')
  positions = np.asarray(q_positions, np.int32).tobytes()
  kernel = _kernel(num_heads, seq_len, sliding_window, chunk_block_sizes(chunk), interpret, shards, positions)
  kernel = _shard_of(kernel, shard, shards)
  q = (q.astype(jnp.float32) * head_dim**-0.5).astype(q.dtype)
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))

  def one_row(q, k, v, q_ids, ids):
    return kernel(q, k, v, segment_ids=None if ids is None else splash.SegmentIds(q=q_ids, kv=ids))

  ids = None if segment_ids is None else segment_ids.astype(jnp.int32)
  q_ids = None if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
  return jax.vmap(one_row)(q, k, v, q_ids, ids).transpose(0, 2, 1, 3)
