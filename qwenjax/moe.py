"""Mixture-of-experts math for Qwen2-MoE: routing, token dispatch to SwiGLU experts, auxiliary losses.

The Flax module (`qwenjax.model.SparseMoeBlock`) owns the parameters; this module holds plain functions.

Routing (exactly as transformers' Qwen2MoeTopKRouter): softmax over the router logits in float32, top-k, and
optionally renormalize the k weights to sum to 1. Each token's output is the weighted sum of its k experts'
SwiGLU outputs.

Dispatch, two modes:

* dropless (`capacity_factor=0`, the default): the token copies are sorted by expert and multiplied with a
  grouped matmul (`qwenjax.kernels.gmm`), so no token is ever dropped and no FLOP is spent on padding.
* capacity (`capacity_factor=c > 0`): each expert takes at most `ceil(c * tokens * k / experts)` token copies
  into a fixed `[experts, capacity, hidden]` buffer (earlier tokens first); the overflow is dropped (that copy
  contributes zero). Fixed shapes, one batched matmul.

Sharding: `experts_ffn` reads the active mesh (`jax.sharding.get_abstract_mesh()`) and Flax logical axis rules.
On a mesh with more than one device, dispatch runs per device inside `jax.shard_map` over the mesh axes of
`activation_batch` / `activation_length` (a global sort would gather every token). If the mesh has an
`expert` axis of size > 1, the experts are split over it (their `expert` logical axis must map to it) and
token copies travel to the device holding their expert with `jax.lax.all_to_all` and back:

* dropless: each device sends every other device a buffer of `tokens * min(k, local experts)` rows, the most
  it could ever need, so nothing is dropped (`ragged_all_to_all` would send only the rows in use, but XLA:CPU
  cannot run it, so it could not be tested here); the receiver regroups rows by expert for the grouped matmul.
* capacity: the `[experts, capacity, hidden]` buffer is split by expert over the devices (GShard style).

If the tokens are not split over `expert` by the rules, each device of an expert group takes its own slice of
the tokens and the outputs are all-gathered. If the rules shard the experts' `mlp` dimension (tensor
parallelism), each device computes a partial sum that is `psum`-ed.

Auxiliary losses: every MoE layer sows router statistics into the `moe_stats` collection (`router_stats`);
`aux_losses` turns those of all layers into Hugging Face's load-balancing loss (the same value as
`transformers.models.qwen2_moe.modeling_qwen2_moe.load_balancing_loss_func` for the same router logits) and
the router z-loss. `qwenjax.model.apply_with_aux` does both steps.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qwenjax import sharding
from qwenjax.kernels import gmm

MOE_STATS = 'moe_stats'  # the collection MoE layers sow router statistics into
EXPERT_AXIS = 'expert'  # the mesh axis that expert parallelism splits experts over

# ---------------------------------------------------------------------------------------------------------
# Routing and losses.


def route(router_logits: jax.Array, k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
  """(weights, expert ids), both `[..., k]`: top-k of softmax(logits) in float32, renormalized if asked."""
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  weights, ids = jax.lax.top_k(probs, k)
  if norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, ids.astype(jnp.int32)


def router_stats(router_logits: jax.Array, expert_ids: jax.Array) -> dict[str, jax.Array]:
  """One layer's sums over its tokens, from which `aux_losses` computes the losses of all layers together.

  `expert_counts` [experts]: top-k assignments per expert; `router_prob_sum` [experts]: softmax probability
  mass per expert; `router_z_sum`: sum of logsumexp(logits)^2; `tokens`: the number of tokens.
  """
  num_experts = router_logits.shape[-1]
  logits = router_logits.astype(jnp.float32).reshape(-1, num_experts)
  ids = expert_ids.reshape(logits.shape[0], -1)
  counts = jnp.sum(jax.nn.one_hot(ids, num_experts, dtype=jnp.float32), axis=(0, 1))
  return {
      'expert_counts': counts,
      'router_prob_sum': jnp.sum(jax.nn.softmax(logits, axis=-1), axis=0),
      'router_z_sum': jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1))),
      'tokens': jnp.asarray(logits.shape[0], jnp.float32),
  }


def aux_losses(config: Any, stats: Mapping[str, Any] | None) -> dict[str, jax.Array]:
  """The auxiliary losses from the `moe_stats` collection of one forward pass.

  Returns a dict with `moe_aux_loss`, the term to add to the training loss: router_aux_loss_coef times the
  load-balancing loss when `config.output_router_logits` (Hugging Face adds it only then) plus
  router_z_loss_coef times the z-loss. MoE models also get the unweighted `moe_load_balancing_loss`
  (Hugging Face's `aux_loss`: num_experts * sum_e f_e * p_e over all MoE layers' tokens together) and
  `moe_router_z_loss` (mean over layers and tokens of logsumexp(router logits)^2), for logging.
  Dense models get `moe_aux_loss = 0` alone.
  """
  zero = jnp.zeros((), jnp.float32)
  if not config.num_experts:
    return {'moe_aux_loss': zero}
  sums: dict[str, jax.Array] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(dict(stats or {}))[0]:
    name = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)][-1]
    leaf = leaf.astype(jnp.float32)
    total = jnp.sum(leaf.reshape(-1, config.num_experts), axis=0) if name in (
        'expert_counts', 'router_prob_sum') else jnp.sum(leaf)
    sums[name] = sums[name] + total if name in sums else total
  if 'tokens' not in sums:
    raise ValueError(f'no router statistics in the {MOE_STATS!r} collection: apply the model with '
                     f'mutable=[{MOE_STATS!r}] (qwenjax.model.apply_with_aux does) and pass that collection')
  rows = sums['tokens']
  balance = config.num_experts * jnp.sum((sums['expert_counts'] / rows) * (sums['router_prob_sum'] / rows))
  z_loss = sums['router_z_sum'] / rows
  total = config.router_z_loss_coef * z_loss
  if config.output_router_logits:
    total = total + config.router_aux_loss_coef * balance
  return {'moe_aux_loss': total, 'moe_load_balancing_loss': balance, 'moe_router_z_loss': z_loss}


def capacity(tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
  """Token copies one expert takes in capacity mode: ceil(factor * tokens * k / experts), at most tokens."""
  return max(1, min(tokens, math.ceil(capacity_factor * tokens * k / num_experts)))


# ---------------------------------------------------------------------------------------------------------
# Experts on one device.


def _inverse(permutation: jax.Array) -> jax.Array:
  return jnp.zeros_like(permutation).at[permutation].set(jnp.arange(permutation.shape[0], dtype=permutation.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _permute_rows(x: jax.Array, order: jax.Array, inverse: jax.Array, copies: int) -> jax.Array:
  """Row i of the output is x[order[i] // copies]: each row of x, `copies` times, in the given order.

  `inverse` is the inverse permutation of `order`. The gradient gathers with it and sums the copies, instead of
  the scatter-add (atomics on GPUs) that differentiating a plain gather would give.
  """
  del inverse
  return jnp.take(x, order // copies, axis=0)


def _permute_rows_fwd(x, order, inverse, copies):
  return _permute_rows(x, order, inverse, copies), (order, inverse)


def _permute_rows_bwd(copies, residuals, g):
  order, inverse = residuals
  rows = jnp.take(g, inverse, axis=0)
  if copies > 1:
    rows = jnp.sum(rows.reshape(-1, copies, g.shape[-1]).astype(jnp.float32), axis=1)
  return rows.astype(g.dtype), None, None


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def _combine(y: jax.Array, weights: jax.Array, dtype) -> jax.Array:
  """`[tokens, k, hidden]` expert outputs weighted by `[tokens, k]` routing weights -> `[tokens, hidden]`."""
  return jnp.einsum('tkh,tk->th', y, weights.astype(y.dtype), preferred_element_type=jnp.float32).astype(dtype)


def _grouped_swiglu(x, group_sizes, w_gate, w_up, w_down, impl, interpret):
  """SwiGLU per expert over rows sorted by expert; rows past sum(group_sizes) give zeros."""
  mm = lambda a, w: gmm.grouped_matmul(a, w, group_sizes, impl=impl, interpret=interpret)
  return mm(nn.silu(mm(x, w_gate)) * mm(x, w_up), w_down)


def _batched_swiglu(x, w_gate, w_up, w_down):
  """SwiGLU per expert on an `[experts, rows, hidden]` buffer."""
  gate = jnp.einsum('ech,ehi->eci', x, w_gate)
  up = jnp.einsum('ech,ehi->eci', x, w_up)
  return jnp.einsum('eci,eih->ech', nn.silu(gate) * up, w_down)


def _sort_by_expert(ids: jax.Array, num_experts: int):
  """(order, sorted expert ids, group sizes) for the flattened `[tokens * k]` assignments."""
  flat = ids.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  group_sizes = jnp.sum(jax.nn.one_hot(flat, num_experts, dtype=jnp.int32), axis=0)
  return order, flat[order], group_sizes


def _runs(starts: jax.Array, sizes: jax.Array, width: int, rows: int) -> tuple[jax.Array, jax.Array]:
  """For groups whose rows are the contiguous runs `[start, start + size)` of `rows` sorted rows: `[groups,
  width]` row positions (clipped into range) and whether each is one of the group's rows."""
  slot = jnp.arange(width)
  return jnp.clip(starts[:, None] + slot[None], 0, rows - 1), slot[None] < sizes[:, None]


def _dropless(x, ids, weights, w_gate, w_up, w_down, impl, interpret):
  tokens, k = ids.shape
  order, _, group_sizes = _sort_by_expert(ids, w_gate.shape[0])
  inverse = _inverse(order)
  y = _grouped_swiglu(_permute_rows(x, order, inverse, k), group_sizes, w_gate, w_up, w_down, impl, interpret)
  y = _permute_rows(y, inverse, order, 1).reshape(tokens, k, -1)
  return _combine(y, weights, x.dtype)


def _capacity_dispatch(x, ids, num_experts, capacity_factor):
  """Fills the `[experts, capacity, hidden]` buffer; returns it and, per assignment, (expert, slot, kept)."""
  tokens, k = ids.shape
  cap = capacity(tokens, k, num_experts, capacity_factor)
  order, sorted_ids, group_sizes = _sort_by_expert(ids, num_experts)
  starts = jnp.cumsum(group_sizes) - group_sizes
  source, filled = _runs(starts, group_sizes, cap, tokens * k)  # [experts, capacity] sorted positions
  buffer = jnp.where(filled[..., None], jnp.take(x, jnp.take(order, source) // k, axis=0), 0)
  rank = _inverse(order)  # sorted position of each assignment
  flat = ids.reshape(-1)
  slot_of = rank - jnp.take(starts, flat)
  return buffer.astype(x.dtype), (flat, jnp.clip(slot_of, 0, cap - 1), slot_of < cap)


def _capacity_combine(out_buffer, where, weights, dtype):
  flat, slot, kept = where
  y = jnp.where(kept[:, None], out_buffer[flat, slot], 0)
  return _combine(y.reshape(weights.shape + (-1,)), weights, dtype)


def _capacity(x, ids, weights, w_gate, w_up, w_down, capacity_factor):
  buffer, where = _capacity_dispatch(x, ids, w_gate.shape[0], capacity_factor)
  return _capacity_combine(_batched_swiglu(buffer, w_gate, w_up, w_down), where, weights, x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Experts split over the `expert` mesh axis (inside shard_map).


def _ep_dropless(x, ids, weights, w_gate, w_up, w_down, num_experts, impl, interpret):
  tokens, k = ids.shape
  local = w_gate.shape[0]
  ep = num_experts // local
  hidden = x.shape[-1]
  order, sorted_ids, group_sizes = _sort_by_expert(ids, num_experts)
  inverse = _inverse(order)
  xs = _permute_rows(x, order, inverse, k)
  # Rows for device p are the sorted rows of its experts, a contiguous run.
  per_device = jnp.sum(group_sizes.reshape(ep, local), axis=1)
  device_start = jnp.cumsum(per_device) - per_device
  width = tokens * min(k, local)  # the most rows one device can send another
  source, filled = _runs(device_start, per_device, width, tokens * k)  # [ep, width]
  send_x = jnp.where(filled[..., None], jnp.take(xs, source, axis=0), 0).reshape(ep * width, hidden)
  send_e = jnp.where(filled, jnp.take(sorted_ids, source) % local, local).reshape(ep * width)
  recv_x = jax.lax.all_to_all(send_x, EXPERT_AXIS, 0, 0, tiled=True)  # block s: rows from device s
  recv_e = jax.lax.all_to_all(send_e, EXPERT_AXIS, 0, 0, tiled=True)  # local expert ids; `local` = empty
  order2, _, local_sizes = _sort_by_expert(recv_e, local)  # empty rows (id `local`) sort last, uncounted
  y2 = _grouped_swiglu(jnp.take(recv_x, order2, axis=0), local_sizes, w_gate, w_up, w_down, impl, interpret)
  back = jax.lax.all_to_all(jnp.take(y2, _inverse(order2), axis=0), EXPERT_AXIS, 0, 0, tiled=True)
  back = back.reshape(ep, width, hidden)
  device = sorted_ids // local
  ys = back[device, jnp.arange(tokens * k) - jnp.take(device_start, device)]
  y = _permute_rows(ys, inverse, order, 1).reshape(tokens, k, hidden)
  return _combine(y, weights, x.dtype)


def _ep_capacity(x, ids, weights, w_gate, w_up, w_down, num_experts, capacity_factor):
  local = w_gate.shape[0]
  ep = num_experts // local
  buffer, where = _capacity_dispatch(x, ids, num_experts, capacity_factor)
  _, cap, hidden = buffer.shape
  recv = jax.lax.all_to_all(buffer, EXPERT_AXIS, 0, 0, tiled=True)  # [ep * local, cap, h], by sender
  recv = recv.reshape(ep, local, cap, hidden).swapaxes(0, 1).reshape(local, ep * cap, hidden)
  out = _batched_swiglu(recv, w_gate, w_up, w_down)
  out = out.reshape(local, ep, cap, hidden).swapaxes(0, 1).reshape(num_experts, cap, hidden)
  back = jax.lax.all_to_all(out, EXPERT_AXIS, 0, 0, tiled=True)  # [experts, cap, h], my tokens
  return _capacity_combine(back, where, weights, x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Entry point.


def experts_ffn(x: jax.Array, expert_ids: jax.Array, weights: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                w_down: jax.Array, *, capacity_factor: float = 0.0, impl: str = 'auto',
                interpret: bool = False) -> jax.Array:
  """The routed experts' output: sum over k of weight * SwiGLU_expert(x).

  Args:
    x: `[batch, seq, hidden]` tokens.
    expert_ids, weights: `[batch, seq, k]` from `route`.
    w_gate, w_up: `[experts, hidden, mlp]`; w_down: `[experts, mlp, hidden]` (global shapes).
    capacity_factor: 0 for dropless dispatch, else the capacity mode's factor.
    impl, interpret: the grouped-matmul backend (`qwenjax.kernels.gmm`), dropless mode only.

  Returns:
    `[batch, seq, hidden]` in x's dtype.
  """
  num_experts = w_gate.shape[0]
  mesh = jax.sharding.get_abstract_mesh()
  free = sharding.free_axes(mesh)
  if not free:
    b, s, h = x.shape
    flat = (x.reshape(-1, h), expert_ids.reshape(b * s, -1), weights.reshape(b * s, -1))
    if capacity_factor:
      y = _capacity(*flat, w_gate, w_up, w_down, capacity_factor)
    else:
      y = _dropless(*flat, w_gate, w_up, w_down, impl, interpret)
    return y.reshape(x.shape)

  batch_axes, length_axes = sharding.active_mesh_axes(('activation_batch', 'activation_length'), mesh)
  (mlp_axes,) = sharding.active_mesh_axes(('mlp',), mesh)
  ep = mesh.shape[EXPERT_AXIS] if EXPERT_AXIS in free else 1
  token_axes = batch_axes + length_axes
  if set(mlp_axes) & (set(token_axes) | {EXPERT_AXIS}):
    raise ValueError(f'the logical axis rules shard the experts\' mlp dimension over mesh axes {mlp_axes}, '
                     f'which also split tokens {token_axes} or experts ({EXPERT_AXIS!r}); map mlp elsewhere')
  if num_experts % ep:
    raise ValueError(f'{num_experts} experts do not split over the {EXPERT_AXIS!r} mesh axis of size {ep}; '
                     'choose an expert axis size that divides num_experts')
  split_tokens = ep > 1 and EXPERT_AXIS not in token_axes

  def body(x, ids, wts, wg, wu, wd):
    b, s, h = x.shape
    x, ids, wts = x.reshape(-1, h), ids.reshape(b * s, -1), wts.reshape(b * s, -1)
    if split_tokens:  # tokens are replicated over the expert axis: each device takes a slice
      if x.shape[0] % ep:
        raise ValueError(f'{x.shape[0]} tokens per device do not split over the {EXPERT_AXIS!r} axis ({ep}); '
                         f'map activation_batch to include {EXPERT_AXIS!r} or use a batch divisible by it')
      n = x.shape[0] // ep
      start = jax.lax.axis_index(EXPERT_AXIS) * n
      x, ids, wts = (jax.lax.dynamic_slice_in_dim(a, start, n, axis=0) for a in (x, ids, wts))
    if ep > 1 and capacity_factor:
      y = _ep_capacity(x, ids, wts, wg, wu, wd, num_experts, capacity_factor)
    elif ep > 1:
      y = _ep_dropless(x, ids, wts, wg, wu, wd, num_experts, impl, interpret)
    elif capacity_factor:
      y = _capacity(x, ids, wts, wg, wu, wd, capacity_factor)
    else:
      y = _dropless(x, ids, wts, wg, wu, wd, impl, interpret)
    if mlp_axes:
      y = jax.lax.psum(y, mlp_axes)
    if split_tokens:
      y = jax.lax.all_gather(y, EXPERT_AXIS, axis=0, tiled=True)
    return y.reshape(b, s, h)

  tok = P(batch_axes or None, length_axes or None, None)
  expert = EXPERT_AXIS if ep > 1 else None
  w_in = P(expert, None, mlp_axes or None)
  w_out = P(expert, mlp_axes or None, None)
  return jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, w_in, w_in, w_out), out_specs=tok,
                       axis_names=set(free), check_vma=False)(x, expert_ids, weights, w_gate, w_up, w_down)
