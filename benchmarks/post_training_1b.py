r"""SFT and DPO on one GPU at the configs/1b.py shape: synthetic chat data, then the DPO step against the SFT step.

    python benchmarks/post_training_1b.py data --out /tmp/pt        # tokenizer, sft.jsonl, dpo.jsonl (a minute)
    python benchmarks/post_training_1b.py steps --out /tmp/pt       # the two steps on the same packed rows

`--config configs/tiny.py --variant b2_m1_none_xla --set model.vocab_size=8192` runs it on a CPU (a smoke test).

`data` writes what a GPU machine without network needs: a 8192-piece BPE trained by the job's own trainer (chat
then uses the built-in ChatML format, `qwenjax.chat`), `sft.jsonl` (multi-turn conversations of random words, 30 to
6,000 tokens) and `dpo.jsonl` (pairs whose prompt + completions mostly fit 8192 tokens). Full SFT of the 1b shape
is then the training job itself, beside its pretraining run (docs/post_training.md gives the commands).

`steps` packs the preference pairs into rows of configs/1b.py's seq_len (`qwenjax.chat_data`, as the job does),
and times, on the very same batches, the SFT step (`train.objective='cross_entropy'`: weights on the completion
tokens) and the DPO step (the policy's forward and backward plus the reference's forward), each in its own process,
jitted as the job jits them (`b{batch}_m{micro}` etc. as in train_1b.py; default b4_m4_acts_pallas_unrolled, the
job's). Reports each step's median, tokens/s over every position, MFU (`metrics.flops_per_token`, the whole causal
band), trained tokens/s, peak memory, and DPO / SFT. One JSON line per step in OUT/post_training_1b.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np

from qwenjax import chat_data
from qwenjax import config as config_lib
from qwenjax import metrics
from qwenjax import sharding
from qwenjax import tokenizer as tokenizer_lib
from qwenjax import train_step

import train_1b  # benchmarks/, next to this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ('model data train token layer attention value query key batch step loss gradient memory kernel device '
         'shard mesh row segment reply question answer chat user system assistant prompt reward policy '
         'reference sample text number the of and to in is it for on with as by at from').split()


def _text(rng, n: int) -> str:
  return ' '.join(rng.choice(WORDS, size=n)) + '.'


def write_data(out: str, conversations: int = 3000, pairs: int = 2000) -> None:
  rng = np.random.default_rng(0)
  os.makedirs(out, exist_ok=True)
  tokenizer_lib.train((_text(rng, 200) for _ in range(5000)), os.path.join(out, 'tokenizer'), vocab_size=8192)
  with open(os.path.join(out, 'sft.jsonl'), 'w') as f:
    for _ in range(conversations):
      messages = [{'role': 'system', 'content': _text(rng, int(rng.integers(5, 40)))}]
      for _ in range(int(rng.integers(1, 5))):
        messages.append({'role': 'user', 'content': _text(rng, int(rng.lognormal(4.0, 1.0)) + 3)})
        messages.append({'role': 'assistant', 'content': _text(rng, int(rng.lognormal(5.0, 1.0)) + 3)})
      f.write(json.dumps({'messages': messages}) + '\n')
  with open(os.path.join(out, 'dpo.jsonl'), 'w') as f:
    for _ in range(pairs):
      prompt = [{'role': 'user', 'content': _text(rng, int(rng.lognormal(5.0, 0.8)) + 3)}]
      reply = lambda: [{'role': 'assistant', 'content': _text(rng, int(rng.lognormal(5.0, 0.8)) + 3)}]
      f.write(json.dumps({'prompt': prompt, 'chosen': reply(), 'rejected': reply()}) + '\n')
  print(f'wrote {out}/tokenizer, sft.jsonl ({conversations} conversations), dpo.jsonl ({pairs} pairs)')


def packed_pairs(out: str, seq_len: int, rows: int, batches: int) -> list[dict[str, np.ndarray]]:
  tok = tokenizer_lib.load(os.path.join(out, 'tokenizer'))
  encoded = chat_data.encode([os.path.join(out, 'dpo.jsonl')], 'preference', tok, os.path.join(out, 'prepared'))
  packed = chat_data.PackedExamples(encoded, seq_len, seed=0)
  print(packed.describe(), flush=True)
  step = chat_data.StepBatches(packed, rows, range(rows))
  return [step(k) for k in range(batches)]


def run_one(objective: str, variant: str, out: str, steps: int, warmup: int, overrides: list[str],
            config_path: str) -> dict:
  v = train_1b.parse_variant(variant)
  config = config_lib.load(config_path)
  train_1b.apply_overrides(config, overrides)
  config.model.update(remat_policy=v['remat'], attention_impl=v['attention'], scan_layers=v['scan_layers'])
  config.train.update(batch_size=v['batch'], grad_accum_steps=v['batch'] // v['micro'], steps=10_000,
                      warmup_steps=100, objective=objective)
  config.data.format = 'preference' if objective == 'dpo' else 'text'
  run = config_lib.settings(config)
  model, seq_len = run.model, run.data.seq_len
  mesh = sharding.make_mesh(run.mesh)
  rules = sharding.logical_axis_rules(run.mesh.rules, mesh, model)
  tx = train_step.make_optimizer(run.optimizer)
  shardings = train_step.state_shardings(model, tx, mesh, rules)
  state = train_step.create_state(model, tx, shardings, rng=jax.random.key(0))
  reference = (train_step.random_params(model, shardings.params, jax.random.key(0)),) if objective == 'dpo' else ()
  batch_sharding = sharding.batch_sharding(mesh, rules)
  host = packed_pairs(out, seq_len, v['batch'], 4)
  batches = [{k: jax.device_put(x, batch_sharding) for k, x in b.items()} for b in host]
  replicated = sharding.replicated(mesh)
  horizon = jax.device_put(train_step.schedule_horizon(run.optimizer), replicated)
  more = (shardings.params,) if reference else ()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step_fn = jax.jit(train_step.make_train_step(model, run.optimizer, run.loss),
                      in_shardings=(shardings, batch_sharding, replicated) + more,
                      out_shardings=(shardings, None), donate_argnums=(0,))
    start = time.perf_counter()
    compiled = step_fn.lower(state, batches[0], horizon, *reference).compile()
    compile_s = time.perf_counter() - start
  for i in range(warmup):
    state, m = compiled(state, batches[i % len(batches)], horizon, *reference)
  jax.block_until_ready(m)
  times = []
  for i in range(steps):
    start = time.perf_counter()
    state, m = compiled(state, batches[i % len(batches)], horizon, *reference)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - start)
  step_s = float(np.median(times))
  tokens = v['batch'] * seq_len
  trained = float(np.mean([b['weights'].sum() for b in host]))
  peak = metrics.peak_flops_per_device() or float('nan')
  memory = jax.devices()[0].memory_stats() or {}
  return {'objective': objective, 'variant': variant, 'overrides': overrides, 'step_s': step_s,
          'tokens_per_s': tokens / step_s, 'mfu': tokens * metrics.flops_per_token(model, seq_len) / step_s / peak,
          'trained_tokens_per_s': trained / step_s, 'loss': float(m['loss']), 'compile_s': compile_s,
          'peak_gib': memory.get('peak_bytes_in_use', 0) / 2**30, 'device': jax.devices()[0].device_kind,
          'jax': jax.__version__}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('what', choices=('data', 'steps'))
  parser.add_argument('--out', default='/tmp/post_training')
  parser.add_argument('--variant', default='b4_m4_acts_pallas_unrolled')
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', '1b.py'))
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--set', action='append', default=[], metavar='SECTION.KEY=VALUE')
  parser.add_argument('--one', choices=('cross_entropy', 'dpo'), help='time this objective in this process')
  args = parser.parse_args()
  if args.what == 'data':
    write_data(args.out)
    return
  results_file = os.path.join(args.out, 'post_training_1b.jsonl')
  if args.one:
    result = run_one(args.one, args.variant, args.out, args.steps, args.warmup, args.set, args.config)
    print(json.dumps(result), flush=True)
    with open(results_file, 'a') as f:
      f.write(json.dumps(result) + '\n')
    return
  if not os.path.exists(os.path.join(args.out, 'dpo.jsonl')):
    write_data(args.out)
  packed_pairs(args.out, 8192, 1, 1)  # encode once, before the two processes read the cache
  results = {}
  for objective in ('cross_entropy', 'dpo'):  # each in a fresh process: a clean peak-memory reading
    command = [sys.executable, os.path.abspath(__file__), 'steps', '--one', objective, '--out', args.out,
               '--variant', args.variant, '--steps', str(args.steps), '--warmup', str(args.warmup),
               '--config', args.config]
    command += [f'--set={item}' for item in args.set]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    print(done.stdout[-3000:], done.stderr[-3000:] if done.returncode else '', flush=True)
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith('{')]
    results[objective] = lines[-1] if lines else None
  print('\n| step | s | tokens/s (all positions) | MFU | trained tokens/s | peak GiB |')
  print('| --- | --- | --- | --- | --- | --- |')
  for objective, r in results.items():
    if r:
      print(f'| {objective} | {r["step_s"]:.3f} | {r["tokens_per_s"]:,.0f} | {100 * r["mfu"]:.1f}% | '
            f'{r["trained_tokens_per_s"]:,.0f} | {r["peak_gib"]:.1f} |')
  if all(results.values()):
    ratio = results['dpo']['step_s'] / results['cross_entropy']['step_s']
    print(f'\nDPO step / SFT step of the same tokens: {ratio:.2f}x (goal: at most 2.2x)')


if __name__ == '__main__':
  main()
