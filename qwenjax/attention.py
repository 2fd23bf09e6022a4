"""Causal attention with grouped-query heads, sliding windows and packed documents.

One entry point, `dot_product_attention`, picks an implementation:

* `'xla'`: the reference, plain einsums and an explicit mask. Runs everywhere.
* `'cudnn'`: `jax.nn.dot_product_attention(implementation='cudnn')`, fused on NVIDIA GPUs.
* `'pallas_tpu'`: JAX's splash attention kernel (`qwenjax.kernels.splash_tpu`).
* `'pallas_gpu'`: our Mosaic GPU flash attention (`qwenjax.kernels.flash_gpu`).
* `'pallas'`: the Pallas kernel of the target platform; `'auto'`: Pallas on TPU and GPU, XLA elsewhere.

`interpret=True` runs a Pallas kernel in its interpreter, so both run on a CPU (slowly; for tests).
Pallas calls cannot be partitioned by XLA, so under a multi-device mesh (`jax.set_mesh`) they run inside a
`jax.shard_map` over the mesh axes that the active Flax logical axis rules give to batch and heads.

Context parallelism (the rules split `activation_length` over mesh axes, `mesh.context`): each device holds two
chunks of every sequence in the zig-zag order of `qwenjax.context`. `context_attention` all-gathers keys, values
and document ids over the context axes, puts them in sequence order, and lets each of the device's two query
chunks attend to the whole sequence through the kernel: `'xla'` and the GPU kernel take the chunk's first
position as a query offset; splash (TPU) takes the device's share of a mask over the zig-zag query order. In
the backward pass the all-gather's transpose reduce-scatters the key and value gradients. `'cudnn'` has no such
input and is refused.

Masking follows Hugging Face: a query at position q sees keys k with `q - sliding_window < k <= q` (no
window: `k <= q`), and only keys of its own document when `segment_ids` are given. That contract (mask, input
checks, visible-pair count) is defined once, in `qwenjax.kernels.attention_contract`, for every kernel.

Kernels are picked for `qwenjax.kernels.target_platform()`: this machine, or the platform named by
`qwenjax.kernels.lowering_platform(...)` while tracing a program to export for another one.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qwenjax import context
from qwenjax import kernels
from qwenjax import sharding
from qwenjax.kernels import attention_contract
from qwenjax.model_config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS

# Logical axis names the model gives attention's inputs (see qwenjax.model.Attention).
Q_AXES = ('activation_batch', 'activation_length', 'activation_heads', 'activation_head_dim')
KV_AXES = ('activation_batch', 'activation_length', 'activation_kv_heads', 'activation_head_dim')


def xla_attention(q, k, v, *, sliding_window=None, segment_ids=None, q_offset=None):
  """Reference attention. Keys and values are never repeated per query head.

  q: [batch, seq, q_heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim].
  Softmax runs in float32; the output has q's dtype.
  `q_offset` (an int, may be traced): q holds the rows q_offset, q_offset + 1, ... of the sequence whose keys,
  values and `segment_ids` are given whole (context parallelism's chunks).
  """
  batch, seq_len, q_heads, head_dim = q.shape
  kv_heads = k.shape[2]
  groups = q_heads // kv_heads
  q = q.reshape(batch, seq_len, kv_heads, groups, head_dim)
  scores = jnp.einsum('bqkgd,bskd->bkgqs', q, k, preferred_element_type=jnp.float32)
  scores *= head_dim**-0.5
  if q_offset is None:
    mask = attention_contract.mask(seq_len, sliding_window=sliding_window, segment_ids=segment_ids)
  else:
    mask = attention_contract.chunk_mask(q_offset, seq_len, k.shape[1], sliding_window=sliding_window,
                                         segment_ids=segment_ids)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum('bkgqs,bskd->bqkgd', probs, v)
  return out.reshape(batch, seq_len, q_heads, head_dim)


def cudnn_attention(q, k, v, *, sliding_window=None, segment_ids=None):
  """cuDNN flash attention (GPU only, bf16/fp16, head_dim a multiple of 8 up to 256)."""
  if segment_ids is not None:
    raise ValueError(
        "attention impl 'cudnn' cannot mask packed documents (segment_ids): jax has no public "
        "cuDNN path for them. Use attention_impl='xla' or 'pallas', or feed "
        'unpacked rows without segment_ids.')
  # A window without is_causal=True silently attends to the future (see docs): always causal.
  window = None if sliding_window is None else (sliding_window - 1, 0)
  return jax.nn.dot_product_attention(
      q, k, v, is_causal=True, local_window_size=window, implementation='cudnn')


# Forward outputs a backward pass needs (output, logsumexp): cuDNN's fused-attention primitives by name, and
# what our Pallas GPU kernel names with `checkpoint_name`.
_CUDNN_FORWARD_PRIMITIVES = frozenset({'dot_product_attention_fwd', 'dot_product_attention_fwd_wrapper'})
_SAVED_NAMES = frozenset({'attention_out', 'attention_lse'})


def forward_saveable(prim, *_, **params) -> bool:
  """Remat policy: keep the attention kernels' forward outputs, so a rematerialized layer's backward pass
  does not run the attention forward a second time (costs one `[batch, seq, heads, head_dim]` output and a
  float32 `[batch, heads, seq]` logsumexp per layer)."""
  if prim.name in _CUDNN_FORWARD_PRIMITIVES:
    return True
  return prim.name == 'name' and params.get('name') in _SAVED_NAMES  # a `checkpoint_name` value


def resolve_impl(impl: str, interpret: bool = False) -> str:
  """The concrete kernel ('xla', 'cudnn', 'pallas_tpu' or 'pallas_gpu') that `impl` means on the target platform.

  The target is `qwenjax.kernels.target_platform()`: this machine's backend, or the platform a program is being
  traced for inside `qwenjax.kernels.lowering_platform(...)` (e.g. exporting the TPU kernels from a CPU host).
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'unknown attention impl {impl!r}; choose one of {IMPLEMENTATIONS}')
  platform = kernels.target_platform()
  pallas_kernel = {'tpu': 'pallas_tpu', 'gpu': 'pallas_gpu'}.get(platform)
  if impl == 'auto':
    return pallas_kernel or 'xla'
  if impl == 'pallas':
    if pallas_kernel:
      return pallas_kernel
    if interpret:
      return 'pallas_tpu'  # the CPU stand-in: splash runs fine in the interpreter
    raise ValueError(
        f"attention impl 'pallas' has no kernel for the {platform!r} platform. Pass interpret=True (model: "
        "attention_interpret=True) to run a Pallas kernel in its interpreter, or use 'xla' or 'auto'.")
  needed = {'pallas_tpu': 'tpu', 'pallas_gpu': 'gpu'}.get(impl)
  if needed and not interpret and platform != needed:
    raise ValueError(
        f'attention impl {impl!r} needs a {needed.upper()} but kernels are picked for {platform!r}. Pass '
        f"interpret=True to run it in the Pallas interpreter, or use 'auto'; to lower it for a {needed.upper()} "
        f"from this machine (jax.export), trace inside qwenjax.kernels.lowering_platform({needed!r}).")
  return impl


def _pallas_kernel(impl: str, sliding_window, interpret) -> Callable:
  """kernel(q, k, v, segment_ids) for one device; imports lazily so one backend's kernel never breaks another."""
  if impl == 'pallas_tpu':
    from qwenjax.kernels import splash_tpu  # pylint: disable=g-import-not-at-top
    fn = splash_tpu.splash_attention
  else:
    from qwenjax.kernels import flash_gpu  # pylint: disable=g-import-not-at-top
    fn = flash_gpu.flash_attention
  return lambda q, k, v, ids: fn(q, k, v, sliding_window=sliding_window, segment_ids=ids, interpret=interpret)


def shard_kernel(kernel: Callable, q, k, v, segment_ids):
  """Runs `kernel(q, k, v, segment_ids)` per device under the active mesh, split over batch and heads.

  With no mesh (or one device) the kernel runs as is. Otherwise batch and query heads are split over the mesh
  axes the logical rules give `activation_batch` and `activation_heads`; k and v follow the query heads when
  `activation_kv_heads` maps to the same axes and divides evenly, else they are replicated and each device
  takes the kv heads its query heads use. Sequence and head_dim must stay whole.
  """
  return _per_device(kernel, q, k, v, segment_ids, split_length=False)


def _per_device(body: Callable, q, k, v, segment_ids, *, split_length: bool):
  """`body(q, k, v, segment_ids)` inside a shard_map over the active mesh's free axes (see `shard_kernel`); with
  `split_length` the sequence stays split over the axes of `activation_length` (context parallelism)."""
  mesh = jax.sharding.get_abstract_mesh()
  free = sharding.free_axes(mesh)
  if not free:
    return body(q, k, v, segment_ids)
  batch_axes, length_axes, head_axes, dim_axes = sharding.active_mesh_axes(Q_AXES, mesh)
  kv_head_axes = sharding.active_mesh_axes(KV_AXES, mesh)[2]
  whole = [('activation_head_dim', dim_axes)] + ([] if split_length else [('activation_length', length_axes)])
  for name, axes in whole:
    if sharding.axes_size(mesh, axes) > 1:
      raise ValueError(
          f'Pallas attention needs whole sequences and head dims on each device, but the logical axis rules '
          f'shard {name} over mesh axes {axes}. Map {name} to None in the rules (or use attention_impl="xla").')
  batch, _, q_heads, _ = q.shape
  kv_heads = k.shape[2]
  n_batch, n_heads = sharding.axes_size(mesh, batch_axes), sharding.axes_size(mesh, head_axes)
  if batch % n_batch or q_heads % n_heads:
    what = 'Context-parallel attention' if split_length else 'Pallas attention'
    raise ValueError(
        f'{what} splits batch ({batch}) over mesh axes {batch_axes} (size {n_batch}) and query heads '
        f'({q_heads}) over {head_axes} (size {n_heads}); both must divide evenly. Change the mesh or the rules '
        'for activation_batch / activation_heads.')
  kv_split = kv_head_axes == head_axes and kv_heads % n_heads == 0
  local_heads = q_heads // n_heads
  groups = q_heads // kv_heads

  def local(q, k, v, ids):
    if not kv_split and n_heads > 1:
      first = jax.lax.axis_index(head_axes) * local_heads  # first global query head on this device
      if local_heads % groups == 0 or groups % local_heads == 0:  # whole kv heads (or one) serve this device
        k, v = (jax.lax.dynamic_slice_in_dim(x, first // groups, max(1, local_heads // groups), axis=2)
                for x in (k, v))
      else:  # query heads straddle kv heads: give each query head its own copy
        index = (first + jnp.arange(local_heads)) // groups
        k, v = (jnp.take(x, index, axis=2) for x in (k, v))
    return body(q, k, v, ids)

  batch_spec = batch_axes or None
  head_spec = head_axes or None
  length_spec = (length_axes or None) if split_length else None
  q_spec = P(batch_spec, length_spec, head_spec, None)
  kv_spec = P(batch_spec, length_spec, head_spec if kv_split else None, None)
  ids_spec = None if segment_ids is None else P(batch_spec, length_spec)
  in_specs = (q_spec, kv_spec, kv_spec, ids_spec)
  args = [_reshard_explicit(x, spec, mesh) for x, spec in zip((q, k, v, segment_ids), in_specs)]
  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=q_spec, axis_names=set(free),
                       check_vma=False)(*args)


def context_attention(q, k, v, *, sliding_window=None, segment_ids=None, impl: str = 'xla',
                      interpret: bool = False):
  """Attention over sequences split over the context axes in zig-zag order (`qwenjax.context`).

  Per device and layer: one all-gather of k and v (and of the document ids) over the context axes, a local
  reorder into sequence order, then the kernel for the device's two query chunks against the whole sequence
  (each skips the key blocks outside its causal band or window). Its gradient reduce-scatters dk and dv back.
  `impl` is a resolved kernel name (`resolve_impl`).
  """
  mesh = jax.sharding.get_abstract_mesh()
  axes = sharding.context_axes(mesh)
  shards = sharding.axes_size(mesh, axes)
  chunk = context.check_seq_len(q.shape[1], shards)
  if impl == 'cudnn':
    raise ValueError("attention impl 'cudnn' cannot run under context parallelism (mesh.context > 1): jax has "
                     "no public cuDNN input for a query chunk's offset. Use attention_impl='pallas' (or 'auto').")
  if impl == 'pallas_gpu':
    from qwenjax.kernels import flash_gpu  # pylint: disable=g-import-not-at-top
    multiple = flash_gpu.chunk_multiple(q.dtype, q.shape[3], interpret)
    if chunk % multiple:
      raise ValueError(
          f'context parallelism with the Pallas GPU kernel needs chunks (seq_len / (2 x context) = {chunk} '
          f'tokens) of a multiple of {multiple} tokens: use a data.seq_len that is a multiple of '
          f'{2 * shards * multiple}, or attention_impl="xla".')
  if impl == 'pallas_tpu':
    from qwenjax.kernels import splash_tpu  # pylint: disable=g-import-not-at-top
    if chunk % splash_tpu.LANES:
      raise ValueError(
          f'context parallelism with the splash kernel needs chunks (seq_len / (2 x context) = {chunk} tokens) '
          f'of a multiple of {splash_tpu.LANES} tokens: use a data.seq_len that is a multiple of '
          f'{2 * shards * splash_tpu.LANES}, or attention_impl="xla".')
  name = axes[0] if len(axes) == 1 else axes

  def gather(x):  # [batch, 2 * chunk, ...] of each device -> [batch, seq, ...] in sequence order
    return context.unzigzag(jax.lax.all_gather(x, name, axis=1, tiled=True), shards)

  def body(q, k, v, ids):
    shard = jax.lax.axis_index(name)
    k_all, v_all = gather(k), gather(v)
    ids_all = None if ids is None else gather(ids)
    if impl == 'pallas_tpu':
      return splash_tpu.splash_attention_zigzag(
          q, k_all, v_all, q_positions=context.zigzag_positions(q.shape[1] * shards, shards), shard=shard,
          shards=shards, sliding_window=sliding_window, q_segment_ids=ids, segment_ids=ids_all, interpret=interpret)

    def attend(rows, place):  # the device's chunk `place` (0: early, 1: late) of the zig-zag order
      q_offset = (shard if place == 0 else 2 * shards - 1 - shard) * chunk
      if impl == 'xla':
        return xla_attention(rows, k_all, v_all, sliding_window=sliding_window, segment_ids=ids_all,
                             q_offset=q_offset)
      return flash_gpu.flash_attention(rows, k_all, v_all, sliding_window=sliding_window, segment_ids=ids_all,
                                       q_offset=q_offset, interpret=interpret)

    return jnp.concatenate([attend(q[:, :chunk], 0), attend(q[:, chunk:], 1)], axis=1)

  return _per_device(body, q, k, v, segment_ids, split_length=True)


def _reshard_explicit(x, spec, mesh):
  """Moves x to `spec` along the mesh's Explicit axes (shard_map reshards Auto axes itself, Explicit ones not)."""
  explicit = set(mesh.explicit_axes)
  if x is None or not explicit:
    return x
  entries = []
  for entry in spec:
    axes = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a in explicit)
    entries.append(axes or None)
  return jax.reshard(x, P(*entries))


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    sliding_window: int | None = None,
    segment_ids: jax.Array | None = None,
    impl: str = 'xla',
    interpret: bool = False,
) -> jax.Array:
  """Causal grouped-query attention.

  Args:
    q: `[batch, seq, q_heads, head_dim]`.
    k, v: `[batch, seq, kv_heads, head_dim]`; q_heads must be a multiple of kv_heads.
    sliding_window: if set, a query sees only the last `sliding_window` keys (itself included).
    segment_ids: `[batch, seq]` int document ids of packed rows; attention stays inside a document.
    impl: one of `IMPLEMENTATIONS`.
    interpret: run a Pallas kernel in the Pallas interpreter (CPU tests); ignored by 'xla' and 'cudnn'.

  Returns:
    `[batch, seq, q_heads, head_dim]` in q's dtype.
  """
  attention_contract.check_inputs(q, k, v, sliding_window, segment_ids)
  impl = resolve_impl(impl, interpret)
  if sharding.context_axes():  # the sequence is split over devices (zig-zag): every impl goes through here
    return context_attention(q, k, v, sliding_window=sliding_window, segment_ids=segment_ids, impl=impl,
                             interpret=interpret)
  if impl == 'xla':
    return xla_attention(q, k, v, sliding_window=sliding_window, segment_ids=segment_ids)
  if impl == 'cudnn':
    return cudnn_attention(q, k, v, sliding_window=sliding_window, segment_ids=segment_ids)
  return shard_kernel(_pallas_kernel(impl, sliding_window, interpret), q, k, v, segment_ids)
