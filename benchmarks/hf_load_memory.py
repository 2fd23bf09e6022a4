"""Peak host memory of loading a Hugging Face checkpoint: sliced into shardings, against the whole-file load.

Writes a random bf16 checkpoint of a config's model shapes (safetensors from numpy, in shards of
`--shard_gb` with an index, as the hub stores them), then loads it in a fresh process per method, on
`--devices` CPU devices with the mesh `--mesh` (the rules of `qwenjax.sharding`):

* `sharded`: `hf.from_pretrained(path, shardings=...)`, each device's block read alone;
* `whole`: `hf.from_pretrained(path)` (every tensor read into host numpy), then placed in the same shardings
  block by block, as `train_step.create_state` does.

Each process reports its peak resident set (`VmHWM` from /proc/self/status, file-backed mmapped pages
included) after jax started and after the load. On CPU devices the arrays live in host memory, so one
process holding all 8 devices of an fsdp=8 mesh holds the whole model: that share is the floor.
`--processes 2` runs the load as two jax processes of 4 devices each (jax.distributed with a local
coordinator), as two hosts would: each holds, and should read, only half of every sharded tensor.
From the repository root after `pip install -e .`:

    python benchmarks/hf_load_memory.py --config configs/qwen2_1_5b.py --dir /tmp/qwen2_1_5b_random
    python benchmarks/hf_load_memory.py --config configs/qwen2_1_5b.py --dir /tmp/qwen2_1_5b_random --processes 2

Prints one JSON line per method and process and a markdown table; deletes the checkpoint unless `--keep`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout, for the default config

METHODS = ('sharded', 'whole')
GIB = 2**30


def memory_gib() -> dict[str, float]:
  """This process's peak and current resident set, and the current one's anonymous and file-backed parts
  (memory-mapped checkpoint pages count in the second), GiB."""
  fields = {}
  with open('/proc/self/status') as f:
    for line in f:
      key, _, value = line.partition(':')
      if key in ('VmHWM', 'VmRSS', 'RssAnon', 'RssFile'):
        fields[key] = int(value.split()[0]) * 1024 / GIB
  return fields


def model_config(config_file: str, scan_layers: bool | None):
  from qwenjax.model_config import ModelConfig  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('config_module', config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  values = dict(module.get_config().model.to_dict(), param_dtype='bfloat16')
  if scan_layers is not None:
    values['scan_layers'] = scan_layers
  return ModelConfig(**values)


def write_checkpoint(config, path: str, shard_gb: float, seed: int = 0) -> int:
  """A random bf16 checkpoint with the tensor names and shapes transformers writes; returns its bytes."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from qwenjax import hf  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(seed)
  shapes = hf.hf_tensor_shapes(config)
  limit = int(shard_gb * GIB)
  shards, current, size = [], [], 0
  for name, shape in shapes.items():
    nbytes = 2 * int(np.prod(shape))
    if current and size + nbytes > limit:
      shards.append(current)
      current, size = [], 0
    current.append(name)
    size += nbytes
  shards.append(current)
  weight_map, total = {}, 0
  for i, names in enumerate(shards):
    file = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    tensors = {name: (0.02 * rng.standard_normal(shapes[name], np.float32)).astype(ml_dtypes.bfloat16)
               for name in names}
    save_file(tensors, os.path.join(path, file), metadata={'format': 'pt'})
    total += sum(t.nbytes for t in tensors.values())
    weight_map.update(dict.fromkeys(names, file))
    del tensors
  with open(os.path.join(path, hf._INDEX), 'w') as f:  # pylint: disable=protected-access
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(hf.config_to_hf(config, 'bfloat16'), f)
  return total


def measure(method: str, path: str, mesh_spec: str, scan_layers: bool, coordinator: str | None = None,
            num_processes: int = 1, process_id: int = 0) -> dict:
  """Runs in its own process: load `path` by `method` into the mesh's shardings; memory before and after.

  With `coordinator`, this is process `process_id` of `num_processes` (jax.distributed, CPU collectives over
  gloo), holding only its local devices' blocks: what one host of a pod slice does.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from qwenjax import config as config_lib, hf, params as params_lib, sharding  # pylint: disable=g-import-not-at-top
  if coordinator:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  mesh_config = dict(zip(sharding.MESH_AXES, (1,) * len(sharding.MESH_AXES)))
  mesh_config.update({k: int(v) for k, v in (item.split('=') for item in mesh_spec.split(','))})
  mesh = sharding.make_mesh(config_lib.MeshConfig(**mesh_config))
  config = hf.load_config(path, scan_layers=scan_layers)
  rules = sharding.logical_axis_rules(sharding.DEFAULT_RULES, mesh, config)
  shardings = sharding.param_shardings(params_lib.abstract_params(config), mesh, rules)
  jax.block_until_ready(jax.device_put(np.zeros(8), shardings['norm']['scale']))  # runtime up
  before = memory_gib()
  start = time.time()
  if method == 'sharded':
    _, params = hf.from_pretrained(path, shardings=shardings, scan_layers=scan_layers)
  else:
    _, host = hf.from_pretrained(path, scan_layers=scan_layers)
    params = jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]), host, shardings)
    del host
  jax.block_until_ready(params)
  seconds = time.time() - start
  after = memory_gib()
  local_bytes = sum(shard.data.nbytes for x in jax.tree.leaves(params) for shard in x.addressable_shards)
  return {'method': method, 'mesh': mesh_spec, 'devices': jax.device_count(), 'scan_layers': scan_layers,
          'process': f'{jax.process_index()} of {jax.process_count()}', 'local_devices': jax.local_device_count(),
          'local_shards_gib': local_bytes / GIB, 'rss_before_gib': before['VmRSS'], 'peak_gib': after['VmHWM'],
          'rss_after_gib': after['VmRSS'], 'rss_after_anon_gib': after['RssAnon'],
          'rss_after_file_gib': after['RssFile'], 'peak_minus_before_gib': after['VmHWM'] - before['VmRSS'],
          'seconds': seconds}


def run_processes(method: str, args: argparse.Namespace, scan_layers: bool, env: dict) -> list[dict]:
  """One fresh process per jax process (all at once, with a local coordinator); their results."""
  command = [sys.executable, os.path.abspath(__file__), '--measure', method, '--dir', args.dir, '--mesh', args.mesh,
             '--scan_layers', 'true' if scan_layers else 'false', '--processes', str(args.processes)]
  if args.processes > 1:
    with socket.socket() as s:
      s.bind(('localhost', 0))
      command += ['--coordinator', f'localhost:{s.getsockname()[1]}']
  children = [subprocess.Popen(command + ['--process_id', str(i)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for i in range(args.processes)]
  outputs = [child.communicate() for child in children]
  for child, (_, err) in zip(children, outputs):
    if child.returncode:
      raise RuntimeError(f'{method} load failed:\n{err[-3000:]}')
  return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', 'qwen2_1_5b.py'))
  parser.add_argument('--dir', default='/tmp/qwenjax_hf_load_memory', help='where the checkpoint is written')
  parser.add_argument('--shard_gb', type=float, default=1.0, help='safetensors file size limit, GiB')
  parser.add_argument('--devices', type=int, default=8, help='fake CPU devices')
  parser.add_argument('--mesh', default='fsdp=8', help='mesh axis sizes, e.g. fsdp=8 or data=2,fsdp=2,tensor=2')
  parser.add_argument('--scan_layers', choices=('config', 'true', 'false'), default='config')
  parser.add_argument('--methods', default=','.join(METHODS))
  parser.add_argument('--keep', action='store_true', help='keep the checkpoint (and reuse one already there)')
  parser.add_argument('--processes', type=int, default=1,
                      help='jax processes on this machine (local coordinator), --devices / processes devices each')
  parser.add_argument('--measure', choices=METHODS, help=argparse.SUPPRESS)  # a child process's job
  parser.add_argument('--coordinator', help=argparse.SUPPRESS)
  parser.add_argument('--process_id', type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.measure:
    print(json.dumps(measure(args.measure, args.dir, args.mesh, args.scan_layers == 'true', args.coordinator,
                             args.processes, args.process_id)))
    return

  scan = None if args.scan_layers == 'config' else args.scan_layers == 'true'
  config = model_config(args.config, scan)
  written_here = not os.path.exists(os.path.join(args.dir, 'config.json'))
  if written_here:
    start = time.time()
    write_checkpoint(config, args.dir, args.shard_gb)
    print(f'wrote {args.dir} in {time.time() - start:.0f} s', file=sys.stderr)
  file_gib = sum(os.path.getsize(os.path.join(args.dir, f)) for f in os.listdir(args.dir)
                 if f.endswith('.safetensors')) / GIB
  if args.devices % args.processes:
    raise SystemExit(f'--devices={args.devices} must divide over --processes={args.processes}')
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={args.devices // args.processes}')
  results = []
  try:
    for method in args.methods.split(','):
      for result in run_processes(method, args, config.scan_layers, env):
        result.update(file_gib=file_gib, config=os.path.basename(args.config))
        results.append(result)
        print(json.dumps(result))
  finally:
    if written_here and not args.keep:
      shutil.rmtree(args.dir)
  print(f'\n{os.path.basename(args.config)}, bf16 files {file_gib:.2f} GiB, {args.devices} CPU devices, '
        f'mesh {args.mesh}, scan_layers={config.scan_layers}\n')
  print('| method | process | its shards | peak RSS | RSS before load | peak - before | / file size | load time |')
  print('| --- | --- | --- | --- | --- | --- | --- | --- |')
  for r in results:
    print(f'| {r["method"]} | {r["process"]} | {r["local_shards_gib"]:.2f} GiB | {r["peak_gib"]:.2f} GiB | '
          f'{r["rss_before_gib"]:.2f} GiB | {r["peak_minus_before_gib"]:.2f} GiB | '
          f'{r["peak_minus_before_gib"] / file_gib:.2f}x | {r["seconds"]:.1f} s |')


if __name__ == '__main__':
  main()
