r"""Throughput of a scaling study's model sizes, alone and in groups (one step vmapped over K runs), on one GPU.

For each ladder size of a sweep file (default experiments/isoflop_gpu.py: its shapes, batch per size, seq_len,
dtypes, attention and loss kernels), the train step `python -m qwenjax.train` and the sweep run
(`qwenjax.train`'s jitted step, vmapped over K members for K > 1), on synthetic packed rows (random tokens,
documents of ~300 tokens). Per (size, K) it records the compile time, the step time with steps issued back to
back (`device`), the step time as the training loop issues them (`loop`: each batch placed from host arrays, the
previous step's metrics awaited, as `train_loop` does), the step time of `--scan` steps in one call (`scan`: the
same step under `jax.lax.scan` over stacked batches, what dispatching several steps at once would buy if host
and launch costs mattered), tokens per second and MFU of the whole group (K x batch x seq_len tokens a step;
`qwenjax.metrics.flops_per_token` against 989 TFLOP/s), peak memory, and for K > 1 the
largest relative difference between each member's losses over 3 steps and those of the same member alone
(different learning rates, one batch: what a group must reproduce).

    python benchmarks/groups_gpu.py --out $OUT                      # sizes and K as below, within --budget_s
    python benchmarks/groups_gpu.py --plan '8:1;11:1;15:1;20:1' --scan 8 --out /tmp/g  # sizes alone, + scans
    python benchmarks/groups_gpu.py --plan '4:1;8:1' --profile --out /tmp/g  # + where the GPU time goes

Stops starting new (size, K) pairs once `--budget_s` has passed. Results: OUT/groups_gpu.jsonl, a table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time

import flax.linen as nn
import jax
import numpy as np

from qwenjax import config as config_lib
from qwenjax import group as group_lib
from qwenjax import metrics
from qwenjax import sharding
from qwenjax import sweep as sweep_lib
from qwenjax import train
from qwenjax import train_step
from qwenjax.model_config import ModelConfig
import profile_summary  # benchmarks/, next to this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The lr stage's sizes first (grouped in the study), then the large sizes, then the other small ones.
DEFAULT_PLAN = '5:1,4;7:1,4;9:1,4;11:1,2,4;13:1,2;15:1,2;20:1;4:1,4;8:1,4;10:1,2'
LRS = (2e-3, 4e-3, 8e-3, 1.6e-2)


def size_config(sweep, size: int):
  """The training config of ladder size `size` in the sweep (its overrides, shape and batch), at the sweep's lr."""
  base = config_lib.load(sweep_lib.resolve_base(sweep.base))
  overrides = dict(sweep_lib.flatten(sweep.get('overrides', {})))
  overrides.update({f'model.{k}': v for k, v in sweep_lib.ladder_shape(size, sweep.ladder).items()})
  model = ModelConfig.from_dict(sweep_lib.apply_overrides(base, overrides).model)
  batch = sweep_lib._batch_size(sweep, sweep_lib.params_with_head(model))  # pylint: disable=protected-access
  if batch:
    overrides['train.batch_size'] = batch
  overrides.update({'train.steps': 10_000, 'train.warmup_steps': 100, 'data.train_files': '', 'data.eval_files': ''})
  return sweep_lib.apply_overrides(base, overrides)


def synthetic_batch(rows: int, seq_len: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (rows, seq_len + 1)).astype(np.int32)
  starts = rng.random((rows, seq_len + 1)) < 1 / 300
  segments = (np.cumsum(starts, axis=1) + 1).astype(np.int32)
  positions = np.zeros_like(tokens)
  for r in range(rows):
    first = np.concatenate([[0], np.flatnonzero(np.diff(segments[r])) + 1])
    lengths = np.diff(np.concatenate([first, [seq_len + 1]]))
    positions[r] = np.concatenate([np.arange(n) for n in lengths])
  same = (segments[:, 1:] == segments[:, :-1])
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'positions': positions[:, :-1],
          'segment_ids': segments[:, :-1], 'weights': same.astype(np.float32)}


def measure(config, size: int, members: int, steps_s: float, scan: int = 0, profile: bool = False) -> dict:
  settings = config_lib.settings(config)
  model, loop = settings.model, settings.loop
  mesh = sharding.make_mesh(settings.mesh)
  rules = sharding.logical_axis_rules(settings.mesh.rules, mesh, model)
  batch_sharding, replicated = sharding.batch_sharding(mesh, rules), sharding.replicated(mesh)
  seq_len, rows = settings.data.seq_len, loop.batch_size
  optimizers = [dataclasses.replace(settings.optimizer, lr=lr) for lr in LRS[:members]] if members > 1 else [
      settings.optimizer]
  host_batches = [synthetic_batch(rows, seq_len, model.vocab_size, seed) for seed in range(4)]
  flops, params = metrics.flops_per_token(model, seq_len), sweep_lib.params_with_head(model)  # outside the mesh
  local = list(range(rows))
  place = lambda b: train._global_batch(b, batch_sharding, local, rows)  # pylint: disable=protected-access
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step_fn, _ = train.jitted_steps(settings, mesh, rules, members)  # the sweep's own step, vmapped
    tx = train_step.make_optimizer(settings.optimizer)
    shardings = train_step.state_shardings(model, tx, mesh, rules)
    single = train_step.create_state(model, tx, shardings, rng=jax.random.key(0))
    initial = jax.device_get(single)

    def fresh():
      one = jax.device_put(initial, shardings)
      return group_lib.stack([one] * members, shardings) if members > 1 else one

    horizon = jax.device_put(group_lib.horizon(optimizers) if members > 1
                             else train_step.schedule_horizon(optimizers[0]), replicated)
    batches = [place(b) for b in host_batches]
    state = fresh()
    start = time.perf_counter()
    state, out = step_fn(state, batches[0], horizon)
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(3):
      state, out = step_fn(state, batches[i % 4], horizon)
    jax.block_until_ready(out)
    n = int(np.clip(steps_s / ((time.perf_counter() - start) / 3), 10, 400))
    start = time.perf_counter()
    for i in range(n):
      state, out = step_fn(state, batches[i % 4], horizon)
    jax.block_until_ready(out)
    device_s = (time.perf_counter() - start) / n
    start, previous = time.perf_counter(), None
    for i in range(n):  # as train_loop: place the host batch, step, wait for the previous step's metrics
      state, out = step_fn(state, place(host_batches[i % 4]), horizon)
      if previous is not None:
        jax.block_until_ready(previous)
      previous = out
    jax.block_until_ready(out)
    loop_s = (time.perf_counter() - start) / n
    scan_s = None
    if scan > 1:  # `scan` steps per call, the batches already on the device
      stacked = jax.tree.map(lambda *x: np.stack(x), *[host_batches[i % 4] for i in range(scan)])

      @functools.partial(jax.jit, donate_argnums=(0,))
      def steps(state, stacked, horizon):
        return jax.lax.scan(lambda s, b: step_fn(s, b, horizon), state, stacked)

      stacked = jax.device_put(stacked)
      state, out = steps(state, stacked, horizon)
      jax.block_until_ready(out)
      calls = max(1, n // scan)
      start = time.perf_counter()
      for _ in range(calls):
        state, out = steps(state, stacked, horizon)
      jax.block_until_ready(out)
      scan_s = (time.perf_counter() - start) / (calls * scan)
    summary = None
    if profile:  # where 4 steps' GPU time goes: kernels by category, and the idle gaps between them

      def four_steps(state=state):
        for i in range(4):
          state, out = step_fn(state, batches[i % 4], horizon)
        return out

      summary = profile_summary.trace(four_steps, f'/tmp/trace_groups_s{size}_k{members}', steps=4, top=15)
      print(f'size {size}, K={members}:\n{profile_summary.format_summary(summary)}', flush=True)
    del state
    record = dict(size=size, members=members, params_with_head=params,
                  batch=rows, seq_len=seq_len, compile_s=round(compile_s, 1), steps_timed=n,
                  device_step_s=device_s, loop_step_s=loop_s, scan=scan, scan_step_s=scan_s,
                  gpu_busy_ms_per_step=summary and summary['busy_ms_per_step'],
                  gpu_ms_per_step_by_category=summary and summary['categories_ms_per_step'])
    tokens = members * rows * seq_len
    peak = metrics.peak_flops_per_device() or 989e12
    record.update(tokens_per_s=tokens / loop_s, mfu_device=tokens * flops / device_s / peak,
                  mfu_loop=tokens * flops / loop_s / peak,
                  mfu_scan=tokens * flops / scan_s / peak if scan_s else None)
    stats = jax.devices()[0].memory_stats() or {}
    record['process_peak_gib'] = round(stats.get('peak_bytes_in_use', 0) / 2**30, 2)  # so far, not reset
    if members > 1:  # each member's losses over 3 steps, grouped and alone
      grouped, alone = fresh(), []
      grouped_losses = []
      for i in range(3):
        grouped, out = step_fn(grouped, batches[i], horizon)
        grouped_losses.append(np.asarray(out['loss'], np.float64))
      one_fn, _ = train.jitted_steps(settings, mesh, rules, 1)
      for k, optimizer in enumerate(optimizers):
        state, losses = jax.device_put(initial, shardings), []
        h = jax.device_put(train_step.schedule_horizon(optimizer), replicated)
        for i in range(3):
          state, out = one_fn(state, batches[i], h)
          losses.append(float(out['loss']))
        alone.append(losses)
      grouped_losses = np.stack(grouped_losses, axis=1)
      record['max_rel_loss_diff'] = float(np.max(np.abs(grouped_losses - np.asarray(alone)) / np.abs(alone)))
  return record


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sweep', default=os.path.join(ROOT, 'experiments', 'isoflop_gpu.py'))
  parser.add_argument('--plan', default=DEFAULT_PLAN, help='size:K,K;size:K,... (K: members of a group)')
  parser.add_argument('--budget_s', type=float, default=420.0)
  parser.add_argument('--steps_s', type=float, default=2.0, help='seconds of steps timed per (size, K)')
  parser.add_argument('--scan', type=int, default=0, help='also time this many steps per call (0: not)')
  parser.add_argument('--profile', action='store_true', help='also trace 4 steps and print where their GPU time goes')
  parser.add_argument('--out', default='/tmp/groups_gpu')
  args = parser.parse_args()
  sweep = config_lib.load(args.sweep)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'groups_gpu.jsonl')
  begin, records = time.time(), []
  print(f'{"size":>4} {"K":>2} {"N":>7} {"batch":>5} {"compile s":>9} {"ms/step":>8} {"loop ms":>8} '
        f'{"MFU":>6} {"loop MFU":>8} {"scan MFU":>8} {"tok/s":>10} {"GiB":>6} {"loss diff":>9}', flush=True)
  for entry in args.plan.split(';'):
    size, groups = entry.split(':')
    for members in map(int, groups.split(',')):
      if time.time() - begin > args.budget_s:
        print(f'budget of {args.budget_s:.0f} s spent: stopping before size {size} K={members}', flush=True)
        break
      try:
        r = measure(size_config(sweep, int(size)), int(size), members, args.steps_s, args.scan, args.profile)
      except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory: recorded, the rest go on)
        r = dict(size=int(size), members=members, error=f'{type(e).__name__}: {str(e)[:300]}')
        print(f'{size:>4} {members:>2} error: {r["error"]}', flush=True)
      else:
        diff = r.get('max_rel_loss_diff')
        scan_mfu = '-' if r['mfu_scan'] is None else f'{100 * r["mfu_scan"]:.1f}%'
        print(f'{r["size"]:>4} {members:>2} {r["params_with_head"] / 1e6:>6.1f}M {r["batch"]:>5} '
              f'{r["compile_s"]:>9.1f} {1e3 * r["device_step_s"]:>8.2f} {1e3 * r["loop_step_s"]:>8.2f} '
              f'{100 * r["mfu_device"]:>5.1f}% {100 * r["mfu_loop"]:>7.1f}% '
              f'{scan_mfu:>8} '
              f'{r["tokens_per_s"]:>10,.0f} '
              f'{r["process_peak_gib"]:>6.1f} {"" if diff is None else f"{diff:.1e}":>9}', flush=True)
      r.update(device=jax.devices()[0].device_kind, jax=jax.__version__, xla_flags=os.environ.get('XLA_FLAGS', ''))
      records.append(r)
      with open(path, 'a') as f:
        f.write(json.dumps(r) + '\n')
    else:
      continue
    break
  print(f'{len(records)} measurements in {time.time() - begin:.0f} s -> {path}')


if __name__ == '__main__':
  main()
