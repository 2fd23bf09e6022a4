"""Context parallelism's sequence layout: each sequence split over the `context` mesh axis in zig-zag order.

With N devices on the context axis (`mesh.context`, the mesh axes the rules give `activation_length`), a sequence
of S tokens is cut into 2N chunks of C = S / 2N tokens, and device i holds chunks i and 2N-1-i, in that order.
Under causal attention an early chunk's queries see few keys and a late chunk's many, so every device gets the
same amount of work (the chunk pairs' key counts add up to the same total).

The train step puts each batch into this order once (`zigzag_batch`: token ids, targets, weights, positions and
document ids alike); the loss is a sum over tokens, so the order does not change it. From there on the sequence
axis of every activation is in zig-zag order and split evenly over the context axis: token-wise layers (norms,
projections, MLP, the loss) run on each device's tokens as they are, and attention (`qwenjax.attention`)
all-gathers keys and values over the context axis and puts them back in sequence order.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from qwenjax import config as config_lib
from qwenjax import sharding


def check_seq_len(seq_len: int, shards: int) -> int:
  """The chunk length `seq_len / (2 * shards)`; a ValueError naming the fix when it does not divide."""
  if seq_len % (2 * shards):
    raise ValueError(config_lib.context_error(seq_len, shards))
  return seq_len // (2 * shards)


def chunk_order(shards: int) -> np.ndarray:
  """The sequence chunks in zig-zag order: `[0, 2N-1, 1, 2N-2, ..., N-1, N]` (device i holds places 2i, 2i+1)."""
  order = np.empty(2 * shards, np.int32)
  order[0::2] = np.arange(shards)
  order[1::2] = np.arange(2 * shards - 1, shards - 1, -1)
  return order


def _reorder(x, order, axis: int):
  """x's chunks along `axis` in `order` (numpy in, numpy out: the layout of host arrays stays a constant)."""
  chunk = x.shape[axis] // len(order)
  if isinstance(x, np.ndarray):
    return np.concatenate([np.take(x, np.arange(c * chunk, (c + 1) * chunk), axis=axis) for c in order], axis)
  return jnp.concatenate([jax.lax.slice_in_dim(x, c * chunk, (c + 1) * chunk, axis=axis) for c in order], axis)


def zigzag(x: jax.Array, shards: int, axis: int = 1) -> jax.Array:
  """x with its sequence axis (in sequence order) put into zig-zag order for `shards` devices."""
  check_seq_len(x.shape[axis], shards)
  return _reorder(x, chunk_order(shards), axis)


def unzigzag(x: jax.Array, shards: int, axis: int = 1) -> jax.Array:
  """The inverse of `zigzag`: a sequence axis in zig-zag order put back into sequence order."""
  check_seq_len(x.shape[axis], shards)
  return _reorder(x, np.argsort(chunk_order(shards)), axis)


def zigzag_positions(seq_len: int, shards: int) -> np.ndarray:
  """The sequence position of each place of the zig-zag order: `zigzag(arange(seq_len))`."""
  check_seq_len(seq_len, shards)
  return _reorder(np.arange(seq_len, dtype=np.int32), chunk_order(shards), 0)


def zigzag_batch(batch: Mapping[str, Any]) -> dict[str, jax.Array]:
  """The step's batch of `[batch, seq]` arrays (rows whole on their devices: `sharding.INPUT_AXES`) in zig-zag
  order, each device keeping its two chunks: cut locally inside a shard_map, so no token moves between devices.
  Rows without `positions` get their sequence positions (what the model assumes without them). To be called
  inside a step traced under the mesh and rules, with context parallelism on (`sharding.context_size() > 1`)."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = sharding.context_axes(mesh)
  shards = sharding.axes_size(mesh, axes)
  name = axes[0] if len(axes) == 1 else axes
  batch = dict(batch)
  rows, seq_len = batch['inputs'].shape
  chunk = check_seq_len(seq_len, shards)
  if 'positions' not in batch:
    batch['positions'] = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (rows, seq_len))
  row_axes = sharding.active_mesh_axes(('activation_batch',), mesh)[0]
  if rows % sharding.axes_size(mesh, row_axes):
    row_axes = ()

  def local(x):
    i = jax.lax.axis_index(name)
    early = jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)
    late = jax.lax.dynamic_slice_in_dim(x, (2 * shards - 1 - i) * chunk, chunk, axis=1)
    return jnp.concatenate([early, late], axis=1)

  spec = P(row_axes or None, None)
  return jax.shard_map(lambda b: jax.tree.map(local, b), mesh=mesh, in_specs=(spec,),
                       out_specs=P(row_axes or None, name), axis_names=set(sharding.free_axes(mesh)),
                       check_vma=False)(batch)
