"""μP-style width scaling of initialization and per-layer Adam learning rates (Yang et al. 2022, Tensor Programs V).

Switched on by `train.mup_base_width > 0`. A model of that hidden size is the standard one; at hidden size w, with
width multiplier m = w / mup_base_width:

| parameters                                             | init std        | Adam learning rate |
| ------------------------------------------------------ | --------------- | ------------------ |
| hidden matrices (attention q/k/v/o, MLP, MoE experts)  | / sqrt(m)       | / m                |
| output-like (lm_head, MoE router, shared-expert gate)  | / m             | / m                |
| embedding table, norm scales, biases                   | unchanged       | unchanged          |

so that the learning rate tuned at the base width stays (near) optimal as the model widens. This is μP's table for
Adam with the output multiplier folded into the head's init and learning rate (equivalent for Adam, which is
invariant to the gradient's scale). Ladders keep `head_dim` fixed and widen by adding heads, so the attention scale
1/sqrt(head_dim) needs no change. Weight decay is decoupled and scales with the learning rate.

The table used as input embedding and output head at once cannot follow both rows: μP needs
`tie_word_embeddings=False`. The width is read from the parameters (`embed_tokens` is `[vocab, hidden]`).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

_OUTPUT_LIKE = ('lm_head', 'gate', 'shared_expert_gate')  # fan-in grows with width, fan-out does not
_UNSCALED = ('embed_tokens', 'scale', 'bias')


def _names(path) -> list[str]:
  return [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]


def kind(path) -> str:
  """'embedding_or_vector', 'output' or 'hidden' for a parameter at `path` of the Qwen2 parameter tree."""
  names = _names(path)
  if names[-1] in _UNSCALED:
    return 'embedding_or_vector'
  if names[-1] in _OUTPUT_LIKE or (len(names) > 1 and names[-2] in _OUTPUT_LIKE and names[-1] == 'kernel'):
    return 'output'
  return 'hidden'


def width_multiplier(params: Any, base_width: int) -> float:
  if 'lm_head' not in params:
    raise ValueError('train.mup_base_width needs model.tie_word_embeddings=False: a tied table cannot be both a '
                     'width-independent input embedding and a 1/width output layer (qwenjax/mup.py)')
  return params['embed_tokens'].shape[-1] / base_width


def _scales(params: Any, base_width: int, hidden: float, output: float) -> Any:
  m = width_multiplier(params, base_width)
  factor = {'embedding_or_vector': 1.0, 'hidden': m**hidden, 'output': m**output}
  return jax.tree_util.tree_map_with_path(lambda path, _: factor[kind(path)], params)


def scale_init(params: Any, base_width: int) -> Any:
  """Standard-parametrization parameters -> μP ones: hidden matrices / sqrt(m), output-like ones / m."""
  return jax.tree.map(lambda p, s: p * s if s != 1.0 else p, params, _scales(params, base_width, -0.5, -1.0))


def scale_learning_rates(base_width: int) -> optax.GradientTransformation:
  """Multiplies Adam's updates by 1/m for hidden and output-like matrices (chain it after the optimizer)."""

  def update(updates, state, params=None):
    del params
    scales = _scales(updates, base_width, -1.0, -1.0)
    return jax.tree.map(lambda u, s: u * s if s != 1.0 else u, updates, scales), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
