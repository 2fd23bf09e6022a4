"""One Qwen2-57B-A14B MoE layer on one GPU: forward + backward time against a dense SwiGLU of the same FLOPs.

Shape: 8192 tokens, hidden 3584, 64 experts (top-8) of width 2560, shared expert of width 20480, bf16
parameters and activations. The MoE layer is `qwenjax.model.SparseMoeBlock` (router, routed experts, gated
shared expert), differentiated in its input and every parameter. The peer is `qwenjax.model.MLP` of width
8 * 2560 + 20480 = 40960, which does the same matmul FLOPs (the router's 0.1% aside). "Routed only" drops the
shared expert on both sides (dense width 20480), which isolates dispatch and grouped matmuls.

Variants: the grouped-matmul backends `ragged_dot` and `mgpu` (dropless), our capacity mode (factor 1.25),
and a one-hot (GShard einsum) dispatch baseline at capacity factor 1.25. Before those, the Mosaic GPU kernels
are timed alone over a few tile configurations and checked against `jax.lax.ragged_dot`, and the best
forward configuration is used for the layer.

From the repository root after `pip install -e .`:

    python benchmarks/moe_gpu.py [--tokens 8192] [--out DIR]

Prints a table; writes moe_gpu.json to --out (default $OUT, else the current directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import traceback

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwenjax import model, moe
from qwenjax.kernels import gmm, gmm_gpu
from qwenjax.model_config import ModelConfig

from timing import median_seconds, rel_err  # benchmarks/, next to this script

HIDDEN, EXPERTS, TOP_K, EXPERT_WIDTH, SHARED_WIDTH = 3584, 64, 8, 2560, 20480
INTERPRET = False  # --cpu_smoke: tiny shapes, Pallas kernels interpreted


def moe_config(shared: bool, **overrides) -> ModelConfig:
  return ModelConfig(
      vocab_size=1024, hidden_size=HIDDEN, intermediate_size=18944, num_hidden_layers=1, num_attention_heads=28,
      num_key_value_heads=4, num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=EXPERT_WIDTH,
      shared_expert_intermediate_size=SHARED_WIDTH if shared else 0, dtype='bfloat16', param_dtype='bfloat16',
      moe_interpret=INTERPRET, **overrides)


def onehot_moe(params, x, config):
  """GShard-style dispatch: one-hot [tokens, experts, capacity] einsums in and out, capacity factor 1.25."""
  t = x.shape[0]
  logits = x.astype(jnp.float32) @ params['gate']['kernel'].astype(jnp.float32)
  weights, ids = moe.route(logits, TOP_K, False)
  cap = moe.capacity(t, TOP_K, EXPERTS, 1.25)
  mask = jax.nn.one_hot(ids, EXPERTS, dtype=jnp.int32)  # [t, k, e]
  position = jnp.cumsum(mask.reshape(t * TOP_K, EXPERTS), axis=0).reshape(t, TOP_K, EXPERTS) * mask - 1
  slot = jax.nn.one_hot(jnp.max(position, axis=-1), cap, dtype=x.dtype)  # [t, k, c]; -1 or >= cap: zeros
  dispatch = jnp.einsum('tke,tkc->tec', mask.astype(x.dtype), slot)
  combine = jnp.einsum('tke,tkc,tk->tec', mask.astype(x.dtype), slot, weights.astype(x.dtype))
  experts = params['experts']
  xe = jnp.einsum('tec,th->ech', dispatch, x)
  h = jnp.einsum('ech,ehi->eci', xe, experts['gate_proj'])
  u = jnp.einsum('ech,ehi->eci', xe, experts['up_proj'])
  ye = jnp.einsum('eci,eih->ech', jax.nn.silu(h) * u, experts['down_proj'])
  out = jnp.einsum('tec,ech->th', combine, ye)
  if config.shared_expert_intermediate_size:
    shared = model.MLP(config, config.shared_expert_intermediate_size).apply(
        {'params': params['shared_expert']}, x)
    out = out + jax.nn.sigmoid(x @ params['shared_expert_gate']['kernel']) * shared
  return out


def fwd_bwd(apply):
  """jit(grad) of sum(apply(params, x) * cotangent) in params and x."""
  def loss(params, x, ct):
    return jnp.sum(apply(params, x).astype(jnp.float32) * ct)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


FORWARD_SWEEP = ((128, 128, 64, 4, 1), (128, 128, 64, 4, 2), (128, 128, 64, 6, 1), (64, 128, 64, 4, 1),
                 (192, 128, 64, 4, 1))
TRANSPOSED_SWEEP = ((128, 128, 64, 4, 1), (64, 128, 64, 4, 1))
# --quick: only the column-block swizzle (grid_block_n), the knob that mattered in the full sweep.
QUICK_FORWARD_SWEEP = ((128, 128, 64, 4, 2), (128, 128, 64, 4, 4), (128, 128, 64, 4, 8))
QUICK_TRANSPOSED_SWEEP = ((128, 128, 64, 4, 1), (128, 128, 64, 4, 2), (128, 128, 64, 4, 4))


def kernel_sweep(tokens, results, forward_sweep, transposed_sweep):
  """The Mosaic GPU kernels alone, for a few tile configurations, against ragged_dot and a dense matmul."""
  rows = tokens * TOP_K
  # Group sizes from random top-k routing, as a freshly initialized router gives.
  _, ids = jax.lax.top_k(jax.random.normal(jax.random.key(0), (tokens, EXPERTS)), TOP_K)
  sizes = jnp.sum(jax.nn.one_hot(ids.reshape(-1), EXPERTS, dtype=jnp.int32), axis=0)
  results['group_sizes_min_max'] = (int(sizes.min()), int(sizes.max()))
  best = {}
  for name, k, n in (('gate/up', HIDDEN, EXPERT_WIDTH), ('down', EXPERT_WIDTH, HIDDEN)):
    lhs = jax.random.normal(jax.random.key(1), (rows, k), jnp.bfloat16)
    rhs = (jax.random.normal(jax.random.key(2), (EXPERTS, k, n)) / np.sqrt(k)).astype(jnp.bfloat16)
    flops = 2 * rows * k * n
    t_ref, ref = median_seconds(jax.jit(lambda a, b: jax.lax.ragged_dot(a, b, sizes)), lhs, rhs)
    t_dense, _ = median_seconds(jax.jit(lambda a, b: a @ b[0]), lhs, rhs)
    results['kernels'].append(dict(product=name, impl='ragged_dot', ms=t_ref * 1e3, tflops=flops / t_ref / 1e12))
    results['kernels'].append(dict(product=name, impl='dense matmul', ms=t_dense * 1e3,
                                   tflops=flops / t_dense / 1e12))
    for bm, bn, bk, steps, gbn in forward_sweep:
      cfg = dict(block_m=bm, block_n=bn, block_k=bk, max_concurrent_steps=steps, grid_block_n=gbn)
      row = dict(product=name, impl='mgpu fwd', config=cfg)
      try:
        fn = jax.jit(lambda a, b, cfg=cfg: gmm_gpu.ragged_dot_mgpu.ragged_dot(
            a, b, group_sizes=sizes,
            **gmm_gpu._kwargs(gmm_gpu.ragged_dot_mgpu.ragged_dot, cfg)))  # pylint: disable=protected-access
        t, out = median_seconds(fn, lhs, rhs, iters=5)
        row.update(ms=t * 1e3, tflops=flops / t / 1e12, rel_err=rel_err(out, ref))
        if row['rel_err'] < 2e-2 and t < best.get(name, (np.inf,))[0]:
          best[name] = (t, cfg)
      except Exception as e:  # pylint: disable=broad-except
        row['error'] = repr(e)[:300]
      results['kernels'].append(row)
      print(row, flush=True)
    # d rhs: the transposed kernel against XLA's ragged contraction.
    dout = jax.random.normal(jax.random.key(3), (rows, n), jnp.bfloat16)
    dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((0,), (0,)), ((), ())),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    t_ref, ref = median_seconds(jax.jit(lambda a, d: jax.lax.ragged_dot_general(a, d, sizes, dims)), lhs, dout, iters=5)
    results['kernels'].append(dict(product=name + ' drhs', impl='ragged_dot_general', ms=t_ref * 1e3,
                                   tflops=flops / t_ref / 1e12))
    for bm, bn, bk, steps, gbn in transposed_sweep:
      cfg = dict(block_m=bm, block_n=bn, block_k=bk, max_concurrent_steps=steps, grid_block_n=gbn)
      row = dict(product=name + ' drhs', impl='mgpu transposed', config=cfg)
      try:
        fn = jax.jit(lambda a, d, cfg=cfg: gmm_gpu.transposed_ragged_dot_mgpu.transposed_ragged_dot(
            a, d, group_sizes=sizes, **gmm_gpu._kwargs(  # pylint: disable=protected-access
                gmm_gpu.transposed_ragged_dot_mgpu.transposed_ragged_dot, cfg)))
        t, out = median_seconds(fn, lhs, dout, iters=5)
        row.update(ms=t * 1e3, tflops=flops / t / 1e12, rel_err=rel_err(out, ref))
        if row['rel_err'] < 2e-2 and t < best.get(name + ' drhs', (np.inf,))[0]:
          best[name + ' drhs'] = (t, cfg)
      except Exception as e:  # pylint: disable=broad-except
        row['error'] = repr(e)[:300]
      results['kernels'].append(row)
      print(row, flush=True)
  return best


def dump(results, out_dir):
  with open(os.path.join(out_dir, 'moe_gpu.json'), 'w') as f:
    json.dump(results, f, indent=1, default=str)


def check_custom_vjp(results):
  """gmm(impl='mgpu') against ragged_dot, value and both gradients, with 100 padding rows past the groups."""
  sizes = jnp.array([500, 0, 1200, 700, 300, 900, 96, 204], jnp.int32)  # sums to 3900 of 4000 rows
  lhs = jax.random.normal(jax.random.key(4), (4000, 256), jnp.bfloat16)
  rhs = (jax.random.normal(jax.random.key(5), (8, 256, 384)) / 16).astype(jnp.bfloat16)
  ct = jax.random.normal(jax.random.key(6), (4000, 384), jnp.float32)

  def run(impl):
    def loss(a, b):
      out = gmm.grouped_matmul(a, b, sizes, impl=impl, interpret=INTERPRET)
      return jnp.sum(out.astype(jnp.float32) * ct), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(lhs, rhs)

  try:
    (_, out), grads = run('mgpu')
    (_, ref), ref_grads = run('ragged_dot')
    results['custom_vjp_check'] = dict(
        out=rel_err(out, ref), dlhs=rel_err(grads[0], ref_grads[0]), drhs=rel_err(grads[1], ref_grads[1]),
        padding_rows_zero=bool(not np.asarray(out[3900:], np.float32).any()
                               and not np.asarray(grads[0][3900:], np.float32).any()))
  except Exception:  # pylint: disable=broad-except
    results['custom_vjp_check'] = dict(error=traceback.format_exc()[-1500:])
  print('custom_vjp check', results['custom_vjp_check'], flush=True)


def main():
  global HIDDEN, EXPERTS, TOP_K, EXPERT_WIDTH, SHARED_WIDTH, INTERPRET  # pylint: disable=global-statement
  parser = argparse.ArgumentParser()
  parser.add_argument('--tokens', type=int, default=8192)
  parser.add_argument('--out', default=os.environ.get('OUT', '.'))
  parser.add_argument('--skip_sweep', action='store_true')
  parser.add_argument('--cpu_smoke', action='store_true', help='tiny shapes, kernels interpreted (CPU check)')
  parser.add_argument('--quick', action='store_true',
                      help='sweep grid_block_n only; layers: dense, mgpu, and a no-drop capacity reference')
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  if args.cpu_smoke:
    HIDDEN, EXPERTS, TOP_K, EXPERT_WIDTH, SHARED_WIDTH, INTERPRET = 128, 8, 2, 128, 256, True
    args.tokens, args.skip_sweep = 64, True
  device = jax.devices()[0]
  results = dict(jax=jax.__version__, device=device.device_kind, tokens=args.tokens, kernels=[], layers=[],
                 compute_capability=str(getattr(device, 'compute_capability', None)))
  print(results, flush=True)
  check_custom_vjp(results)

  if not args.skip_sweep:
    try:
      sweeps = (QUICK_FORWARD_SWEEP, QUICK_TRANSPOSED_SWEEP) if args.quick else (FORWARD_SWEEP, TRANSPOSED_SWEEP)
      best = kernel_sweep(args.tokens, results, *sweeps)
      # One forward config serves both products (the layer uses one); pick the best for gate/up, the larger share.
      if 'gate/up' in best:
        gmm_gpu.FORWARD_CONFIG = best['gate/up'][1]
      if 'gate/up drhs' in best:
        gmm_gpu.TRANSPOSED_CONFIG = best['gate/up drhs'][1]
      results['chosen'] = dict(forward=gmm_gpu.FORWARD_CONFIG, transposed=gmm_gpu.TRANSPOSED_CONFIG)
      print('chosen', results['chosen'], flush=True)
      dump(results, args.out)
    except Exception:  # pylint: disable=broad-except
      results['sweep_error'] = traceback.format_exc()[-2000:]
      print(results['sweep_error'], flush=True)

  x = jax.random.normal(jax.random.key(10), (args.tokens, HIDDEN), jnp.bfloat16)
  ct = jax.random.normal(jax.random.key(11), (args.tokens, HIDDEN), jnp.float32)
  reference = {}
  for shared in (True, False):
    dense_width = TOP_K * EXPERT_WIDTH + (SHARED_WIDTH if shared else 0)
    base = moe_config(shared)
    params = nn.unbox(jax.jit(lambda: model.SparseMoeBlock(base).init(jax.random.key(0), x[None, :8]))()['params'])
    active_flops = 2 * args.tokens * 3 * HIDDEN * dense_width  # routed + shared matmuls, as the dense peer
    dense_cfg = dataclasses.replace(base, intermediate_size=dense_width)
    dense_params = nn.unbox(jax.jit(lambda: model.MLP(dense_cfg).init(jax.random.key(1), x[:8]))()['params'])
    variants = [('dense SwiGLU %d' % dense_width, lambda p, x: model.MLP(dense_cfg).apply({'params': p}, x),
                 dense_params)]
    layer_variants = (('ragged_dot dropless', dict(moe_impl='ragged_dot')),
                      ('mgpu dropless', dict(moe_impl='mgpu')),
                      ('capacity 1.25 (gather + batched matmul)', dict(moe_capacity_factor=1.25)))
    if args.quick:  # reference first: capacity factor experts / k never drops, so it computes the same layer
      reference_variant = ('capacity 8, no drops (reference)', dict(moe_capacity_factor=EXPERTS / TOP_K))
      layer_variants = ((reference_variant,) if shared else ()) + (('mgpu dropless', dict(moe_impl='mgpu')),)
    for label, overrides in layer_variants:
      cfg = moe_config(shared, **overrides)
      variants.append((label, lambda p, x, cfg=cfg: model.SparseMoeBlock(cfg).apply({'params': p}, x[None])[0],
                       params))
    if not args.quick:
      variants.append(('one-hot einsum dispatch, capacity 1.25', lambda p, x, cfg=base: onehot_moe(p, x, cfg),
                       params))
    dense_time = None
    for label, apply, p in variants:
      row = dict(layer='with shared expert' if shared else 'routed only', variant=label)
      try:
        t, (value, grads) = median_seconds(fwd_bwd(apply), p, x, ct)
        dense_time = dense_time or t
        row.update(ms=t * 1e3, tflops=3 * active_flops / t / 1e12, fraction_of_dense=dense_time / t)
        if label in ('ragged_dot dropless', 'capacity 8, no drops (reference)'):
          reference[shared] = (value, grads)
        elif label == 'mgpu dropless' and shared in reference:
          ref_value, ref_grads = reference[shared]
          row['grad_rel_err'] = max(rel_err(a, b) for a, b in zip(jax.tree.leaves(grads),
                                                                  jax.tree.leaves(ref_grads)))
          row['loss_rel_err'] = rel_err(value, ref_value)
      except Exception:  # pylint: disable=broad-except
        row['error'] = traceback.format_exc()[-1500:]
      results['layers'].append(row)
      print(row, flush=True)
      dump(results, args.out)
  print('\n| layer | variant | fwd+bwd ms | TF/s (active) | x dense |')
  print('| --- | --- | --- | --- | --- |')
  for row in results['layers']:
    if 'ms' in row:
      print(f"| {row['layer']} | {row['variant']} | {row['ms']:.2f} | {row['tflops']:.0f} | "
            f"{row['fraction_of_dense']:.2f} |")
    else:
      print(f"| {row['layer']} | {row['variant']} | failed | | |")
  print('auto resolves to', gmm.resolve_impl('auto', x, jax.ShapeDtypeStruct((EXPERTS, HIDDEN, EXPERT_WIDTH),
                                                                               jnp.bfloat16)))


if __name__ == '__main__':
  main()
