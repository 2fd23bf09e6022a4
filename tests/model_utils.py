"""Random parameters for tests that need some parameters of a config's shapes, but not `model.init_params`."""

import flax.linen as nn
import jax
import numpy as np

from qwenjax import model


def random_params(config: model.ModelConfig, seed: int = 0) -> dict:
  """Host (numpy) parameters of `config`'s shapes and dtype, drawn as `model.init_params` draws them: weights and
  embeddings normal(0, initializer_range), norm scales 1, biases 0.

  `model.init_params` runs the model's init op by op, several seconds per config on a CPU (a MoE model's over
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

  return jax.tree_util.tree_map_with_path(draw, nn.unbox(model.abstract_params(config)))
