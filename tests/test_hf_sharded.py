"""Hugging Face checkpoints loaded slice by slice into sharded arrays: the same params as the plain load, and
each device's block read alone (what lets every host of a pod slice read only its own share)."""

import dataclasses
import json
import math
import os
import pathlib
import socket
import subprocess
import sys

import flax.linen as nn
import hf_utils
import jax
import numpy as np
import pytest
import transformers

from qwenjax import hf, params as params_lib, sharding
from qwenjax.config import MeshConfig
from train_utils import subprocess_xla_flags

# Dense: untied head, GQA 4/2, in several files. MoE: experts in transformers 5's fused layout.
DENSE = dict(tie_word_embeddings=False)
MOE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=128, num_experts=4, num_experts_per_tok=2,
           moe_intermediate_size=32, shared_expert_intermediate_size=48)


def _random_params(config, seed):
  """Random numpy params of the config's shapes (every value distinct, so a mis-mapped tensor shows)."""
  rng = np.random.RandomState(seed)
  dtype = jax.numpy.dtype(config.param_dtype)
  return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(dtype),
                      nn.unbox(params_lib.abstract_params(config)))


@pytest.fixture(scope='module')
def dense_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('dense')
  config = dataclasses.replace(hf.config_from_hf(hf_utils.tiny_hf_config(**DENSE)), param_dtype='bfloat16')
  hf.save_pretrained(str(path), config, _random_params(config, 0), max_shard_size='60KB')
  assert (path / 'model.safetensors.index.json').exists()
  return str(path)


@pytest.fixture(scope='module')
def moe_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('moe')
  config = hf.config_from_hf({'model_type': 'qwen2_moe', **transformers.Qwen2MoeConfig(**MOE).to_dict()})
  hf.save_pretrained(str(path), config, _random_params(config, 1), expert_layout='fused')
  return str(path)


def _shardings(path, mesh_config, **overrides):
  mesh = sharding.make_mesh(MeshConfig(**dict(zip(sharding.MESH_AXES, mesh_config))))
  config = hf.load_config(path, **overrides)
  rules = sharding.logical_axis_rules(sharding.DEFAULT_RULES, mesh, config)
  return sharding.param_shardings(params_lib.abstract_params(config), mesh, rules)


def _assert_same(sharded, plain, shardings):
  flat_sharded = jax.tree_util.tree_leaves_with_path(sharded)
  flat_plain, flat_shardings = jax.tree.leaves(plain), jax.tree.leaves(shardings)
  assert len(flat_sharded) == len(flat_plain) == len(flat_shardings)
  for (path, x), y, s in zip(flat_sharded, flat_plain, flat_shardings):
    assert isinstance(x, jax.Array) and x.sharding == s, path
    assert x.dtype == y.dtype and x.shape == y.shape, path
    np.testing.assert_array_equal(np.asarray(x), y, err_msg=str(path))


@pytest.mark.parametrize('scan_layers', [False, True])
def test_fsdp8_equals_plain_load(dense_dir, scan_layers, monkeypatch):
  _, plain = hf.from_pretrained(dense_dir, scan_layers=scan_layers)
  shardings = _shardings(dense_dir, (1, 8, 1, 1), scan_layers=scan_layers)
  # The sharded path must never read whole files.
  monkeypatch.setattr(hf, 'load_file', lambda *a, **k: pytest.fail('sharded load read a whole file'))
  config, params = hf.from_pretrained(dense_dir, shardings=shardings, scan_layers=scan_layers)
  assert config.param_dtype == 'bfloat16' and config.scan_layers == scan_layers
  # fsdp=8 over embed (64): every kernel is split 8 ways.
  assert params['embed_tokens'].sharding.shard_shape(params['embed_tokens'].shape) == (97, 8)
  _assert_same(params, plain, shardings)


def test_mesh_2x2x2_scanned_fused_moe_and_dtype(moe_dir):
  """data x fsdp x tensor and fsdp x tensor x expert meshes; experts stacked per layer and split over `expert`,
  read from fused gate_up_proj tensors; a dtype cast on the way."""
  _, plain = hf.from_pretrained(moe_dir, scan_layers=True)
  for mesh_config in ((2, 2, 2, 1), (1, 2, 2, 2)):
    shardings = _shardings(moe_dir, mesh_config, scan_layers=True)
    config, params = hf.from_pretrained(moe_dir, shardings=shardings, scan_layers=True)
    gate = params['layers']['mlp']['experts']['gate_proj']
    assert gate.shape == (2, 4, 64, 32)
    if mesh_config[3] == 2:
      assert gate.sharding.shard_shape(gate.shape) == (2, 2, 32, 16)  # expert, fsdp (embed), tensor (mlp)
    _assert_same(params, plain, shardings)

  shardings = _shardings(moe_dir, (2, 2, 2, 1), scan_layers=True)
  config, params = hf.from_pretrained(moe_dir, 'float32', shardings=shardings, scan_layers=True)
  assert config.param_dtype == 'float32'
  _assert_same(params, jax.tree.map(lambda x: x.astype(np.float32), plain), shardings)


def test_each_read_is_one_device_block(dense_dir, monkeypatch):
  """Every read is exactly the HF rows/columns of one device's block: 1/8 of each tensor that fsdp=8 splits."""
  reads = []
  original = hf.read_slice

  def counting(file, source, index):
    block = original(file, source, index)
    reads.append((source.tensor, block.nbytes, math.prod(source.shape) * block.itemsize))
    return block

  monkeypatch.setattr(hf, 'read_slice', counting)
  shardings = _shardings(dense_dir, (1, 8, 1, 1), scan_layers=True)
  _, params = hf.from_pretrained(dense_dir, shardings=shardings, scan_layers=True)

  by_tensor = {}
  for tensor, nbytes, total in reads:
    by_tensor.setdefault(tensor, []).append((nbytes, total))
  assert len(by_tensor) == 3 + 12 * 3  # embed, norm, lm_head; 12 tensors in each of 3 layers
  flat_params = {'/'.join(k.key for k in path): x for path, x in jax.tree_util.tree_leaves_with_path(params)}
  q = flat_params['layers/self_attn/q_proj/kernel']
  assert q.sharding.shard_shape(q.shape) == (3, 8, 4, 16)
  for tensor, sizes in by_tensor.items():
    split = 8 if tensor.endswith(('proj.weight', 'embed_tokens.weight', 'lm_head.weight')) else 1
    # One read per distinct block (jax asks once for blocks that devices share); each is 1/split of the
    # tensor, so together they read every tensor's bytes exactly once.
    assert len(sizes) == split, tensor
    assert all(nbytes * split == total for nbytes, total in sizes), (tensor, sizes)


def test_bad_shardings_give_named_errors(dense_dir):
  unscanned = _shardings(dense_dir, (1, 8, 1, 1), scan_layers=False)
  with pytest.raises(ValueError, match=r'shardings do not match .*scan_layers=True.*hf\.load_config'):
    hf.from_pretrained(dense_dir, shardings=unscanned, scan_layers=True)


# One of two jax processes (4 CPU devices each, as two hosts): loads with fsdp=8, counts the bytes it reads.
TWO_PROCESS_SCRIPT = '''
import json, sys
import jax
import numpy as np
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(coordinator_address=sys.argv[2], num_processes=2, process_id=int(sys.argv[3]))
from qwenjax import hf, params as params_lib, sharding
from qwenjax.config import MeshConfig
path, read = sys.argv[1], []
original = hf.read_slice
def counting(file, source, index):
  block = original(file, source, index)
  read.append(block.nbytes)
  return block
hf.read_slice = counting
mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=8, tensor=1, expert=1))
config = hf.load_config(path)
rules = sharding.logical_axis_rules(sharding.DEFAULT_RULES, mesh, config)
shardings = sharding.param_shardings(params_lib.abstract_params(config), mesh, rules)
_, params = hf.from_pretrained(path, shardings=shardings)
_, plain = hf.from_pretrained(path)
equal, blocks = True, 0
for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(plain)):
  distinct = {}
  for shard in x.addressable_shards:
    equal &= np.array_equal(np.asarray(shard.data), y[shard.index])
    distinct[str(shard.index)] = shard.data.nbytes
  blocks += sum(distinct.values())
total = sum(y.nbytes for y in jax.tree.leaves(plain))
print(json.dumps({'equal': bool(equal), 'read': sum(read), 'blocks': blocks, 'total': total,
                  'local_devices': jax.local_device_count(), 'devices': jax.device_count()}))
'''


@pytest.mark.slow
def test_two_processes_each_read_only_their_half(dense_dir, tmp_path):
  script = tmp_path / 'load.py'
  script.write_text(TWO_PROCESS_SCRIPT)
  with socket.socket() as s:
    s.bind(('localhost', 0))
    coordinator = f'localhost:{s.getsockname()[1]}'
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=subprocess_xla_flags(4),
             PYTHONPATH=str(pathlib.Path(__file__).parent.parent))
  children = [subprocess.Popen([sys.executable, str(script), dense_dir, coordinator, str(i)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [child.communicate(timeout=300) for child in children]
  for child, (_, err) in zip(children, outputs):
    assert child.returncode == 0, err[-3000:]
  results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
  for result in results:
    assert result['equal'] and (result['local_devices'], result['devices']) == (4, 8)
    # Each process read exactly the distinct blocks its 4 devices hold: half of every fsdp-split tensor
    # (the norms, replicated, are read whole by both; they are under 1% of the bytes).
    assert result['read'] == result['blocks']
    assert 0.5 <= result['read'] / result['total'] < 0.51


@pytest.mark.slow
def test_memory_benchmark_runs(tmp_path):
  """benchmarks/hf_load_memory.py on the tiny config: both methods load the whole model into 8 devices."""
  out_dir = tmp_path / 'checkpoint'
  done = subprocess.run(
      [sys.executable, str(pathlib.Path(__file__).parent.parent / 'benchmarks' / 'hf_load_memory.py'),
       '--config', str(pathlib.Path(__file__).parent.parent / 'configs' / 'tiny.py'), '--dir', str(out_dir),
       '--shard_gb', '0.002'], capture_output=True, text=True, timeout=300, check=False,
      env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(pathlib.Path(__file__).parent.parent),
                                                       os.environ.get('PYTHONPATH', '')])))
  assert done.returncode == 0, done.stderr[-3000:]
  results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{')]
  assert [r['method'] for r in results] == ['sharded', 'whole']
  for result in results:
    assert result['devices'] == 8 and result['peak_gib'] >= result['rss_before_gib']
    assert abs(result['local_shards_gib'] - result['file_gib']) < 0.01 * result['file_gib']
  assert '| sharded | 0 of 1 |' in done.stdout
  assert not out_dir.exists()  # written, measured, deleted
