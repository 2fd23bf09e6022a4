"""Rotary position embedding, in Hugging Face's `rotate_half` layout.

Its own module because both the model's attention (`qwenjax.model.Attention`) and a decode step over the KV cache
(`qwenjax.kv_cache`, whose kernel takes the angles' cosines and sines) rotate queries and keys the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotary_angles(positions: jax.Array, head_dim: int, theta: float) -> jax.Array:
  """The rotary angles `[..., head_dim // 2]` (float32) of `positions [...]`: element i of a head turns with
  element i + head_dim // 2 by angle `position / theta**(2i / head_dim)`."""
  inv_freq = 1.0 / (theta**(jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  return positions[..., None].astype(jnp.float32) * inv_freq


def apply_rotary_embedding(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in the `rotate_half` layout. x: [batch, seq, heads, head_dim]; positions: [batch, seq]."""
  freqs = rotary_angles(positions, x.shape[-1], theta)
  angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)
