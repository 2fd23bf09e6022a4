"""Context parallelism (`mesh.context`): each sequence split over devices in zig-zag order.

On 8 fake CPU devices: the zig-zag layout, attention over a split sequence (XLA and the Pallas kernels in their
interpreters) against the unsplit reference, and the first training losses of context-parallel meshes against
pure data parallelism, with sliding-window layers and packed documents.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax import attention
from qwenjax import config as config_lib
from qwenjax import context
from qwenjax import sharding
from qwenjax import train_step
from qwenjax.model_config import ModelConfig


def make_mesh(**sizes):
  sizes = {'data': 1, 'fsdp': 1, 'tensor': 1, 'expert': 1, 'context': 1, **sizes}
  return sharding.make_mesh(config_lib.MeshConfig(**sizes))


def packed_ids(batch, seq, seed=0):
  """Segment ids of packed documents (about four per row), and each token's position in its document."""
  rng = np.random.default_rng(seed)
  ids = np.cumsum(rng.random((batch, seq)) < 4 / seq, axis=1).astype(np.int32) + 1
  starts = np.concatenate([np.ones((batch, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
  index = np.arange(seq)[None].repeat(batch, 0)
  positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
  return ids, positions.astype(np.int32)


def test_zigzag_layout():
  assert list(context.chunk_order(4)) == [0, 7, 1, 6, 2, 5, 3, 4]
  x = np.arange(16)[None]
  z = np.asarray(context.zigzag(x, 2))
  assert list(z[0]) == [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]  # device 0: chunks 0, 3
  np.testing.assert_array_equal(context.unzigzag(z, 2), x)
  np.testing.assert_array_equal(context.zigzag_positions(16, 2), z[0])
  # Every device gets the same causal work: the key counts of its two chunks add up alike.
  work = [sum(int(p) + 1 for p in context.zigzag_positions(64, 4)[16 * d:16 * (d + 1)]) for d in range(4)]
  assert len(set(work)) == 1
  with pytest.raises(ValueError, match='data.seq_len=30 does not split into the 8 equal chunks'):
    context.zigzag(np.zeros((1, 30)), 4)


def test_seq_len_that_does_not_split_is_a_usage_error():
  from train_utils import TINY  # pylint: disable=g-import-not-at-top
  config = config_lib.load(TINY)
  config.mesh.update(context=4, fsdp=1, data=-1)
  config.data.seq_len = 100
  with pytest.raises(ValueError, match=r'data.seq_len=100 does not split into the 8 equal chunks that '
                     r'mesh.context=4 needs.*multiple of 8 \(e.g. 96\)'):
    config_lib.settings(config)
  config.data.seq_len = 96
  assert config_lib.settings(config).mesh.context == 4


@pytest.mark.slow
def test_the_command_line_reports_a_seq_len_that_does_not_split(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  from train_utils import train_command  # pylint: disable=g-import-not-at-top
  command, env = train_command(str(tmp_path / 'run'), {'mesh.context': 3})  # configs/tiny.py: seq_len 256
  result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith(
      'error: data.seq_len=256 does not split into the 6 equal chunks that mesh.context=3 needs')
  assert not (tmp_path / 'run').exists()


def _random_qkv(batch, seq, heads, kv_heads, head_dim, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(keys[0], (batch, seq, heads, head_dim)),
          jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim)),
          jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim)))


def _split_attention(mesh, q, k, v, ids, window, impl, interpret=False):
  """Attention under `mesh` with the sequence split over `context` (inputs and output in sequence order), and
  the gradients of a fixed random projection of the output."""
  shards = mesh.shape['context']
  rules = sharding.logical_axis_rules(sharding.DEFAULT_RULES, mesh)
  probe = jax.random.normal(jax.random.key(7), q.shape)

  def loss(q, k, v):
    z = lambda x: None if x is None else context.zigzag(x, shards)
    out = attention.dot_product_attention(z(q), z(k), z(v), sliding_window=window, segment_ids=z(ids), impl=impl,
                                          interpret=interpret)
    out = context.unzigzag(out, shards)
    return jnp.sum(out * probe), out

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    jaxpr = str(jax.make_jaxpr(fn)(q, k, v))
    assert 'all_gather' in jaxpr and 'shard_map' in jaxpr
    assert ('pallas_call' in jaxpr) == (impl != 'xla')
    (_, out), grads = fn(q, k, v)
  return out, grads


def _reference(q, k, v, ids, window):
  probe = jax.random.normal(jax.random.key(7), q.shape)

  def loss(q, k, v):
    out = attention.xla_attention(q, k, v, sliding_window=window, segment_ids=ids)
    return jnp.sum(out * probe), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def _assert_close(got, expected, atol):
  (out, grads), (ref_out, ref_grads) = got, expected
  np.testing.assert_allclose(out, ref_out, atol=atol, rtol=atol)
  for name, g, e in zip('qkv', grads, ref_grads):
    np.testing.assert_allclose(g, e, atol=atol, rtol=atol, err_msg=name)


@pytest.mark.parametrize('sizes,window,packed', [
    ({'data': 2, 'context': 4}, None, True),
    ({'data': 2, 'context': 4}, 11, False),
    ({'fsdp': 2, 'context': 2, 'tensor': 2}, 11, True),
    pytest.param({'context': 8}, 5, True, marks=pytest.mark.slow),
])
@pytest.mark.slow
def test_xla_attention_over_a_split_sequence_equals_the_reference(sizes, window, packed):
  mesh = make_mesh(**sizes)
  q, k, v = _random_qkv(2, 64, 4, 2, 16)
  ids = jnp.asarray(packed_ids(2, 64)[0]) if packed else None
  _assert_close(_split_attention(mesh, q, k, v, ids, window, 'xla'), _reference(q, k, v, ids, window), 2e-5)


@pytest.mark.slow
@pytest.mark.parametrize('sizes,window', [({'data': 2, 'context': 4}, 40), ({'fsdp': 2, 'context': 2, 'tensor': 2},
                                                                            None)])
def test_pallas_gpu_kernel_over_a_split_sequence_equals_the_reference(sizes, window):
  """The GPU kernels (their interpreter: the Triton family's blocked algorithm) with a query offset per chunk."""
  mesh = make_mesh(**sizes)
  q, k, v = _random_qkv(2, 128, 4, 2, 64, seed=1)
  ids = jnp.asarray(packed_ids(2, 128, seed=1)[0])
  got = _split_attention(mesh, q, k, v, ids, window, 'pallas_gpu', interpret=True)
  _assert_close(got, _reference(q, k, v, ids, window), 5e-5)


@pytest.mark.slow
def test_splash_kernel_over_a_split_sequence_equals_the_reference():
  """Splash (TPU) in its interpreter: one call per device over its share of the zig-zag query mask."""
  mesh = make_mesh(data=4, context=2)
  q, k, v = _random_qkv(4, 512, 2, 1, 64, seed=2)
  ids = jnp.asarray(packed_ids(4, 512, seed=2)[0])
  got = _split_attention(mesh, q, k, v, ids, 200, 'pallas_tpu', interpret=True)
  _assert_close(got, _reference(q, k, v, ids, 200), 5e-5)


@pytest.mark.slow
@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_context_attention_lowers_with_the_kernels_of_each_platform(platform):
  """What a GPU or TPU runs under {data: 2, context: 4}: the Hopper kernels with a query offset, or splash over
  its share of the zig-zag mask, inside the shard_map, K/V all-gathered and their gradients reduce-scattered
  (traced and lowered here; no accelerator needed)."""
  from qwenjax import kernels  # pylint: disable=g-import-not-at-top
  mesh = make_mesh(data=2, context=4)
  q = jax.ShapeDtypeStruct((2, 2048, 8, 128), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, 2048, 2, 128), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((2, 2048), jnp.int32)

  def loss(q, k, v, ids):
    out = attention.dot_product_attention(q, k, v, sliding_window=300, segment_ids=ids, impl='auto')
    return out.astype(jnp.float32).sum()

  rules = sharding.logical_axis_rules(sharding.DEFAULT_RULES, mesh)
  with kernels.lowering_platform(platform), jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, ids).lower(lowering_platforms=(platform,))
  text = lowered.as_text()
  if platform == 'cuda':
    for kernel in ('flash_forward', 'flash_dq', 'flash_dkv'):
      assert f'{kernel}_mosaic_gpu' in text, kernel
  else:
    assert text.count('tpu_custom_call') >= 3  # splash forward, dq, dkv
  assert 'all_gather' in text and 'reduce_scatter' in text


def test_kernels_refuse_chunks_they_cannot_take():
  mesh = make_mesh(data=2, context=4)
  q, k, v = _random_qkv(2, 64, 4, 2, 64)  # chunks of 8 tokens
  for impl, message in (('pallas_gpu', 'multiple of 16'), ('pallas_tpu', 'multiple of 128')):
    with pytest.raises(ValueError, match=message):
      _split_attention(mesh, q, k, v, None, None, impl, interpret=True)
  with pytest.raises(ValueError, match='does not split into the 8 equal chunks'):
    _split_attention(mesh, *_random_qkv(2, 60, 4, 2, 64), None, None, 'xla')


# ---------------------------------------------------------------------------------------------------------
# Training: the first losses of context-parallel meshes equal those of data parallelism.

MODEL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, attention_impl='xla')


def _batches(steps, batch, seq, packed, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for step in range(steps):
    tokens = rng.integers(0, MODEL['vocab_size'], (batch, seq + 1)).astype(np.int32)
    b = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'weights': np.ones((batch, seq), np.float32)}
    if packed:
      ids, positions = packed_ids(batch, seq + 1, seed=seed * 100 + step)
      b.update(segment_ids=ids[:, :-1], positions=positions[:, :-1],
               weights=(ids[:, 1:] == ids[:, :-1]).astype(np.float32))
    out.append(b)
  return out


def _losses(sizes, model_config, batches, steps=3):
  mesh = make_mesh(**sizes)
  rules = sharding.logical_axis_rules(sharding.DEFAULT_RULES, mesh, model_config)
  optimizer = config_lib.OptimizerConfig(lr=3e-3, warmup_steps=0, steps=steps, lr_schedule='constant')
  tx = train_step.make_optimizer(optimizer)
  shardings = train_step.state_shardings(model_config, tx, mesh, rules)
  state = train_step.create_state(model_config, tx, shardings, rng=jax.random.key(0))
  batch_sharding = sharding.batch_sharding(mesh, rules)
  losses = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    horizon = jax.device_put(train_step.schedule_horizon(optimizer), sharding.replicated(mesh))
    step = jax.jit(train_step.make_train_step(model_config, optimizer, config_lib.LossConfig(loss_chunk=8)),
                   in_shardings=(shardings, batch_sharding, sharding.replicated(mesh)))
    for batch in batches[:steps]:
      state, metrics = step(state, jax.device_put(batch, batch_sharding), horizon)
      losses.append(float(metrics['loss']))
  return losses


@pytest.mark.slow
@pytest.mark.parametrize('windows,packed,scan', [(True, True, False), (False, False, True)])
def test_context_parallel_losses_equal_data_parallel(windows, packed, scan):
  """{data: 2, context: 4}, {fsdp: 2, context: 2, tensor: 2} and {context: 8} train as data=8 does (3 steps)."""
  model_config = ModelConfig(**MODEL, use_sliding_window=windows, sliding_window=12, max_window_layers=1,
                             scan_layers=scan)  # windows: layer 0 full causal, layer 1 windowed
  batches = _batches(3, 8, 64, packed)
  expected = _losses({'data': 8}, model_config, batches)
  for sizes in ({'data': 2, 'context': 4}, {'fsdp': 2, 'context': 2, 'tensor': 2}, {'context': 8}):
    np.testing.assert_allclose(_losses(sizes, model_config, batches), expected, atol=1e-4, rtol=0, err_msg=sizes)


def test_decoding_refuses_a_context_axis():
  from qwenjax import kv_cache, model, params as params_lib  # pylint: disable=g-import-not-at-top
  config = ModelConfig(**MODEL)
  params = sharding.strip_boxes(params_lib.abstract_params(config))
  mesh = make_mesh(data=2, context=4)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_axis_rules(sharding.DEFAULT_RULES, mesh)):
    with pytest.raises(ValueError, match='decoding.*does not support context parallelism'):
      jax.eval_shape(lambda p: model.Qwen2(config).apply({'params': p}, jnp.zeros((2, 8), jnp.int32),
                                                         cache=kv_cache.init_cache(config, 2, 8),
                                                         lengths=jnp.full((2,), 8)), params)


@pytest.mark.slow
def test_training_job_with_a_context_axis_logs_the_losses_of_data_parallelism(tmp_path, tokenizer_file):
  """`--config.mesh.context=4` through the job's own path (data, mesh, step, evaluation): the packed rows of the
  built-in corpus, sliding-window and full layers, the same losses as data=8."""
  from qwenjax import train  # pylint: disable=g-import-not-at-top
  from train_utils import losses, read_metrics, small_config  # pylint: disable=g-import-not-at-top
  logged = {}
  for name, mesh in (('data', dict(data=8, fsdp=1)), ('context', dict(data=2, fsdp=1, context=4))):
    config = small_config(steps=3, log_every=1, eval_every=0, eval_steps=1, z_loss=0.0)
    config.data.tokenizer = tokenizer_file
    config.mesh.update(mesh)
    train.train_and_evaluate(config, str(tmp_path / name))
    records = read_metrics(str(tmp_path / name))
    logged[name] = (losses(records), [r['eval_loss'] for r in records if 'eval_loss' in r])
  (data_losses, data_eval), (context_losses, context_eval) = logged['data'], logged['context']
  assert sorted(data_losses) == [1, 2, 3]
  np.testing.assert_allclose([context_losses[s] for s in (1, 2, 3)], [data_losses[s] for s in (1, 2, 3)],
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(context_eval, data_eval, atol=1e-4, rtol=0)
