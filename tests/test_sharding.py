"""Mesh construction, logical axis rules, and the same training numbers on every mesh (8 fake CPU devices)."""

import dataclasses
import os
import socket
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_utils import random_params
from train_utils import subprocess_xla_flags
from qwenjax import config as config_lib
from qwenjax import loss as loss_lib
from qwenjax import sharding
from qwenjax import train_step
from qwenjax.model_config import ModelConfig

MODEL = ModelConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, use_sliding_window=True, sliding_window=12, max_window_layers=1,
    attention_impl='xla')
BATCH, SEQ = 8, 32


MOE_MODEL = dataclasses.replace(
    MODEL, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
    output_router_logits=True, router_aux_loss_coef=0.01, router_z_loss_coef=1e-3)


def mesh_config(data, fsdp, tensor, expert=1, dcn_data=1):
  return config_lib.MeshConfig(data=data, fsdp=fsdp, tensor=tensor, expert=expert, dcn_data=dcn_data)


def test_mesh_sizes_resolve_and_errors_name_the_device_count():
  assert sharding.mesh_shape(mesh_config(2, -1, 2), 8) == (2, 2, 2, 1, 1)
  assert sharding.make_mesh(mesh_config(1, -1, 1)).shape == {'data': 1, 'fsdp': 8, 'tensor': 1, 'expert': 1,
                                                              'context': 1}
  assert sharding.mesh_shape(mesh_config(1, 2, 1, -1), 8) == (1, 2, 1, 4, 1)
  with pytest.raises(ValueError, match=r'multiply to 4 but there are 8 devices.*product is 8'):
    sharding.make_mesh(mesh_config(2, 2, 1))
  with pytest.raises(ValueError, match='does not divide the 8 devices'):
    sharding.mesh_shape(mesh_config(3, -1, 1), 8)
  with pytest.raises(ValueError, match='at most one may be -1'):
    sharding.mesh_shape(mesh_config(-1, -1, 1), 8)
  context = config_lib.MeshConfig(data=2, fsdp=1, context=-1)
  assert sharding.make_mesh(context).shape == {'data': 2, 'fsdp': 1, 'tensor': 1, 'expert': 1, 'context': 4}


def test_multi_slice_shapes_put_only_data_across_slices():
  """mesh.dcn_data slices: the ICI sizes are one slice's, and the data axis runs over the slices."""
  two_slices = mesh_config(1, -1, 2, dcn_data=2)
  assert sharding.hybrid_mesh_shapes(two_slices, 16) == ((1, 4, 2, 1, 1), (2, 1, 1, 1, 1))
  assert sharding.mesh_shape(two_slices, 16) == (2, 4, 2, 1, 1)
  assert sharding.hybrid_mesh_shapes(mesh_config(2, -1, 1), 8) == ((2, 4, 1, 1, 1), (1, 1, 1, 1, 1))  # no dcn_data
  # Fake devices of 2 slices (numbered so the slices interleave): each slice is one contiguous half of `data`.
  devices = [types.SimpleNamespace(id=i, slice_index=i % 2, process_index=i // 8, platform='fake',
                                   device_kind='fake') for i in range(16)]
  array = sharding.hybrid_device_array(two_slices, devices)
  assert array.shape == (2, 4, 2, 1, 1)
  assert [{d.slice_index for d in array[i].flat} for i in range(2)] == [{0}, {1}]
  # Without slice_index (GPUs), hosts are the slices.
  for d in devices:
    del d.slice_index
  assert [{d.process_index for d in sharding.hybrid_device_array(two_slices, devices)[i].flat}
          for i in range(2)] == [{0}, {1}]


def test_multi_slice_errors_name_the_fix():
  with pytest.raises(ValueError, match=r'dcn_data=2 but the 8 devices are in 1 slice\(s\).*Set mesh.dcn_data to 1'):
    sharding.make_mesh(mesh_config(1, -1, 1, dcn_data=2))  # 8 fake CPU devices of one process
  with pytest.raises(ValueError, match='dcn_data=3 slices do not divide the 8 devices'):
    sharding.make_mesh(mesh_config(1, -1, 1, dcn_data=3))
  with pytest.raises(ValueError, match='positive int'):
    sharding.mesh_shape(mesh_config(1, -1, 1, dcn_data=0), 8)
  with pytest.raises(ValueError, match='multiply to 4 but there are 8 devices of each of the 2 slices'):
    sharding.mesh_shape(mesh_config(2, 2, 1, dcn_data=2), 16)
  assert sharding.make_mesh(mesh_config(1, -1, 1)).shape['data'] == 1  # dcn_data=1: one slice, as before


_TWO_HOSTS = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from qwenjax import config, sharding
port, process = sys.argv[1], int(sys.argv[2])
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2, process_id=process)
mesh = sharding.make_mesh(config.MeshConfig(data=1, fsdp=-1, tensor=1, expert=1, dcn_data=2))
hosts = [sorted({d.process_index for d in mesh.devices[i].flat}) for i in range(mesh.shape['data'])]
rows = jax.make_array_from_process_local_data(NamedSharding(mesh, P(('data', 'fsdp'))),
                                              np.full((4,), process + 1, np.float32))
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(rows)
print('RESULT', dict(mesh.shape), hosts, float(total))
"""


@pytest.mark.slow
def test_two_hosts_as_two_slices():
  """Two processes of 4 CPU devices with mesh.dcn_data=2: hosts are the slices (no slice_index), each one
  half of the data axis, and a reduction across them is right."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS=subprocess_xla_flags(4), JAX_PLATFORMS='cpu')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  processes = [subprocess.Popen([sys.executable, '-c', _TWO_HOSTS, str(port), str(i)], cwd=root, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  for p, out in zip(processes, outputs):
    assert p.returncode == 0, out[-3000:]
    result = [line for line in out.splitlines() if line.startswith('RESULT')]
    expected = "RESULT {'data': 2, 'fsdp': 4, 'tensor': 1, 'expert': 1, 'context': 1} [[0], [1]] 12.0"
    assert result == [expected], out[-3000:]


def test_rules_leave_unsharded_what_the_mesh_does_not_divide():
  mesh = sharding.make_mesh(mesh_config(1, 2, 4))
  rules = dict(sharding.logical_axis_rules(sharding.DEFAULT_RULES, mesh, MODEL))  # 2 kv heads, tensor=4
  assert rules['kv_heads'] is None and rules['activation_kv_heads'] is None
  assert rules['heads'] == 'tensor' and rules['activation_batch'] == ('data', 'fsdp', 'expert')
  with pytest.raises(ValueError, match='names mesh axes'):
    sharding.logical_axis_rules((('embed', 'model'),), mesh, MODEL)


def test_param_shardings_follow_logical_names():
  mesh = sharding.make_mesh(mesh_config(2, 2, 2))
  rules = sharding.logical_axis_rules(sharding.DEFAULT_RULES, mesh, MODEL)
  tx = train_step.make_optimizer(config_lib.OptimizerConfig())
  shardings = train_step.state_shardings(dataclasses.replace(MODEL, scan_layers=True), tx, mesh, rules)
  specs = jax.tree.map(lambda s: tuple(s.spec), shardings.params)
  assert specs['embed_tokens'] == ('tensor', 'fsdp')
  assert specs['layers']['self_attn']['q_proj']['kernel'] == (None, 'fsdp', 'tensor', None)
  assert specs['layers']['mlp']['down_proj']['kernel'] == (None, 'tensor', 'fsdp')
  assert specs['norm']['scale'] in ((), (None,))
  # Adam moments are sharded like their parameters.
  mu = shardings.opt_state[1][0].mu
  assert tuple(mu['layers']['mlp']['up_proj']['kernel'].spec) == (None, 'fsdp', 'tensor')
  assert sharding.batch_shards(mesh, rules) == 4


def _batch(rng):
  """Two documents per row (boundary at a random place) so segment masking matters."""
  tokens = rng.integers(0, MODEL.vocab_size, (BATCH, SEQ + 1)).astype(np.int32)
  cut = rng.integers(5, SEQ - 5, (BATCH, 1))
  col = np.arange(SEQ + 1)[None]
  segments = np.where(col < cut, 1, 2).astype(np.int32)
  positions = np.where(col < cut, col, col - cut).astype(np.int32)
  weights = (segments[:, 1:] == segments[:, :-1]).astype(np.float32)
  weights[-1, -7:] = 0  # some padding
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'positions': positions[:, :-1],
          'segment_ids': segments[:, :-1], 'weights': weights}


@pytest.fixture(scope='module')
def setup():
  params = random_params(MODEL)
  rng = np.random.default_rng(0)
  first, second = _batch(rng), _batch(rng)
  return params, [first, second, first]


def run_steps(params, batches, mesh_sizes, grad_accum_steps=1, model=MODEL, metric_names=('loss', 'grad_norm')):
  """Three train steps from the given host params on a mesh; returns the metrics per step."""
  train = config_lib.OptimizerConfig(lr=1e-3, warmup_steps=1, steps=10)
  loss = config_lib.LossConfig(grad_accum_steps=grad_accum_steps, z_loss=1e-4)
  mesh = sharding.make_mesh(mesh_config(*mesh_sizes))
  rules = sharding.logical_axis_rules(sharding.DEFAULT_RULES, mesh, model)
  tx = train_step.make_optimizer(train)
  shardings = train_step.state_shardings(model, tx, mesh, rules)
  state = train_step.create_state(model, tx, shardings, params=params)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  out = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = jax.jit(train_step.make_train_step(model, train, loss),
                   in_shardings=(shardings, batch_sharding, sharding.replicated(mesh)),
                   out_shardings=(shardings, None), donate_argnums=(0,))
    for batch in batches:
      state, metrics = step(state, {k: jax.device_put(v, batch_sharding) for k, v in batch.items()},
                            train_step.schedule_horizon(train))
      out.append([float(metrics[name]) for name in metric_names])
  # The state stayed in its shardings across steps (donation + out_shardings).
  assert state.params['embed_tokens'].sharding == shardings.params['embed_tokens']
  return np.array(out)


@pytest.fixture(scope='module')
def reference(setup):
  return run_steps(*setup, (8, 1, 1))


@pytest.mark.slow
@pytest.mark.parametrize('mesh_sizes,accum', [((1, 8, 1), 1), ((2, 2, 2), 1), ((1, 4, 2), 1), ((8, 1, 1), 2)])
def test_same_losses_on_every_mesh(setup, reference, mesh_sizes, accum):
  losses = run_steps(*setup, mesh_sizes, grad_accum_steps=accum)
  assert reference[0, 0] > 5.0  # random init on 256 tokens: about ln(256) = 5.5
  assert reference[2, 0] < reference[0, 0]  # step 3 sees step 1's batch again: the updates fit it
  np.testing.assert_allclose(losses[:, 0], reference[:, 0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(losses[:, 1], reference[:, 1], rtol=1e-4)


@pytest.fixture(scope='module')
def moe_params():
  return random_params(MOE_MODEL, seed=1)


@pytest.mark.slow
def test_moe_train_step_is_the_same_on_expert_meshes(setup, moe_params):
  """Qwen2-MoE through the real train step: expert parallelism (all-to-all) changes no number."""
  batches = setup[1]
  names = ('loss', 'grad_norm', 'moe_aux_loss', 'moe_load_balancing_loss', 'moe_router_z_loss')
  # (data, fsdp, tensor, expert): no expert parallelism (the reference); experts over expert=2 with the batch also
  # over data and each expert's MLP split over tensor; experts over expert=4 with the weights split over fsdp.
  runs = {sizes: run_steps(moe_params, batches, sizes, model=MOE_MODEL, metric_names=names)
          for sizes in ((8, 1, 1, 1), (2, 1, 2, 2), (1, 2, 1, 4))}
  reference = runs[(8, 1, 1, 1)]
  assert reference[0, 2] > 0  # the router loss is on and reported
  assert reference[2, 0] < reference[0, 0]
  for sizes, metrics in runs.items():
    np.testing.assert_allclose(metrics[:, 0], reference[:, 0], atol=1e-5, rtol=0, err_msg=str(sizes))
    np.testing.assert_allclose(metrics[:, 1:], reference[:, 1:], rtol=1e-4, err_msg=str(sizes))


def test_expert_axis_shards_experts_and_tokens():
  mesh = sharding.make_mesh(mesh_config(1, 2, 1, 4))
  rules = sharding.logical_axis_rules(sharding.DEFAULT_RULES, mesh, MOE_MODEL)
  tx = train_step.make_optimizer(config_lib.OptimizerConfig())
  specs = jax.tree.map(lambda s: tuple(s.spec), train_step.state_shardings(MOE_MODEL, tx, mesh, rules).params)
  assert specs['layers_0']['mlp']['experts']['gate_proj'] == ('expert', 'fsdp', 'tensor')  # tensor has size 1
  assert sharding.batch_shards(mesh, rules) == 8


@pytest.mark.slow
def test_loss_ignores_masked_targets():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 11))
  targets = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
  weights = jnp.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 1]], jnp.float32)
  nll, _ = loss_lib.full_logits_cross_entropy(logits, targets, weights)
  logp = jax.nn.log_softmax(logits)
  expected = -sum(float(logp[b, s, targets[b, s]]) for b in range(2) for s in range(5) if weights[b, s])
  np.testing.assert_allclose(float(nll), expected, rtol=1e-6)
  changed = logits.at[0, 2].set(100.0).at[1, 0].set(-50.0)  # masked positions: no effect
  changed_nll, _ = loss_lib.full_logits_cross_entropy(changed, targets, weights)
  np.testing.assert_allclose(float(changed_nll), expected, rtol=1e-6)


def test_weight_decay_skips_norms_and_biases():
  params = random_params(MODEL)  # decay_mask reads the tree's names
  mask = train_step.decay_mask(params)
  assert mask['layers_0']['mlp']['up_proj']['kernel'] and mask['embed_tokens']
  assert not mask['norm']['scale'] and not mask['layers_1']['self_attn']['q_proj']['bias']
  assert not mask['layers_0']['input_layernorm']['scale']
