"""Flash attention for NVIDIA GPUs in Pallas: causal, sliding window, grouped-query, packed documents.

`flash_attention(q, k, v, sliding_window=..., segment_ids=...)` computes the attention `attention_contract`
defines (a query at position q sees keys k with `q - sliding_window < k <= q`, inside its own document), with a
`jax.custom_vjp` whose backward pass is also a set of kernels.

Two kernel families share one blocked algorithm and the block-range arithmetic of `flash_gpu_common`:

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

A query offset (`q_offset`, context parallelism's chunks, `qwenjax.attention.context_attention`): the queries are
rows `q_offset ..` of the sequence whose keys, values and document ids are given whole. The offset is a traced
scalar the kernels read from memory (one compiled kernel serves every device's chunk); their block ranges and masks
work in sequence positions, so a chunk visits only the key blocks of its band. The dK/dV kernels run over every key
block of the sequence and skip those no query of the chunk sees.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from qwenjax import kernels
from qwenjax.kernels import attention_contract
from qwenjax.kernels.flash_gpu_common import INTERPRET_BLOCK_SIZES, BlockSizes

BACKENDS = ('mosaic', 'triton')


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
    q_offset: jax.Array | int | None = None,
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
    q_offset: None, or an int32 scalar (may be traced): q `[batch, q_len, ...]` holds the rows q_offset ..
      q_offset + q_len - 1 of the sequence of k, v and segment_ids (`[batch, seq]`). q_len, seq and q_offset
      must then be multiples of `chunk_multiple(...)`, and q_offset + q_len <= seq.
    interpret: run the blocked algorithm in the Pallas interpreter (CPU tests).
    backend: 'mosaic' (Hopper, bf16/fp16) or 'triton'; None picks by device and dtype.
    block_sizes: tile sizes; defaults suit the backend.

  Returns:
    `[batch, seq, q_heads, head_dim]` (q's length) in q's dtype. Softmax scale is `1/sqrt(head_dim)`.
  """
  if q_offset is None:
    attention_contract.check_inputs(q, k, v, sliding_window, segment_ids)
  else:  # check_inputs' rules for the whole sequence, and a chunk of it as q
    whole = jax.ShapeDtypeStruct(k.shape[:2] + q.shape[2:], q.dtype)
    attention_contract.check_inputs(whole, k, v, sliding_window, segment_ids)
    if q.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[1] > k.shape[1]:
      raise ValueError(f'with q_offset, q [b, q_len, h, d] must be a chunk of the sequence of k, v {k.shape}; '
                       f'got {q.shape}')
  seq_len, head_dim = k.shape[1], q.shape[3]
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
  if segment_ids is not None:
    segment_ids = segment_ids.astype(jnp.int32)
  config = _Config(backend=backend, window=sliding_window, blocks=block_sizes, interpret=bool(interpret))
  if q_offset is not None:
    if q.shape[1] % multiple or seq_len % multiple:
      raise ValueError(f'with q_offset, the chunk ({q.shape[1]} rows) and the sequence ({seq_len}) must be '
                       f'multiples of {multiple} (the kernels\' blocks: no padding inside a sequence)')
    return _attention(q, k, v, segment_ids, jnp.asarray(q_offset, jnp.int32).reshape(1), config)
  padded = -(-seq_len // multiple) * multiple
  if padded != seq_len:
    # Padded keys sit after every real query, so causality already hides them; padded queries are dropped.
    pad = ((0, 0), (0, padded - seq_len), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    if segment_ids is not None:
      segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padded - seq_len)), constant_values=-1)
  out = _attention(q, k, v, segment_ids, None, config)
  return out[:, :seq_len]


def chunk_multiple(dtype, head_dim: int, interpret: bool = False) -> int:
  """What the chunk length and the sequence must be multiples of for `flash_attention(..., q_offset=...)` with
  the default block sizes of the backend that would run."""
  if interpret:
    return INTERPRET_BLOCK_SIZES.seq_multiple('triton')
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  backend = 'mosaic' if half and head_dim % 64 == 0 else 'triton'  # what a GPU kernel picks, Hopper or not
  return max(BlockSizes().seq_multiple(backend), BlockSizes().seq_multiple('triton'))


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


def _batch_folded(fn, shared: int):
  """`fn(*arrays, config)`, whose arrays (or None) all lead with the batch axis but the one at position `shared`
  (the query offset, the same for every row), made so that `jax.vmap` folds the mapped axis into the batch: one
  kernel over K x batch rows rather than a grid axis jax adds per vmapped kernel. A group of training runs
  (`qwenjax.train.train_group`) vmaps the whole step over its members; inputs the members share (their
  segment_ids) are repeated for each."""

  @functools.lru_cache(maxsize=None)
  def for_config(config: _Config):
    @jax.custom_batching.custom_vmap
    def call(*arrays):
      return fn(*arrays, config)

    @call.def_vmap
    def rule(axis_size, in_batched, *arrays):
      def fold(i, x, batched):
        if x is None:
          return None
        if i == shared:
          if batched:
            raise NotImplementedError('a query offset that differs between vmapped members')
          return x
        x = x if batched else jnp.broadcast_to(x, (axis_size,) + x.shape)
        return x.reshape((axis_size * x.shape[1],) + x.shape[2:])

      out = call(*map(fold, range(len(arrays)), arrays, in_batched))
      unfold = lambda y: y.reshape((axis_size, y.shape[0] // axis_size) + y.shape[1:])
      return jax.tree.map(unfold, out), jax.tree.map(lambda _: True, out)

    return call

  return lambda *args: for_config(args[-1])(*args[:-1])


# The kernels sit behind jax.jit so that every layer's call site (unrolled layers, rematerialization) shares one
# traced and lowered kernel instead of compiling its own copy. `q_offset`: None, or an int32 `[1]` array.
@functools.partial(jax.jit, static_argnums=(5,))
def _forward_kernel(q, k, v, segment_ids, q_offset, config: _Config):
  impl = _kernels(config)
  return impl.forward(q, k, v, segment_ids, window=config.window, blocks=config.blocks,
                      interpret=config.interpret, **_offset(q_offset))


def _offset(q_offset) -> dict:
  """The kernels' keyword for a query offset; none without one, so their code is what it was without offsets."""
  return {} if q_offset is None else {'q_offset': q_offset}


_forward = _batch_folded(_forward_kernel, shared=4)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, segment_ids, q_offset, config: _Config):
  out, _ = _forward(q, k, v, segment_ids, q_offset, config)
  return out


def _attention_fwd(q, k, v, segment_ids, q_offset, config: _Config):
  out, lse = _forward(q, k, v, segment_ids, q_offset, config)
  # Named so that a remat policy can keep them (qwenjax.attention.forward_saveable) instead of rerunning this.
  out = checkpoint_name(out, 'attention_out')
  lse = checkpoint_name(lse, 'attention_lse')
  return out, (q, k, v, segment_ids, q_offset, out, lse)


@functools.partial(jax.jit, static_argnums=(8,))
def _backward_kernels(q, k, v, segment_ids, q_offset, d_out, out, lse, config: _Config):
  # delta = rowsum(dO * O): one fused XLA pass, laid out [batch, heads, seq] like lse.
  delta = jnp.einsum('bshd,bshd->bhs', d_out.astype(jnp.float32), out.astype(jnp.float32))
  return _kernels(config).backward(q, k, v, segment_ids, d_out.astype(q.dtype), lse, delta, window=config.window,
                                   blocks=config.blocks, interpret=config.interpret, **_offset(q_offset))


_backward = _batch_folded(_backward_kernels, shared=4)


def _attention_bwd(config: _Config, residuals, d_out):
  q, k, v, segment_ids, q_offset, out, lse = residuals
  dq, dk, dv = _backward(q, k, v, segment_ids, q_offset, d_out, out, lse, config)
  return dq, dk, dv, None, None  # no gradient for the document ids and the offset


_attention.defvjp(_attention_fwd, _attention_bwd)
