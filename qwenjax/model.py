"""The Qwen2 decoder in Flax Linen, computing exactly what `transformers.Qwen2ForCausalLM` computes.

Parameters carry logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `norm`,
and `layers` when scanned); activations carry `activation_*` names. `qwenjax.sharding` maps both to mesh
axes in one place, so nothing here knows about devices.

Parameter tree (unscanned; with `scan_layers=True` the `layers_{i}` subtrees become one `layers` subtree whose
leaves have a leading layer axis, see `qwenjax.params.stack_layers` / `unstack_layers`):

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

LoRA adapters (`qwenjax.lora`) are a second collection, `lora`, beside `params`: under a projection's path (its
kernel's path without `kernel`) it holds `a` and `b`, and the projection adds (x @ a) @ b to x @ W; the routed
experts add a @ b to their stacked weights. Without that collection (a plain `apply({'params': ...})`) the model is
the base model, exactly.

Given a KV cache (`qwenjax.kv_cache`), `Qwen2` prefills or decodes and returns the new cache with the logits;
how a decode step attends over the cache is decided there. The configuration is `qwenjax.model_config`'s, the
parameter utilities (init, shapes, stacking) are in `qwenjax.params`.

Under context parallelism (a `context` mesh axis, `qwenjax.context`) the sequence axis of the inputs, and so of
every activation, is in zig-zag order: the train step puts batches in that order; without `positions` the model
takes each place's position in it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from qwenjax import attention
from qwenjax import context
from qwenjax import moe
from qwenjax import sharding
from qwenjax.kv_cache import LayerCache
from qwenjax.model_config import ModelConfig
from qwenjax.rotary import apply_rotary_embedding

LORA = 'lora'  # the collection of LoRA adapters: {'a', 'b'} under a projection's name (qwenjax.lora)

# `checkpoint_name`s of a decoder layer's activations, for remat policies.
ACTIVATION_NAMES = ('norm_out', 'query', 'key', 'value', 'residual', 'mlp_gate', 'mlp_up', 'mlp_hidden')
# Attention's inputs as its backward pass reads them (q and k after rotary): what 'attention_saveable' keeps.
ATTENTION_INPUT_NAMES = ('query', 'key', 'value')


def _init(config: ModelConfig, *names: str):
  return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), names)


def _constrain(x, *names: str):
  return nn.with_logical_constraint(x, names)


def _with_lora(module: nn.Module, name: str, x, y):
  """`y`, the projection `name` of `x`, plus (x @ a) @ b when the `lora` collection holds its adapters.

  `a` is `[*input dims, rank]` and `b` `[rank, *output dims]` (qwenjax.lora scales b by alpha / rank beforehand).
  """
  if not module.has_variable(LORA, name):
    return y
  adapter = module.get_variable(LORA, name)
  a, b = adapter['a'].astype(x.dtype), adapter['b'].astype(x.dtype)
  low_rank = jnp.tensordot(x, a, axes=a.ndim - 1)
  return y + jnp.tensordot(low_rank, b, axes=1).astype(y.dtype)


def _with_lora_weight(module: nn.Module, name: str, w):
  """Stacked expert weights `[expert, in, out]` plus a @ b per expert when the `lora` collection holds adapters
  for `name` (the grouped matmuls take one weight per expert, so the low-rank update is folded in)."""
  if not module.has_variable(LORA, name):
    return w
  adapter = module.get_variable(LORA, name)
  a, b = adapter['a'].astype(w.dtype), adapter['b'].astype(w.dtype)
  return w + jnp.einsum('eir,ero->eio', a, b)


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
      y = einsum(
          (cfg.hidden_size, heads, cfg.head_dim), 'bse,ehd->bshd', use_bias=True, name=name,
          kernel_init=_init(cfg, 'embed', heads_axis, 'head_dim'),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (heads_axis, 'head_dim')))(x)
      return _with_lora(self, name, x, y)

    def constrain(q, k, v):
      return (_constrain(q, 'activation_batch', 'activation_length', 'activation_heads', 'activation_head_dim'),
              _constrain(k, 'activation_batch', 'activation_length', 'activation_kv_heads', 'activation_head_dim'),
              _constrain(v, 'activation_batch', 'activation_length', 'activation_kv_heads', 'activation_head_dim'))

    def output(out):
      out = _constrain(out, 'activation_batch', 'activation_length', 'activation_heads', 'activation_head_dim')
      y = einsum((cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size), 'bshd,hde->bse', use_bias=False,
                 name='o_proj', kernel_init=_init(cfg, 'heads', 'head_dim', 'embed'))(out)
      return _with_lora(self, 'o_proj', out, y)

    q = qkv('q_proj', cfg.num_attention_heads, 'heads')
    k = qkv('k_proj', cfg.num_key_value_heads, 'kv_heads')
    v = qkv('v_proj', cfg.num_key_value_heads, 'kv_heads')
    if cache is not None and lengths is None:  # a decode step: rotary is part of the step (a kernel on GPUs)
      window = cfg.sliding_window if sliding is not False and cfg.use_sliding_window else None
      out, cache = cache.step(*constrain(q, k, v), positions, cfg.rope_theta, window, sliding, cfg.decode_impl,
                              cfg.attention_interpret, rope_scaling=cfg.rope_scaling)
      return output(out), cache
    q = checkpoint_name(apply_rotary_embedding(q, positions, cfg.rope_theta, cfg.rope_scaling), 'query')
    k = checkpoint_name(apply_rotary_embedding(k, positions, cfg.rope_theta, cfg.rope_scaling), 'key')
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

    def dense(features, name, x, *names):
      y = nn.DenseGeneral(features, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                          kernel_init=_init(cfg, *names))(x)
      return _with_lora(self, name, x, y)

    gate = checkpoint_name(dense(size, 'gate_proj', x, 'embed', 'mlp'), 'mlp_gate')
    up = checkpoint_name(dense(size, 'up_proj', x, 'embed', 'mlp'), 'mlp_up')
    hidden = checkpoint_name(nn.silu(gate) * up, 'mlp_hidden')
    hidden = _constrain(hidden, 'activation_batch', 'activation_length', 'activation_mlp')
    return dense(cfg.hidden_size, 'down_proj', hidden, 'mlp', 'embed')


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
    gate, up, down = (_with_lora_weight(self, name, w.astype(cfg.dtype))
                      for name, w in (('gate_proj', gate), ('up_proj', up), ('down_proj', down)))
    return moe.experts_ffn(x, expert_ids, weights, gate, up, down, capacity_factor=cfg.moe_capacity_factor,
                           impl=cfg.moe_impl, interpret=cfg.moe_interpret)


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
  if config.remat_policy in ('none', 'auto'):  # 'auto' unresolved (`qwenjax.fit` resolves it): as with no memory figure
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
  elif config.remat_policy == 'attention_saveable':
    policy = policies.save_from_both_policies(policies.save_only_these_names(*ATTENTION_INPUT_NAMES),
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

    Decoding: with a `cache` (`kv_cache.init_cache`) it returns (logits, new cache). With `lengths [batch]` it is a
    prefill of right-padded rows (positions 0..length-1), and the logits are those of each row's last real
    token, `[batch, 1, vocab]`; without, the tokens at `positions` are appended to the cache.
    """
    cfg = self.config
    batch, seq_len = input_ids.shape
    shards = sharding.context_size()  # > 1: the sequence is split over devices, in zig-zag order (qwenjax.context)
    if shards > 1 and cache is not None:
      raise ValueError('decoding (a KV cache) does not support context parallelism: the rules split '
                       'activation_length over the mesh. Decode on a mesh with context=1.')
    if positions is None:
      order = jnp.arange(seq_len, dtype=jnp.int32) if shards == 1 else context.zigzag_positions(seq_len, shards)
      positions = jnp.broadcast_to(order, (batch, seq_len))

    embedding = self.param('embed_tokens', _init(cfg, 'vocab', 'embed'),
                           (cfg.vocab_size, cfg.hidden_size), cfg.param_dtype)
    x = jnp.take(embedding, input_ids, axis=0).astype(cfg.dtype)
    x = _constrain(x, 'activation_batch', 'activation_length', 'activation_embed')

    x, cache = _decoder_layers(cfg, x, positions, segment_ids, cache, lengths)

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


def _decoder_layers(cfg: ModelConfig, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
                    cache: dict[str, LayerCache] | None, lengths: jax.Array | None):
  """The decoder layers inside `Qwen2.__call__`, unrolled or as one nn.scan over the `layers` stack: (hidden
  states, new cache or None).

  Decoding (a `cache`) differentiates nothing, so it runs without remat. Through nn.scan a decode step takes
  the XLA path: flax's scan can reject the decode kernel's pallas_call (docs/generation.md), and `generate`
  decodes scanned models unrolled anyway (`generate.unrolled`).
  """
  decoding = cache is not None
  if decoding:
    segment_ids = None
  if not cfg.scan_layers:
    layer_cls = DecoderLayer if decoding else _remat(DecoderLayer, cfg)
    new_cache = {}
    for i in range(cfg.num_hidden_layers):
      name = f'layers_{i}'
      layer = layer_cls(cfg, cfg.is_sliding(i), cfg.is_moe(i), name=name)
      if decoding:
        x, new_cache[name] = layer(x, positions, segment_ids, None, cache[name], lengths)
      else:
        x = layer(x, positions, segment_ids)
    return x, new_cache if decoding else None
  layer_cls = ScannedDecoderLayer if decoding else _remat(ScannedDecoderLayer, cfg)
  if decoding:
    cfg = dataclasses.replace(cfg, decode_impl='xla')
  sliding = cfg.is_sliding(0) if not cfg.has_mixed_layers else None
  flags = jnp.array([cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)])
  # Scanned over: each layer's parameters, adapters, router statistics, sliding flag and cache; the rest is
  # broadcast.
  stack = nn.scan(
      layer_cls, variable_axes={'params': 0, moe.MOE_STATS: 0, LORA: 0}, split_rngs={'params': True},
      in_axes=(nn.broadcast, nn.broadcast, 0, 0, nn.broadcast), length=cfg.num_hidden_layers,
      metadata_params={nn.PARTITION_NAME: 'layers'})
  x, layers = stack(cfg, sliding, cfg.is_moe(0), name='layers')(
      x, positions, segment_ids, flags, cache['layers'] if decoding else None, lengths)
  return x, {'layers': layers} if decoding else None


def output_head(config: ModelConfig, params: Any) -> jax.Array:
  """The `[embed, vocab]` output projection: the tied embedding table, or `lm_head`."""
  return params['embed_tokens'].T if config.tie_word_embeddings else params['lm_head']


def apply_with_aux(config: ModelConfig, params: Any, input_ids: jax.Array, positions: jax.Array | None = None,
                   segment_ids: jax.Array | None = None, return_hidden: bool = False,
                   lora: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(float32 logits, auxiliary losses): the one call a train step needs, dense or MoE.

  With `return_hidden`, the final hidden states instead of logits (see `Qwen2.__call__`).
  `aux['moe_aux_loss']` is the scalar to add to the mean token loss (0 for dense models); MoE models also
  return the unweighted `moe_load_balancing_loss` and `moe_router_z_loss` for logging. See `moe.aux_losses`.
  `lora`: the `lora` collection (`qwenjax.lora.scaled`), or None for the base model.
  """
  variables = {'params': params} if lora is None else {'params': params, LORA: lora}
  out, state = Qwen2(config).apply(variables, input_ids, positions, segment_ids, return_hidden,
                                   mutable=[moe.MOE_STATS])
  return out, moe.aux_losses(config, state.get(moe.MOE_STATS))
