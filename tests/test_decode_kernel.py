"""The decode-step kernel (`qwenjax.kernels.decode_gpu`) in the Pallas interpreter, against the XLA path
(`LayerCache.step(..., impl='xla')`: rotary, `append`, `attend`), and its lowering for a GPU from this CPU."""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax import kernels
from qwenjax.kernels import decode_gpu
from qwenjax.kv_cache import LayerCache
from qwenjax.rotary import rotary_angles


def ring_positions(position: np.ndarray, slots: int) -> np.ndarray:
  """What a cache holds after positions 0 .. position-1 of each row: position p in slot p % slots (-1: empty)."""
  s = np.arange(slots)[None]
  last = position[:, None] - 1
  return np.where(s <= last, s + slots * ((last - s) // slots), -1).astype(np.int32)


# (rows' positions, kv heads, group, head_dim, slots, window, dtype, block, programs)
CASES = {
    # a full cache not a whole number of blocks; a row at position 0 (nothing cached yet); a group of 6 read as 16 rows
    'full': ([30, 0, 39], 2, 6, 32, 40, None, jnp.float32, 16, 8),
    # a ring of `window` slots: one row has wrapped several times, one has not
    'ring': ([57, 3], 2, 3, 32, 20, 20, jnp.float32, 16, 8),
    # a window shorter than an unwrapped cache (only slots from position - window + 1 on), bf16, one split per row
    'window_in_full_cache': ([50, 17], 1, 16, 32, 64, 16, jnp.bfloat16, 32, 1),
    # 19 splits a row
    'many_splits': ([299, 120], 1, 4, 32, 300, None, jnp.float32, 16, 38),
}


@pytest.mark.slow
@pytest.mark.parametrize('case', list(CASES))
def test_kernel_matches_append_then_attend(case):
  position, kv_heads, group, head_dim, slots, window, dtype, block, programs = CASES[case]
  batch = len(position)
  position = np.asarray(position, np.int32)
  keys = jax.random.split(jax.random.key(len(case)), 5)
  draw = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype)
  cache = LayerCache(draw(keys[0], (batch, kv_heads, slots, head_dim)),
                     draw(keys[1], (batch, kv_heads, slots, head_dim)), jnp.asarray(ring_positions(position, slots)))
  q = draw(keys[2], (batch, 1, kv_heads * group, head_dim))
  k, v = draw(keys[3], (batch, 1, kv_heads, head_dim)), draw(keys[4], (batch, 1, kv_heads, head_dim))
  theta = 100.0  # turns fast, so that a wrong angle or pairing shows
  # The XLA path: rotary, then append and attend.
  expected, expected_cache = cache.step(q, k, v, position[:, None], theta, window, impl='xla')
  lowest = position - window + 1 if window else np.zeros_like(position)
  angles, _ = rotary_angles(jnp.asarray(position), head_dim, theta)
  out, key, value, held = decode_gpu.decode_attention(
      jnp.concatenate([q[:, 0], k[:, 0], v[:, 0]], axis=1), jnp.cos(angles), jnp.sin(angles), cache.key,
      cache.value, cache.positions, jnp.asarray(position), jnp.asarray(lowest), kv_heads=kv_heads,
      interpret=True, block=block, programs=programs)
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(out.reshape(expected.shape), np.float32),
                             np.asarray(expected, np.float32), rtol=tolerance, atol=tolerance)
  # The rotated key is computed in float32 by both and rounded once: the caches are equal.
  for got, want in ((key, expected_cache.key), (value, expected_cache.value), (held, expected_cache.positions)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_plan_splits_the_cache_among_programs():
  assert decode_gpu.plan(rows=4, slots=1280) == (64, 64, 20)  # one block a split: 80 programs
  assert decode_gpu.plan(rows=128, slots=1280) == (64, 640, 2)  # 256 programs, 10 blocks each
  assert decode_gpu.plan(rows=2, slots=20, block=64) == (16, 16, 2)  # block no larger than the cache
  block, length, splits = decode_gpu.plan(rows=6, slots=4097)
  assert length % block == 0 and (splits - 1) * length < 4097 <= splits * length


def test_unsupported_shapes_get_a_clear_error():
  def call(heads, head_dim, kv_heads=1, slots=32):
    args = [jnp.zeros((1, heads, head_dim)), jnp.zeros((1, head_dim // 2)), jnp.zeros((1, head_dim // 2)),
            jnp.zeros((1, 1, slots, head_dim)), jnp.zeros((1, 1, slots, head_dim)), jnp.zeros((1, slots), jnp.int32),
            jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32)]
    decode_gpu.decode_attention(*args, kv_heads=kv_heads, interpret=True)

  with pytest.raises(ValueError, match='head_dim'):
    call(heads=4, head_dim=12)
  with pytest.raises(ValueError, match='head_dim'):
    call(heads=4, head_dim=16)  # its rotary halves are too short for a Triton dot
  with pytest.raises(ValueError, match='cache slots'):
    call(heads=4, head_dim=32, slots=8)
  with pytest.raises(ValueError, match='2 x 1 kv heads'):
    call(heads=2, head_dim=32)  # no query head
  with pytest.raises(ValueError, match='2 x 2 kv heads'):
    call(heads=5, head_dim=32, kv_heads=2)  # 1 query head for 2 kv heads


def test_lowers_for_a_gpu_from_this_cpu():
  """The kernel's Triton lowering (what runs on a GPU) succeeds for the benchmark's shapes and odd ones."""
  for batch, group, slots in ((2, 6, 1280), (64, 7, 37)):
    shapes = [((batch, 2 * group + 4, 128), jnp.bfloat16), ((batch, 64), jnp.float32), ((batch, 64), jnp.float32),
              ((batch, 2, slots, 128), jnp.bfloat16), ((batch, 2, slots, 128), jnp.bfloat16),
              ((batch, slots), jnp.int32), ((batch,), jnp.int32), ((batch,), jnp.int32)]
    args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]
    with kernels.lowering_platform('gpu'):
      lowered = jax.jit(functools.partial(decode_gpu.decode_attention, kv_heads=2)).trace(*args).lower(
          lowering_platforms=('cuda',))
    text = lowered.as_text()
    assert 'decode_attention' in text and 'triton' in text


@pytest.mark.slow
def test_decode_check_script_runs_on_cpu():
  """benchmarks/decode_check_gpu.py (run on a GPU for docs/generation.md), here with the interpreted kernel."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
  import decode_check_gpu  # pylint: disable=import-outside-toplevel
  (result,) = decode_check_gpu.main(['--interpret', '--configs', 'ring_fp32', '--steps', '3', '--new_tokens', '4'])
  assert result['config'] == 'ring_fp32' and result['same_tokens']
  assert result['max_logits_diff'] < 1e-4 * result['logits_std']
