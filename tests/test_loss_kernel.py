"""The loss's Pallas kernels (`kernels/cross_entropy_gpu.py`, `loss_impl='pallas'`) in the interpreter: the same
values and gradients as the XLA passes, on one device and with the vocabulary split over a mesh, and their
Triton lowering for a GPU."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_utils import loss_inputs
from qwenjax import config as config_lib
from qwenjax import kernels
from qwenjax import loss
from qwenjax import sharding
from qwenjax import train_step
from qwenjax.kernels import cross_entropy_gpu
from qwenjax.model_config import ModelConfig


@pytest.mark.slow
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_kernels_match_a_float32_reference(dtype):
  rows, vocab, z_coef = 5, 1000, 1e-2  # 1000 columns: the last block of 256 is partly outside the row
  k = jax.random.split(jax.random.key(0), 3)
  logits = 30.0 * jax.random.normal(k[0], (rows, vocab))  # a large spread: the running max must rescale
  logits = logits.at[-1].set(-jnp.inf).at[-1, 700].set(2.0).astype(dtype)  # one finite entry, in a late block
  targets = jax.random.randint(k[1], (rows,), 0, vocab).at[-1].set(700)
  weights = jnp.array([1.0, 0.0, 0.5, 1.0, 1.0])

  lse = cross_entropy_gpu.logsumexp(logits, block=256, interpret=True)
  want_lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-6)
  assert lse[-1] == 2.0

  grad = cross_entropy_gpu.softmax_grad(logits, lse, targets, weights, z_coef=z_coef, dtype=jnp.float32,
                                        block=256, interpret=True)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  want = weights[:, None] * (probs * (1 + 2 * z_coef * want_lse[:, None]) - jax.nn.one_hot(targets, vocab))
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)
  assert not np.any(np.asarray(grad[1]))  # weight 0: no gradient
  assert float(grad[-1, 700]) == pytest.approx(2 * z_coef * 2.0)  # p = 1 at the only finite logit


def _loss_and_grads(impl, hidden, head, targets, weights, logits_dtype='float32'):
  def total(hidden, head):
    t, nll, z = loss.cross_entropy(hidden, head, targets, weights, z_coef=1e-2, chunk=5, logits_dtype=logits_dtype,
                                   impl=impl, interpret=True)
    return 3.0 * t, (nll, z)

  (t, (nll, z)), grads = jax.jit(jax.value_and_grad(total, (0, 1), has_aux=True))(hidden, head)
  return [t, nll, z], grads


@pytest.mark.slow
@pytest.mark.parametrize('logits_dtype', ['float32', 'bfloat16'])
def test_cross_entropy_with_the_kernels_matches_xla(logits_dtype):
  hidden, head, targets, weights = loss_inputs(1, vocab=64)
  if logits_dtype == 'bfloat16':
    hidden, head = hidden.astype(jnp.bfloat16), head.astype(jnp.bfloat16)
  want, want_grads = _loss_and_grads('xla', hidden, head, targets, weights, logits_dtype)
  got, grads = _loss_and_grads('pallas', hidden, head, targets, weights, logits_dtype)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  tol = 1e-5 if logits_dtype == 'float32' else 2e-2
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g.astype(jnp.float32), w.astype(jnp.float32), rtol=tol, atol=tol)


@pytest.mark.slow
def test_kernels_on_a_mesh_with_the_vocabulary_split():
  """data=2 x tensor=4: rows split over data, the vocabulary over tensor; each device's logsumexp is combined
  over tensor and its targets offset to its slice. Also under vmap, as the evaluator scores rows."""
  mesh = sharding.make_mesh(config_lib.MeshConfig(data=2, fsdp=1, tensor=4, expert=1))
  rules = sharding.logical_axis_rules(sharding.DEFAULT_RULES, mesh)
  assert sharding.active_mesh_axes(loss.LOGITS_AXES, mesh) == [(), (), ()]  # outside the rules: nothing
  hidden, head, targets, weights = loss_inputs(2, batch=4, vocab=64)
  want, want_grads = _loss_and_grads('xla', hidden, head, targets, weights)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    assert sharding.active_mesh_axes(loss.LOGITS_AXES, mesh) == [('data',), (), ('tensor',)]
    got, grads = _loss_and_grads('pallas', hidden, head, targets, weights)
    per_row = lambda h, t, w: loss.cross_entropy(h[None], head, t[None], w[None], chunk=4, impl='pallas',
                                                 interpret=True)[1]
    rows = jax.jit(jax.vmap(per_row))(hidden, targets, weights)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  want_rows = [loss.cross_entropy(hidden[i:i + 1], head, targets[i:i + 1], weights[i:i + 1], impl='xla')[1]
               for i in range(4)]
  np.testing.assert_allclose(rows, want_rows, rtol=1e-6)


def test_loss_kernels_lower_for_a_gpu_from_this_cpu():
  """The kernels' Triton lowering (what runs on a GPU) for configs/1b.py's chunk: 4 x 1024 rows of Qwen2's
  151,936-column vocabulary in bfloat16, which no block divides."""
  hidden = jax.ShapeDtypeStruct((4, 2048, 256), jnp.bfloat16)
  head = jax.ShapeDtypeStruct((256, 151936), jnp.bfloat16)
  rows = jax.ShapeDtypeStruct((4, 2048), jnp.int32)

  def grads(hidden, head, targets, weights):
    return jax.grad(lambda h, w: loss.cross_entropy(h, w, targets, weights, chunk=1024,
                                                    logits_dtype='bfloat16', impl='auto')[0], (0, 1))(hidden, head)

  with kernels.lowering_platform('gpu'):
    text = jax.jit(grads).trace(hidden, head, rows, rows).lower(lowering_platforms=('cuda',)).as_text()
  assert 'triton' in text and 'logsumexp' in text and 'softmax_grad' in text

  # The evaluator's path: each row's loss under vmap (no gradient, so the logsumexp kernel alone).
  per_row = lambda h, w, t, weight: loss.cross_entropy(h[None], w, t[None], weight[None], chunk=256)[1]
  args = (jax.ShapeDtypeStruct((3, 512, 64), jnp.bfloat16), jax.ShapeDtypeStruct((64, 1000), jnp.bfloat16),
          jax.ShapeDtypeStruct((3, 512), jnp.int32), jax.ShapeDtypeStruct((3, 512), jnp.float32))
  with kernels.lowering_platform('gpu'):
    text = jax.jit(jax.vmap(per_row, in_axes=(0, None, 0, 0))).trace(*args).lower(
        lowering_platforms=('cuda',)).as_text()
  assert 'triton' in text and 'logsumexp' in text and 'softmax_grad' not in text


def test_loss_impl_errors():
  with pytest.raises(ValueError, match="unknown loss impl 'fast'.*'auto', 'xla', 'pallas'"):
    loss.resolve_impl('fast')
  with pytest.raises(ValueError, match="loss impl 'pallas' runs Triton kernels, which need a GPU"):
    loss.resolve_impl('pallas')
  assert loss.resolve_impl('pallas', interpret=True) == 'pallas'
  assert loss.resolve_impl('auto') == 'xla'  # this CPU
  with kernels.lowering_platform('gpu'):
    assert loss.resolve_impl('auto') == 'pallas'
  model = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
  with pytest.raises(ValueError, match="unknown loss impl 'fast'"):
    train_step.make_train_step(model, config_lib.OptimizerConfig(), config_lib.LossConfig(loss_impl='fast'))
