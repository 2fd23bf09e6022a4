"""Evaluation: the in-job eval step by micro-batches, and `python -m qwenjax.evaluate` (loss, bits per byte,
multiple-choice scoring) against values computed with `transformers`."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from qwenjax import config as config_lib
from qwenjax import model as model_lib
from qwenjax import sharding
from qwenjax import train_step

MODEL = model_lib.ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, attention_impl='xla')


def _mesh(model, devices):
  mesh_config = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1, rules=sharding.DEFAULT_RULES))
  mesh = sharding.make_mesh(mesh_config, devices=devices)
  return mesh, sharding.logical_axis_rules(mesh_config.rules, mesh, model)


def _eval_batch(rows=16, seq=32, seed=0):
  rng = np.random.default_rng(seed)
  weights = (rng.random((rows, seq)) > 0.2).astype(np.float32)
  weights[-3:] = 0.0  # padding rows, as eval_batches ends a short set
  return {'inputs': rng.integers(0, 512, (rows, seq)).astype(np.int32),
          'targets': rng.integers(0, 512, (rows, seq)).astype(np.int32),
          'positions': np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy(),
          'segment_ids': np.ones((rows, seq), np.int32), 'weights': weights}


def _run_eval_step(train, params, batch):
  """The eval step as train.py runs it: jitted on an 8-device mesh, params and batch sharded."""
  mesh, rules = _mesh(MODEL, jax.devices())
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = train_step.param_shardings(MODEL, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    step = jax.jit(train_step.make_eval_step(MODEL, train), in_shardings=(shardings, batch_sharding))
    nll, count = step(jax.device_put(params, shardings), jax.device_put(batch, batch_sharding))
  return float(nll), float(count)


def test_eval_step_in_micro_batches_gives_the_whole_batch_loss():
  params = model_lib.init_params(MODEL, jax.random.key(0))
  batch = _eval_batch()
  want_nll, want_count = _run_eval_step(None, params, batch)  # the whole batch at once, float32 logits
  assert want_count == batch['weights'].sum()

  train = config_lib.train_section()
  train.update(grad_accum_steps=4, loss_chunk=8, logits_dtype='float32')
  nll, count = _run_eval_step(train, params, batch)
  assert count == want_count
  np.testing.assert_allclose(nll, want_nll, rtol=1e-5)

  train.update(logits_dtype='bfloat16')  # logits rounded to 8 mantissa bits: the mean loss moves a little
  nll, count = _run_eval_step(train, params, batch)
  assert count == want_count and nll != want_nll
  np.testing.assert_allclose(nll / count, want_nll / want_count, rtol=1e-2)


def test_compiled_eval_step_runs_one_micro_batch_and_one_loss_chunk_at_a_time():
  train = config_lib.train_section()
  train.update(grad_accum_steps=4, loss_chunk=16, logits_dtype='bfloat16')
  mesh, rules = _mesh(MODEL, jax.devices()[:1])
  params = sharding.strip_boxes(train_step._abstract_params(MODEL))  # pylint: disable=protected-access
  batch = {k: jax.ShapeDtypeStruct((8, 96), jnp.float32 if k == 'weights' else jnp.int32)
           for k in ('inputs', 'targets', 'weights')}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = train_step.make_eval_step(MODEL, train)
    jaxpr = jax.make_jaxpr(step)(params, batch)
    hlo = jax.jit(step).lower(params, batch).compile().as_text()
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'scan']
  assert [e.params['length'] for e in scans] == [4]  # a loop over the 4 micro-batches ...
  assert (4, 2, 96) in {tuple(v.aval.shape) for v in scans[0].invars}  # ... of 2 rows each
  activations = set(re.findall(r'f32\[(\d+),96,64\]', hlo))  # [rows, seq, hidden]
  assert activations == {'2'}, activations
  # Logits: only one 16-position chunk of one micro-batch (2 x 16 rows), written in bfloat16; [64, 512] is the
  # output head.
  vocab_shapes = set(re.findall(r'(?:f32|bf16)\[[0-9,]*,512\]', hlo))
  assert 'bf16[32,512]' in vocab_shapes, vocab_shapes
  assert vocab_shapes <= {'bf16[32,512]', 'f32[32,512]', 'f32[2,16,512]', 'f32[64,512]'}, vocab_shapes


def test_eval_step_rejects_a_batch_that_does_not_split():
  train = config_lib.train_section()
  train.update(grad_accum_steps=3)
  params = sharding.strip_boxes(train_step._abstract_params(MODEL))  # pylint: disable=protected-access
  batch = {k: jax.ShapeDtypeStruct((8, 64), jnp.float32 if k == 'weights' else jnp.int32)
           for k in ('inputs', 'targets', 'weights')}
  with pytest.raises(ValueError, match='does not split into grad_accum_steps=3'):
    jax.eval_shape(train_step.make_eval_step(MODEL, train), params, batch)
