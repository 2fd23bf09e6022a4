"""The Qwen2 decoder in Flax Linen, computing exactly what `transformers.Qwen2ForCausalLM` computes.

Parameters carry logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `norm`,
and `layers` when scanned); activations carry `activation_*` names. `qwenjax.sharding` maps both to mesh
axes in one place, so nothing here knows about devices.

Parameter tree (unscanned; with `scan_layers=True` the `layers_{i}` subtrees become one `layers` subtree whose
leaves have a leading layer axis, see `stack_layers` / `unstack_layers`):

    embed_tokens                          [vocab, embed]
    layers_{i}/input_layernorm/scale      [embed]
    layers_{i}/self_attn/{q,k,v}_proj/kernel, bias   [embed, (kv_)heads, head_dim], [(kv_)heads, head_dim]
    layers_{i}/self_attn/o_proj/kernel    [heads, head_dim, embed]
    layers_{i}/post_attention_layernorm/scale
    layers_{i}/mlp/{gate,up}_proj/kernel  [embed, mlp];  mlp/down_proj/kernel [mlp, embed]
    norm/scale                            [embed]
    lm_head                               [embed, vocab]   (only when tie_word_embeddings is False)

MoE layers (`config.is_moe(i)`, Qwen2-MoE) replace `layers_{i}/mlp` with:

    mlp/gate/kernel                       [embed, expert_router]     the router
    mlp/experts/{gate,up}_proj            [expert, embed, mlp];  mlp/experts/down_proj [expert, mlp, embed]
    mlp/shared_expert/{gate,up,down}_proj/kernel   as the dense mlp, width shared_expert_intermediate_size
    mlp/shared_expert_gate/kernel         [embed, None]

and sow router statistics into the `moe_stats` collection (a plain `apply` drops them); `apply_with_aux`
returns (logits, auxiliary losses). The experts' math and sharding live in `qwenjax.moe`.

Decoding (`qwenjax.generate`) passes a KV cache (`init_cache`, one `LayerCache` per layer, shaped like the
parameter tree) and gets `(logits, new cache)` back: a prefill (`lengths` given) runs the training path's
attention over right-padded prompts and stores each row's last keys; a decode step writes the new tokens' keys
and attends over the cache. Without a cache nothing changes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

from flax import struct
import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

from qwenjax import attention
from qwenjax import kernels
from qwenjax import moe
from qwenjax import sharding
from qwenjax.kernels import decode_gpu
from qwenjax.kernels import gmm

# 'none' (no remat), 'full' (save nothing), `jax.checkpoint_policies` by name, and two of ours:
# * 'dots_and_attention_saveable': what 'dots_with_no_batch_dims_saveable' keeps plus the attention kernels'
#   outputs, so the backward pass recomputes only elementwise work (norms, rotary, SwiGLU).
# * 'activations_saveable': every compute-dtype activation the backward pass reads (ACTIVATION_NAMES and the
#   attention outputs), so it recomputes nothing, yet keeps none of the float32 temporaries that 'none' keeps.
#   (The routed experts of an MoE block are not named: they are recomputed.)
REMAT_POLICIES = ('none', 'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable',
                  'dots_and_attention_saveable', 'activations_saveable', 'nothing_saveable',
                  'everything_saveable')
# A decode step's attention: 'xla' (LayerCache.append + attend), 'pallas' (kernels.decode_gpu; on a CPU only
# with attention_interpret=True), 'auto' (the kernel on a GPU where it applies, else XLA).
DECODE_IMPLEMENTATIONS = ('auto', 'xla', 'pallas')
# `checkpoint_name`s of a decoder layer's activations, for remat policies.
ACTIVATION_NAMES = ('norm_out', 'query', 'key', 'value', 'residual', 'mlp_gate', 'mlp_up', 'mlp_hidden')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Model shape and numerics. Field names follow Hugging Face's `Qwen2Config`; the last block is ours."""
  vocab_size: int = 151936
  hidden_size: int = 896
  intermediate_size: int = 4864
  num_hidden_layers: int = 24
  num_attention_heads: int = 14
  num_key_value_heads: int = 2
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  max_position_embeddings: int = 32768
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  initializer_range: float = 0.02
  tie_word_embeddings: bool = False
  use_sliding_window: bool = False
  sliding_window: int | None = 4096
  max_window_layers: int = 28
  # Mixture of experts (Hugging Face's `Qwen2MoeConfig` names); num_experts=0 is a dense model.
  num_experts: int = 0
  num_experts_per_tok: int = 4
  moe_intermediate_size: int = 1408
  shared_expert_intermediate_size: int = 5632  # 0: none (Hugging Face: a zero-wide one)
  norm_topk_prob: bool = False
  decoder_sparse_step: int = 1  # layer i is MoE iff (i + 1) % decoder_sparse_step == 0 ...
  mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here (a list in Hugging Face's config)
  router_aux_loss_coef: float = 0.001
  output_router_logits: bool = False  # as in Hugging Face: the load-balancing loss is added only if True
  # Ours.
  dtype: str = 'float32'  # activations / compute
  param_dtype: str = 'float32'  # stored parameters
  remat_policy: str = 'none'  # one of REMAT_POLICIES
  scan_layers: bool = False  # nn.scan over layers: one compiled layer, params stacked on a `layers` axis
  attention_impl: str = 'auto'  # see qwenjax.attention.IMPLEMENTATIONS
  attention_interpret: bool = False  # run a Pallas attention kernel in its interpreter (CPU tests)
  decode_impl: str = 'auto'  # a decode step's attention: one of DECODE_IMPLEMENTATIONS (see LayerCache.step)
  router_z_loss_coef: float = 0.0  # weight of the router z-loss (ST-MoE) in moe_aux_loss
  moe_capacity_factor: float = 0.0  # 0: dropless; c > 0: each expert takes ceil(c * tokens * k / experts)
  moe_impl: str = 'auto'  # grouped-matmul backend, see qwenjax.kernels.gmm.IMPLEMENTATIONS
  moe_interpret: bool = False  # run a Pallas grouped-matmul kernel in its interpreter (CPU tests)

  def __post_init__(self):
    if self.head_dim is None:
      object.__setattr__(self, 'head_dim', self.hidden_size // self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f'num_attention_heads ({self.num_attention_heads}) must be a multiple of '
                       f'num_key_value_heads ({self.num_key_value_heads})')
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'unknown remat_policy {self.remat_policy!r}; choose one of {REMAT_POLICIES}')
    if self.decode_impl not in DECODE_IMPLEMENTATIONS:
      raise ValueError(f'unknown decode_impl {self.decode_impl!r}; choose one of {DECODE_IMPLEMENTATIONS}')
    if self.attention_impl not in attention.IMPLEMENTATIONS:
      raise ValueError(f'unknown attention_impl {self.attention_impl!r}; '
                       f'choose one of {attention.IMPLEMENTATIONS}')
    for name in ('dtype', 'param_dtype'):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError:
        raise ValueError(f'unknown {name} {getattr(self, name)!r}: give a dtype name such as float32 or '
                         'bfloat16') from None
    if self.use_sliding_window and not self.sliding_window:
      raise ValueError('use_sliding_window=True needs a positive sliding_window')
    object.__setattr__(self, 'mlp_only_layers', tuple(int(i) for i in self.mlp_only_layers or ()))
    if self.num_experts:
      self._check_moe()

  def _check_moe(self):
    if not 1 <= self.num_experts_per_tok <= self.num_experts:
      raise ValueError(f'num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and num_experts '
                       f'({self.num_experts})')
    if self.decoder_sparse_step < 1:
      raise ValueError(f'decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}')
    if self.moe_capacity_factor < 0:
      raise ValueError(f'moe_capacity_factor must be 0 (dropless) or positive, got {self.moe_capacity_factor}')
    if self.moe_impl not in gmm.IMPLEMENTATIONS:
      raise ValueError(f'unknown moe_impl {self.moe_impl!r}; choose one of {gmm.IMPLEMENTATIONS}')
    if self.scan_layers and self.mixes_dense_and_moe:
      raise ValueError('scan_layers=True needs every layer to be the same kind, but mlp_only_layers='
                       f'{self.mlp_only_layers} / decoder_sparse_step={self.decoder_sparse_step} mix dense and '
                       'MoE layers; set scan_layers=False')

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> 'ModelConfig':
    """Builds a config from a dict or ConfigDict, naming any key that is not a field."""
    values = dict(values)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(f'unknown model config key(s) {unknown}; valid keys: {sorted(fields)}')
    return cls(**values)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def is_sliding(self, layer: int) -> bool:
    """Hugging Face's rule: layer i uses the window iff use_sliding_window and i >= max_window_layers."""
    return bool(self.use_sliding_window and layer >= self.max_window_layers)

  def is_moe(self, layer: int) -> bool:
    """Hugging Face's rule: layer i is a sparse MoE block iff num_experts > 0, i is not in mlp_only_layers and
    (i + 1) % decoder_sparse_step == 0."""
    return bool(self.num_experts and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

  @property
  def mixes_dense_and_moe(self) -> bool:
    """Dense and MoE layers in one model: their parameters differ, so the layers cannot be scanned."""
    return len({self.is_moe(i) for i in range(self.num_hidden_layers)}) > 1

  @property
  def has_mixed_layers(self) -> bool:
    kinds = {self.is_sliding(i) for i in range(self.num_hidden_layers)}
    return len(kinds) > 1


def _init(config: ModelConfig, *names: str):
  return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), names)


def _constrain(x, *names: str):
  return nn.with_logical_constraint(x, names)


class RMSNorm(nn.Module):
  """Root-mean-square norm, computed in float32 like Hugging Face's Qwen2RMSNorm."""
  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return checkpoint_name(scale.astype(self.dtype) * normed.astype(self.dtype), 'norm_out')


def rotary_angles(positions: jax.Array, head_dim: int, theta: float) -> jax.Array:
  """The rotary angles `[..., head_dim // 2]` (float32) of `positions [...]`: element i of a head turns with
  element i + head_dim // 2 by angle `position / theta**(2i / head_dim)`."""
  inv_freq = 1.0 / (theta**(jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  return positions[..., None].astype(jnp.float32) * inv_freq


def apply_rotary_embedding(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in the `rotate_half` layout. x: [batch, seq, heads, head_dim]; positions: [batch, seq]."""
  freqs = rotary_angles(positions, x.shape[-1], theta)
  angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


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
    axes = ('activation_batch', 'activation_kv_heads', 'activation_length', 'activation_head_dim')
    return self.replace(key=_constrain(self.key, *axes), value=_constrain(self.value, *axes))

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
           window: int | None, sliding=True, impl: str = 'xla', interpret: bool = False
           ) -> tuple[jax.Array, 'LayerCache']:
    """A decode step from this token's projections before rotary: rotary on `q` and `k`, `append(k, v,
    positions)`, then `attend(q, ...)`; returns (attention output, new cache).

    With `impl` 'pallas' (or 'auto' on a GPU) one Pallas kernel does all three (`kernels.decode_gpu`), where
    it applies: one token per row, a power-of-two head_dim of 32+, 16+ slots, a cache of the queries' dtype,
    and no mesh to split over (under a multi-device mesh the XLA path runs, which XLA partitions). Scanned
    layers always take the XLA path (`_cached_layers`).
    """
    batch, seq, heads, head_dim = q.shape
    use_kernel = impl == 'pallas' or (impl == 'auto' and kernels.target_platform() == 'gpu')
    if impl == 'pallas' and not interpret and kernels.target_platform() != 'gpu':
      raise ValueError("decode_impl='pallas' needs a GPU; set attention_interpret=True to run its kernel in "
                       "the Pallas interpreter, or use decode_impl='auto' or 'xla'.")
    if (not use_kernel or seq != 1 or not decode_gpu.supported(head_dim, self.slots) or self.key.dtype != q.dtype
        or sharding.free_axes(jax.sharding.get_abstract_mesh())):
      q = apply_rotary_embedding(q, positions, rope_theta)
      cache = self.append(apply_rotary_embedding(k, positions, rope_theta), v, positions)
      return cache.attend(q, positions, window, sliding), cache
    kv_heads = self.key.shape[1]
    position = positions[:, 0].astype(jnp.int32)
    lowest = jnp.zeros_like(position)
    if window is not None:
      lowest = jnp.where(jnp.asarray(sliding), position - window + 1, lowest)
    angles = rotary_angles(position, head_dim, rope_theta)  # [batch, head_dim // 2]
    # One array of all heads' projections: XLA writes it in one fusion with the biases (three before).
    qkv = jnp.concatenate([q[:, 0], k[:, 0].astype(q.dtype), v[:, 0].astype(q.dtype)], axis=1)
    out, key, value, held = decode_gpu.decode_attention(
        qkv, jnp.cos(angles), jnp.sin(angles), self.key, self.value, self.positions, position, lowest,
        kv_heads=kv_heads, interpret=interpret)
    return out.reshape(batch, 1, heads, head_dim), LayerCache(key, value, held).constrained()

  def attend(self, q: jax.Array, positions: jax.Array, window: int | None, sliding=True) -> jax.Array:
    """Attention of queries `q [batch, seq, heads, head_dim]` at `positions` over the cached keys.

    A key is seen if its position is in [q - window + 1, q] (no window: [0, q]); `sliding` (a traced bool for
    scanned layers of mixed kinds) turns the window off. Softmax in float32, as `attention.xla_attention`.
    The queries of one kv head (its group, at every position) are the rows of one matmul against that head's
    keys: batched over (batch, kv_heads), with the keys' slots as columns, so the reductions over slots run in
    the matmuls and the softmax has many rows (a decode step's einsum over grouped heads left XLA a slow
    reduction over 12 rows of 1280 x 128 products).
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
    seen = (held >= 0) & (held <= query)
    if window is not None:
      seen &= (held > query - window) | jnp.logical_not(sliding)
    scores = jnp.where(seen, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(batch, kv_heads, seq * group, -1)
    out = jax.lax.dot_general(probs, self.value.astype(q.dtype), (((3,), (2,)), batched))
    out = out.reshape(batch, kv_heads, seq, group, head_dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(batch, seq, heads, head_dim)


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


class Attention(nn.Module):
  """Grouped-query self-attention: Q/K/V with bias, O without, rotary positions.

  With a `cache` it returns (output, new cache): with `lengths` (a prefill of right-padded rows) it attends as
  without a cache and fills the cache; without, it appends this step's keys and attends over the cache.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, segment_ids, sliding, cache: LayerCache | None = None, lengths=None):
    cfg = self.config
    # nn.Einsum, not nn.DenseGeneral: DenseGeneral initializes a flattened 2-d kernel and applies the 3-d
    # kernel's logical constraint to it (also in apply's shape check), which fails under jax.set_mesh.
    einsum = functools.partial(nn.Einsum, dtype=cfg.dtype, param_dtype=cfg.param_dtype)

    def qkv(name, heads, heads_axis):
      return einsum(
          (cfg.hidden_size, heads, cfg.head_dim), 'bse,ehd->bshd', use_bias=True, name=name,
          kernel_init=_init(cfg, 'embed', heads_axis, 'head_dim'),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (heads_axis, 'head_dim')))(x)

    def constrain(q, k, v):
      return (_constrain(q, 'activation_batch', 'activation_length', 'activation_heads', 'activation_head_dim'),
              _constrain(k, 'activation_batch', 'activation_length', 'activation_kv_heads', 'activation_head_dim'),
              _constrain(v, 'activation_batch', 'activation_length', 'activation_kv_heads', 'activation_head_dim'))

    def output(out):
      out = _constrain(out, 'activation_batch', 'activation_length', 'activation_heads', 'activation_head_dim')
      return einsum((cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size), 'bshd,hde->bse', use_bias=False,
                    name='o_proj', kernel_init=_init(cfg, 'heads', 'head_dim', 'embed'))(out)

    q = qkv('q_proj', cfg.num_attention_heads, 'heads')
    k = qkv('k_proj', cfg.num_key_value_heads, 'kv_heads')
    v = qkv('v_proj', cfg.num_key_value_heads, 'kv_heads')
    if cache is not None and lengths is None:  # a decode step: rotary is part of the step (a kernel on GPUs)
      window = cfg.sliding_window if sliding is not False and cfg.use_sliding_window else None
      out, cache = cache.step(*constrain(q, k, v), positions, cfg.rope_theta, window, sliding, cfg.decode_impl,
                              cfg.attention_interpret)
      return output(out), cache
    q = checkpoint_name(apply_rotary_embedding(q, positions, cfg.rope_theta), 'query')
    k = checkpoint_name(apply_rotary_embedding(k, positions, cfg.rope_theta), 'key')
    q, k, v = constrain(q, k, checkpoint_name(v, 'value'))

    def attend(window):
      return attention.dot_product_attention(
          q, k, v, sliding_window=window, segment_ids=segment_ids, impl=cfg.attention_impl,
          interpret=cfg.attention_interpret)

    if isinstance(sliding, bool):  # unrolled layers know their kind at trace time
      out = attend(cfg.sliding_window if sliding else None)
    else:  # scanned layers of mixed kinds: pick the kernel at run time
      out = jax.lax.cond(sliding, lambda: attend(cfg.sliding_window), lambda: attend(None))
    if cache is not None and lengths is not None:  # a prefill
      cache = cache.fill(k, v, lengths)
    out = output(out)
    return out if cache is None else (out, cache)


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  config: ModelConfig
  intermediate_size: int | None = None

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    size = self.intermediate_size or cfg.intermediate_size
    dense = functools.partial(nn.DenseGeneral, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    gate = checkpoint_name(dense(size, name='gate_proj', kernel_init=_init(cfg, 'embed', 'mlp'))(x), 'mlp_gate')
    up = checkpoint_name(dense(size, name='up_proj', kernel_init=_init(cfg, 'embed', 'mlp'))(x), 'mlp_up')
    hidden = checkpoint_name(nn.silu(gate) * up, 'mlp_hidden')
    hidden = _constrain(hidden, 'activation_batch', 'activation_length', 'activation_mlp')
    return dense(cfg.hidden_size, name='down_proj', kernel_init=_init(cfg, 'mlp', 'embed'))(hidden)


class Experts(nn.Module):
  """The routed SwiGLU experts, stacked: gate/up `[expert, embed, mlp]`, down `[expert, mlp, embed]`."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, expert_ids, weights):
    cfg = self.config
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    gate = self.param('gate_proj', _init(cfg, 'expert', 'embed', 'mlp'), (e, h, i), cfg.param_dtype)
    up = self.param('up_proj', _init(cfg, 'expert', 'embed', 'mlp'), (e, h, i), cfg.param_dtype)
    down = self.param('down_proj', _init(cfg, 'expert', 'mlp', 'embed'), (e, i, h), cfg.param_dtype)
    return moe.experts_ffn(x, expert_ids, weights, gate.astype(cfg.dtype), up.astype(cfg.dtype),
                           down.astype(cfg.dtype), capacity_factor=cfg.moe_capacity_factor, impl=cfg.moe_impl,
                           interpret=cfg.moe_interpret)


class SparseMoeBlock(nn.Module):
  """Qwen2-MoE feed-forward: top-k routed experts plus a shared expert scaled by sigmoid(shared_expert_gate(x)).

  The router runs in float32; its statistics are sown into the `moe.MOE_STATS` collection (kept only when
  that collection is mutable, see `apply_with_aux`).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    router = nn.Dense(cfg.num_experts, use_bias=False, dtype=jnp.float32, param_dtype=cfg.param_dtype,
                      name='gate', kernel_init=_init(cfg, 'embed', 'expert_router'))
    logits = router(x)
    weights, expert_ids = moe.route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
    for name, value in moe.router_stats(logits, expert_ids).items():
      self.sow(moe.MOE_STATS, name, value)
    out = Experts(cfg, name='experts')(x, expert_ids, weights)
    if cfg.shared_expert_intermediate_size:
      shared = MLP(cfg, cfg.shared_expert_intermediate_size, name='shared_expert')(x)
      gate = nn.Dense(1, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name='shared_expert_gate',
                      kernel_init=_init(cfg, 'embed', None))(x)
      out = out + nn.sigmoid(gate) * shared
    return out


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)).

  `sliding` is this layer's kind when known at trace time; scanned layers pass it per layer as
  `sliding_flag` (a traced bool) instead. `moe` selects the sparse MoE block for the feed-forward.
  """
  config: ModelConfig
  sliding: bool | None = None
  moe: bool = False

  @nn.compact
  def __call__(self, x, positions, segment_ids, sliding_flag=None, cache=None, lengths=None):
    """The new hidden states; with a `cache` (see `Attention`), (hidden states, new cache)."""
    cfg = self.config
    norm = functools.partial(RMSNorm, eps=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    sliding = self.sliding if self.sliding is not None else sliding_flag
    h = Attention(cfg, name='self_attn')(norm(name='input_layernorm')(x), positions, segment_ids, sliding,
                                         cache, lengths)
    if cache is not None:
      h, cache = h
    x = checkpoint_name(x + h, 'residual')
    feed_forward = SparseMoeBlock(cfg, name='mlp') if self.moe else MLP(cfg, name='mlp')
    x = x + feed_forward(norm(name='post_attention_layernorm')(x))
    x = _constrain(x, 'activation_batch', 'activation_length', 'activation_embed')
    return x if cache is None else (x, cache)


class ScannedDecoderLayer(DecoderLayer):
  """DecoderLayer in nn.scan's carry form; with a cache, the layer's new cache is the scan's output."""

  def __call__(self, x, positions, segment_ids, sliding_flag, cache=None, lengths=None):
    if cache is None:
      return super().__call__(x, positions, segment_ids, sliding_flag), None
    return super().__call__(x, positions, segment_ids, sliding_flag, cache, lengths)


def _remat(cls, config: ModelConfig):
  if config.remat_policy == 'none':
    return cls
  policies = jax.checkpoint_policies
  if config.remat_policy == 'full':
    policy = None
  elif config.remat_policy == 'dots_and_attention_saveable':
    policy = policies.save_from_both_policies(policies.dots_with_no_batch_dims_saveable,
                                              attention.forward_saveable)
  elif config.remat_policy == 'activations_saveable':
    policy = policies.save_from_both_policies(policies.save_only_these_names(*ACTIVATION_NAMES),
                                              attention.forward_saveable)
  else:
    policy = getattr(policies, config.remat_policy)
  return nn.remat(cls, policy=policy, prevent_cse=not config.scan_layers)


class Qwen2(nn.Module):
  """Qwen2 causal language model. `apply` returns float32 logits `[batch, seq, vocab]`.

  With `num_experts > 0` it is Qwen2-MoE. MoE layers sow router statistics into the `moe.MOE_STATS`
  collection; a plain `apply` drops them, and `apply_with_aux` returns (logits, auxiliary losses).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, return_hidden: bool = False,
               cache: dict[str, LayerCache] | None = None, lengths: jax.Array | None = None):
    """Logits, or with `return_hidden` the final normed hidden states `[batch, seq, embed]` for a loss that
    applies the head (`output_head`) chunk by chunk and never holds `[batch, seq, vocab]` logits.

    Decoding: with a `cache` (`init_cache`) it returns (logits, new cache). With `lengths [batch]` it is a
    prefill of right-padded rows (positions 0..length-1), and the logits are those of each row's last real
    token, `[batch, 1, vocab]`; without, the tokens at `positions` are appended to the cache.
    """
    cfg = self.config
    batch, seq_len = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))

    embedding = self.param('embed_tokens', _init(cfg, 'vocab', 'embed'),
                           (cfg.vocab_size, cfg.hidden_size), cfg.param_dtype)
    x = jnp.take(embedding, input_ids, axis=0).astype(cfg.dtype)
    x = _constrain(x, 'activation_batch', 'activation_length', 'activation_embed')

    if cache is not None:
      x, cache = _cached_layers(cfg, x, positions, cache, lengths)
    elif cfg.scan_layers:
      sliding = cfg.is_sliding(0) if not cfg.has_mixed_layers else None
      flags = jnp.array([cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)])
      stack = nn.scan(
          _remat(ScannedDecoderLayer, cfg),
          variable_axes={'params': 0, moe.MOE_STATS: 0}, split_rngs={'params': True},
          in_axes=(nn.broadcast, nn.broadcast, 0), length=cfg.num_hidden_layers,
          metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = stack(cfg, sliding, cfg.is_moe(0), name='layers')(x, positions, segment_ids, flags)
    else:
      layer_cls = _remat(DecoderLayer, cfg)
      for i in range(cfg.num_hidden_layers):
        x = layer_cls(cfg, cfg.is_sliding(i), cfg.is_moe(i), name=f'layers_{i}')(x, positions, segment_ids)

    if cache is not None and lengths is not None:  # a prefill: only each row's last token is needed
      x = jnp.take_along_axis(x, (lengths.astype(jnp.int32) - 1)[:, None, None], axis=1)
    x = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name='norm')(x)
    if return_hidden and not self.is_initializing():
      return x if cache is None else (x, cache)
    if cfg.tie_word_embeddings:
      head = embedding.T
    else:
      head = self.param('lm_head', _init(cfg, 'embed', 'vocab'), (cfg.hidden_size, cfg.vocab_size),
                        cfg.param_dtype)
    logits = jnp.einsum('bse,ev->bsv', x, head.astype(cfg.dtype), preferred_element_type=jnp.float32)
    logits = _constrain(logits, 'activation_batch', 'activation_length', 'activation_vocab')
    return logits if cache is None else (logits, cache)



def _cached_layers(cfg: ModelConfig, x, positions, cache, lengths):
  """The decoder layers with a KV cache (no remat: nothing is differentiated), inside `Qwen2.__call__`."""
  if cfg.scan_layers:
    sliding = cfg.is_sliding(0) if not cfg.has_mixed_layers else None
    flags = jnp.array([cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)])
    stack = nn.scan(
        ScannedDecoderLayer, variable_axes={'params': 0, moe.MOE_STATS: 0}, split_rngs={'params': True},
        in_axes=(nn.broadcast, nn.broadcast, 0, 0, nn.broadcast), length=cfg.num_hidden_layers,
        metadata_params={nn.PARTITION_NAME: 'layers'})
    # Through nn.scan a decode step takes the XLA path: flax's scan can reject the decode kernel's pallas_call
    # (docs/generation.md), and `generate` decodes scanned models unrolled anyway (`generate.unrolled`).
    layer_cfg = dataclasses.replace(cfg, decode_impl='xla')
    x, layers = stack(layer_cfg, sliding, cfg.is_moe(0), name='layers')(x, positions, None, flags, cache['layers'],
                                                                          lengths)
    return x, {'layers': layers}
  new_cache = {}
  for i in range(cfg.num_hidden_layers):
    name = f'layers_{i}'
    x, new_cache[name] = DecoderLayer(cfg, cfg.is_sliding(i), cfg.is_moe(i), name=name)(
        x, positions, None, None, cache[name], lengths)
  return x, new_cache


def output_head(config: ModelConfig, params: Any) -> jax.Array:
  """The `[embed, vocab]` output projection: the tied embedding table, or `lm_head`."""
  return params['embed_tokens'].T if config.tie_word_embeddings else params['lm_head']


def apply_with_aux(config: ModelConfig, params: Any, input_ids: jax.Array, positions: jax.Array | None = None,
                   segment_ids: jax.Array | None = None,
                   return_hidden: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(float32 logits, auxiliary losses): the one call a train step needs, dense or MoE.

  With `return_hidden`, the final hidden states instead of logits (see `Qwen2.__call__`).
  `aux['moe_aux_loss']` is the scalar to add to the mean token loss (0 for dense models); MoE models also
  return the unweighted `moe_load_balancing_loss` and `moe_router_z_loss` for logging. See `moe.aux_losses`.
  """
  out, state = Qwen2(config).apply({'params': params}, input_ids, positions, segment_ids, return_hidden,
                                   mutable=[moe.MOE_STATS])
  return out, moe.aux_losses(config, state.get(moe.MOE_STATS))


# ---------------------------------------------------------------------------------------------------------
# Parameter utilities.

def _for_init(config: ModelConfig) -> ModelConfig:
  """Parameters do not depend on the attention kernel; a Pallas kernel need not accept an 8-token input."""
  return dataclasses.replace(config, attention_impl='xla', attention_interpret=False)


def init_params(config: ModelConfig, rng: jax.Array, seq_len: int = 8):
  """Random parameters (boxed with logical axis names stripped).

  Unrolled layers of one kind are drawn as a scanned stack and then split: the same distributions, from a
  program with one layer's random-number kernels instead of one set per layer, which compiles in a fraction of
  the time (docs/training.md).
  """
  ids = jnp.zeros((1, seq_len), jnp.int32)
  init_config = _for_init(config)
  if config.scan_layers or config.mixes_dense_and_moe:
    return nn.unbox(Qwen2(init_config).init(rng, ids)['params'])
  stacked = Qwen2(dataclasses.replace(init_config, scan_layers=True)).init(rng, ids)['params']
  return unstack_layers(nn.unbox(stacked))


def abstract_params(config: ModelConfig):
  """Parameter shapes and dtypes as `jax.ShapeDtypeStruct`s, with nothing allocated.

  Leaves stay boxed in `nn.LogicallyPartitioned` so their logical axis names can be read.
  """
  ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  return jax.eval_shape(lambda: Qwen2(_for_init(config)).init(jax.random.key(0), ids))['params']


def count_params(config: ModelConfig) -> int:
  """Total number of parameters, computed from shapes alone."""
  leaves = jax.tree.leaves(nn.unbox(abstract_params(config)))
  return sum(int(x.size) for x in leaves)


def stack_layers(params: dict, num_layers: int) -> dict:
  """Unscanned tree (`layers_0` .. `layers_{n-1}`) -> scanned tree (`layers` with a leading layer axis).

  Host (numpy) trees stay on the host, so a large checkpoint never lands whole on one device.
  """
  params = dict(params)
  layers = [params.pop(f'layers_{i}') for i in range(num_layers)]
  stack = np.stack if isinstance(jax.tree.leaves(layers[0])[0], np.ndarray) else jnp.stack
  params['layers'] = jax.tree.map(lambda *xs: stack(xs), *layers)
  return params


def unstack_layers(params: dict) -> dict:
  """Scanned tree -> unscanned tree; the inverse of `stack_layers`."""
  params = dict(params)
  stacked = params.pop('layers')
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(num_layers):
    params[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params
