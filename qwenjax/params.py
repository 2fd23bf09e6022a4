"""The model's parameter trees: random initialization, shapes with nothing allocated, counts, and the two layouts.

The tree is `qwenjax.model`'s (its docstring draws it); unrolled layers are `layers_{i}` subtrees, scanned ones
(`scan_layers=True`) one `layers` subtree with a leading layer axis, and `stack_layers` / `unstack_layers` turn one
into the other. Whoever places parameters on a mesh passes `abstract_params(config)` to
`qwenjax.sharding.param_shardings`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.model import Qwen2
from qwenjax.model_config import ModelConfig


def _for_init(config: ModelConfig) -> ModelConfig:
  """Parameters do not depend on the attention kernel; a Pallas kernel need not accept an 8-token input."""
  return dataclasses.replace(config, attention_impl='xla', attention_interpret=False)


def init_params(config: ModelConfig, rng: jax.Array, seq_len: int = 8):
  """Random parameters (boxed with logical axis names stripped).

  Unrolled layers of one kind are drawn as a scanned stack and then split: the same distributions, from a
  program with one layer's random-number kernels instead of one set per layer, which compiles in a fraction of
  the time (docs/training.md).
  """
  ids = jnp.zeros((1, seq_len), jnp.int32)
  init_config = _for_init(config)
  if config.scan_layers or config.mixes_dense_and_moe:
    return nn.unbox(Qwen2(init_config).init(rng, ids)['params'])
  stacked = Qwen2(dataclasses.replace(init_config, scan_layers=True)).init(rng, ids)['params']
  return unstack_layers(nn.unbox(stacked))


def abstract_params(config: ModelConfig):
  """Parameter shapes and dtypes as `jax.ShapeDtypeStruct`s, with nothing allocated.

  Leaves stay boxed in `nn.LogicallyPartitioned` so their logical axis names can be read.
  """
  ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  return jax.eval_shape(lambda: Qwen2(_for_init(config)).init(jax.random.key(0), ids))['params']


def count_params(config: ModelConfig) -> int:
  """Total number of parameters, computed from shapes alone (the boxes' values read directly: unboxing would
  apply the logical axis rules of a mesh in use)."""
  boxed = nn.LogicallyPartitioned
  leaves = jax.tree.leaves(abstract_params(config), is_leaf=lambda x: isinstance(x, boxed))
  return sum(int((x.value if isinstance(x, boxed) else x).size) for x in leaves)


def stack_layers(params: dict, num_layers: int) -> dict:
  """Unscanned tree (`layers_0` .. `layers_{n-1}`) -> scanned tree (`layers` with a leading layer axis).

  Host (numpy) trees stay on the host, so a large checkpoint never lands whole on one device.
  """
  params = dict(params)
  layers = [params.pop(f'layers_{i}') for i in range(num_layers)]
  stack = np.stack if isinstance(jax.tree.leaves(layers[0])[0], np.ndarray) else jnp.stack
  params['layers'] = jax.tree.map(lambda *xs: stack(xs), *layers)
  return params


def unstack_layers(params: dict) -> dict:
  """Scanned tree -> unscanned tree; the inverse of `stack_layers`."""
  params = dict(params)
  stacked = params.pop('layers')
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(num_layers):
    params[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params
