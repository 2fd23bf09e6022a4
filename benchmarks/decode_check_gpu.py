"""Checks the decode kernel (`qwenjax.kernels.decode_gpu`) against XLA's decode attention on a small random model.

Two configs (fp32 with a sliding-window ring that wraps, bf16 with full attention), three prompts of different
lengths. For each: the largest logits difference over `--steps` teacher-forced decode steps (both paths fed the
same tokens), and whether greedy `generate` gives the same tokens. Run on a GPU, from the repository root
after `pip install -e .`:

    python benchmarks/decode_check_gpu.py                       # default matmul precision
    python benchmarks/decode_check_gpu.py --precision highest   # fp32 products in full fp32 on both paths

At default precision XLA runs fp32 products in TF32 on NVIDIA GPUs while the kernel uses full fp32, so small
differences (and flipped near-ties of a random model's flat logits) are expected; at `highest` they vanish.
On a CPU, `--interpret` runs the kernel in the Pallas interpreter (`decode_impl='pallas'`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax import generate, kv_cache, model
from qwenjax import params as params_lib
from qwenjax.model_config import ModelConfig

BASE = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=512, attention_impl='xla')
CONFIGS = {
    'ring_fp32': dict(dtype='float32', param_dtype='float32', use_sliding_window=True, sliding_window=32,
                      max_window_layers=1),
    'full_bf16': dict(dtype='bfloat16', param_dtype='bfloat16'),
}
PROMPT_LENGTHS = (5, 50, 17)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=40, help='teacher-forced decode steps compared')
  parser.add_argument('--new_tokens', type=int, default=60, help='greedy tokens compared')
  parser.add_argument('--precision', default='default', choices=['default', 'high', 'highest'])
  parser.add_argument('--interpret', action='store_true', help="the kernel in the Pallas interpreter (CPU)")
  parser.add_argument('--configs', default=','.join(CONFIGS), help=f'comma-separated, of {sorted(CONFIGS)}')
  return parser.parse_args(argv)


def step_logits(config, params, prompts, steps: int) -> np.ndarray:
  """Logits `[steps, batch, vocab]` of decode steps after a prefill, fed token `position % 500` each step."""
  lengths = np.array([len(p) for p in prompts])
  ids = np.zeros((len(prompts), 64), np.int32)
  for i, p in enumerate(prompts):
    ids[i, :len(p)] = p
  qwen = model.Qwen2(config)
  cache = kv_cache.init_cache(config, len(prompts), 128)
  prefill = jax.jit(lambda p, x, n: qwen.apply({'params': p}, x, cache=cache, lengths=n))
  step = jax.jit(lambda p, t, pos, c: qwen.apply({'params': p}, t[:, None], pos[:, None], cache=c))
  logits, cache = prefill(params, ids, lengths)
  position, token = jnp.asarray(lengths), jnp.argmax(logits[:, 0], -1)
  out = []
  for _ in range(steps):
    logits, cache = step(params, token, position, cache)
    out.append(np.asarray(logits[:, 0], np.float32))
    token, position = position % 500, position + 1
  return np.stack(out)


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  if args.precision != 'default':
    jax.config.update('jax_default_matmul_precision', args.precision)
  kernel = dict(decode_impl='pallas', attention_interpret=True) if args.interpret else dict(decode_impl='auto')
  rng = np.random.RandomState(0)
  prompts = [rng.randint(0, BASE['vocab_size'], n).tolist() for n in PROMPT_LENGTHS]
  results = []
  for name in args.configs.split(','):
    config = ModelConfig(**BASE, **CONFIGS[name])
    params = params_lib.init_params(config, jax.random.key(1))
    configs = {'xla': dataclasses.replace(config, decode_impl='xla'), 'kernel': dataclasses.replace(config, **kernel)}
    logits = {k: step_logits(c, params, prompts, args.steps) for k, c in configs.items()}
    tokens = {k: generate.generate(c, params, prompts, max_new_tokens=args.new_tokens) for k, c in configs.items()}
    result = dict(config=name, precision=args.precision, device=jax.devices()[0].device_kind,
                  max_logits_diff=float(np.abs(logits['kernel'] - logits['xla']).max()),
                  logits_std=float(logits['xla'].std()), same_tokens=tokens['kernel'] == tokens['xla'])
    print(json.dumps(result), flush=True)
    results.append(result)
  return results


if __name__ == '__main__':
  main()
