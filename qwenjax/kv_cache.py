"""The KV cache of decoding, and a decode step's attention over it.

Decoding (`qwenjax.generate`) passes `qwenjax.model.Qwen2` a KV cache (`init_cache`, one `LayerCache` per layer,
shaped like the parameter tree) and gets `(logits, new cache)` back: a prefill (`lengths` given) runs the
training path's attention over right-padded prompts and stores each row's last keys (`LayerCache.fill`); a
decode step writes the new tokens' keys and attends over the cache (`LayerCache.step`). Without a cache nothing
changes.

A decode step's attention runs through XLA (`append`, then `attend`) or as one Pallas kernel
(`qwenjax.kernels.decode_gpu`). `LayerCache.step` picks between them for the platform kernels are picked for and
the active mesh, so the model's Flax modules never look at devices. Which cached keys a query sees is
`qwenjax.kernels.attention_contract`'s rule, as for every attention kernel.
"""

from __future__ import annotations

from typing import Any, Callable

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp

from qwenjax import kernels
from qwenjax import sharding
from qwenjax.kernels import attention_contract
from qwenjax.kernels import decode_gpu
from qwenjax.model_config import ModelConfig, RopeScaling
from qwenjax.rotary import apply_rotary_embedding, rotary_angles

CACHE_AXES = ('activation_batch', 'activation_kv_heads', 'activation_length', 'activation_head_dim')


@struct.dataclass
class LayerCache:
  """One layer's keys and values for decoding, kept as a ring of `slots` entries.

  Position p lives in slot `p % slots`, and `positions[b, s]` says which position slot s holds (-1: empty),
  so one masking rule serves both kinds of layer: full-attention layers get as many slots as the longest
  sequence (the ring never wraps), sliding-window layers `sliding_window` slots (their cache stays that size
  however long the generation). Scanned layers stack these on a leading layer axis. Keys and values are kept
  head-major, `[batch, kv_heads, slots, head_dim]`, so attending over them is a batched matmul with no
  transpose of the cache at each step.
  """
  key: jax.Array  # [batch, kv_heads, slots, head_dim]
  value: jax.Array  # [batch, kv_heads, slots, head_dim]
  positions: jax.Array  # [batch, slots] int32

  @property
  def slots(self) -> int:
    return self.key.shape[-2]

  def constrained(self) -> 'LayerCache':
    return self.replace(key=nn.with_logical_constraint(self.key, CACHE_AXES),
                        value=nn.with_logical_constraint(self.value, CACHE_AXES))

  def fill(self, k: jax.Array, v: jax.Array, lengths: jax.Array) -> 'LayerCache':
    """The cache after a prefill of right-padded rows `k, v [batch, seq, kv_heads, head_dim]` of `lengths` real
    tokens.

    Slot s takes the last real position p < length with p % slots == s (none: -1), so a sliding-window ring
    keeps each row's last `slots` keys whatever the prompt's length.
    """
    seq = k.shape[1]
    s = jnp.arange(self.slots, dtype=jnp.int32)[None]
    last = lengths.astype(jnp.int32)[:, None] - 1
    held = jnp.where(s <= last, s + self.slots * ((last - s) // self.slots), -1)  # [batch, slots]
    index = jnp.clip(held, 0, seq - 1)[:, :, None, None]
    # Gather the held rows first, then go head-major: only `slots` rows are transposed, not the whole prompt.
    take = lambda x: jnp.swapaxes(jnp.take_along_axis(x, index, axis=1), 1, 2).astype(self.key.dtype)
    return LayerCache(take(k), take(v), held).constrained()

  def append(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> 'LayerCache':
    """Writes `k, v [batch, seq, kv_heads, head_dim]` at their `positions [batch, seq]` (seq <= slots: no slot
    twice)."""
    rows = jnp.arange(k.shape[0])[:, None]
    slot = positions % self.slots
    # Advanced indices split by a slice put their dims first: the update is [batch, seq, kv_heads, head_dim].
    return LayerCache(self.key.at[rows, :, slot].set(k.astype(self.key.dtype)),
                      self.value.at[rows, :, slot].set(v.astype(self.value.dtype)),
                      self.positions.at[rows, slot].set(positions.astype(jnp.int32))).constrained()

  def step(self, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, rope_theta: float,
           window: int | None, sliding=True, impl: str = 'xla', interpret: bool = False,
           rope_scaling: RopeScaling | None = None) -> tuple[jax.Array, 'LayerCache']:
    """A decode step from this token's projections before rotary: rotary on `q` and `k`, `append(k, v,
    positions)`, then `attend(q, ...)`; returns (attention output, new cache).

    With `impl` 'pallas' (or 'auto' on a GPU) one Pallas kernel does all three (`kernels.decode_gpu`), where
    it applies: one token per row, a power-of-two head_dim of 32+, 16+ slots, a cache of the queries' dtype,
    and no mesh to split over (under a multi-device mesh the XLA path runs, which XLA partitions). Scanned
    layers always take the XLA path (`qwenjax.model` decodes them so).
    """
    if not self._takes_kernel(q, impl, interpret):
      q = apply_rotary_embedding(q, positions, rope_theta, rope_scaling)
      cache = self.append(apply_rotary_embedding(k, positions, rope_theta, rope_scaling), v, positions)
      return cache.attend(q, positions, window, sliding), cache
    batch, _, heads, head_dim = q.shape
    position = positions[:, 0].astype(jnp.int32)
    lowest = _per_kind(sliding, window, lambda w: attention_contract.first_visible(position, w))
    angles, factor = rotary_angles(position, head_dim, rope_theta, rope_scaling)  # [batch, head_dim // 2]
    # One array of all heads' projections: XLA writes it in one fusion with the biases (three before).
    qkv = jnp.concatenate([q[:, 0], k[:, 0].astype(q.dtype), v[:, 0].astype(q.dtype)], axis=1)
    out, key, value, held = decode_gpu.decode_attention(
        qkv, jnp.cos(angles) * factor, jnp.sin(angles) * factor, self.key, self.value, self.positions, position, lowest,
        kv_heads=self.key.shape[1], interpret=interpret)
    return out.reshape(batch, 1, heads, head_dim), LayerCache(key, value, held).constrained()

  def _takes_kernel(self, q: jax.Array, impl: str, interpret: bool) -> bool:
    """Whether a decode step of queries `q` runs `kernels.decode_gpu` (see `step`); raises if 'pallas' cannot run
    on the platform kernels are picked for."""
    platform = kernels.target_platform()
    if impl == 'pallas' and not interpret and platform != 'gpu':
      raise ValueError("decode_impl='pallas' needs a GPU; set attention_interpret=True to run its kernel in "
                       "the Pallas interpreter, or use decode_impl='auto' or 'xla'.")
    if not (impl == 'pallas' or (impl == 'auto' and platform == 'gpu')):
      return False
    return (q.shape[1] == 1 and decode_gpu.supported(q.shape[-1], self.slots) and self.key.dtype == q.dtype
            and not sharding.free_axes(jax.sharding.get_abstract_mesh()))

  def attend(self, q: jax.Array, positions: jax.Array, window: int | None, sliding=True) -> jax.Array:
    """Attention of queries `q [batch, seq, heads, head_dim]` at `positions` over the cached keys.

    A query sees the cached positions `attention_contract.visible` allows it (window or not); `sliding` (a
    traced bool for scanned layers of mixed kinds) turns the window off. Softmax in float32, as
    `attention.xla_attention`. The queries of one kv head (its group, at every position) are the rows of one
    matmul against that head's keys: batched over (batch, kv_heads), with the keys' slots as columns, so the
    reductions over slots run in the matmuls and the softmax has many rows (a decode step's einsum over grouped
    heads left XLA a slow reduction over 12 rows of 1280 x 128 products).
    """
    batch, seq, heads, head_dim = q.shape
    kv_heads = self.key.shape[1]
    group = heads // kv_heads
    rows = q.reshape(batch, seq, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    rows = rows.reshape(batch, kv_heads, seq * group, head_dim)
    batched = ((0, 1), (0, 1))
    scores = jax.lax.dot_general(rows, self.key.astype(q.dtype), (((3,), (3,)), batched),
                                 preferred_element_type=jnp.float32)  # [batch, kv_heads, seq * group, slots]
    scores = scores.reshape(batch, kv_heads, seq, group, -1) * head_dim**-0.5
    held = self.positions[:, None, None, None, :]  # [batch, 1, 1, 1, slots]
    query = positions[:, None, :, None, None]  # [batch, 1, seq, 1, 1]
    seen = (held >= 0) & _per_kind(sliding, window, lambda w: attention_contract.visible(query, held, w))
    scores = jnp.where(seen, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(batch, kv_heads, seq * group, -1)
    out = jax.lax.dot_general(probs, self.value.astype(q.dtype), (((3,), (2,)), batched))
    out = out.reshape(batch, kv_heads, seq, group, head_dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(batch, seq, heads, head_dim)


def _per_kind(sliding, window: int | None, rule: Callable[[int | None], jax.Array]) -> jax.Array:
  """`rule(window)` for a sliding-window layer, `rule(None)` for a full-attention one; `sliding` is a bool, or
  a traced one for scanned layers of mixed kinds (then both are computed and one picked)."""
  if window is None or sliding is True:
    return rule(window)
  return jnp.where(jnp.asarray(sliding), rule(window), rule(None))


def cache_slots(config: ModelConfig, layer: int, max_length: int) -> int:
  """Slots of layer `layer`'s cache for sequences of up to `max_length` tokens (see `LayerCache`)."""
  if config.is_sliding(layer):
    return min(config.sliding_window, max_length)
  return max_length


def init_cache(config: ModelConfig, batch: int, max_length: int, dtype: Any = None) -> dict[str, LayerCache]:
  """An empty cache for `batch` rows of up to `max_length` tokens, keyed like the parameters.

  Unrolled layers: `layers_{i}` each, sized by `cache_slots`. Scanned layers: one `layers` stack; all its
  layers need one size, so a scanned model that mixes window and full layers gives every layer `max_length`
  slots (the window is still applied by masking).
  """
  dtype = jnp.dtype(dtype or config.dtype)
  kv = lambda *lead, slots: jnp.zeros((*lead, batch, config.num_key_value_heads, slots, config.head_dim), dtype)
  empty = lambda *lead, slots: jnp.full((*lead, batch, slots), -1, jnp.int32)
  if config.scan_layers:
    slots = max(cache_slots(config, i, max_length) for i in range(config.num_hidden_layers))
    n = config.num_hidden_layers
    return {'layers': LayerCache(kv(n, slots=slots), kv(n, slots=slots), empty(n, slots=slots))}
  return {f'layers_{i}': LayerCache(kv(slots=s), kv(slots=s), empty(slots=s))
          for i, s in ((i, cache_slots(config, i, max_length)) for i in range(config.num_hidden_layers))}
