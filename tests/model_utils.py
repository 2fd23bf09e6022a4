"""Random parameters (and loss inputs) for tests that need some of a config's shapes, but not `params.init_params`."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwenjax import params as params_lib
from qwenjax.model_config import ModelConfig


def random_params(config: ModelConfig, seed: int = 0) -> dict:
  """Host (numpy) parameters of `config`'s shapes and dtype, drawn as `params.init_params` draws them: weights and
  embeddings normal(0, initializer_range), norm scales 1, biases 0.

  `params.init_params` runs the model's init op by op, several seconds per config on a CPU (a MoE model's over
  ten): tests whose subject is not the initialization take these instead. init_params itself is tested in
  test_model.py and test_mup.py, and through `train_step.create_state` by every training test.
  """
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = path[-1].key
    if name == 'scale':
      value = np.ones(x.shape)
    elif name == 'bias':
      value = np.zeros(x.shape)
    else:
      value = config.initializer_range * rng.standard_normal(x.shape)
    return value.astype(x.dtype)

  return jax.tree_util.tree_map_with_path(draw, nn.unbox(params_lib.abstract_params(config)))


def loss_inputs(seed: int, batch: int = 2, seq: int = 12, embed: int = 16, vocab: int = 37):
  """(hidden, head, targets, weights) for `loss.cross_entropy`: random, about a third of the weights 0."""
  k = jax.random.split(jax.random.key(seed), 4)
  hidden = jax.random.normal(k[0], (batch, seq, embed))
  head = 0.3 * jax.random.normal(k[1], (embed, vocab))
  targets = jax.random.randint(k[2], (batch, seq), 0, vocab)
  weights = (jax.random.uniform(k[3], (batch, seq)) > 0.3).astype(jnp.float32)
  return hidden, head, targets, weights
