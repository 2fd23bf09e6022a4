"""Next-token cross-entropy computed from the final hidden states, chunk by chunk over the sequence.

A `[batch, seq, vocab]` float32 logits tensor is the largest thing in a training step (5 GB per 8192-token row
at Qwen2's 151,936-token vocabulary, and autodiff keeps two or three of them), so the loss never builds it:
for each chunk of the sequence it computes the chunk's logits (operands in the compute dtype, float32
accumulation and softmax, exactly as the model's head), the loss terms, and at once their gradients with
respect to the hidden states and the head (the softmax gradient is known in the forward pass). The backward
pass only scales those by the incoming cotangent: the FLOPs of autodiff through full logits, the memory of one
chunk.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

LOGITS_AXES = ('activation_batch', 'activation_length', 'activation_vocab')
DEFAULT_CHUNK = 1024  # sequence positions per chunk


def _chunk_len(seq_len: int, chunk: int) -> int:
  """The largest divisor of seq_len that is at most `chunk`."""
  chunk = max(1, min(chunk, seq_len))
  while seq_len % chunk:
    chunk -= 1
  return chunk


def _split(x: jax.Array, chunk: int) -> jax.Array:
  """[batch, seq, ...] -> [seq / chunk, batch, chunk, ...]."""
  batch, seq = x.shape[:2]
  return jnp.moveaxis(x.reshape(batch, seq // chunk, chunk, *x.shape[2:]), 1, 0)


def _merge(x: jax.Array) -> jax.Array:
  """The inverse of `_split`."""
  chunks, batch, chunk = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(batch, chunks * chunk, *x.shape[3:])


def _logsumexp(logits: jax.Array) -> jax.Array:
  """logsumexp over the last axis in one pass over memory: a variadic reduction carrying (max, sum of exp).

  `jax.nn.logsumexp` reads its input twice (max, then the sum of exp); at `[rows, 151936]` float32 per chunk
  each read of the logits is a pass over gigabytes, so one read instead of two is worth rescaling the running
  sum. The pass is bound by arithmetic, not memory, on an H100, so the combine spends one exp per element.
  """
  def combine(a, b):
    (m1, s1), (m2, s2) = a, b
    # One exp per element: the side with the smaller max is scaled by exp(-|m1 - m2|). Equal maxes (both
    # -inf included, where the difference is NaN) need no scaling.
    scale = jnp.exp(jnp.where(m1 == m2, 0.0, -jnp.abs(m1 - m2)))
    return jnp.maximum(m1, m2), jnp.where(m1 >= m2, s1 + s2 * scale, s1 * scale + s2)

  init = (jnp.array(-jnp.inf, logits.dtype), jnp.array(0.0, logits.dtype))
  m, total = jax.lax.reduce((logits, jnp.ones_like(logits)), init, combine, (logits.ndim - 1,))
  return m + jnp.log(total)


def _chunk_terms(x, head, targets, weights, logits_dtype):
  """One chunk's logits (float32), logsumexp, summed NLL and summed logsumexp^2 (float32).

  The matmul accumulates in float32 and writes `logits_dtype`; everything after it is float32 (a bfloat16
  matmul output is converted inside the passes that read it, so it is never stored as float32).
  """
  logits = jnp.einsum('bce,ev->bcv', x, head, preferred_element_type=logits_dtype)
  logits = nn.with_logical_constraint(logits, LOGITS_AXES).astype(jnp.float32)
  lse = _logsumexp(logits)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # a gather, not a pass
  w = weights.astype(jnp.float32)
  return logits, lse, jnp.sum((lse - target_logit) * w), jnp.sum(jnp.square(lse) * w)


def _sums(hidden, head, targets, weights, z_coef, chunk, logits_dtype):
  """(NLL + z_coef * z, NLL, z) summed over weighted targets, without gradients."""
  c = _chunk_len(hidden.shape[1], chunk)

  def body(carry, xs):
    _, _, nll, z = _chunk_terms(xs[0], head, xs[1], xs[2], logits_dtype)
    return (carry[0] + nll, carry[1] + z), None

  zero = jnp.zeros((), jnp.float32)
  (nll, z), _ = jax.lax.scan(body, (zero, zero), (_split(hidden, c), _split(targets, c), _split(weights, c)))
  return nll + z_coef * z, nll, z


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused(hidden, head, targets, weights, z_coef, chunk, logits_dtype):
  return _sums(hidden, head, targets, weights, z_coef, chunk, logits_dtype)


def _fused_fwd(hidden, head, targets, weights, z_coef, chunk, logits_dtype):
  c = _chunk_len(hidden.shape[1], chunk)

  def body(carry, xs):
    x, t, w = xs
    nll_sum, z_sum, dhead = carry
    logits, lse, nll, z = _chunk_terms(x, head, t, w, logits_dtype)
    w = w.astype(jnp.float32)[..., None]
    # d(nll + z_coef * lse^2) / d logits = softmax * (1 + 2 z_coef lse) - onehot, per weighted target.
    onehot = jax.nn.one_hot(t, logits.shape[-1], dtype=jnp.float32)  # fuses into this pass; never stored
    probs = jnp.exp(logits - lse[..., None])
    dlogits = (w * (probs * (1.0 + 2.0 * z_coef * lse[..., None]) - onehot)).astype(head.dtype)
    dlogits = nn.with_logical_constraint(dlogits, LOGITS_AXES)
    dx = jnp.einsum('bcv,ev->bce', dlogits, head, preferred_element_type=jnp.float32).astype(x.dtype)
    dhead = dhead + jnp.einsum('bce,bcv->ev', x, dlogits, preferred_element_type=jnp.float32)
    return (nll_sum + nll, z_sum + z, dhead), dx

  zero = jnp.zeros((), jnp.float32)
  init = (zero, zero, jnp.zeros(head.shape, jnp.float32))
  (nll, z, dhead), dx = jax.lax.scan(body, init, (_split(hidden, c), _split(targets, c), _split(weights, c)))
  return (nll + z_coef * z, nll, z), (_merge(dx), dhead.astype(head.dtype))


def _fused_bwd(z_coef, chunk, logits_dtype, residuals, cotangents):
  del z_coef, chunk, logits_dtype
  dx, dhead = residuals
  g = cotangents[0]  # the NLL and z outputs leave `cross_entropy` under stop_gradient: their cotangents are 0
  return (g * dx).astype(dx.dtype), (g * dhead).astype(dhead.dtype), None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array, *,
                  z_coef: float = 0.0, chunk: int = DEFAULT_CHUNK,
                  logits_dtype: str = 'float32') -> tuple[jax.Array, jax.Array, jax.Array]:
  """Weighted next-token losses of `logits = hidden @ head`, summed over positions.

  Args:
    hidden: `[batch, seq, embed]` final hidden states (after the final norm), in the compute dtype.
    head: `[embed, vocab]` output projection in the compute dtype (the tied embedding's transpose, or lm_head).
    targets: `[batch, seq]` int target ids. weights: `[batch, seq]`, 0 where a target does not count.
    z_coef: weight of the z-loss term in the differentiable total.
    chunk: sequence positions per chunk (rounded down to a divisor of seq).
    logits_dtype: what the head matmul writes ('float32', or 'bfloat16' as under Hugging Face's bf16 autocast:
      half the memory traffic, logits rounded to 8 bits of mantissa before the float32 softmax).

  Returns:
    (total, nll, z): `total = nll + z_coef * z` is differentiable; `nll` (summed negative log-likelihood) and
    `z` (summed logsumexp^2) are for logging and carry no gradient.
  """
  total, nll, z = _fused(hidden, head, targets, weights, float(z_coef), int(chunk), jnp.dtype(logits_dtype))
  return total, jax.lax.stop_gradient(nll), jax.lax.stop_gradient(z)


def full_logits_cross_entropy(logits: jax.Array, targets: jax.Array,
                              weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(summed NLL, summed logsumexp^2) from logits you already hold, in float32: what `cross_entropy` computes
  chunk by chunk (and the reference its tests compare against)."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype), axis=-1)
  weights = weights.astype(jnp.float32)
  return jnp.sum((lse - target_logit) * weights), jnp.sum(jnp.square(lse) * weights)
