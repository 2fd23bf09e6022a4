"""The chunked loss: same values and gradients as full logits, and the train step never holds full logits."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_utils import loss_inputs
from model_utils import random_params
from qwenjax import config as config_lib
from qwenjax import loss
from qwenjax import model as model_lib
from qwenjax import sharding
from qwenjax import train_step
from qwenjax.model_config import ModelConfig

MODEL = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, attention_impl='xla')


def test_one_pass_logsumexp_matches_jax():
  logits = jnp.concatenate([
      30.0 * jax.random.normal(jax.random.key(0), (3, 1000)),  # large spread: the running max must rescale
      jnp.full((1, 1000), -jnp.inf).at[0, 7].set(2.0),  # one finite entry among masked ones
  ])
  got = loss._xla_logsumexp(logits)  # pylint: disable=protected-access
  np.testing.assert_allclose(got, jax.nn.logsumexp(logits, axis=-1), rtol=1e-6)
  assert got[-1] == 2.0



@pytest.mark.slow
def test_bfloat16_logits_are_the_rounded_float32_logits():
  """logits_dtype='bfloat16' computes the loss and gradients of the head's output rounded to bfloat16 (as
  Hugging Face's bf16 autocast does), with the softmax still in float32."""
  hidden, head, targets, weights = loss_inputs(3)
  hidden, head = hidden.astype(jnp.bfloat16), head.astype(jnp.bfloat16)

  def reference(hidden, head):
    logits = jnp.einsum('bse,ev->bsv', hidden, head, preferred_element_type=jnp.float32)
    nll, z = loss.full_logits_cross_entropy(logits.astype(jnp.bfloat16), targets, weights)
    return nll + 1e-2 * z

  def chunked(hidden, head, logits_dtype):
    return loss.cross_entropy(hidden, head, targets, weights, z_coef=1e-2, chunk=5, logits_dtype=logits_dtype)[0]

  want, want_grads = jax.value_and_grad(reference, (0, 1))(hidden, head)
  got, grads = jax.jit(jax.value_and_grad(chunked, (0, 1)), static_argnums=2)(hidden, head, 'bfloat16')
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g.astype(jnp.float32), w.astype(jnp.float32), rtol=1e-2, atol=1e-2)
  # float32 logits differ from the rounded ones: the option changes what is computed.
  assert abs(float(jax.jit(chunked, static_argnums=2)(hidden, head, 'float32')) - float(want)) > 1e-4

@pytest.mark.parametrize('chunk,z_coef', [(12, 0.0), (5, 1e-2), (1, 1e-2)])
def test_chunked_loss_matches_full_logits(chunk, z_coef):
  hidden, head, targets, weights = loss_inputs(chunk)

  def reference(hidden, head):
    nll, z = loss.full_logits_cross_entropy(hidden @ head, targets, weights)
    return nll + z_coef * z, (nll, z)

  def chunked(hidden, head):
    total, nll, z = loss.cross_entropy(hidden, head, targets, weights, z_coef=z_coef, chunk=chunk)
    return 3.0 * total, (nll, z)  # a scaled cotangent reaches the backward

  (want, (want_nll, want_z)), want_grads = jax.value_and_grad(reference, (0, 1), has_aux=True)(hidden, head)
  (got, (nll, z)), grads = jax.jit(jax.value_and_grad(chunked, (0, 1), has_aux=True))(hidden, head)
  np.testing.assert_allclose(got, 3.0 * want, rtol=1e-6)
  np.testing.assert_allclose([nll, z], [want_nll, want_z], rtol=1e-6)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g, 3.0 * w, atol=2e-6)


@pytest.mark.slow
def test_step_loss_matches_the_models_logits():
  params = random_params(MODEL)
  rng = np.random.default_rng(0)
  batch = {'inputs': rng.integers(0, 512, (2, 24)), 'targets': rng.integers(0, 512, (2, 24)),
           'weights': np.ones((2, 24), np.float32)}
  logits = jax.jit(lambda p: model_lib.Qwen2(MODEL).apply({'params': p}, batch['inputs']))(params)
  want_nll, want_z = loss.full_logits_cross_entropy(logits, batch['targets'], batch['weights'])
  sums = jax.jit(functools.partial(train_step._sums, MODEL, z_loss=0.5, chunk=8))  # pylint: disable=protected-access
  total, (nll, z, count, _) = sums(params, batch)
  np.testing.assert_allclose([nll, z, count], [want_nll, want_z, 48.0], rtol=2e-6)
  np.testing.assert_allclose(total, want_nll + 0.5 * want_z, rtol=2e-6)


@pytest.mark.slow
def test_compiled_train_step_never_holds_full_logits():
  model = ModelConfig(**{**MODEL.to_dict(), 'dtype': 'bfloat16'})
  train, loss = config_lib.OptimizerConfig(), config_lib.LossConfig(loss_chunk=16)
  mesh_config = config_lib.MeshConfig(data=1, fsdp=1, tensor=1, expert=1)
  mesh = sharding.make_mesh(mesh_config, devices=jax.devices()[:1])
  rules = sharding.logical_axis_rules(mesh_config.rules, mesh, model)
  tx = train_step.make_optimizer(train)
  state = train_step.abstract_state(model, tx, train_step.state_shardings(model, tx, mesh, rules))
  batch = {k: jax.ShapeDtypeStruct((8, 64), jnp.float32 if k == 'weights' else jnp.int32)
           for k in ('inputs', 'targets', 'weights')}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = jax.jit(train_step.make_train_step(model, train, loss))
    hlo = step.lower(state, batch, train_step.schedule_horizon(train)).compile().as_text()
  vocab_shapes = set(re.findall(r'(?:f32|bf16)\[[0-9,]*,512\]', hlo))
  assert 'f32[8,16,512]' in vocab_shapes  # one chunk of logits
  assert not {s for s in vocab_shapes if s.endswith('[8,64,512]')}, vocab_shapes  # never the whole sequence
