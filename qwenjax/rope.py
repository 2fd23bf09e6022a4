"""Rotary position embedding frequencies, with the context-extension scalings Hugging Face's Qwen2 configs use.

`inverse_frequencies(head_dim, theta, scaling)` gives the `head_dim // 2` angular frequencies of the rotary
embedding and the factor that multiplies its cos and sin, computed as `transformers.modeling_rope_utils` does:

* `default`: `1 / theta**(2i / head_dim)`, factor 1.
* `linear` (position interpolation): the default frequencies divided by `factor`.
* `yarn` (Peng et al. 2023, "YaRN"): frequencies that turn fewer than `beta_slow` times over the original context
  are interpolated (divided by `factor`), those that turn more than `beta_fast` times are kept, with a linear ramp
  between; cos and sin are scaled by `attention_factor` (default `0.1 ln(factor) + 1`), which scales the attention
  logits by its square. Qwen2's long-context checkpoints use it with `original_max_position_embeddings` 32768.

Dynamic NTK scaling changes the frequencies with the length of each batch (transformers keeps state across calls to
do it) and is refused by name, as are the other types. Plain numpy: the frequencies are constants of a model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

ROPE_TYPES = ('default', 'linear', 'yarn')


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Hugging Face's `rope_parameters` / `rope_scaling` fields, minus the theta (ModelConfig.rope_theta)."""
  rope_type: str = 'default'
  factor: float = 1.0
  original_max_position_embeddings: int = 0  # yarn: the context the model was pretrained on
  attention_factor: float | None = None  # yarn: None is 0.1 ln(factor) + 1, or from mscale / mscale_all_dim
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float | None = None
  mscale_all_dim: float | None = None
  truncate: bool = True

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f'rope type {self.rope_type!r} is not supported; supported: {ROPE_TYPES} (dynamic NTK '
                       'scaling depends on each batch\'s length and is not)')
    if self.rope_type != 'default' and not (math.isfinite(self.factor) and self.factor >= 1.0):
      raise ValueError(f'rope scaling factor must be a number >= 1, got {self.factor!r}')
    if self.rope_type == 'yarn' and self.original_max_position_embeddings < 1:
      raise ValueError('yarn rope scaling needs original_max_position_embeddings (the pretraining context)')

  @classmethod
  def from_hf(cls, values: Mapping[str, Any] | None, max_position_embeddings: int) -> 'RopeScaling':
    """From a config.json's `rope_parameters` or `rope_scaling` dict (`type` or `rope_type`; extra keys such as
    `rope_theta` ignored). A yarn dict without `factor` takes max_position / original_max_position, as
    transformers does."""
    if not values:
      return cls()
    rope_type = values.get('rope_type', values.get('type', 'default')) or 'default'
    if rope_type == 'default':
      return cls()
    known = {f.name for f in dataclasses.fields(cls)} - {'rope_type'}
    kwargs = {k: v for k, v in values.items() if k in known and v is not None}
    if rope_type == 'yarn' and 'factor' not in kwargs and kwargs.get('original_max_position_embeddings'):
      kwargs['factor'] = max_position_embeddings / kwargs['original_max_position_embeddings']
    for name in ('factor', 'attention_factor', 'beta_fast', 'beta_slow', 'mscale', 'mscale_all_dim'):
      if name in kwargs:
        kwargs[name] = float(kwargs[name])
    if 'original_max_position_embeddings' in kwargs:
      kwargs['original_max_position_embeddings'] = int(kwargs['original_max_position_embeddings'])
    return cls(rope_type=rope_type, **kwargs)

  def to_hf(self) -> dict[str, Any] | None:
    """The `rope_scaling` / `rope_parameters` entries of a config.json (None: default rope)."""
    if self.rope_type == 'default':
      return None
    out = {'rope_type': self.rope_type, 'factor': self.factor}
    if self.rope_type == 'yarn':
      out.update(original_max_position_embeddings=self.original_max_position_embeddings, beta_fast=self.beta_fast,
                 beta_slow=self.beta_slow, truncate=self.truncate)
      for name in ('attention_factor', 'mscale', 'mscale_all_dim'):
        if getattr(self, name) is not None:
          out[name] = getattr(self, name)
    return out


def _mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> tuple[np.ndarray, float]:
  """(float32 `[head_dim // 2]` frequencies, cos/sin factor): element i of a head turns with element
  i + head_dim // 2 by angle `position * frequency[i]`."""
  scaling = scaling or RopeScaling()
  exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  base = np.float32(theta) ** exponents  # float32 throughout, as transformers computes them
  inv_freq = np.float32(1.0) / base
  if scaling.rope_type == 'linear':
    return inv_freq / np.float32(scaling.factor), 1.0
  if scaling.rope_type != 'yarn':
    return inv_freq, 1.0
  factor = scaling.factor
  attention_factor = scaling.attention_factor
  if attention_factor is None:
    if scaling.mscale and scaling.mscale_all_dim:
      attention_factor = _mscale(factor, scaling.mscale) / _mscale(factor, scaling.mscale_all_dim)
    else:
      attention_factor = _mscale(factor)

  def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over the context
    return (head_dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(theta)))

  low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
  if scaling.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001  # as transformers: no division by zero
  ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
  extrapolation = np.float32(1.0) - ramp.astype(np.float32)  # 1: keep the frequency, 0: interpolate it
  interpolated = np.float32(1.0) / (np.float32(factor) * base)
  inv_freq = interpolated * (1 - extrapolation) + inv_freq * extrapolation
  return inv_freq.astype(np.float32), float(attention_factor)
