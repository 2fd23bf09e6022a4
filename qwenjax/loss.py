"""Next-token cross-entropy computed from the final hidden states, chunk by chunk over the sequence.

A `[batch, seq, vocab]` float32 logits tensor is the largest thing in a training step (5 GB per 8192-token row
at Qwen2's 151,936-token vocabulary, and autodiff keeps two or three of them), so the loss never builds it:
for each chunk of the sequence it computes the chunk's logits (operands in the compute dtype, float32
accumulation and softmax, exactly as the model's head), the loss terms, and at once their gradients with
respect to the hidden states and the head (the softmax gradient is known in the forward pass). The backward
pass only scales those by the incoming cotangent: the FLOPs of autodiff through full logits, the memory of one
chunk.

After the head's matmul, a chunk's logits are read twice: once for each row's logsumexp, once to write the
softmax gradient. `impl` picks who runs those two passes: XLA, or (on a GPU, `'auto'`) the Pallas kernels of
`kernels/cross_entropy_gpu.py`, per device under the active mesh.

Under context parallelism (the sequence split over `shards` devices, `qwenjax.context`) each step of the scan
takes one chunk of every device's own piece of the sequence, so no device reads another's tokens; `loss_chunk`
is then positions per device.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qwenjax import kernels
from qwenjax import sharding

LOGITS_AXES = ('activation_batch', 'activation_length', 'activation_vocab')
DEFAULT_CHUNK = 1024  # sequence positions per chunk


def _chunk_len(seq_len: int, chunk: int) -> int:
  """The largest divisor of seq_len that is at most `chunk`."""
  chunk = max(1, min(chunk, seq_len))
  while seq_len % chunk:
    chunk -= 1
  return chunk


def _split(x: jax.Array, chunk: int, shards: int = 1) -> jax.Array:
  """[batch, seq, ...] -> [seq / chunk, batch, chunk, ...]; with `shards` > 1 (the sequence split in that many
  pieces over the context axes) [seq / (shards * chunk), batch, shards * chunk, ...], step i holding chunk i of
  every piece."""
  batch, seq = x.shape[:2]
  if shards == 1:
    return jnp.moveaxis(x.reshape(batch, seq // chunk, chunk, *x.shape[2:]), 1, 0)
  steps = seq // (shards * chunk)
  x = jnp.moveaxis(x.reshape(batch, shards, steps, chunk, *x.shape[2:]), 2, 0)
  x = x.reshape(steps, batch, shards * chunk, *x.shape[4:])
  return nn.with_logical_constraint(x, (None,) + LOGITS_AXES[:2] + (None,) * (x.ndim - 3))


def _merge(x: jax.Array, shards: int = 1) -> jax.Array:
  """The inverse of `_split`."""
  (steps, batch, width), rest = x.shape[:3], x.shape[3:]
  if shards == 1:
    return jnp.moveaxis(x, 0, 1).reshape(batch, steps * width, *rest)
  x = jnp.moveaxis(x.reshape(steps, batch, shards, width // shards, *rest), 0, 2)
  return x.reshape(batch, steps * width, *rest)


IMPLS = ('auto', 'xla', 'pallas')


def resolve_impl(impl: str, interpret: bool = False) -> str:
  """'xla' or 'pallas': the passes over the logits `impl` means on the target platform ('auto': the Pallas
  kernels on a GPU, where XLA's fusions of these passes run below memory bandwidth; XLA elsewhere)."""
  if impl not in IMPLS:
    raise ValueError(f'unknown loss impl {impl!r}; choose one of {IMPLS}')
  platform = kernels.target_platform()
  if impl == 'auto':
    return 'pallas' if platform == 'gpu' else 'xla'
  if impl == 'pallas' and platform != 'gpu' and not interpret:
    raise ValueError(f"loss impl 'pallas' runs Triton kernels, which need a GPU (kernels are picked for "
                     f"{platform!r}); use 'auto' or 'xla', or interpret=True for the Pallas interpreter.")
  return impl


def _xla_logsumexp(logits: jax.Array) -> jax.Array:
  """logsumexp over the last axis in one pass over memory: a variadic reduction carrying (max, sum of exp).

  `jax.nn.logsumexp` reads its input twice (max, then the sum of exp); at `[rows, 151936]` per chunk each read
  of the logits is a pass over gigabytes, so one read instead of two is worth rescaling the running sum. The
  combine spends one exp per element.
  """
  logits = logits.astype(jnp.float32)

  def combine(a, b):
    (m1, s1), (m2, s2) = a, b
    # One exp per element: the side with the smaller max is scaled by exp(-|m1 - m2|). Equal maxes (both
    # -inf included, where the difference is NaN) need no scaling.
    scale = jnp.exp(jnp.where(m1 == m2, 0.0, -jnp.abs(m1 - m2)))
    return jnp.maximum(m1, m2), jnp.where(m1 >= m2, s1 + s2 * scale, s1 * scale + s2)

  init = (jnp.array(-jnp.inf, logits.dtype), jnp.array(0.0, logits.dtype))
  m, total = jax.lax.reduce((logits, jnp.ones_like(logits)), init, combine, (logits.ndim - 1,))
  return m + jnp.log(total)


def _xla_softmax_grad(logits, lse, targets, weights, z_coef, dtype):
  logits, lse = logits.astype(jnp.float32), lse[..., None]
  onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)  # fuses into this pass; never stored
  probs = jnp.exp(logits - lse)
  w = weights.astype(jnp.float32)[..., None]
  return (w * (probs * (1.0 + 2.0 * z_coef * lse) - onehot)).astype(dtype)


def _per_device(fn, logits, *rows, vocab_out: bool):
  """`fn(logits, *rows, vocab_axes)` per device under the active mesh: `[batch, chunk, vocab]` logits and
  `[batch, chunk]` row arrays split as the logical rules split `LOGITS_AXES` (rows are independent; `fn` combines
  what depends on the whole vocabulary over `vocab_axes`). Returns `[batch, chunk(, vocab)]`."""
  mesh = jax.sharding.get_abstract_mesh()
  free = sharding.free_axes(mesh)
  if not free:
    return fn(logits, *rows, ())
  # Axes that do not divide a dimension (a vmapped row of the evaluator over data=2) leave it whole.
  axes = [a if n % sharding.axes_size(mesh, a) == 0 else ()
          for a, n in zip(sharding.active_mesh_axes(LOGITS_AXES, mesh), logits.shape)]
  spec = P(*(a or None for a in axes))
  row_spec = P(*spec[:2])
  return jax.shard_map(lambda x, *r: fn(x, *r, axes[2]), mesh=mesh, in_specs=(spec,) + (row_spec,) * len(rows),
                       out_specs=spec if vocab_out else row_spec, axis_names=set(free),
                       check_vma=False)(logits, *rows)


def _pallas_logsumexp(logits, interpret):
  from qwenjax.kernels import cross_entropy_gpu  # pylint: disable=g-import-not-at-top  (GPU only)

  def local(x, vocab_axes):
    lse = cross_entropy_gpu.logsumexp(x.reshape(-1, x.shape[-1]), interpret=interpret).reshape(x.shape[:-1])
    if vocab_axes:  # each device holds a slice of the vocabulary: combine the slices' logsumexps
      top = jax.lax.pmax(lse, vocab_axes)
      lse = top + jnp.log(jax.lax.psum(jnp.exp(lse - top), vocab_axes))
    return lse

  return _per_device(local, logits, vocab_out=False)


def _pallas_softmax_grad(logits, lse, targets, weights, z_coef, dtype, interpret):
  from qwenjax.kernels import cross_entropy_gpu  # pylint: disable=g-import-not-at-top  (GPU only)

  def local(x, lse, t, w, vocab_axes):
    vocab = x.shape[-1]
    if vocab_axes:
      t = t - jax.lax.axis_index(vocab_axes) * vocab  # the target's column in this device's slice
    flat = lambda r: r.reshape(-1)
    grad = cross_entropy_gpu.softmax_grad(x.reshape(-1, vocab), flat(lse), flat(t), flat(w), z_coef=z_coef,
                                          dtype=dtype, interpret=interpret)
    return grad.reshape(x.shape)

  return _per_device(local, logits, lse, targets, weights, vocab_out=True)


def logsumexp(logits: jax.Array, impl: str = 'auto', interpret: bool = False) -> jax.Array:
  """logsumexp over the last axis of `[batch, chunk, vocab]` logits, in float32."""
  if resolve_impl(impl, interpret) == 'xla':
    return _xla_logsumexp(logits)
  return _pallas_logsumexp(logits, interpret)


def softmax_grad(logits: jax.Array, lse: jax.Array, targets: jax.Array, weights: jax.Array, z_coef: float,
                 dtype, impl: str = 'auto', interpret: bool = False) -> jax.Array:
  """d(weights * (lse - logit[target] + z_coef * lse^2)) / d logits, as `dtype`: the softmax gradient of
  `[batch, chunk, vocab]` logits with their logsumexp `lse`."""
  if resolve_impl(impl, interpret) == 'xla':
    return _xla_softmax_grad(logits, lse, targets, weights, z_coef, dtype)
  return _pallas_softmax_grad(logits, lse, targets, weights, z_coef, dtype, interpret)


def _chunk_terms(x, head, targets, weights, logits_dtype, impl, interpret):
  """One chunk's logits (as the matmul writes them), logsumexp, summed NLL and summed logsumexp^2 (float32).

  The matmul accumulates in float32 and writes `logits_dtype`; everything after it is float32 (a bfloat16
  matmul output is converted inside the passes that read it, so it is never stored as float32).
  """
  logits = jnp.einsum('bce,ev->bcv', x, head, preferred_element_type=logits_dtype)
  logits = nn.with_logical_constraint(logits, LOGITS_AXES)
  lse = logsumexp(logits, impl, interpret)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0].astype(jnp.float32)  # a gather
  w = weights.astype(jnp.float32)
  return logits, lse, jnp.sum((lse - target_logit) * w), jnp.sum(jnp.square(lse) * w)


def _sums(hidden, head, targets, weights, z_coef, chunk, logits_dtype, impl, interpret, shards):
  """(NLL + z_coef * z, NLL, z) summed over weighted targets, without gradients."""
  c = _chunk_len(hidden.shape[1] // shards, chunk)

  def body(carry, xs):
    _, _, nll, z = _chunk_terms(xs[0], head, xs[1], xs[2], logits_dtype, impl, interpret)
    return (carry[0] + nll, carry[1] + z), None

  zero = jnp.zeros((), jnp.float32)
  split = lambda x: _split(x, c, shards)
  (nll, z), _ = jax.lax.scan(body, (zero, zero), (split(hidden), split(targets), split(weights)))
  return nll + z_coef * z, nll, z


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _fused(hidden, head, targets, weights, z_coef, chunk, logits_dtype, impl, interpret, shards):
  return _sums(hidden, head, targets, weights, z_coef, chunk, logits_dtype, impl, interpret, shards)


def _fused_fwd(hidden, head, targets, weights, z_coef, chunk, logits_dtype, impl, interpret, shards):
  c = _chunk_len(hidden.shape[1] // shards, chunk)

  def body(carry, xs):
    x, t, w = xs
    nll_sum, z_sum, dhead = carry
    logits, lse, nll, z = _chunk_terms(x, head, t, w, logits_dtype, impl, interpret)
    dlogits = softmax_grad(logits, lse, t, w, z_coef, head.dtype, impl, interpret)
    dlogits = nn.with_logical_constraint(dlogits, LOGITS_AXES)
    dx = jnp.einsum('bcv,ev->bce', dlogits, head, preferred_element_type=jnp.float32).astype(x.dtype)
    dhead = dhead + jnp.einsum('bce,bcv->ev', x, dlogits, preferred_element_type=jnp.float32)
    return (nll_sum + nll, z_sum + z, dhead), dx

  zero = jnp.zeros((), jnp.float32)
  init = (zero, zero, jnp.zeros(head.shape, jnp.float32))
  split = lambda x: _split(x, c, shards)
  (nll, z, dhead), dx = jax.lax.scan(body, init, (split(hidden), split(targets), split(weights)))
  return (nll + z_coef * z, nll, z), (_merge(dx, shards), dhead.astype(head.dtype))


def _fused_bwd(z_coef, chunk, logits_dtype, impl, interpret, shards, residuals, cotangents):
  del z_coef, chunk, logits_dtype, impl, interpret, shards
  dx, dhead = residuals
  g = cotangents[0]  # the NLL and z outputs leave `cross_entropy` under stop_gradient: their cotangents are 0
  return (g * dx).astype(dx.dtype), (g * dhead).astype(dhead.dtype), None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array, *,
                  z_coef: float = 0.0, chunk: int = DEFAULT_CHUNK,
                  logits_dtype: str = 'float32', impl: str = 'auto',
                  interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Weighted next-token losses of `logits = hidden @ head`, summed over positions.

  Args:
    hidden: `[batch, seq, embed]` final hidden states (after the final norm), in the compute dtype.
    head: `[embed, vocab]` output projection in the compute dtype (the tied embedding's transpose, or lm_head).
    targets: `[batch, seq]` int target ids. weights: `[batch, seq]`, 0 where a target does not count.
    z_coef: weight of the z-loss term in the differentiable total.
    chunk: sequence positions per chunk (rounded down to a divisor of seq), per device under context parallelism.
    logits_dtype: what the head matmul writes ('float32', or 'bfloat16' as under Hugging Face's bf16 autocast:
      half the memory traffic, logits rounded to 8 bits of mantissa before the float32 softmax).
    impl: how the passes over each chunk's logits run: 'xla', 'pallas' (`kernels/cross_entropy_gpu.py`), or
      'auto' (the kernels on a GPU). interpret: run the Pallas kernels in the interpreter (CPU tests).

  Returns:
    (total, nll, z): `total = nll + z_coef * z` is differentiable; `nll` (summed negative log-likelihood) and
    `z` (summed logsumexp^2) are for logging and carry no gradient.
  """
  shards = sharding.context_size()
  if hidden.shape[1] % shards:  # a sequence not split over the context axes after all (e.g. a vmapped row)
    shards = 1
  total, nll, z = _fused(hidden, head, targets, weights, float(z_coef), int(chunk), jnp.dtype(logits_dtype),
                         resolve_impl(impl, interpret), bool(interpret), shards)
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


# ---------------------------------------------------------------------------------------------------------
# Per-token log-probabilities (DPO), chunk by chunk as the loss above.

def _token_log_probs(hidden, head, targets, chunk, logits_dtype, impl, interpret):
  """(log p(target) per position [batch, seq], logsumexp per position), float32, chunk by chunk."""
  c = _chunk_len(hidden.shape[1], chunk)

  def body(_, xs):
    x, t = xs
    logits = nn.with_logical_constraint(
        jnp.einsum('bce,ev->bcv', x, head, preferred_element_type=logits_dtype), LOGITS_AXES)
    lse = logsumexp(logits, impl, interpret)
    target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0].astype(jnp.float32)
    return None, (target_logit - lse, lse)

  _, (logp, lse) = jax.lax.scan(body, None, (_split(hidden, c), _split(targets, c)))
  return _merge(logp), _merge(lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _log_probs(hidden, head, targets, chunk, logits_dtype, impl, interpret):
  return _token_log_probs(hidden, head, targets, chunk, logits_dtype, impl, interpret)[0]


def _log_probs_fwd(hidden, head, targets, chunk, logits_dtype, impl, interpret):
  logp, lse = _token_log_probs(hidden, head, targets, chunk, logits_dtype, impl, interpret)
  return logp, (hidden, head, targets, lse)


def _log_probs_bwd(chunk, logits_dtype, impl, interpret, residuals, g):
  """The chunk's logits again, then d logp / d logits = onehot - softmax, scaled by the cotangent `g` of each
  position: the softmax gradient of the loss above with weights -g (one kernel serves both)."""
  hidden, head, targets, lse = residuals
  c = _chunk_len(hidden.shape[1], chunk)

  def body(dhead, xs):
    x, t, l, w = xs
    logits = nn.with_logical_constraint(
        jnp.einsum('bce,ev->bcv', x, head, preferred_element_type=logits_dtype), LOGITS_AXES)
    dlogits = softmax_grad(logits, l, t, -w, 0.0, head.dtype, impl, interpret)
    dlogits = nn.with_logical_constraint(dlogits, LOGITS_AXES)
    dx = jnp.einsum('bcv,ev->bce', dlogits, head, preferred_element_type=jnp.float32).astype(x.dtype)
    return dhead + jnp.einsum('bce,bcv->ev', x, dlogits, preferred_element_type=jnp.float32), dx

  split = lambda a: _split(a, c)
  dhead, dx = jax.lax.scan(body, jnp.zeros(head.shape, jnp.float32),
                           (split(hidden), split(targets), split(lse), split(g.astype(jnp.float32))))
  return _merge(dx), dhead.astype(head.dtype), None


_log_probs.defvjp(_log_probs_fwd, _log_probs_bwd)


def token_log_probs(hidden: jax.Array, head: jax.Array, targets: jax.Array, *, chunk: int = DEFAULT_CHUNK,
                    logits_dtype: str = 'float32', impl: str = 'auto', interpret: bool = False) -> jax.Array:
  """`[batch, seq]` float32 log-probabilities of `targets` under `logits = hidden @ head`, differentiable.

  What DPO sums over each completion (`qwenjax.dpo`). Like `cross_entropy`, never more than one chunk of
  logits at a time: the forward pass keeps only each position's logsumexp, the backward pass computes each chunk's
  logits again (one more head matmul than `cross_entropy`'s fused pass) and its gradient with the same passes
  over the logits (`impl`). Arguments as for `cross_entropy`.
  """
  return _log_probs(hidden, head, targets, int(chunk), jnp.dtype(logits_dtype), resolve_impl(impl, interpret),
                    bool(interpret))
