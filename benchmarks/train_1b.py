r"""Times qwenjax train steps of configs/1b.py (seq_len 8192) on one GPU with synthetic tokens.

The step is `qwenjax.train_step.make_train_step`, the one `python -m qwenjax.train` runs (AdamW with fp32
master weights, bf16 compute, clipping, z-loss, gradient accumulation), jitted with the same shardings and
donation. Batches are random token ids without packing (cuDNN attention cannot mask packed documents), so no
grain is needed; or, with `--batches_file` (from `data_throughput.py --save`), packed documents of the main job's
pipeline, with segment ids and positions, as `python -m qwenjax.train` trains on (use a `pallas` variant).
A variant's name fixes the global batch, the micro-batch (grad accumulation), the remat policy, the attention
kernel and scanned or unrolled layers (`parse_variant`); `mauto` and `auto` leave the micro-batch and the policy to
`qwenjax.fit`, as the main job's defaults do, and the result records what it chose. MFU counts
`qwenjax.metrics.flops_per_token` against the device's bf16 peak (989 TFLOP/s on an H100). From the repository
root after `pip install -e .`:

    python benchmarks/train_1b.py --out /tmp/bench            # DEFAULT_VARIANTS, a table at the end
    python benchmarks/train_1b.py --variants b4_m1_none_cudnn  # others
    python benchmarks/train_1b.py --variants b4_m4_dots_cudnn --profile  # and where the GPU time goes
    python benchmarks/train_1b.py --variants b16_mauto_auto_pallas_unrolled,b16_m4_acts_pallas_unrolled  # 'auto'
    python benchmarks/train_1b.py --variants b4_m4_acts_cudnn_unrolled --set train.loss_chunk=4096  # config values
    python benchmarks/train_1b.py --config configs/tiny.py --variants b2_m1_none_xla  # a CPU smoke run
    python benchmarks/train_1b.py --variants b1_m1_acts_pallas_unrolled --set data.seq_len=131072 \
        --set mesh.fsdp=1 --set mesh.context=8   # one 128k-token sequence over 8 GPUs (context parallelism)
    python benchmarks/data_throughput.py --batch_size 4 --batches 8 --save /tmp/docs.npz   # packed documents:
    python benchmarks/train_1b.py --variants b4_m4_acts_pallas_unrolled --batches_file /tmp/docs.npz

XLA flags (`XLA_FLAGS=...`) reach every variant's process and are recorded with its result.

Results: one JSON object per variant in OUT/train_1b.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import jax
import numpy as np

from qwenjax import config as config_lib
from qwenjax import fit
from qwenjax import metrics
from qwenjax import sharding
from qwenjax import train
from qwenjax import train_step

import profile_summary  # benchmarks/, next to this script
from timing import packed_batches  # benchmarks/

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout, for the default config

REMAT = {'none': 'none', 'full': 'full', 'dots': 'dots_with_no_batch_dims_saveable',
         'dotsattn': 'dots_and_attention_saveable', 'acts': 'activations_saveable', 'attn': 'attention_saveable',
         'auto': 'auto'}
ATTENTION = {'cudnn': 'cudnn', 'pallas': 'pallas_gpu', 'xla': 'xla'}
DEFAULT_VARIANTS = ('b4_m4_acts_cudnn_unrolled', 'b4_m4_dotsattn_cudnn_unrolled', 'b4_m4_dots_cudnn')


def parse_variant(name: str) -> dict:
  """'b{batch}_m{micro}_{remat}_{attention}[_unrolled]', e.g. b4_m4_dots_cudnn: global batch 4, micro-batch 4,
  remat 'dots' (see REMAT), cuDNN attention (see ATTENTION), scanned layers unless '_unrolled'. Micro-batch
  'mauto' and remat 'auto': chosen by `qwenjax.fit` (micro None)."""
  parts = name.split('_')
  try:
    batch = int(parts[0].removeprefix('b'))
    micro = None if parts[1] == 'mauto' else int(parts[1].removeprefix('m'))
    remat, impl = REMAT[parts[2]], ATTENTION[parts[3]]
    if parts[4:] not in ([], ['unrolled']) or (micro and batch % micro):
      raise ValueError
  except (IndexError, KeyError, ValueError):
    raise SystemExit(f'bad variant {name!r}: expected b{{batch}}_m{{micro|auto}}_{{{"|".join(REMAT)}}}_'
                     f'{{{"|".join(ATTENTION)}}}[_unrolled], micro dividing batch') from None
  return dict(batch=batch, micro=micro, remat=remat, attention=impl, scan_layers=parts[4:] != ['unrolled'])


def apply_overrides(config, overrides: list[str]) -> dict:
  """Sets 'section.key=value' strings on the config (value parsed as the current value's type)."""
  applied = {}
  for item in overrides:
    path, _, text = item.partition('=')
    section, _, key = path.partition('.')
    if not text or key not in config.get(section, {}):
      raise SystemExit(f'bad --set {item!r}: expected section.key=value with an existing key')
    kind = type(config[section][key])
    value = text.lower() in ('1', 'true') if kind is bool else kind(text)
    config[section][key] = applied[path] = value
  return applied


def build(name: str, config_path: str, overrides: list[str] = (), batches_file: str = ''):
  """The jitted-and-compiled train step of one variant, its initial state and the batches it steps through:
  two synthetic ones, or every batch of packed documents in `batches_file`."""
  v = parse_variant(name)
  config = config_lib.load(config_path)
  config.mesh.update(data=1, fsdp=-1, tensor=1)  # every device on fsdp, unless --set mesh.* says otherwise
  v['overrides'] = apply_overrides(config, list(overrides))
  config.model.update(attention_impl=v['attention'], scan_layers=v['scan_layers'])
  config.train.update(batch_size=v['batch'], grad_accum_steps=v['batch'] // v['micro'] if v['micro'] else 'auto',
                      remat_policy=v['remat'], steps=10_000, warmup_steps=100)
  seq_len = int(config.data.seq_len)
  run = config_lib.settings(config)
  model = run.model
  mesh = sharding.make_mesh(run.mesh)
  rules = sharding.logical_axis_rules(run.mesh.rules, mesh, model)
  tx = train_step.make_optimizer(run.optimizer)
  shardings = train_step.state_shardings(model, tx, mesh, rules)
  state = train_step.create_state(model, tx, shardings, rng=jax.random.key(0))
  batch_sharding = sharding.batch_sharding(mesh, rules)

  rng = np.random.default_rng(0)
  def random_batch():
    tokens = rng.integers(0, model.vocab_size, (v['batch'], seq_len + 1), dtype=np.int32)
    return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
            'weights': np.ones((v['batch'], seq_len), np.float32)}
  # Taken in turn (two random batches, or every batch of the file): never the same input twice in a row.
  host = packed_batches(batches_file, v['batch'], seq_len) if batches_file else [random_batch() for _ in range(2)]
  batches = [{k: jax.device_put(x, batch_sharding) for k, x in b.items()} for b in host]

  replicated = sharding.replicated(mesh)
  horizon = jax.device_put(train_step.schedule_horizon(run.optimizer), replicated)

  # The main job's way: fitted to the device's memory ('auto' resolved, an explicit setting checked) and compiled.
  abstract = {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding) for k, x in batches[0].items()}
  start = time.perf_counter()
  run, compiled, choice = fit.fit_step(run, mesh=mesh, rules=rules, tx=tx, shardings=shardings, batch=abstract,
                                       jit_step=lambda s: train.jitted_steps(s, mesh, rules)[0])
  v.update(seq_len=seq_len, model=run.model, compile_s=time.perf_counter() - start, data=batches_file or 'random',
           loss_chunk=int(config.train.loss_chunk), logits_dtype=config.train.logits_dtype, horizon=horizon,
           micro=v['batch'] // choice.grad_accum_steps, remat=choice.remat_policy, needed_gib=choice.needed / 2**30,
           limit_gib=(choice.limit or 0) / 2**30, chosen=list(choice.automatic))
  return compiled, state, batches, v


def run_variant(name: str, steps: int, warmup: int, config_path: str, out: str, profile: bool,
                overrides: list[str] = (), batches_file: str = '') -> dict:
  compiled, state, batches, v = build(name, config_path, overrides, batches_file)
  for i in range(warmup):
    state, m = compiled(state, batches[i % len(batches)], v['horizon'])
  jax.block_until_ready(m)
  times = []
  for i in range(steps):
    start = time.perf_counter()
    state, m = compiled(state, batches[i % len(batches)], v['horizon'])
    jax.block_until_ready(m)
    times.append(time.perf_counter() - start)
  step_s = float(np.median(times))
  # The same number of steps dispatched back to back, one sync at the end, as a training loop runs them: the
  # host enqueues the next step while the GPU runs this one.
  start = time.perf_counter()
  for i in range(steps):
    state, m = compiled(state, batches[i % len(batches)], v['horizon'])
  jax.block_until_ready(m)
  pipelined_s = (time.perf_counter() - start) / steps
  tokens = v['batch'] * v['seq_len']
  flops = metrics.flops_per_token(v['model'], v['seq_len'])
  peak = metrics.peak_flops_per_device() or float('nan')
  memory = jax.devices()[0].memory_stats() or {}
  result = {
      'variant': name, 'batch': v['batch'], 'micro_batch': v['micro'], 'remat': v['remat'],
      'attention': v['attention'], 'scan_layers': v['scan_layers'], 'seq_len': v['seq_len'],
      'auto': v['chosen'], 'needed_gib': v['needed_gib'], 'limit_gib': v['limit_gib'],
      'loss_chunk': v['loss_chunk'], 'logits_dtype': v['logits_dtype'], 'overrides': v['overrides'],
      'data': v['data'],
      'step_s': step_s,
      'step_s_min': float(min(times)), 'tokens_per_s': tokens / step_s, 'mfu': tokens * flops / step_s / peak,
      'pipelined_step_s': pipelined_s, 'pipelined_tokens_per_s': tokens / pipelined_s,
      'gflop_per_token': flops / 1e9, 'compile_s': v['compile_s'], 'loss': float(m['loss']),
      'peak_gib': memory.get('peak_bytes_in_use', 0) / 2**30, 'device': jax.devices()[0].device_kind,
      'jax': jax.__version__, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }
  if profile:
    with open(os.path.join(out, f'{name}.hlo.txt'), 'w') as f:
      f.write(compiled.as_text())

    def two_steps(state=state):
      for i in range(2):
        state, m = compiled(state, batches[i % len(batches)], v['horizon'])
      return m

    summary = profile_summary.trace(two_steps, os.path.join('/tmp', f'trace_{name}'), steps=2)
    with open(os.path.join(out, f'{name}.profile.json'), 'w') as f:
      json.dump(summary, f, indent=1)
    print(profile_summary.format_summary(summary), flush=True)
    result['gpu_busy_ms_per_step'] = summary['busy_ms_per_step']
  return result


def _data_label(result: dict) -> str:
  data = result.get('data', 'random')
  return '' if data == 'random' else f', packed documents ({os.path.basename(data)})'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variants', default=','.join(DEFAULT_VARIANTS),
                      help='comma-separated names, see parse_variant')
  parser.add_argument('--steps', type=int, default=6, help='timed steps per variant (median reported)')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', '1b.py'))
  parser.add_argument('--set', action='append', default=[], metavar='SECTION.KEY=VALUE',
                      help='override a config value, e.g. --set train.loss_chunk=2048 (repeatable)')
  parser.add_argument('--batches_file', default='',
                      help='packed documents from data_throughput.py --save instead of random tokens')
  parser.add_argument('--out', default='.')
  parser.add_argument('--one', help='run this variant in this process (the parent runs each in its own)')
  parser.add_argument('--timeout', type=float, default=300, help='seconds per variant')
  parser.add_argument('--profile', action='store_true',
                      help='also trace two steps: per-kernel GPU time in OUT/VARIANT.profile.json, HLO beside it')
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  results_file = os.path.join(args.out, 'train_1b.jsonl')
  if args.one:
    try:
      result = run_variant(args.one, args.steps, args.warmup, args.config, args.out, args.profile, args.set,
                           args.batches_file)
    except Exception as e:  # pylint: disable=broad-except  (an OOM or a kernel failure ends one variant only)
      traceback.print_exc(limit=4)
      result = {'variant': args.one, 'error': f'{type(e).__name__}: {str(e)[:300]}'}
    print(json.dumps(result), flush=True)
    with open(results_file, 'a') as f:
      f.write(json.dumps(result) + '\n')
    return

  # Each variant in a fresh process: a clean peak-memory reading, and an OOM cannot affect the next one.
  names = args.variants.split(',')
  for name in names:
    parse_variant(name)  # a typo stops here, before any variant runs
  for name in names:
    print(f'--- {name}', flush=True)
    command = [sys.executable, os.path.abspath(__file__), '--one', name, '--steps', str(args.steps),
               '--warmup', str(args.warmup), '--config', args.config, '--out', args.out]
    command += [f'--set={item}' for item in args.set] + [f'--batches_file={args.batches_file}']
    command += ['--profile'] if args.profile else []
    try:
      failed = subprocess.run(command, check=False, timeout=args.timeout).returncode
    except subprocess.TimeoutExpired:
      failed = f'timed out after {args.timeout:.0f} s'
    if failed:
      with open(results_file, 'a') as f:
        f.write(json.dumps({'variant': name, 'error': f'process failed: {failed}'}) + '\n')
  with open(results_file) as f:
    results = [r for r in map(json.loads, f) if r['variant'] in names]
  print('\n| variant | batch x seq | micro-batch | remat | attention | loss chunk, logits | step s | tokens/s | MFU |'
        ' peak GiB | back to back: step s, tokens/s |')
  print('| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |')
  for r in results:
    if 'error' in r:
      print(f'| {r["variant"]} | failed: {r["error"][:100]} |')
    else:
      print(f'| {r["variant"]} | {r["batch"]} x {r["seq_len"]} | {r["micro_batch"]} | {r["remat"]} | '
            f'{r["attention"]}{_data_label(r)} | {r.get("loss_chunk", "")}, {r.get("logits_dtype", "float32")} | '
            f'{r["step_s"]:.3f} | {r["tokens_per_s"]:,.0f} | '
            f'{100 * r["mfu"]:.1f}% | {r["peak_gib"]:.1f} | '
            f'{r["pipelined_step_s"]:.3f}, {r["pipelined_tokens_per_s"]:,.0f} |')


if __name__ == '__main__':
  main()
