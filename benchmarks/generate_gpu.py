r"""Decode and prefill speed of `qwenjax.generate` against transformers with a static cache, on one GPU.

Random bf16 weights of a config's shape (default `configs/qwen2_1_5b.py`), prompts of `--prompt_len` random
tokens, `--new_tokens` new tokens (greedy, no stop token), at each `--batches` size:

* ours: `generate.prefill` once, then `generate.decode` for the remaining tokens, timed apart (median of
  `--iters`, after a compiling call). Decode tokens/s = batch * (new_tokens - 1) / decode time.
* peer (in a subprocess, before ours, so the two never share the GPU's memory): transformers'
  `Qwen2ForCausalLM` in bf16 with sdpa attention, two ways. `generate`: `model.generate(...,
  cache_implementation='static', compile_config=CompileConfig(fullgraph=True, mode='reduce-overhead'))`, as
  transformers' docs describe (the decoding step compiled with CUDA graphs); its decode time is the time of a
  whole generate less that of a 1-token generate. `loop`: a hand-written greedy loop over a `StaticCache`
  whose one-token step is `torch.compile(mode='reduce-overhead', fullgraph=True)`; it times the decode loop
  alone.
* the bandwidth bound at each batch: (weight bytes + the valid cache bytes of the average step) read once per
  step, over the copy bandwidth measured here (a large device-to-device copy: bytes read + written / time).
  A read probe (a float32 sum) is recorded too; both are XLA kernels and may read more slowly than its GEMMs.

From the repository root after `pip install -e .` (the peer also needs torch with CUDA and transformers):

    python benchmarks/generate_gpu.py --out /tmp/gen --peer_ways loop  # the H200 run (docs/performance.md)
    python benchmarks/generate_gpu.py --config configs/tiny.py --prompt_len 16 --new_tokens 8 --batches 1,2 \
        --device cpu --no-peer_compile --copy_mib 16 --out /tmp/gen   # a CPU smoke run (tests)

Results: one JSON object per measurement in OUT/generate_gpu.jsonl, and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout, for the default config


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', 'qwen2_1_5b.py'))
  parser.add_argument('--batches', default='1,64')
  parser.add_argument('--prompt_len', type=int, default=1024)
  parser.add_argument('--new_tokens', type=int, default=256)
  parser.add_argument('--iters', type=int, default=3)
  parser.add_argument('--attention_impl', default='', help="prefill kernel (default: 'cudnn' on GPU, 'xla' else)")
  parser.add_argument('--decode_impl', default='auto',
                      help="decode step's attention (qwenjax.model_config.DECODE_IMPLEMENTATIONS)")
  parser.add_argument('--scan_layers', action='store_true',
                      help='decode through nn.scan (configs/7b.py\'s layers; generate() unrolls them, this shows why)')
  parser.add_argument('--copy_mib', type=int, default=2048,
                      help='size of the bandwidth probe (below 4096: 2^31 bf16 elements need 64-bit indexing)')
  parser.add_argument('--peer', action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument('--peer_ways', default='loop,generate')
  parser.add_argument('--peer_compile', action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument('--peer_timeout', type=int, default=300)
  parser.add_argument('--device', default='cuda', help='the peer\'s torch device')
  parser.add_argument('--part', default='all', choices=['all', 'ours', 'peer'])
  parser.add_argument('--profile', action='store_true',
                      help='also trace one decode call per batch: per-step kernel times into the results')
  parser.add_argument('--out', default='/tmp/generate_gpu')
  return parser.parse_args(argv)


def model_config(args):
  from qwenjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from qwenjax.model_config import ModelConfig  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  impl = args.attention_impl or ('cudnn' if jax.default_backend() == 'gpu' else 'xla')
  values = dict(config_lib.load(args.config).model)
  values.update(dtype='bfloat16', param_dtype='bfloat16', attention_impl=impl, scan_layers=args.scan_layers,
                decode_impl=args.decode_impl)
  return ModelConfig.from_dict(values)


def prompts(args, batch: int, vocab: int):
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.random.RandomState(batch).randint(0, vocab, (batch, args.prompt_len))


def write(args, result: dict) -> None:
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'generate_gpu.jsonl'), 'a') as f:
    f.write(json.dumps(result) + '\n')
  print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------------
# Ours.

def bandwidths(mib: int) -> tuple[float, float]:
  """Bytes per second of two jitted probes over one `mib` MiB bf16 array (median of 10 samples of 10 calls back to
  back): a copy (bytes read + written) and a float32 sum (bytes read: what a decode step does with its weights)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from timing import median_seconds  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (mib * 2**19,), jnp.bfloat16)  # mib MiB of bf16
  copy_s, _ = median_seconds(jax.jit(lambda x: -x), x, warmup=3, iters=10, calls=10)
  read_s, _ = median_seconds(jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32)), x, warmup=3, iters=10,
                             calls=10)
  return 2 * x.nbytes / copy_s, x.nbytes / read_s


def run_ours(args) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from qwenjax import generate  # pylint: disable=g-import-not-at-top
  from qwenjax import params as params_lib  # pylint: disable=g-import-not-at-top
  import profile_summary  # pylint: disable=g-import-not-at-top  (benchmarks/profile_summary.py)
  config = model_config(args)
  bandwidth, read = bandwidths(args.copy_mib)
  write(args, dict(what='copy_bandwidth', bytes_per_s=bandwidth, device=jax.devices()[0].device_kind))
  write(args, dict(what='read_bandwidth', bytes_per_s=read))
  params = jax.jit(params_lib.init_params, static_argnums=0)(config, jax.random.key(0))
  leaves = jax.tree.leaves(params)
  weight_bytes = sum(x.nbytes for x in leaves)
  if not config.tie_word_embeddings:  # decoding reads one row of the embedding table, the whole lm_head
    weight_bytes -= params['embed_tokens'].nbytes
  kv_bytes_per_position = 2 * config.num_key_value_heads * config.head_dim * 2  # k and v, bf16, one layer
  for batch in [int(b) for b in args.batches.split(',')]:
    try:
      ids = prompts(args, batch, config.vocab_size)
      request = generate.make_request(config, ids.tolist(), args.new_tokens)
      knobs = (1.0, 0, 1.0, config.vocab_size)
      key = jax.random.key(0)
      static = dict(config=config, sampling=generate.Sampling())
      prefill = lambda: generate.prefill(params, request.input_ids, request.lengths, request.active,
                                         request.stop_ids, key, *knobs, cache_len=request.cache_len, **static)
      rows = generate.decode_rows(batch, jax.default_backend())  # one row decodes with an idle second row on GPU
      decode = lambda state: generate.decode(params, generate.pad_rows(state, rows), args.new_tokens,
                                             request.stop_ids, key, *knobs, **static)
      start = time.perf_counter()
      state = jax.block_until_ready(decode(jax.block_until_ready(prefill())))
      first_call = time.perf_counter() - start
      assert int(state['step']) == args.new_tokens, int(state['step'])
      prefill_times, decode_times = [], []
      for _ in range(args.iters):
        start = time.perf_counter()
        state = jax.block_until_ready(prefill())
        prefill_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        state = jax.block_until_ready(decode(state))
        decode_times.append(time.perf_counter() - start)
      prefill_s, decode_s = statistics.median(prefill_times), statistics.median(decode_times)
      steps = args.new_tokens - 1
      # Bytes one decode step needs: every weight once, and each row's valid keys and values of all layers.
      mean_positions = sum(min(args.prompt_len + t + 1, _window(config, i, args.prompt_len + t + 1))
                           for t in range(1, args.new_tokens) for i in range(config.num_hidden_layers)) / steps
      cache_bytes = batch * mean_positions * kv_bytes_per_position
      bound = batch * bandwidth / (weight_bytes + cache_bytes)
      tokens_per_s = batch * steps / decode_s
      write(args, dict(what='ours', batch=batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                       decode_tokens_per_s=tokens_per_s, decode_ms_per_step=1e3 * decode_s / steps,
                       prefill_tokens_per_s=batch * args.prompt_len / prefill_s, prefill_ms=1e3 * prefill_s,
                       first_call_s=first_call, weight_bytes=weight_bytes, cache_bytes_per_step=cache_bytes,
                       bound_tokens_per_s=bound, fraction_of_bound=tokens_per_s / bound,
                       cache_len=request.cache_len, attention_impl=config.attention_impl,
                       decode_impl=config.decode_impl, scan_layers=config.scan_layers,
                       xla_flags=os.environ.get('XLA_FLAGS', ''),
                       traces=dict(generate.TRACES), tokens_head=np.asarray(state['out'][0, :8]).tolist()))
      if args.profile:
        state = jax.block_until_ready(prefill())
        summary = profile_summary.trace(lambda: decode(state), os.path.join(args.out, f'trace_b{batch}'), steps=steps,
                                        top=25)
        write(args, dict(what='profile', batch=batch, xla_flags=os.environ.get('XLA_FLAGS', ''), **summary))
        print(f'decode profile, batch {batch}:\n{profile_summary.format_summary(summary)}')
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      write(args, dict(what='ours', batch=batch, error=f'{type(e).__name__}: {str(e)[:500]}'))


def _window(config, layer: int, length: int) -> int:
  return config.sliding_window if config.is_sliding(layer) else length


# ---------------------------------------------------------------------------------------------------------
# The peer.

def run_peer(args) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from qwenjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from qwenjax import hf  # pylint: disable=g-import-not-at-top
  from qwenjax.model_config import ModelConfig  # pylint: disable=g-import-not-at-top
  config = ModelConfig.from_dict(config_lib.load(args.config).model)
  values = hf.config_to_hf(config, 'bfloat16')
  values.pop('torch_dtype', None)
  values.pop('dtype', None)
  hf_config = transformers.Qwen2Config(**values)
  hf_config._attn_implementation = 'sdpa'  # pylint: disable=protected-access
  device = torch.device(args.device)
  torch.manual_seed(0)
  with device:
    peer = transformers.Qwen2ForCausalLM(hf_config).to(torch.bfloat16).eval()
  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

  def timed(fn):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out

  for way in args.peer_ways.split(','):
    for batch in [int(b) for b in args.batches.split(',')]:
      try:
        ids = torch.from_numpy(prompts(args, batch, config.vocab_size)).to(device)
        with torch.no_grad():
          if way == 'generate':
            result = _peer_generate(args, peer, ids, timed)
          elif way == 'loop':
            result = _peer_loop(args, peer, hf_config, ids, timed, device)
          else:
            raise ValueError(f'unknown peer way {way!r}')
        steps = args.new_tokens - 1
        write(args, dict(what='peer', way=way, batch=batch, prompt_len=args.prompt_len,
                         new_tokens=args.new_tokens, decode_tokens_per_s=batch * steps / result['decode_s'],
                         decode_ms_per_step=1e3 * result['decode_s'] / steps,
                         prefill_tokens_per_s=batch * args.prompt_len / result['prefill_s'],
                         prefill_ms=1e3 * result['prefill_s'], compile=args.peer_compile,
                         torch=torch.__version__, transformers=transformers.__version__,
                         tokens_head=np.asarray(result['tokens'][0, :8].cpu()).tolist()))
      except Exception as e:  # pylint: disable=broad-except
        traceback.print_exc()
        write(args, dict(what='peer', way=way, batch=batch, error=f'{type(e).__name__}: {str(e)[:500]}'))
      torch.cuda.empty_cache() if device.type == 'cuda' else None


def _peer_generate(args, peer, ids, timed) -> dict:
  import transformers  # pylint: disable=g-import-not-at-top
  kwargs = dict(attention_mask=ids.new_ones(ids.shape), do_sample=False, eos_token_id=None, pad_token_id=0,
                cache_implementation='static')
  if args.peer_compile:
    kwargs['compile_config'] = transformers.CompileConfig(fullgraph=True, mode='reduce-overhead')
  else:
    kwargs['disable_compile'] = True
  full = lambda: peer.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kwargs)
  first = lambda: peer.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
  for _ in range(2):  # compiles, then records the CUDA graphs
    full()
  full_times, first_times = [], []
  for _ in range(args.iters):
    seconds, tokens = timed(full)
    full_times.append(seconds)
    first_times.append(timed(first)[0])
  full_s, prefill_s = statistics.median(full_times), statistics.median(first_times)
  assert tokens.shape[1] == ids.shape[1] + args.new_tokens, tokens.shape
  return dict(decode_s=full_s - prefill_s, prefill_s=prefill_s, tokens=tokens[:, ids.shape[1]:])


def _peer_loop(args, peer, hf_config, ids, timed, device) -> dict:
  """Greedy decoding over a StaticCache with the one-token step compiled (CUDA graphs)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  batch, prompt_len = ids.shape
  cache = transformers.StaticCache(config=hf_config, max_cache_len=prompt_len + args.new_tokens)

  def forward(input_ids, position_ids, cache_position):
    out = peer(input_ids=input_ids, position_ids=position_ids, past_key_values=cache, cache_position=cache_position,
               use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].argmax(-1)

  step = torch.compile(forward, mode='reduce-overhead', fullgraph=True) if args.peer_compile else forward

  def prefill():
    cache.reset()
    positions = torch.arange(prompt_len, device=device)
    return forward(ids, positions[None].expand(batch, -1), positions)

  def decode(token):
    tokens = [token]
    for t in range(prompt_len, prompt_len + args.new_tokens - 1):
      position = torch.full((batch, 1), t, device=device, dtype=torch.long)
      token = step(tokens[-1][:, None].clone(), position, position[0])
      tokens.append(token.clone())
    return torch.stack(tokens, 1)

  for _ in range(2):  # compiles, then records the CUDA graphs
    decode(prefill())
  prefill_times, decode_times = [], []
  for _ in range(args.iters):
    seconds, first = timed(prefill)
    prefill_times.append(seconds)
    seconds, tokens = timed(lambda: decode(first))
    decode_times.append(seconds)
  return dict(decode_s=statistics.median(decode_times), prefill_s=statistics.median(prefill_times),
              tokens=tokens)


# ---------------------------------------------------------------------------------------------------------

def table(args) -> str:
  path = os.path.join(args.out, 'generate_gpu.jsonl')
  rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
  lines = ['| who | batch | decode tok/s | ms/step | prefill tok/s | bound tok/s | of bound |', '|' + ' --- |' * 7]
  for r in rows:
    if r['what'] == 'copy_bandwidth':
      lines.insert(0, f'copy bandwidth: {r["bytes_per_s"] / 1e12:.3f} TB/s ({r["device"]})\n')
      continue
    if r['what'] == 'read_bandwidth':
      lines.insert(0, f'read bandwidth (float32 sum of bf16): {r["bytes_per_s"] / 1e12:.3f} TB/s\n')
      continue
    if r['what'] == 'profile':
      continue
    how = [r['way']] if 'way' in r else [r.get('decode_impl', '')] + (['scanned'] if r.get('scan_layers') else [])
    who = r['what'] + (f' ({", ".join(h for h in how if h)})' if any(how) else '')
    if 'error' in r:
      lines.append(f'| {who} | {r["batch"]} | error: {r["error"][:80]} | | | | |')
      continue
    bound = f'{r["bound_tokens_per_s"]:,.0f}' if 'bound_tokens_per_s' in r else ''
    share = f'{100 * r["fraction_of_bound"]:.1f}%' if 'fraction_of_bound' in r else ''
    lines.append(f'| {who} | {r["batch"]} | {r["decode_tokens_per_s"]:,.0f} | {r["decode_ms_per_step"]:.3f} | '
                 f'{r["prefill_tokens_per_s"]:,.0f} | {bound} | {share} |')
  return '\n'.join(lines)


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.part == 'peer':
    run_peer(args)
    return
  if args.part == 'all':
    path = os.path.join(args.out, 'generate_gpu.jsonl')
    if os.path.exists(path):
      os.remove(path)
    if args.peer:  # first, in its own process: it frees all its GPU memory before jax takes its share
      command = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
                 '--part', 'peer']
      try:
        subprocess.run(command, timeout=args.peer_timeout, check=False)
      except subprocess.TimeoutExpired:
        write(args, dict(what='peer', batch=0, error=f'timed out after {args.peer_timeout} s'))
  run_ours(args)
  print(table(args))


if __name__ == '__main__':
  main()
