r"""Times the peer: Hugging Face transformers `Qwen2ForCausalLM` training steps with the shape of configs/1b.py.

Same model shape (built from our ModelConfig by `qwenjax.hf.config_to_hf`, sliding window on layers 8-15),
same global batch of random token ids at seq_len 8192, fp32 master weights with bf16 autocast, `torch.compile`
on the model, fused AdamW with global-norm clipping, gradient accumulation over micro-batches (`--micro-batch`;
docs/performance.md has the memory and speed of each size; the eager model does not fit even one). Run it after
benchmarks/train_1b.py in the same command, so both use the same GPU; with `--out` shared, the last lines
compare the two, against the fastest peer run in OUT.

With `--batches_file` (from `data_throughput.py --save`, the same file as train_1b.py's) it steps on packed
documents of the main job's pipeline instead: `position_ids` restart at each document, from which transformers
builds a document mask (with flex_attention, a block-sparse one), and labels that cross a document are ignored,
as qwenjax's loss weights do. From the repository root after `pip install -e .` (and torch with CUDA and
transformers):

    python benchmarks/hf_peer_1b.py --attn sdpa,flex_attention --batch 4 --micro-batch 2 --out /tmp/bench

Results: one JSON object per attention implementation in OUT/hf_peer_1b.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # jax (for the FLOP count) must not take GPU memory from torch

import numpy as np  # pylint: disable=g-import-not-at-top
import torch  # pylint: disable=g-import-not-at-top
import transformers  # pylint: disable=g-import-not-at-top

from qwenjax import config as config_lib  # pylint: disable=g-import-not-at-top
from qwenjax import hf  # pylint: disable=g-import-not-at-top
from qwenjax import metrics  # pylint: disable=g-import-not-at-top
from qwenjax.model_config import ModelConfig  # pylint: disable=g-import-not-at-top

from timing import packed_batches  # pylint: disable=g-import-not-at-top  (benchmarks/, next to this script)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout, for the default config


def qwen2_config(model_config: ModelConfig, dtype: str, attn: str) -> transformers.Qwen2Config:
  """transformers' `Qwen2Config` of our model's shape (`qwenjax.hf.config_to_hf`), with `attn` as its attention
  implementation; the parameters' dtype is the caller's to set."""
  values = hf.config_to_hf(model_config, dtype)
  values.pop('torch_dtype', None)
  values.pop('dtype', None)
  config = transformers.Qwen2Config(**values)
  config._attn_implementation = attn  # pylint: disable=protected-access
  return config


def packed_labels(inputs: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """Labels for `Qwen2ForCausalLM`, which shifts them (labels[t + 1] is the target of position t): the inputs,
  with -100 (ignored) where qwenjax's loss weight of position t is 0 (a target in another document)."""
  labels = np.array(inputs, np.int64)
  labels[:, 1:][weights[:, :-1] == 0] = -100
  return labels


def peer_loss(forward, ids, positions, labels):
  """Mean token loss of a micro-batch. `positions` that restart at 0 mark packed documents; use_cache=False
  as in training (with a KV cache, transformers also ignores the packing)."""
  return forward(input_ids=ids, position_ids=positions, labels=labels, use_cache=False).loss


def run(attn: str, args) -> dict:
  model_config = ModelConfig.from_dict(config_lib.load(args.config).model)
  seq_len = args.seq_len or int(config_lib.load(args.config).data.seq_len)
  hf_config = qwen2_config(model_config, 'float32', attn)
  device = torch.device(args.device)
  torch.manual_seed(0)
  with device:
    model = transformers.Qwen2ForCausalLM(hf_config)  # fp32 parameters (master weights)
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                fused=device.type == 'cuda')
  forward = torch.compile(model) if args.compile else model
  accum = args.batch // args.micro_batch
  shape = (accum, args.micro_batch, seq_len)
  if args.batches_file:
    batches = [[torch.from_numpy(np.asarray(x, np.int64).reshape(shape)).to(device)
                for x in (b['inputs'], b['positions'], packed_labels(b['inputs'], b['weights']))]
               for b in packed_batches(args.batches_file, args.batch, seq_len)]
  else:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
      ids = torch.randint(0, model_config.vocab_size, shape, generator=generator).to(device)
      batches.append([ids, None, ids])
  dtype = torch.bfloat16

  def step(batch):
    for i in range(accum):
      ids, positions, labels = (None if x is None else x[i] for x in batch)
      with torch.autocast(device.type, dtype=dtype):
        loss = peer_loss(forward, ids, positions, labels)
      (loss / accum).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
  start = time.perf_counter()
  for i in range(args.warmup):
    loss = step(batches[i % len(batches)])
  sync()
  warmup_s = time.perf_counter() - start
  times = []
  for i in range(args.steps):
    start = time.perf_counter()
    loss = step(batches[i % len(batches)])
    sync()
    times.append(time.perf_counter() - start)
  step_s = float(np.median(times))
  start = time.perf_counter()  # back to back, one sync at the end: as train_1b.py's pipelined_step_s
  for i in range(args.steps):
    loss = step(batches[i % len(batches)])
  sync()
  pipelined_s = (time.perf_counter() - start) / args.steps
  tokens = args.batch * seq_len
  flops = metrics.flops_per_token(model_config, seq_len)
  name = torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'
  peak = metrics.peak_flops(name) or float('nan')
  return {
      'peer': f'transformers Qwen2ForCausalLM ({attn})', 'attn': attn, 'batch': args.batch,
      'micro_batch': args.micro_batch, 'seq_len': seq_len, 'step_s': step_s, 'tokens_per_s': tokens / step_s,
      'mfu': tokens * flops / step_s / peak, 'pipelined_step_s': pipelined_s,
      'pipelined_tokens_per_s': tokens / pipelined_s, 'warmup_s': warmup_s, 'loss': float(loss),
      'peak_gib': torch.cuda.max_memory_allocated() / 2**30 if device.type == 'cuda' else 0.0,
      'device': name, 'torch': torch.__version__, 'transformers': transformers.__version__,
      'compiled': args.compile, 'data': args.batches_file or 'random',
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--attn', default='sdpa,flex_attention')
  parser.add_argument('--batch', type=int, default=4, help='global batch (sequences per optimizer step)')
  parser.add_argument('--micro-batch', type=int, default=2,
                      help='sequences per forward/backward (docs/performance.md: 2 about as fast as 4, in less memory)')
  parser.add_argument('--seq-len', type=int, default=0, help='0: the config\'s data.seq_len')
  parser.add_argument('--steps', type=int, default=6)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', '1b.py'))
  parser.add_argument('--batches_file', default='',
                      help='packed documents from data_throughput.py --save instead of random tokens')
  parser.add_argument('--device', default='cuda')
  parser.add_argument('--no-compile', dest='compile', action='store_false')
  parser.add_argument('--out', default='.')
  parser.add_argument('--summary', action='store_true', help='only print the table of results already in OUT')
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  peers = []
  for attn in ([] if args.summary else args.attn.split(',')):
    print(f'--- {attn}', flush=True)
    try:
      result = run(attn, args)
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc(limit=4)
      result = {'attn': attn, 'data': args.batches_file or 'random', 'error': f'{type(e).__name__}: {str(e)[:300]}'}
    if torch.cuda.is_available():
      torch.cuda.empty_cache()
      torch.cuda.reset_peak_memory_stats()
    print(json.dumps(result), flush=True)
    with open(os.path.join(args.out, 'hf_peer_1b.jsonl'), 'a') as f:
      f.write(json.dumps(result) + '\n')
  data = args.batches_file or 'random'  # the table compares runs on the same data
  peers_file = os.path.join(args.out, 'hf_peer_1b.jsonl')
  if os.path.exists(peers_file):
    with open(peers_file) as f:
      peers = [r for r in map(json.loads, f) if r.get('batch', args.batch) == args.batch
               and r.get('data', 'random') == data]

  ours_file = os.path.join(args.out, 'train_1b.jsonl')
  ours = []
  if os.path.exists(ours_file):
    with open(ours_file) as f:
      ours = [r for r in map(json.loads, f) if 'error' not in r and r['batch'] == args.batch
              and r.get('data', 'random') == data]
  print('\n| run | batch x seq | micro-batch | step s | tokens/s | MFU | back to back: step s, tokens/s |')
  print('| --- | --- | --- | --- | --- | --- | --- |')
  pipelined = lambda r: (f'{r["pipelined_step_s"]:.3f}, {r["pipelined_tokens_per_s"]:,.0f}'
                         if 'pipelined_step_s' in r else '')
  for r in ours:
    print(f'| qwenjax {r["variant"]} | {r["batch"]} x {r["seq_len"]} | {r["micro_batch"]} | '
          f'{r["step_s"]:.3f} | {r["tokens_per_s"]:,.0f} | {100 * r["mfu"]:.1f}% | {pipelined(r)} |')
  for r in peers:
    if 'error' in r:
      print(f'| peer {r["attn"]} | failed: {r["error"][:100]} |')
    else:
      print(f'| {r["peer"]} | {r["batch"]} x {r["seq_len"]} | {r["micro_batch"]} | {r["step_s"]:.3f} | '
            f'{r["tokens_per_s"]:,.0f} | {100 * r["mfu"]:.1f}% | {pipelined(r)} |')
  good = [r for r in peers if 'error' not in r]
  if ours and good:
    for key in ('tokens_per_s', 'pipelined_tokens_per_s'):
      if all(key in r for r in ours + good):
        best, peer = max(ours, key=lambda r: r[key]), max(good, key=lambda r: r[key])
        print(f'\nqwenjax {best["variant"]} / {peer["peer"]}, {key}: {best[key] / peer[key]:.2f}x')


if __name__ == '__main__':
  main()
