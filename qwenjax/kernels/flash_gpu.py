"""Flash attention for NVIDIA GPUs in Pallas: causal, sliding window, grouped-query, packed documents.

`flash_attention(q, k, v, sliding_window=..., segment_ids=...)` computes the attention `attention_contract`
defines (a query at position q sees keys k with `q - sliding_window < k <= q`, inside its own document), with a
`jax.custom_vjp` whose backward pass is also a set of kernels.

Two kernel families share one blocked algorithm and the block-range arithmetic below:

* `flash_gpu_mosaic`: Hopper (H100) kernels on the Mosaic GPU backend (TMA, wgmma, one producer warpgroup
  feeding two consumer warpgroups). Used for bf16/fp16 on compute capability 9.x.
* `flash_gpu_triton`: the same algorithm as plain `pallas_call`s that lower through the Triton backend (fp32
  inputs, other GPUs) and run in the generic Pallas interpreter on CPU (`interpret=True`). The Mosaic GPU
  interpreter of jax 0.10 cannot run these kernels (no transposed wgmma operands, no `run_state`), so CPU tests
  exercise the tiling, masking and block skipping through this family; see docs/attention_gpu.md.

Block skipping: for each query block only the key blocks that intersect the causal band (and the window) are
loaded and computed, so at a fixed window the cost grows linearly in the sequence length. Blocks entirely inside
the band run without a mask. The softmax works in base 2: the saved logsumexp is `log2(sum(exp2(s * c)))` with
`c = log2(e) / sqrt(head_dim)`.

Grouped-query attention never repeats K/V in memory: each query head's kernel instance reads its KV head, and the
dK/dV kernels loop over the query heads of a group, accumulating in registers.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from jax import lax

from qwenjax import kernels
from qwenjax.kernels import attention_contract

LOG2E = math.log2(math.e)
# Masked scores are -inf. A row with no visible key in a block keeps a running max of -inf; kernels then
# subtract 0 instead (`safe_max`), so exp2 gives exact zeros. A large finite mask value is not safe: with
# the scale folded into an FMA, exp2(s * c - m) sees the rounding error of MASK * c, which can overflow.
MASK_VALUE = -math.inf

BACKENDS = ('mosaic', 'triton')


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


# ----------------------------------------------------------------------------------------------------------
# Public entry point.


def _default_backend(dtype, head_dim: int) -> str:
  if kernels.target_platform() != 'gpu':
    raise ValueError(
        f'flash_gpu kernels need an NVIDIA GPU, but kernels are picked for {kernels.target_platform()!r}. '
        'Pass interpret=True to run them in the Pallas interpreter on CPU, or use another attention impl.')
  device = jax.devices()[0]
  # Lowering for a GPU from a machine without one (kernels.lowering_platform): assume the Hopper they target.
  hopper = kernels.is_hopper(device) if device.platform == 'gpu' else True
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if hopper and half and head_dim % 64 == 0:
    return 'mosaic'
  return 'triton'


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    sliding_window: int | None = None,
    segment_ids: jax.Array | None = None,
    interpret: bool = False,
    backend: str | None = None,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
  """Causal grouped-query flash attention with an optional sliding window and packed documents.

  Args:
    q: `[batch, seq, q_heads, head_dim]`, bf16, fp16 or fp32.
    k, v: `[batch, seq, kv_heads, head_dim]`, q's dtype; q_heads a multiple of kv_heads.
    sliding_window: a query sees the last `sliding_window` keys, itself included; None: all earlier keys.
    segment_ids: `[batch, seq]` int document ids; attention stays inside a document.
    interpret: run the blocked algorithm in the Pallas interpreter (CPU tests).
    backend: 'mosaic' (Hopper, bf16/fp16) or 'triton'; None picks by device and dtype.
    block_sizes: tile sizes; defaults suit the backend.

  Returns:
    `[batch, seq, q_heads, head_dim]` in q's dtype. Softmax scale is `1/sqrt(head_dim)`.
  """
  attention_contract.check_inputs(q, k, v, sliding_window, segment_ids)
  seq_len, head_dim = q.shape[1], q.shape[3]
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f'q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}. Cast them first.')
  if jnp.dtype(q.dtype) not in map(jnp.dtype, (jnp.bfloat16, jnp.float16, jnp.float32)):
    raise ValueError(f'flash_attention supports bf16, fp16 and fp32 inputs, got {q.dtype}')
  if head_dim not in (64, 128):
    raise ValueError(f'flash_attention supports head_dim 64 and 128, got {head_dim}; use impl="xla" instead')
  if sliding_window is not None:
    sliding_window = int(sliding_window)
    if sliding_window >= seq_len:
      sliding_window = None  # the window covers the whole causal band

  if interpret:
    backend = 'triton'
  elif backend is None:
    backend = _default_backend(q.dtype, head_dim)
  if backend not in BACKENDS:
    raise ValueError(f'unknown flash_gpu backend {backend!r}; choose one of {BACKENDS}')
  if backend == 'mosaic' and jnp.dtype(q.dtype) == jnp.dtype(jnp.float32):
    raise ValueError("backend='mosaic' needs bf16/fp16 inputs; fp32 runs on backend='triton'")
  if block_sizes is None:
    block_sizes = INTERPRET_BLOCK_SIZES if interpret else BlockSizes()

  multiple = block_sizes.seq_multiple(backend)
  padded = -(-seq_len // multiple) * multiple
  if segment_ids is not None:
    segment_ids = segment_ids.astype(jnp.int32)
  if padded != seq_len:
    # Padded keys sit after every real query, so causality already hides them; padded queries are dropped.
    pad = ((0, 0), (0, padded - seq_len), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    if segment_ids is not None:
      segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padded - seq_len)), constant_values=-1)
  config = _Config(backend=backend, window=sliding_window, blocks=block_sizes, interpret=bool(interpret))
  out = _attention(q, k, v, segment_ids, config)
  return out[:, :seq_len]


@dataclasses.dataclass(frozen=True)
class _Config:
  backend: str
  window: int | None
  blocks: BlockSizes
  interpret: bool


def _kernels(config: _Config):
  if config.backend == 'mosaic':
    from qwenjax.kernels import flash_gpu_mosaic as impl  # pylint: disable=g-import-not-at-top
  else:
    from qwenjax.kernels import flash_gpu_triton as impl  # pylint: disable=g-import-not-at-top
  return impl


# The kernels sit behind jax.jit so that every layer's call site (unrolled layers, rematerialization) shares one
# traced and lowered kernel instead of compiling its own copy.
@functools.partial(jax.jit, static_argnums=(4,))
def _forward(q, k, v, segment_ids, config: _Config):
  impl = _kernels(config)
  return impl.forward(q, k, v, segment_ids, window=config.window, blocks=config.blocks,
                      interpret=config.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segment_ids, config: _Config):
  out, _ = _forward(q, k, v, segment_ids, config)
  return out


def _attention_fwd(q, k, v, segment_ids, config: _Config):
  out, lse = _forward(q, k, v, segment_ids, config)
  # Named so that a remat policy can keep them (qwenjax.attention.forward_saveable) instead of rerunning this.
  out = checkpoint_name(out, 'attention_out')
  lse = checkpoint_name(lse, 'attention_lse')
  return out, (q, k, v, segment_ids, out, lse)


@functools.partial(jax.jit, static_argnums=(7,))
def _backward(q, k, v, segment_ids, d_out, out, lse, config: _Config):
  # delta = rowsum(dO * O): one fused XLA pass, laid out [batch, heads, seq] like lse.
  delta = jnp.einsum('bshd,bshd->bhs', d_out.astype(jnp.float32), out.astype(jnp.float32))
  return _kernels(config).backward(q, k, v, segment_ids, d_out.astype(q.dtype), lse, delta, window=config.window,
                                   blocks=config.blocks, interpret=config.interpret)


def _attention_bwd(config: _Config, residuals, d_out):
  q, k, v, segment_ids, out, lse = residuals
  dq, dk, dv = _backward(q, k, v, segment_ids, d_out, out, lse, config)
  d_seg = None
  return dq, dk, dv, d_seg


_attention.defvjp(_attention_fwd, _attention_bwd)
