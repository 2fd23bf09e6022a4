"""μP width scaling: init and per-layer Adam learning rates by width, through the optimizer the train step uses."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from qwenjax import config as config_lib
from qwenjax import mup
from qwenjax import train_step
from qwenjax.model_config import ModelConfig
from qwenjax.params import init_params


@pytest.fixture(scope='module')
def params():
  """One layer of width 256 with an untied head (one init, shared by the tests: it is the slow part)."""
  config = ModelConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False)
  return init_params(config, jax.random.key(0))


@pytest.mark.slow
def test_kinds_follow_the_mup_table(params):
  kinds = {'/'.join(mup._names(path)): mup.kind(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
  assert kinds['embed_tokens'] == 'embedding_or_vector'
  assert kinds['lm_head'] == 'output'
  assert kinds['norm/scale'] == 'embedding_or_vector'
  assert kinds['layers_0/self_attn/q_proj/bias'] == 'embedding_or_vector'
  assert kinds['layers_0/self_attn/q_proj/kernel'] == 'hidden'
  assert kinds['layers_0/mlp/gate_proj/kernel'] == 'hidden'
  assert kinds['layers_0/mlp/down_proj/kernel'] == 'hidden'


def test_init_scales_by_width(params):
  same = mup.scale_init(params, 256)  # at the base width: the standard model
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), same, params))
  wide = mup.scale_init(params, 64)  # m = 4
  std = lambda x: float(jnp.std(x))
  assert std(wide['layers_0']['mlp']['up_proj']['kernel']) == pytest.approx(0.02 / 2, rel=0.05)
  assert std(wide['lm_head']) == pytest.approx(0.02 / 4, rel=0.05)
  assert std(wide['embed_tokens']) == pytest.approx(0.02, rel=0.05)
  tied = {k: v for k, v in params.items() if k != 'lm_head'}
  with pytest.raises(ValueError, match='tie_word_embeddings=False'):
    mup.scale_init(tied, 64)


@pytest.mark.slow
def test_adam_updates_shrink_by_width(params):
  train = config_lib.OptimizerConfig(lr=1e-2, warmup_steps=0, steps=10, lr_schedule='constant',
                                     lr_final_fraction=0.1, adam_b1=0.9, adam_b2=0.95, adam_eps=1e-8,
                                     weight_decay=0.0, grad_clip=0.0)
  grads = jax.tree.map(jnp.ones_like, params)
  plain = train_step.make_optimizer(train)
  scaled = train_step.make_optimizer(dataclasses.replace(train, mup_base_width=64))  # m = 4
  u_plain, _ = plain.update(grads, plain.init(params), params)
  u_mup, _ = scaled.update(grads, scaled.init(params), params)
  ratio = jax.tree.map(lambda a, b: float(jnp.mean(b) / jnp.mean(a)), u_plain, u_mup)
  assert ratio['embed_tokens'] == pytest.approx(1.0)
  assert ratio['norm']['scale'] == pytest.approx(1.0)
  assert ratio['lm_head'] == pytest.approx(0.25)
  assert ratio['layers_0']['self_attn']['o_proj']['kernel'] == pytest.approx(0.25)
  assert ratio['layers_0']['mlp']['down_proj']['kernel'] == pytest.approx(0.25)
