r"""Times LoRA SFT of the configs/qwen2_1_5b.py shape (random weights) on one GPU: qwenjax against transformers +
PEFT, on the same packed batches.

Both sides train rank-`--rank` adapters (alpha 2 x rank) on q, k, v, o, gate, up and down of a frozen bfloat16
base, float32 adapters, AdamW with global-norm clipping, bfloat16 compute, the global batch in micro-batches:

* qwenjax: `train_step.make_train_step` with `train.lora_rank` (the step `python -m qwenjax.train` runs), jitted
  with the job's shardings and donation; our attention kernel (`auto`: it masks packed conversations), remat
  `activations_saveable`, unrolled layers, bfloat16 logits (configs/1b.py's settings).
* the peer: transformers `Qwen2ForCausalLM` in bfloat16 wrapped by `peft.get_peft_model` (PEFT's adapters are
  float32 by default), under `torch.autocast(bfloat16)` and `torch.compile` (`--compile no` or `both` for eager),
  fused AdamW on the adapters, `use_cache=False`; attention `--attn` (sdpa, flex_attention). `position_ids`
  restart at each conversation, from which transformers masks packed sequences, and labels are -100 where our loss
  weight is 0.

The batches are synthetic SFT rows, the same on both sides (a seeded numpy draw, checked by a fingerprint):
conversations of 128 to 2048 tokens packed into rows of `--seq-len` (4096), each a prompt (about 40%, not trained)
and a response (trained: weight 1), as SFT on chat data trains. Each side runs in its own process (JAX and torch each
want the GPU's memory), under `--timeout` seconds. From the repository root after `pip install -e .` and
`pip install torch transformers peft` (CUDA builds):

    python benchmarks/lora_sft_gpu.py --out /tmp/bench          # qwenjax, then the peer; a table and the ratio

Results: one JSON object per run in OUT/lora_sft_gpu.jsonl. With the defaults (8 rows of 4096 tokens a step, 2
warm-up and 8 timed steps per run) the whole command takes about 5 minutes on one H100.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout, for the default config
TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


def sft_batches(count: int, rows: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
  """`count` batches of `rows` packed SFT rows: `inputs`, `targets`, `positions`, `segment_ids`, `weights` (1 on
  a conversation's response tokens whose target is in the same conversation), as `qwenjax.data` packs rows.
  Conversations are seq_len / 32 to seq_len / 2 tokens long (128 to 2048 at 4096)."""
  rng = np.random.default_rng(seed)
  lengths = (max(2, seq_len // 32), max(2, seq_len // 2))
  out = []
  for _ in range(count):
    tokens = rng.integers(0, vocab, (rows, seq_len + 1), dtype=np.int32)
    segments = np.zeros((rows, seq_len + 1), np.int32)
    positions = np.zeros((rows, seq_len + 1), np.int32)
    trained = np.zeros((rows, seq_len + 1), bool)
    for r in range(rows):
      start, segment = 0, 1
      while start < seq_len + 1:
        n = min(int(rng.integers(lengths[0], lengths[1] + 1)), seq_len + 1 - start)
        prompt = int(n * rng.uniform(0.2, 0.6))
        segments[r, start:start + n] = segment
        positions[r, start:start + n] = np.arange(n)
        trained[r, start + prompt:start + n] = True
        start, segment = start + n, segment + 1
    same = segments[:, 1:] == segments[:, :-1]
    out.append({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'positions': positions[:, :-1],
                'segment_ids': segments[:, :-1], 'weights': (same & trained[:, 1:]).astype(np.float32)})
  return out


def fingerprint(batches: list[dict[str, np.ndarray]]) -> str:
  digest = hashlib.sha256()
  for b in batches:
    for key in sorted(b):
      digest.update(np.ascontiguousarray(b[key]).tobytes())
  return digest.hexdigest()[:16]


def _timed(step, batches, steps: int, warmup: int, sync) -> dict:
  """Median step (each ended by a sync), then the same steps back to back with one sync."""
  start = time.perf_counter()
  for i in range(warmup):
    sync(step(batches[i % len(batches)]))
  warmup_s = time.perf_counter() - start
  times = []
  for i in range(steps):
    start = time.perf_counter()
    loss = step(batches[i % len(batches)])
    sync(loss)
    times.append(time.perf_counter() - start)
  start = time.perf_counter()
  for i in range(steps):
    loss = step(batches[i % len(batches)])
  sync(loss)
  pipelined = (time.perf_counter() - start) / steps
  return {'step_s': float(np.median(times)), 'pipelined_step_s': pipelined, 'warmup_s': warmup_s,
          'loss': float(loss)}


def run_ours(args) -> dict:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from qwenjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from qwenjax import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from qwenjax import sharding  # pylint: disable=g-import-not-at-top
  from qwenjax import train_step  # pylint: disable=g-import-not-at-top

  config = config_lib.load(args.config)
  config.model.update(dtype='bfloat16', param_dtype='bfloat16', remat_policy=args.remat, scan_layers=False,
                      attention_impl=args.attention)
  config.data.seq_len = args.seq_len
  config.train.update(batch_size=args.batch, grad_accum_steps=args.batch // args.micro_batch, steps=10_000,
                      warmup_steps=10, logits_dtype='bfloat16', z_loss=0.0, weight_decay=0.0, lora_rank=args.rank,
                      lora_alpha=2.0 * args.rank, lora_targets=','.join(TARGETS))
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  settings = config_lib.settings(config)
  model, lora = settings.model, settings.lora
  mesh = sharding.make_mesh(settings.mesh, devices=jax.devices()[:1])
  rules = sharding.logical_axis_rules(settings.mesh.rules, mesh, model)
  tx = train_step.make_optimizer(settings.optimizer)
  shardings = train_step.state_shardings(model, tx, mesh, rules, lora)
  base_shardings = train_step.param_shardings(model, mesh, rules)
  base = train_step.random_params(model, base_shardings, jax.random.key(0))
  state = train_step.create_state(model, tx, shardings, rng=jax.random.key(1), lora=lora)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  host = sft_batches(2, args.batch, args.seq_len, model.vocab_size)
  batches = [{k: jax.device_put(x, batch_sharding) for k, x in b.items()} for b in host]
  replicated = sharding.replicated(mesh)
  horizon = jax.device_put(train_step.schedule_horizon(settings.optimizer), replicated)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step_fn = jax.jit(train_step.make_train_step(model, settings.optimizer, settings.loss, lora),
                      in_shardings=(shardings, batch_sharding, replicated, base_shardings),
                      out_shardings=(shardings, None), donate_argnums=(0,))
    start = time.perf_counter()
    compiled = step_fn.lower(state, batches[0], horizon, base).compile()
    compile_s = time.perf_counter() - start

    def step(batch):
      nonlocal state
      state, metrics = compiled(state, batch, horizon, base)
      return metrics['loss']

    result = _timed(step, batches, args.steps, args.warmup, jax.block_until_ready)
  memory = jax.devices()[0].memory_stats() or {}
  return {**result, 'run': 'qwenjax', 'micro_batch': args.micro_batch, 'attention': args.attention,
          'remat': args.remat, 'compile_s': compile_s, 'adapter_params': lora_lib.count(model, lora),
          'peak_gib': memory.get('peak_bytes_in_use', 0) / 2**30, 'device': jax.devices()[0].device_kind,
          'jax': jax.__version__, 'batches': fingerprint(host)}


def run_peer(args, attn: str, compiled: bool) -> dict:
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # jax (for the config) must not take GPU memory from torch
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from hf_peer_1b import packed_labels, peer_loss, qwen2_config  # pylint: disable=g-import-not-at-top
  from qwenjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from qwenjax import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from qwenjax.model_config import ModelConfig  # pylint: disable=g-import-not-at-top

  model_config = ModelConfig.from_dict(config_lib.load(args.config).model)
  hf_config = qwen2_config(model_config, 'bfloat16', attn)
  device = torch.device(args.device)
  torch.manual_seed(0)
  with device:
    base = transformers.Qwen2ForCausalLM(hf_config).to(torch.bfloat16)  # the frozen base in bfloat16
  names = [lora_lib.PROJECTIONS[t] for t in TARGETS]
  model = peft.get_peft_model(base, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                    target_modules=names, task_type='CAUSAL_LM'))
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(trainable, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                fused=device.type == 'cuda')
  forward = torch.compile(model) if compiled else model
  accum = args.batch // args.peer_micro_batch
  shape = (accum, args.peer_micro_batch, args.seq_len)
  host = sft_batches(2, args.batch, args.seq_len, model_config.vocab_size)
  batches = [[torch.from_numpy(np.asarray(x, np.int64).reshape(shape)).to(device)
              for x in (b['inputs'], b['positions'], packed_labels(b['inputs'], b['weights']))] for b in host]

  def step(batch):
    for i in range(accum):
      ids, positions, labels = (x[i] for x in batch)
      with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = peer_loss(forward, ids, positions, labels)
      (loss / accum).backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()

  sync = (lambda _: torch.cuda.synchronize()) if device.type == 'cuda' else (lambda _: None)
  result = _timed(step, batches, args.steps, args.warmup, sync)
  return {**result, 'run': f'transformers + PEFT ({attn}{", compiled" if compiled else ", eager"})',
          'micro_batch': args.peer_micro_batch, 'attention': attn, 'compiled': compiled,
          'adapter_params': sum(p.numel() for p in trainable),
          'peak_gib': torch.cuda.max_memory_allocated() / 2**30 if device.type == 'cuda' else 0.0,
          'device': torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu', 'torch': torch.__version__,
          'transformers': transformers.__version__, 'peft': peft.__version__, 'batches': fingerprint(host)}


def _runs(args) -> list[str]:
  """The runs of this command: 'ours', then 'peer:ATTN:compiled' or 'peer:ATTN:eager' per --attn and --compile."""
  compile_modes = {'yes': ['compiled'], 'no': ['eager'], 'both': ['compiled', 'eager']}[args.compile]
  peers = [f'peer:{attn}:{mode}' for attn in args.attn.split(',') if attn for mode in compile_modes]
  return (['ours'] if not args.no_ours else []) + peers


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', 'qwen2_1_5b.py'))
  parser.add_argument('--rank', type=int, default=16)
  parser.add_argument('--seq-len', type=int, default=4096)
  parser.add_argument('--batch', type=int, default=8, help='global batch: rows of seq-len tokens per step')
  parser.add_argument('--micro-batch', type=int, default=4, help='rows per forward/backward, qwenjax')
  parser.add_argument('--peer-micro-batch', type=int, default=2, help='rows per forward/backward, the peer')
  parser.add_argument('--remat', default='activations_saveable', help='qwenjax model.remat_policy')
  parser.add_argument('--attention', default='auto', help='qwenjax model.attention_impl')
  parser.add_argument('--attn', default='sdpa,flex_attention', help='the peer\'s attention implementations')
  parser.add_argument('--compile', default='yes', choices=('yes', 'no', 'both'), help='torch.compile the peer')
  parser.add_argument('--no-ours', action='store_true', help='time the peer only')
  parser.add_argument('--steps', type=int, default=8)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--device', default='cuda', help='the peer\'s torch device')
  parser.add_argument('--timeout', type=float, default=240, help='seconds per run')
  parser.add_argument('--out', default='.')
  parser.add_argument('--one', help='run this one (ours, peer:ATTN:compiled|eager) in this process')
  args = parser.parse_args()
  if args.batch % args.micro_batch or args.batch % args.peer_micro_batch:
    raise SystemExit(f'--batch {args.batch} must be a multiple of --micro-batch and --peer-micro-batch')
  os.makedirs(args.out, exist_ok=True)
  results_file = os.path.join(args.out, 'lora_sft_gpu.jsonl')
  common = {'config': os.path.basename(args.config), 'rank': args.rank, 'batch': args.batch, 'seq_len': args.seq_len,
            'steps': args.steps}
  if args.one:
    try:
      if args.one == 'ours':
        result = run_ours(args)
      else:
        _, attn, mode = args.one.split(':')
        result = run_peer(args, attn, mode == 'compiled')
    except Exception as e:  # pylint: disable=broad-except  (an OOM or a compile failure ends one run only)
      traceback.print_exc(limit=6)
      result = {'run': args.one, 'error': f'{type(e).__name__}: {str(e)[:300]}'}
    result = {**common, **result}
    if 'step_s' in result:
      tokens = args.batch * args.seq_len
      result.update(tokens_per_s=tokens / result['step_s'], pipelined_tokens_per_s=tokens / result['pipelined_step_s'])
    print(json.dumps(result), flush=True)
    with open(results_file, 'a') as f:
      f.write(json.dumps(result) + '\n')
    return

  names, started = _runs(args), time.time()
  for name in names:  # each in a fresh process: JAX and torch each take the GPU's memory
    print(f'--- {name}', flush=True)
    command = [sys.executable, os.path.abspath(__file__), '--one', name] + [
        a for a in sys.argv[1:] if not a.startswith('--one')]
    env = dict(os.environ, JAX_PLATFORMS='cpu') if name.startswith('peer') else None
    try:
      failed = subprocess.run(command, check=False, timeout=args.timeout, env=env).returncode
    except subprocess.TimeoutExpired:
      failed = f'timed out after {args.timeout:.0f} s'
    if failed:
      with open(results_file, 'a') as f:
        f.write(json.dumps({**common, 'run': name, 'error': f'process failed: {failed}'}) + '\n')
  with open(results_file) as f:
    results = [r for r in map(json.loads, f) if all(r.get(k) == v for k, v in common.items())][-len(names):]
  print(f'\nLoRA SFT, rank {args.rank}, {args.batch} x {args.seq_len} tokens a step, {os.path.basename(args.config)} '
        f'({time.time() - started:.0f} s in all)\n')
  print('| run | micro-batch | step s | tokens/s | back to back: step s, tokens/s | peak GiB | batches |')
  print('| --- | --- | --- | --- | --- | --- | --- |')
  for r in results:
    if 'error' in r:
      print(f'| {r["run"]} | failed: {r["error"][:100]} |')
    else:
      print(f'| {r["run"]} | {r["micro_batch"]} | {r["step_s"]:.3f} | {r["tokens_per_s"]:,.0f} | '
            f'{r["pipelined_step_s"]:.3f}, {r["pipelined_tokens_per_s"]:,.0f} | {r["peak_gib"]:.1f} | {r["batches"]} |')
  ours = [r for r in results if r['run'] == 'qwenjax' and 'error' not in r]
  peers = [r for r in results if r['run'] != 'qwenjax' and 'error' not in r]
  if ours and peers:
    if len({r['batches'] for r in ours + peers}) != 1:
      print('\nthe runs stepped on different batches: no ratio')
      return
    for key in ('tokens_per_s', 'pipelined_tokens_per_s'):
      best = max(peers, key=lambda r: r[key])
      print(f'\nqwenjax / {best["run"]}, {key}: {ours[0][key] / best[key]:.2f}x')


if __name__ == '__main__':
  main()
