"""The loss's passes over a chunk of logits: XLA's fusions against the Pallas kernels, on one GPU.

From the repository root after `pip install -e .`:

    python benchmarks/loss_gpu.py --out /tmp/loss                 # configs/1b.py's chunk: 4 x 1024 rows, bf16
    python benchmarks/loss_gpu.py --out /tmp/loss --blocks 2048 4096 8192 --warps 4 8   # kernel settings

Times (back to back, `timing.median_seconds`) the logsumexp pass and the gradient pass that `qwenjax.loss`
runs per chunk, both ways (`loss_impl` 'xla' and 'pallas'), reports each pass's bandwidth (bytes of logits read
and gradients written over its time) and checks the kernels against a float32 reference.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax import loss
from qwenjax.kernels import cross_entropy_gpu

from timing import median_seconds, rel_err  # benchmarks/, next to this script


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--rows', type=int, default=4096, help='batch x loss_chunk of configs/1b.py')
  parser.add_argument('--vocab', type=int, default=151936)
  parser.add_argument('--dtype', default='bfloat16', help='the logits dtype (train.logits_dtype)')
  parser.add_argument('--z_coef', type=float, default=1e-4)
  parser.add_argument('--blocks', type=int, nargs='+', default=[4096])
  parser.add_argument('--warps', type=int, nargs='+', default=[4])
  parser.add_argument('--iters', type=int, default=10)
  parser.add_argument('--calls', type=int, default=10)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  interpret = jax.default_backend() != 'gpu'
  rng = np.random.RandomState(0)
  dtype = jnp.dtype(args.dtype)
  logits = jnp.asarray(rng.randn(args.rows, args.vocab) * 4, dtype)
  targets = jnp.asarray(rng.randint(0, args.vocab, args.rows), jnp.int32)
  weights = jnp.asarray(rng.rand(args.rows) > 0.1, jnp.float32)
  ref_lse = jax.jit(lambda x: jax.nn.logsumexp(x.astype(jnp.float32), axis=-1))(logits)
  ref_grad = jax.jit(lambda x, lse: weights[:, None] * (jnp.exp(x.astype(jnp.float32) - lse[:, None]) * (
      1 + 2 * args.z_coef * lse[:, None]) - jax.nn.one_hot(targets, args.vocab)))(logits, ref_lse)
  logit_bytes = logits.size * dtype.itemsize
  results = []

  def record(name, sec, out, ref, traffic):
    rec = dict(pass_=name, ms=sec * 1e3, tb_per_s=traffic / sec / 1e12,
               rel_err=rel_err(np.asarray(out, np.float32), np.asarray(ref, np.float32)))
    print(json.dumps(rec), flush=True)
    results.append(rec)

  lse_fns = {'xla': lambda x: loss.logsumexp(x, impl='xla')}  # as the step calls it: it converts to float32
  grad_fns = {'xla': lambda x, lse: loss.softmax_grad(x, lse, targets, weights, args.z_coef, dtype, impl='xla')}
  for block in args.blocks:
    for warps in args.warps:
      lse_fns[f'pallas_b{block}_w{warps}'] = lambda x, b=block, w=warps: cross_entropy_gpu.logsumexp(
          x, block=b, num_warps=w, interpret=interpret)
      grad_fns[f'pallas_b{block}_w{warps}'] = lambda x, lse, b=block, w=warps: cross_entropy_gpu.softmax_grad(
          x, lse, targets, weights, z_coef=args.z_coef, dtype=dtype, block=b, num_warps=w, interpret=interpret)
  for name, fn in lse_fns.items():
    sec, out = median_seconds(jax.jit(fn), logits, iters=args.iters, calls=args.calls)
    record(f'logsumexp {name}', sec, out, ref_lse, logit_bytes)
  for name, fn in grad_fns.items():
    sec, out = median_seconds(jax.jit(fn), logits, ref_lse, iters=args.iters, calls=args.calls)
    record(f'softmax_grad {name}', sec, out, ref_grad, 2 * logit_bytes)
  print(f'jax {jax.__version__}, {jax.devices()[0].device_kind}, logits [{args.rows}, {args.vocab}] {args.dtype}')
  with open(os.path.join(args.out, 'loss_gpu.json'), 'w') as f:
    json.dump(dict(args=vars(args), device=jax.devices()[0].device_kind, jax=jax.__version__, results=results), f)


if __name__ == '__main__':
  main()
