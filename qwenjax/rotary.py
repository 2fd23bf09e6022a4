"""Rotary position embedding, in Hugging Face's `rotate_half` layout, with the context-extension scalings of
`ModelConfig.rope_scaling` (linear, YaRN) computed as `transformers.modeling_rope_utils` computes them.

Its own module because both the model's attention (`qwenjax.model.Attention`) and a decode step over the KV cache
(`qwenjax.kv_cache`, whose kernel takes the angles' cosines and sines) rotate queries and keys the same way.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.model_config import RopeScaling


def _mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> tuple[np.ndarray, float]:
  """(float32 `[head_dim // 2]` frequencies, the factor on cos and sin): element i of a head turns with element
  i + head_dim // 2 by angle `position * frequency[i]`. Constants of a model, so plain numpy (float32, as
  transformers computes them)."""
  scaling = scaling or RopeScaling()
  base = np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
  inv_freq = np.float32(1.0) / base
  if scaling.rope_type == 'linear':
    return inv_freq / np.float32(scaling.factor), 1.0
  if scaling.rope_type != 'yarn':
    return inv_freq, 1.0
  factor = scaling.factor
  if scaling.attention_factor:
    attention_factor = scaling.attention_factor
  elif scaling.mscale and scaling.mscale_all_dim:
    attention_factor = _mscale(factor, scaling.mscale) / _mscale(factor, scaling.mscale_all_dim)
  else:
    attention_factor = _mscale(factor)

  def dimension(rotations: float) -> float:  # the dimension that turns `rotations` times over the old context
    return (head_dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(theta)))

  low, high = dimension(scaling.beta_fast), dimension(scaling.beta_slow)
  if scaling.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001  # as transformers: no division by zero
  ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
  keep = np.float32(1.0) - ramp  # 1: the frequency as it was (extrapolated), 0: divided by factor
  inv_freq = np.float32(1.0) / (np.float32(factor) * base) * (1 - keep) + inv_freq * keep
  return inv_freq.astype(np.float32), float(attention_factor)


def rotary_angles(positions: jax.Array, head_dim: int, theta: float, scaling: RopeScaling | None = None
                  ) -> tuple[jax.Array, float]:
  """(the rotary angles `[..., head_dim // 2]` (float32) of `positions [...]`, the factor on cos and sin)."""
  inv_freq, factor = inverse_frequencies(head_dim, theta, scaling)
  return positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq), factor


def apply_rotary_embedding(x: jax.Array, positions: jax.Array, theta: float,
                           scaling: RopeScaling | None = None) -> jax.Array:
  """Rotary embedding in the `rotate_half` layout. x: [batch, seq, heads, head_dim]; positions: [batch, seq]."""
  freqs, factor = rotary_angles(positions, x.shape[-1], theta, scaling)
  angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  if factor != 1.0:
    cos, sin = cos * factor, sin * factor
  return (x32 * cos + rotated * sin).astype(x.dtype)
