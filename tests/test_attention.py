"""Attention: the XLA reference against float64 numpy, and the Pallas TPU (splash) kernel, run in the Pallas
interpreter on CPU, against the XLA reference: outputs and q/k/v gradients, alone, sharded, and in the model.

Interpreted splash is slow (seconds per compiled case), so each kernel case combines several features.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from model_utils import random_params
from qwenjax import attention, kernels, model, sharding
from qwenjax.kernels import attention_contract, splash_tpu
from qwenjax.model_config import ModelConfig


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision('highest'):
    yield


def random_qkv(batch, seq, heads, kv_heads, head_dim, dtype=jnp.float32, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (batch, seq, heads, head_dim), dtype),
          jax.random.normal(kk, (batch, seq, kv_heads, head_dim), dtype),
          jax.random.normal(kv, (batch, seq, kv_heads, head_dim), dtype))


def segments(batch, seq, boundaries):
  """[batch, seq] document ids that change at `boundaries` (row b shifts them by b, so rows differ)."""
  pos = np.arange(seq)
  return jnp.asarray(np.stack([sum((pos >= max(1, x - b)).astype(np.int32) for x in boundaries)
                               for b in range(batch)]))


def numpy_attention(q, k, v, window, segment_ids):
  """Float64 attention, written independently of qwenjax: K/V repeated per query head, explicit loops."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, seq, heads, dim = q.shape
  k = np.repeat(k, heads // k.shape[2], axis=2)
  v = np.repeat(v, heads // v.shape[2], axis=2)
  out = np.zeros_like(q)
  for b in range(batch):
    for i in range(seq):
      visible = [j for j in range(seq) if j <= i and (window is None or j > i - window)
                 and (segment_ids is None or segment_ids[b, j] == segment_ids[b, i])]
      for h in range(heads):
        scores = np.array([q[b, i, h] @ k[b, j, h] for j in visible]) / np.sqrt(dim)
        p = np.exp(scores - scores.max())
        out[b, i, h] = (p / p.sum()) @ v[b, visible, h]
  return out


@pytest.mark.parametrize('heads,kv_heads,window,with_segments', [
    (2, 2, None, False),  # plain causal MHA
    (4, 2, 3, True),  # GQA 2, window, documents
    (7, 1, 20, True),  # GQA 7, window longer than the sequence
])
def test_xla_reference_matches_float64_numpy(heads, kv_heads, window, with_segments):
  q, k, v = random_qkv(2, 13, heads, kv_heads, 8)
  ids = segments(2, 13, [4, 9]) if with_segments else None
  out = attention.dot_product_attention(q, k, v, sliding_window=window, segment_ids=ids, impl='xla')
  expected = numpy_attention(q, k, v, window, None if ids is None else np.asarray(ids))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_contract_mask_definitions_agree():
  """The one mask definition, in each of its forms: elementwise, by distance with a scalar offset, over a
  kernel's tile (as the Mosaic GPU kernels mask), per block (splash's BandMask), dense, and counted."""
  seq = 40
  q, k = np.arange(seq)[:, None], np.arange(seq)[None, :]
  for window in (None, 1, 7, 16, 40, 100):
    expected = (k <= q) & ((window is None) | (k > q - (window or 0)))  # Hugging Face: q - window < k <= q
    np.testing.assert_array_equal(attention_contract.visible(q, k, window), expected)
    np.testing.assert_array_equal(attention_contract.mask(seq, sliding_window=window)[0], expected)
    for offset in (-9, 0, 5):
      np.testing.assert_array_equal(attention_contract.in_band(q - k - offset, window, offset), expected)
    for q0, k0 in [(0, 0), (16, 8), (8, 24)]:  # a blocked kernel's 16 x 8 tile, keys along rows or columns
      rows, cols = np.arange(16)[:, None], np.arange(8)[None, :]
      tile = attention_contract.tile_visible(rows, cols, q0, k0, rows_are_queries=True, window=window)
      np.testing.assert_array_equal(tile, expected[q0:q0 + 16, k0:k0 + 8])
      tile = attention_contract.tile_visible(rows, cols, k0, q0, rows_are_queries=False, window=window)
      np.testing.assert_array_equal(tile, expected[q0:q0 + 8, k0:k0 + 16].T)
    assert attention_contract.band_pairs(seq, window) == expected.sum()
    for q0, k0, rows, cols in [(0, 0, 8, 8), (8, 0, 8, 8), (16, 0, 8, 4), (24, 20, 5, 16), (3, 30, 8, 8)]:
      block = expected[q0:q0 + rows, k0:k0 + cols]
      none, every = attention_contract.block_visibility(q0, q0 + rows - 1, k0, k0 + cols - 1, window)
      assert (none, every) == (not block.any(), block.all()), (window, q0, k0)
  ids = segments(2, seq, [10, 25])
  dense = attention_contract.mask(seq, sliding_window=7, segment_ids=ids)
  np.testing.assert_array_equal(dense, attention_contract.visible(q, k, 7, ids[:, :, None], ids[:, None, :]))


def test_no_kernel_imports_upward():
  """Kernels import only jax, numpy, qwenjax.kernels (the contract, each other) and the leaf qwenjax.model_config
  (the names of the implementations a model may pick): never qwenjax.attention."""
  import ast, pathlib  # pylint: disable=g-import-not-at-top,multiple-imports
  for path in pathlib.Path(kernels.__file__).parent.glob('*.py'):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        imported = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module == 'qwenjax':
        imported = ['qwenjax.' + a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        imported = [node.module or '']
      else:
        continue
      for name in imported:
        assert not name.startswith('qwenjax') or name.startswith(('qwenjax.kernels', 'qwenjax.model_config')), (
            f'{path.name}: {name}')


def _loss_and_grads(fn, q, k, v, cotangent):
  def loss(q, k, v):
    out = fn(q, k, v)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def _assert_matches_reference(fn, q, k, v, window, ids, atol):
  """fn's output and q/k/v gradients equal the XLA reference's (computed in float32)."""
  cotangent = jax.random.normal(jax.random.key(7), q.shape, jnp.float32)
  ref = lambda q, k, v: attention.xla_attention(q, k, v, sliding_window=window, segment_ids=ids)
  out, grads = _loss_and_grads(fn, q, k, v, cotangent)
  q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
  ref_out, ref_grads = _loss_and_grads(ref, q32, k32, v32, cotangent)
  assert out.dtype == q.dtype and out.shape == q.shape
  np.testing.assert_allclose(out.astype(jnp.float32), ref_out, rtol=atol, atol=atol, err_msg='output')
  for name, g, ref_g in zip('qkv', grads, ref_grads):
    assert g.dtype == q.dtype and g.shape == ref_g.shape
    np.testing.assert_allclose(g.astype(jnp.float32), ref_g, rtol=atol, atol=atol, err_msg=f'd{name}')


def _blocks(size):
  return splash.BlockSizes(block_q=size, block_kv=size, block_kv_compute=size, block_q_dkv=size,
                           block_kv_dkv=size, block_kv_dkv_compute=size, block_q_dq=size, block_kv_dq=size)


# Each case: (batch, seq, heads, kv_heads, head_dim, window, document boundaries, block size, dtype).
SPLASH_CASES = {
    # 3 blocks of 128 (300 = 2.3 blocks, padded), window 16 < block: most blocks skipped, documents
    # changing inside blocks, GQA 2, head_dim 64.
    'window_lt_block_gqa2_docs': (1, 300, 4, 2, 64, 16, [45, 170, 200], 128, jnp.float32),
    # odd length in one padded block, window longer than the sequence, GQA 7, head_dim 128, documents.
    'window_gt_seq_gqa7_d128_docs': (1, 77, 7, 1, 128, 200, [30], None, jnp.float32),
    # window spanning block edges (150 over 128-blocks), MHA (GQA 1), batch 2, no documents, head_dim 128.
    'window_across_blocks_mha_batch2': (2, 260, 2, 2, 128, 150, None, 128, jnp.float32),
    # bf16 inputs (float32 accumulation inside), full causal, GQA 4, documents, default blocks.
    'bf16_causal_gqa4_docs': (1, 130, 4, 1, 64, None, [60], None, jnp.bfloat16),
}


@pytest.mark.slow
@pytest.mark.parametrize('case', sorted(SPLASH_CASES))
def test_splash_matches_xla_reference(case):
  batch, seq, heads, kv_heads, dim, window, boundaries, block, dtype = SPLASH_CASES[case]
  q, k, v = random_qkv(batch, seq, heads, kv_heads, dim, dtype, seed=len(case))
  ids = None if boundaries is None else segments(batch, seq, boundaries)
  fn = lambda q, k, v: splash_tpu.splash_attention(
      q, k, v, sliding_window=window, segment_ids=ids, interpret=True,
      block_sizes=None if block is None else _blocks(block))
  _assert_matches_reference(fn, q, k, v, window, ids, atol=2e-5 if dtype == jnp.float32 else 3e-2)


def test_splash_mask_cache_and_block_skipping():
  """Kernels (and their host-built mask metadata) are cached, and a short window skips most blocks."""
  splash_tpu._kernel.cache_clear()
  first = splash_tpu._kernel(2, 1024, 64, _blocks(128), True)
  assert splash_tpu._kernel(2, 1024, 64, _blocks(128), True) is first
  assert splash_tpu._kernel(2, 1024, None, _blocks(128), True) is not first
  # 8x8 blocks; a 64-key window touches only the diagonal block and the one before it.
  assert int(np.sum(np.asarray(first.fwd_mask_info.block_mask) > 0)) == 8 + 7
  causal = splash_tpu._kernel(2, 1024, None, _blocks(128), True)
  assert int(np.sum(np.asarray(causal.fwd_mask_info.block_mask) > 0)) == 8 * 9 // 2


@pytest.mark.parametrize('seq,window,block', [(1024, 64, 128), (1024, 129, 128), (1024, 128, 128),
                                              (1536, 300, 256), (640, None, 128), (640, 1000, 128)])
def test_band_mask_metadata_equals_stock_masks(seq, window, block):
  """BandMask's fast host path builds exactly the block metadata of splash's own LocalMask / CausalMask."""
  stock_mask = (splash.CausalMask((seq, seq)) if window is None or window >= seq
                else splash.LocalMask((seq, seq), (window - 1, 0), 0))
  stock = splash.make_splash_mha(splash.MultiHeadMask([stock_mask] * 2), block_sizes=_blocks(block),
                                 head_shards=1, q_seq_shards=1, interpret=True)
  ours = splash_tpu._kernel(2, seq, window, _blocks(block), True)
  for info in ('fwd_mask_info', 'dq_mask_info', 'dkv_mask_info'):
    for field, mine in getattr(ours, info)._asdict().items():
      theirs = getattr(getattr(stock, info), field)
      assert (mine is None) == (theirs is None), (info, field)
      if mine is not None:
        np.testing.assert_array_equal(mine, theirs, err_msg=f'{info}.{field}')


def test_default_block_sizes():
  assert splash_tpu.default_block_sizes(77).block_q == 128
  assert splash_tpu.default_block_sizes(300).block_kv == 384
  sizes = splash_tpu.default_block_sizes(32768)
  assert sizes.block_q == sizes.block_kv_dkv == sizes.block_q_dq == 512 and sizes.has_backward_blocks


MESH_RULES = (('activation_batch', ('data', 'fsdp')), ('activation_heads', 'tensor'),
              ('activation_kv_heads', 'tensor'), ('activation_length', None), ('activation_head_dim', None))


@pytest.mark.parametrize('heads,kv_heads,axis_type', [
    (4, 2, 'Auto'),  # kv heads split over 'tensor' with the query heads
    # 3 kv heads cannot split over tensor=2: replicated; each device gathers its query heads' kv heads
    (6, 3, 'Explicit'),
    (4, 1, 'Auto'),  # one kv head, replicated: each device slices the one its query heads use
])
@pytest.mark.slow
def test_pallas_under_mesh_matches_xla(heads, kv_heads, axis_type):
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'),
                       axis_types=(getattr(jax.sharding.AxisType, axis_type),) * 3)
  q, k, v = random_qkv(4, 100, heads, kv_heads, 64, seed=heads)
  ids = segments(4, 100, [33, 70])
  fn = lambda q, k, v: attention.dot_product_attention(
      q, k, v, sliding_window=24, segment_ids=ids, impl='pallas_tpu', interpret=True)
  with jax.set_mesh(mesh), nn.logical_axis_rules(MESH_RULES):
    assert 'shard_map' in str(jax.make_jaxpr(fn)(q, k, v))
    _assert_matches_reference(fn, q, k, v, 24, ids, atol=2e-5)


def test_pallas_under_mesh_with_sharded_length_is_context_parallel():
  """A mesh axis for activation_length splits sequences (tests/test_context_parallel.py); splash needs chunks of
  128 tokens there, which 16 tokens over 2 x 2 chunks are not."""
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'))
  q, k, v = random_qkv(2, 16, 2, 2, 64)
  rules = (('activation_batch', 'data'), ('activation_length', 'fsdp'))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    with pytest.raises(ValueError, match='context parallelism with the splash kernel needs chunks'):
      attention.dot_product_attention(q, k, v, impl='pallas_tpu', interpret=True)


@pytest.mark.parametrize('scan_layers,sharded', [
    (False, False),
    # Scanned mixed layers pick the kernel in a lax.cond; on the 8-device mesh with the project's rules, as the
    # train step runs it (gradients checked too).
    (True, True),
])
@pytest.mark.slow
def test_model_with_pallas_tpu_equals_xla_model(scan_layers, sharded):
  cfg = ModelConfig(
      vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, use_sliding_window=True, sliding_window=9, max_window_layers=1,
      attention_impl='xla', scan_layers=scan_layers)  # layer 0 full causal, layer 1 windowed
  params = random_params(cfg)
  ids = jax.random.randint(jax.random.key(1), (4, 37), 0, cfg.vocab_size)
  docs = segments(4, 37, [20])
  pallas_cfg = dataclasses.replace(cfg, attention_impl='pallas', attention_interpret=True)

  def loss(config, p):
    logits = model.Qwen2(config).apply({'params': p}, ids, segment_ids=docs)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

  if not sharded:
    logits = jax.jit(lambda p: loss(pallas_cfg, p)[1])(params)
    np.testing.assert_allclose(logits, jax.jit(lambda p: loss(cfg, p)[1])(params), rtol=1e-4, atol=1e-4)
    return
  (_, expected), expected_grads = jax.jit(jax.value_and_grad(functools.partial(loss, cfg), has_aux=True))(params)
  mesh = jax.make_mesh((2, 2, 2, 1, 1), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 5)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_axis_rules(sharding.DEFAULT_RULES, mesh, cfg)):
    step = jax.jit(jax.value_and_grad(functools.partial(loss, pallas_cfg), has_aux=True))
    assert 'shard_map' in str(jax.make_jaxpr(step)(params))
    (_, logits), grads = step(params)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
  jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6), grads, expected_grads)


def test_impl_resolution_and_errors():
  assert jax.default_backend() == 'cpu'
  assert attention.resolve_impl('auto') == 'xla'
  assert attention.resolve_impl('pallas', interpret=True) == 'pallas_tpu'
  # Tracing for another platform (jax.export from this CPU): kernels are picked for it, then for the CPU again.
  with kernels.lowering_platform('tpu'):
    assert kernels.target_platform() == 'tpu'
    assert attention.resolve_impl('auto') == attention.resolve_impl('pallas') == 'pallas_tpu'
    assert attention.resolve_impl('pallas_tpu') == 'pallas_tpu'
    with pytest.raises(ValueError, match="needs a GPU but kernels are picked for 'tpu'"):
      attention.resolve_impl('pallas_gpu')
  with kernels.lowering_platform('cuda'):
    assert attention.resolve_impl('auto') == 'pallas_gpu'
  assert kernels.target_platform() == 'cpu'
  with pytest.raises(ValueError, match="unknown platform 'tpu7'"):
    with kernels.lowering_platform('tpu7'):
      pass
  assert ModelConfig().attention_impl == 'auto'
  q, k, v = random_qkv(1, 8, 2, 1, 64)
  with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
    attention.dot_product_attention(q, k, v, impl='flash')
  with pytest.raises(ValueError, match='interpret=True'):
    attention.dot_product_attention(q, k, v, impl='pallas')
  with pytest.raises(ValueError, match=r"needs a TPU.*lowering_platform\('tpu'\)"):
    attention.dot_product_attention(q, k, v, impl='pallas_tpu')
  with pytest.raises(ValueError, match='needs a GPU'):
    attention.dot_product_attention(q, k, v, impl='pallas_gpu')
  with pytest.raises(ValueError, match='segment_ids must be'):
    attention.dot_product_attention(q, k, v, segment_ids=jnp.zeros((1, 7), jnp.int32))
  with pytest.raises(ValueError, match='unknown attention_impl'):
    ModelConfig(attention_impl='splash')
  with pytest.raises(ValueError, match='backward blocks'):
    splash_tpu.splash_attention(q, k, v, interpret=True, block_sizes=splash.BlockSizes(128, 128))
