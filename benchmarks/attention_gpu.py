"""Checks and times qwenjax's Pallas GPU flash attention against cuDNN, XLA and JAX's stock Pallas kernel.

Run on a Hopper GPU (jax with CUDA), from the repository root after `pip install -e .` (results:
docs/performance.md):

    python benchmarks/attention_gpu.py --check            # correctness on fresh random bf16/fp32 inputs
                                                          # (cases 10-13: query chunks at an offset)
    python benchmarks/attention_gpu.py --bench --out DIR  # the issue-5 timing table (markdown, last)
    python benchmarks/attention_gpu.py --bench --only ours cuDNN --profile  # and the time of each kernel

Shape of the table: B=1, 28 query heads, 4 KV heads, head_dim 128, window 4096, bf16, seq 8k/16k/32k
(`--batch 4 --q_heads 16 --seqs 8192` is a layer of configs/1b.py; `--window 0` its full-attention layers). Useful
TFLOP/s count only the visible band: fwd = 4 * B * Hq * D * band_pairs, fwd+bwd = 3.5 x fwd. Times are medians
of `--iters` samples after warm-up, each `--calls` calls issued back to back and ended by one
`jax.block_until_ready` (as a training loop runs them; one call at a time adds launch latency and spread).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from qwenjax.attention import xla_attention
from qwenjax.kernels import attention_contract, flash_gpu

import profile_summary  # benchmarks/, next to this script
from timing import median_seconds, packed_batches, rel_err  # benchmarks/


def _inputs(key, batch, seq, q_heads, kv_heads, head_dim, dtype, doc_len=0, descending=False):
  """Random q, k, v, dO; with doc_len > 0 also segment ids of packed documents of that mean length (boundaries
  anywhere, also inside blocks). `descending`: the same documents numbered in decreasing order, which the
  kernels cannot tell are contiguous runs: they visit and mask the whole band, as before document ranges."""
  ks = jax.random.split(key, 5)
  q = jax.random.normal(ks[0], (batch, seq, q_heads, head_dim), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (batch, seq, kv_heads, head_dim), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (batch, seq, kv_heads, head_dim), jnp.float32).astype(dtype)
  do = jax.random.normal(ks[3], (batch, seq, q_heads, head_dim), jnp.float32).astype(dtype)
  seg = None
  if doc_len:
    seg = jnp.cumsum(jax.random.bernoulli(ks[4], 1.0 / doc_len, (batch, seq)), axis=1).astype(jnp.int32)
    if descending:
      seg = seq - seg
  return q, k, v, do, seg


def _blocks(args) -> flash_gpu.BlockSizes:
  return flash_gpu.BlockSizes(**json.loads(args.blocks)) if args.blocks else flash_gpu.BlockSizes()


def check(args) -> bool:
  """Kernel vs the XLA reference on fp32-upcast inputs: outputs and q/k/v gradients."""
  cases = [
      # batch, seq, q_heads, kv_heads, head_dim, window, mean document length (0: none), dtype, backend
      (1, 2048, 28, 4, 128, 4096, 0, jnp.bfloat16, 'mosaic'),  # window > seq
      (2, 1000, 14, 2, 128, 300, 0, jnp.bfloat16, 'mosaic'),  # odd length, window
      (1, 1536, 7, 7, 64, 37, 0, jnp.bfloat16, 'mosaic'),  # window < block, GQA 1, d=64
      (2, 777, 14, 2, 128, 200, 194, jnp.bfloat16, 'mosaic'),  # packed documents
      (1, 1024, 8, 4, 64, None, 256, jnp.float16, 'mosaic'),  # causal, fp16, documents
      (1, 1000, 4, 2, 128, 100, 250, jnp.float32, 'triton'),  # fp32 path
      (1, 512, 4, 2, 64, 70, 0, jnp.bfloat16, 'triton'),
      (2, 4096, 16, 4, 128, 1024, 900, jnp.bfloat16, 'mosaic'),  # long documents: one-document blocks unmasked
      (2, 4096, 16, 4, 128, None, 600, jnp.bfloat16, 'mosaic'),  # the same, plain causal
      (1, 2000, 8, 2, 128, 500, -300, jnp.bfloat16, 'mosaic'),  # ids not ascending: mask everything
  ]
  # Context parallelism's chunks (q_offset): (first row, rows) of the queries, against the whole sequence.
  chunks = dict(zip(range(len(cases), len(cases) + 4), [(0, 256), (1024, 512), (3584, 512), (256, 128)]))
  cases += [
      (2, 2048, 14, 2, 128, 300, 0, jnp.bfloat16, 'mosaic'),  # the first chunk, window
      (1, 4096, 16, 4, 128, 1024, 900, jnp.bfloat16, 'mosaic'),  # a middle chunk, window, documents
      (1, 4096, 16, 4, 128, None, 0, jnp.bfloat16, 'mosaic'),  # the last chunk, plain causal
      (1, 1024, 4, 2, 128, 100, 250, jnp.float32, 'triton'),  # fp32 path
  ]
  ok = True
  results = []
  for i, (b, s, hq, hkv, d, w, doc_len, dtype, backend) in enumerate(cases):
    if args.cases and i not in args.cases:
      continue
    t0 = time.perf_counter()
    q, k, v, do, seg = _inputs(jax.random.key(1000 + i + int(time.time())), b, s, hq, hkv, d, dtype, abs(doc_len),
                               descending=doc_len < 0)
    try:
      fn = functools.partial(flash_gpu.flash_attention, sliding_window=w, segment_ids=seg, backend=backend,
                             block_sizes=_blocks(args) if backend == 'mosaic' else None)
      ref_fn = functools.partial(xla_attention, sliding_window=w, segment_ids=seg)
      if i in chunks:  # queries of rows first .. first + rows - 1 only, at a traced offset
        first, rows = chunks[i]
        fn = functools.partial(lambda f, q, k, v: f(q[:, first:first + rows], k, v, q_offset=jnp.int32(first)), fn)
        ref_fn = functools.partial(lambda f, q, k, v: f(q, k, v)[:, first:first + rows], ref_fn)
        do = do[:, first:first + rows]

      @jax.jit
      def ours(q, k, v, do):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(do)

      @jax.jit
      def reference(q, k, v, do):
        up = lambda x: x.astype(jnp.float32)
        with jax.default_matmul_precision('highest'):
          out, vjp = jax.vjp(ref_fn, up(q), up(k), up(v))
          return out, vjp(up(do))

      out, grads = jax.block_until_ready(ours(q, k, v, do))
      ref, ref_grads = reference(q, k, v, do)
      errs = [rel_err(out, ref)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
      finite = all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in (out, *grads))
      tol = 1e-4 if dtype == jnp.float32 else 2e-2
      passed = finite and max(errs) < tol
    except Exception as e:  # pylint: disable=broad-except
      errs, passed = [repr(e)[:400]], False
    ok &= passed
    line = dict(case=i, blocks=args.blocks, b=b, s=s, hq=hq, hkv=hkv, d=d, window=w, doc_len=doc_len,
                q_chunk=chunks.get(i),
                dtype=jnp.dtype(dtype).name, backend=backend, errors_out_dq_dk_dv=errs, passed=passed,
                seconds=round(time.perf_counter() - t0, 1))
    results.append(line)
    print(json.dumps(line), flush=True)
  if args.out:
    with open(os.path.join(args.out, 'check.json'), 'w') as f:
      json.dump(results, f, indent=1)
  print('CHECK', 'PASSED' if ok else 'FAILED', flush=True)
  return ok


def _impls(window, blocks):
  """name -> attention(q, k, v) over [b, s, h, d] inputs (K/V with kv_heads)."""
  def ours(q, k, v, segment_ids=None):
    return flash_gpu.flash_attention(q, k, v, sliding_window=window, segment_ids=segment_ids, block_sizes=blocks)

  def cudnn(q, k, v):
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local, implementation='cudnn')

  def xla(q, k, v):
    return xla_attention(q, k, v, sliding_window=window)

  def stock(q, k, v):
    from jax.experimental.pallas.ops.gpu import attention as stock_attention  # pylint: disable=g-import-not-at-top
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    return stock_attention.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=True)

  return {'ours (Pallas Mosaic GPU)': ours, 'cuDNN': cudnn, 'XLA masked reference': xla,
          'stock Pallas mha (Triton, causal only, no window)': stock}


VARIANTS = (
    {},
    {'stages_bwd': 3},
    {'pingpong_bwd': True},
    {'pingpong_bwd': True, 'stages_bwd': 3},
)


def tune(args) -> flash_gpu.BlockSizes:
  """Times our fwd+bwd at the longest sequence for a few block configurations; returns the fastest."""
  batch, q_heads, kv_heads, head_dim, window = 1, 28, 4, 128, 4096
  seq = max(args.seqs)
  q, k, v, do, _ = _inputs(jax.random.key(7), batch, seq, q_heads, kv_heads, head_dim, jnp.bfloat16)
  best, best_t, log = None, float('inf'), []
  for variant in VARIANTS:
    if args.safe and variant.get('pingpong_bwd'):
      continue
    blocks = flash_gpu.BlockSizes(**variant)
    fn = functools.partial(flash_gpu.flash_attention, sliding_window=window, block_sizes=blocks)
    f = jax.jit(lambda q, k, v, do, fn=fn: jax.vjp(fn, q, k, v)[1](do))
    try:
      t, _ = median_seconds(f, q, k, v, do, warmup=3, iters=args.iters, calls=args.calls)
    except Exception as e:  # pylint: disable=broad-except
      print('variant', variant, 'failed:', repr(e)[:300], flush=True)
      continue
    log.append(dict(variant=variant, seq=seq, fwd_bwd_ms=t * 1e3))
    print(json.dumps(log[-1]), flush=True)
    if t < best_t:
      best, best_t = blocks, t
  if args.out:
    with open(os.path.join(args.out, 'tune.json'), 'w') as f:
      json.dump(log, f, indent=1)
  return best


def _document_pairs(seg, window) -> int:
  """Visible (query, key) pairs of one head over the batch with packed documents."""
  return attention_contract.documents_band_pairs(attention_contract.document_lengths(seg), window)


def _profile(fn, inputs, calls: int, out: str | None, label: str) -> dict:
  """Per-kernel device time of `calls` back-to-back calls (a trace under `out`, else a temporary directory)."""
  trace_dir = os.path.join(out or tempfile.mkdtemp(), 'trace_' + ''.join(c if c.isalnum() else '_' for c in label))

  def back_to_back():
    for _ in range(calls):
      result = fn(*inputs)
    return result

  summary = profile_summary.trace(back_to_back, trace_dir, steps=calls, top=10)
  print(f'profile of fwd+bwd, {label}, per call:\n{profile_summary.format_summary(summary)}', flush=True)
  return summary


def bench(args, blocks=None):
  batch, q_heads, kv_heads, head_dim = args.batch, args.q_heads, 4, 128
  window = args.window or None
  if blocks is None:
    blocks = _blocks(args)
  rows, results = [], []
  for seq in args.seqs:
    key = jax.random.key(seq)
    q, k, v, do, seg = _inputs(key, batch, seq, q_heads, kv_heads, head_dim, jnp.bfloat16, args.doc_len)
    impls, pairs = _impls(window, blocks), {}  # useful TF/s count the visible pairs: the band, or the documents'
    if args.batches_file:  # the documents of the first batch of a data_throughput.py --save file
      seg = jnp.asarray(packed_batches(args.batches_file, batch, seq)[0]['segment_ids'])
      ours = impls['ours (Pallas Mosaic GPU)']
      name = f'ours, documents of {os.path.basename(args.batches_file)}'
      impls = {name: functools.partial(ours, segment_ids=seg), 'ours, no documents (all of the band)': ours}
      pairs = dict.fromkeys(list(impls)[:1], _document_pairs(seg, window))
    elif args.doc_len:  # the same inputs in packed documents: ascending ids, then the same documents descending
      seg_desc = _inputs(key, batch, seq, q_heads, kv_heads, head_dim, jnp.bfloat16, args.doc_len, True)[4]
      ours = impls['ours (Pallas Mosaic GPU)']
      impls = {
          f'ours, documents of mean length {args.doc_len}': functools.partial(ours, segment_ids=seg),
          'ours, the same documents, whole band masked': functools.partial(ours, segment_ids=seg_desc),
          'ours, no documents (all of the band)': ours}
      pairs = dict.fromkeys(list(impls)[:2], _document_pairs(seg, window))
    for name, fn in impls.items():
      fwd_flops = 4 * q_heads * head_dim * pairs.get(name, batch * attention_contract.band_pairs(seq, window))
      if args.only and not any(o in name for o in args.only):
        continue
      entry = dict(seq=seq, impl=name)
      fwd = jax.jit(fn)
      fwd_bwd = jax.jit(lambda q, k, v, do, fn=fn: jax.vjp(fn, q, k, v)[1](do))
      for label, f, a, flops in (('fwd', fwd, (q, k, v), fwd_flops),
                                 ('fwd+bwd', fwd_bwd, (q, k, v, do), 3.5 * fwd_flops)):
        try:
          t, _ = median_seconds(f, *a, warmup=3, iters=args.iters, calls=args.calls)
          entry[label + '_ms'] = t * 1e3
          entry[label + '_tflops'] = flops / t / 1e12
        except Exception as e:  # pylint: disable=broad-except
          msg = repr(e)
          entry[label + '_error'] = 'OOM' if 'RESOURCE_EXHAUSTED' in msg or 'out of memory' in msg else msg[:300]
      if args.profile and 'fwd+bwd_ms' in entry:
        entry['fwd+bwd_profile'] = _profile(fwd_bwd, (q, k, v, do), args.calls, args.out, f'{seq}_{name}')
      print(json.dumps(entry), flush=True)
      results.append(entry)
  if args.out:
    with open(os.path.join(args.out, 'bench.json'), 'w') as f:
      json.dump(dict(jax=jax.__version__, device=str(jax.devices()[0].device_kind), blocks=str(blocks),
                     results=results), f, indent=1)

  def cell(e, label):
    if label + '_ms' in e:
      return f"{e[label + '_ms']:.2f} ms / {e[label + '_tflops']:.0f}"
    return e.get(label + '_error', '-')[:40]

  print(f'\njax {jax.__version__}, {jax.devices()[0].device_kind}, blocks {blocks}')
  print('| seq | implementation | fwd (ms / useful TF/s) | fwd+bwd (ms / useful TF/s) |')
  print('| --- | --- | --- | --- |')
  for e in results:
    rows.append(f"| {e['seq']} | {e['impl']} | {cell(e, 'fwd')} | {cell(e, 'fwd+bwd')} |")
  print('\n'.join(rows), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--check', action='store_true')
  parser.add_argument('--bench', action='store_true')
  parser.add_argument('--tune', action='store_true', help='pick our block sizes first (fwd+bwd, longest seq)')
  parser.add_argument('--safe', action='store_true', help='tune without the ping-pong variants')
  parser.add_argument('--cases', type=int, nargs='*', help='check only these case indices')
  parser.add_argument('--seqs', type=int, nargs='+', default=[8192, 16384, 32768])
  parser.add_argument('--batch', type=int, default=1, help='--bench shape (configs/1b.py: --batch 4 --q_heads 16)')
  parser.add_argument('--q_heads', type=int, default=28, help='--bench shape; 4 KV heads, head_dim 128')
  parser.add_argument('--window', type=int, default=4096, help='--bench sliding window; 0: plain causal')
  parser.add_argument('--doc_len', type=int, default=0,
                      help='--bench ours on packed documents of this mean length (useful TF/s count their pairs)')
  parser.add_argument('--batches_file', default='',
                      help="--bench ours on the documents of a data_throughput.py --save file's first batch")
  parser.add_argument('--iters', type=int, default=10, help='timed samples (their median is reported)')
  parser.add_argument('--calls', type=int, default=10, help='calls per sample, back to back (1: one at a time)')
  parser.add_argument('--only', nargs='*', help='substrings of implementation names to time')
  parser.add_argument('--profile', action='store_true',
                      help='--bench: also trace --calls fwd+bwd calls of each implementation (time per kernel)')
  parser.add_argument('--blocks', help='JSON of flash_gpu.BlockSizes fields for ours')
  parser.add_argument('--out', default=os.environ.get('OUT'))
  args = parser.parse_args()
  if args.out:
    os.makedirs(args.out, exist_ok=True)
  print('jax', jax.__version__, jax.devices(), flush=True)
  ok = True
  if args.check:
    ok = check(args)
  blocks = tune(args) if args.tune else None
  if args.bench:
    bench(args, blocks)
  sys.exit(0 if ok else 1)


if __name__ == '__main__':
  main()
