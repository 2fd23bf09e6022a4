"""Where a jitted step spends GPU time: per-kernel totals from a `jax.profiler.trace(create_perfetto_trace=True)`.

    summary = summarize(trace_dir, steps=2)   # after tracing two steps into trace_dir
    print(format_summary(summary))

or from the command line, from the repository root after `pip install -e .`, e.g. on the trace
`python -m qwenjax.train ... --config.train.profile_steps=3` writes:

    python benchmarks/profile_summary.py WORKDIR/profile --steps 3

Kernels are grouped by name (a fusion's kernel is named after the HLO fusion, e.g. `loop_convert_fusion_3` is
`%loop_convert_fusion.3` in the compiled HLO text) and sorted by total time; `busy` is the union of kernel
intervals, so `wall - busy` is time the GPU sat idle (launch gaps, host syncs).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
from typing import Any, Callable

# Kernel-name fragments -> category, first match wins (lower case).
CATEGORIES = (
    ('attention', ('fmha', 'cudnn', 'flash', 'attention', 'mosaic')),
    ('matmul', ('gemm', 'nvjet', 'cutlass', 'xmma', 'cublas', 'sm90_', 'dot')),
    ('copy', ('memcpy', 'memset', 'copy', 'transpose', 'dynamic_update_slice', 'dynamic-update-slice')),
)


def category(kernel: str, hlo_op: str) -> str:
  text = f'{kernel} {hlo_op}'.lower()
  for name, fragments in CATEGORIES:
    if any(f in text for f in fragments):
      return name
  return 'other (elementwise, reductions)'


def _events(trace_dir: str) -> list[dict]:
  paths = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True)
  if not paths:
    raise FileNotFoundError(f'no perfetto_trace.json.gz under {trace_dir}')
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  pids = {e['pid'] for e in events if e.get('ph') == 'M' and e.get('name') == 'process_name'
          and 'GPU' in str(e.get('args', {}).get('name', ''))}
  kernels = [e for e in events if e.get('ph') == 'X' and e.get('dur', 0) > 0 and 'hlo_op' in e.get('args', {})]
  return [e for e in kernels if e['pid'] in pids] if pids else kernels  # no GPU: the host's thunks (CPU runs)


def summarize(trace_dir: str, steps: int, top: int = 60) -> dict:
  events = _events(trace_dir)
  if not events:
    raise ValueError(f'the trace in {trace_dir} holds no GPU kernels with an hlo_op')
  by_kernel = collections.defaultdict(lambda: [0.0, 0, ''])
  by_category = collections.Counter()
  for e in events:
    op = e['args']['hlo_op']  # with CUDA graphs (command buffers) this names the graph, not the kernel
    entry = by_kernel[e['name']]
    entry[0] += e['dur']
    entry[1] += 1
    entry[2] = entry[2] or op
    by_category[category(e['name'], op)] += e['dur']
  intervals = sorted((e['ts'], e['ts'] + e['dur']) for e in events)
  busy, end = 0.0, float('-inf')
  for a, b in intervals:
    if b > end:
      busy += b - max(a, end)
      end = b
  wall = intervals[-1][1] - intervals[0][0]
  ms = lambda us: us / 1e3 / steps  # microseconds over all steps -> ms per step
  kernels = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])
  return {
      'steps': steps, 'wall_ms_per_step': ms(wall), 'busy_ms_per_step': ms(busy),
      'kernel_ms_per_step': ms(sum(v[0] for v in by_kernel.values())),
      'categories_ms_per_step': {k: ms(v) for k, v in by_category.most_common()},
      'top_kernels': [{'kernel': kernel[:160], 'hlo_op': op, 'ms_per_step': ms(t), 'launches_per_step': n / steps,
                       'category': category(kernel, op)} for kernel, (t, n, op) in kernels[:top]],
  }


def trace(run: Callable[[], Any], trace_dir: str, steps: int, top: int = 60) -> dict:
  """Runs `run()` (which issues `steps` steps) under `jax.profiler` and summarizes the trace. Its result is waited
  for inside the trace, so the trace holds every kernel it launched."""
  import jax  # pylint: disable=g-import-not-at-top  (reading a trace needs no jax)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    jax.block_until_ready(run())
  return summarize(trace_dir, steps, top)


def format_summary(s: dict) -> str:
  lines = [f'GPU: wall {s["wall_ms_per_step"]:.1f} ms/step, busy {s["busy_ms_per_step"]:.1f}, '
           f'kernels {s["kernel_ms_per_step"]:.1f}']
  lines += [f'  {k:32s} {v:8.1f} ms' for k, v in s['categories_ms_per_step'].items()]
  lines += ['| ms/step | launches | category | kernel |', '| --- | --- | --- | --- |']
  lines += [f'| {k["ms_per_step"]:.2f} | {k["launches_per_step"]:g} | {k["category"]} | {k["kernel"][:90]} |'
            for k in s['top_kernels']]
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('trace_dir')
  parser.add_argument('--steps', type=int, required=True, help='steps the trace holds (times are per step)')
  parser.add_argument('--top', type=int, default=60)
  args = parser.parse_args()
  print(format_summary(summarize(args.trace_dir, args.steps, args.top)))


if __name__ == '__main__':
  main()
