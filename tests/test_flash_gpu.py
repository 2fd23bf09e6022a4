"""CPU tests of the Pallas GPU flash attention (qwenjax.kernels.flash_gpu).

The blocked algorithm (tiling, masks, block skipping, GQA, documents, custom VJP) runs in the Pallas
interpreter with tiny blocks; the Hopper (Mosaic GPU) kernels are traced and lowered for CUDA, which checks
their shapes, layouts and shared-memory budget without a GPU. Timings: docs/attention_gpu.md.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.kernels import attention_contract, flash_gpu, flash_gpu_common


def reference(q, k, v, *, window=None, segment_ids=None):
  """Masked softmax attention in float32, K/V repeated per query head."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  groups = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  seq = q.shape[1]
  pos = jnp.arange(seq)
  mask = pos[None, :] <= pos[:, None]
  if window is not None:
    mask &= pos[None, :] > pos[:, None] - window
  mask = mask[None, None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, precision='highest') / np.sqrt(q.shape[-1])
  probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
  return jnp.einsum('bhqk,bkhd->bqhd', probs, v, precision='highest')


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize(
    'batch,seq,q_heads,kv_heads,head_dim,window,segments,dtype',
    [
        (1, 40, 7, 1, 64, 5, False, jnp.float32),  # window < block, GQA 7, odd length
        (2, 33, 4, 2, 64, 100, True, jnp.float32),  # window > seq, GQA 2, documents split blocks
        (1, 37, 2, 2, 128, None, False, jnp.float32),  # causal, GQA 1, head_dim 128
        (1, 50, 4, 2, 64, 20, True, jnp.bfloat16),  # bf16 in, fp32 accumulation
    ])
@pytest.mark.slow
def test_matches_reference(batch, seq, q_heads, kv_heads, head_dim, window, segments, dtype):
  keys = jax.random.split(jax.random.key(seq * 7 + q_heads), 5)
  q = jax.random.normal(keys[0], (batch, seq, q_heads, head_dim)).astype(dtype)
  k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim)).astype(dtype)
  v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim)).astype(dtype)
  d_out = jax.random.normal(keys[3], q.shape).astype(dtype)
  segment_ids = None
  if segments:  # about three documents per row, boundaries at arbitrary positions
    segment_ids = jnp.cumsum(jax.random.bernoulli(keys[4], 3 / seq, (batch, seq)), axis=1)
    assert len(np.unique(np.asarray(segment_ids))) > 1

  ours = functools.partial(flash_gpu.flash_attention, sliding_window=window, segment_ids=segment_ids,
                           interpret=True)
  ref = functools.partial(reference, window=window, segment_ids=segment_ids)
  out, vjp = jax.vjp(ours, q, k, v)
  expected, ref_vjp = jax.vjp(ref, q, k, v)
  assert out.shape == q.shape and out.dtype == q.dtype
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  assert _rel(out, expected) < tol
  for name, grad, expected_grad in zip('qkv', vjp(d_out), ref_vjp(d_out.astype(jnp.float32))):
    assert grad.dtype == dtype, name
    assert _rel(grad, expected_grad) < tol, name


def _brute_force_blocks(seq, rows, cols, block_rows, block_cols, window, queries_are_rows):
  """(visited, full) block-column sets for one row block, by enumerating every pair."""
  visited, full = set(), set()
  for j in range(seq // block_cols):
    pairs = []
    for r in range(rows, rows + block_rows):
      for c in range(j * block_cols, (j + 1) * block_cols):
        qpos, kpos = (r, c) if queries_are_rows else (c, r)
        pairs.append(bool(attention_contract.visible(qpos, kpos, window)))
    if any(pairs):
      visited.add(j)
    if all(pairs):
      full.add(j)
  return visited, full


@pytest.mark.parametrize('window', [None, 1, 5, 16, 23, 64, 200])
def test_block_ranges_cover_exactly_the_band(window):
  """Block skipping visits exactly the blocks with a visible pair; only fully visible blocks skip the mask."""
  seq = 96
  for block_rows, block_cols in [(16, 32), (32, 16), (16, 16)]:
    for start in range(0, seq, block_rows):
      visited, full = _brute_force_blocks(seq, start, None, block_rows, block_cols, window, True)
      lo, hi = map(int, flash_gpu_common.kv_block_range(start, block_rows, block_cols, window))
      f_lo, f_hi = map(int, flash_gpu_common.kv_full_range(start, block_rows, block_cols, window, lo, hi))
      assert set(range(lo, hi)) == visited
      assert set(range(f_lo, f_hi)) == full & visited  # contiguous, so any gap would show here

      visited, full = _brute_force_blocks(seq, start, None, block_rows, block_cols, window, False)
      lo, hi = map(int, flash_gpu_common.q_block_range(start, block_rows, block_cols, window, seq // block_cols))
      f_lo, f_hi = map(int, flash_gpu_common.q_full_range(start, block_rows, block_cols, window, lo, hi))
      assert set(range(lo, hi)) == visited
      assert set(range(f_lo, f_hi)) == full


def _document_layouts(seq):
  """Segment ids: packed runs (boundaries on and off block edges, padding after), and ids that are not runs."""
  rng = np.random.default_rng(0)
  runs = [np.repeat(np.arange(1, 5), [16, 20, 45, seq - 81]),  # a boundary on a block edge, others not
          np.cumsum(rng.random(seq) < 0.08) + 1,
          np.concatenate([np.ones(70, int), np.full(seq - 70, -1)]),  # the wrapper's padding
          np.concatenate([np.repeat([1, 2], [30, 50]), np.zeros(seq - 80, int)])]  # trailing 0s: not runs
  return runs + [np.arange(seq) % 3]  # interleaved documents: not runs


@pytest.mark.parametrize('window', [None, 5, 16, 40])
def test_document_ranges_cover_every_visible_pair(window):
  """With packed documents, the visited blocks still hold every visible pair, unmasked blocks hold only
  visible pairs, and blocks outside the documents are skipped."""
  seq, block_rows, block_cols = 96, 16, 16
  skipped = 0
  for seg in _document_layouts(seq):
    doc_start, doc_end = (np.asarray(x)[0] for x in flash_gpu_common.document_bounds(jnp.asarray(seg)[None]))
    vis = np.array([[bool(attention_contract.visible(q, k, window, seg[q], seg[k])) for k in range(seq)]
                    for q in range(seq)])
    tiles = vis.reshape(seq // block_rows, block_rows, seq // block_cols, block_cols).transpose(0, 2, 1, 3)
    any_pair, all_pairs = tiles.any(axis=(2, 3)), tiles.all(axis=(2, 3))
    for i in range(seq // block_rows):
      start, end = i * block_rows, (i + 1) * block_rows - 1
      lo, hi, f_lo, f_hi = map(int, flash_gpu_common.kv_document_range(start, block_rows, block_cols, window,
                                                                doc_start[start], doc_start[end]))
      assert set(np.flatnonzero(any_pair[i])) <= set(range(lo, hi))
      assert set(range(f_lo, f_hi)) <= set(np.flatnonzero(all_pairs[i]))
      plain_lo, plain_hi = flash_gpu_common.kv_block_range(start, block_rows, block_cols, window)
      skipped += (int(plain_hi) - int(plain_lo)) - (hi - lo)
    for j in range(seq // block_cols):  # keys: the mirror image
      start, end = j * block_cols, (j + 1) * block_cols - 1
      lo, hi, f_lo, f_hi = map(int, flash_gpu_common.q_document_range(start, block_cols, block_rows, window,
                                                               seq // block_rows, doc_end[start], doc_end[end]))
      assert set(np.flatnonzero(any_pair[:, j])) <= set(range(lo, hi))
      assert set(range(f_lo, f_hi)) <= set(np.flatnonzero(all_pairs[:, j]))
  assert skipped > 0


@pytest.mark.slow
@pytest.mark.parametrize('layout', range(5))
def test_matches_reference_for_each_document_layout(layout):
  seq, window = 96, 40
  seg = jnp.asarray(_document_layouts(seq)[layout])[None]
  keys = jax.random.split(jax.random.key(layout), 4)
  q = jax.random.normal(keys[0], (1, seq, 4, 64))
  k, v = (jax.random.normal(key, (1, seq, 2, 64)) for key in keys[1:3])
  d_out = jax.random.normal(keys[3], q.shape)
  out, vjp = jax.vjp(functools.partial(flash_gpu.flash_attention, sliding_window=window, segment_ids=seg,
                                       interpret=True), q, k, v)
  expected, ref_vjp = jax.vjp(functools.partial(reference, window=window, segment_ids=seg), q, k, v)
  assert _rel(out, expected) < 1e-5
  for name, grad, expected_grad in zip('qkv', vjp(d_out), ref_vjp(d_out)):
    assert _rel(grad, expected_grad) < 1e-5, name


def test_work_is_linear_in_seq_len_at_fixed_window():
  """Visited key blocks per query block stay bounded by the window: cost ~ seq_len x window."""
  window, block = 64, 16
  for seq in (256, 1024):
    counts = [int(hi - lo) for lo, hi in
              (flash_gpu_common.kv_block_range(s, block, block, window) for s in range(0, seq, block))]
    assert max(counts) <= window // block + 1
  assert attention_contract.band_pairs(1024, 64) < 2.1 * attention_contract.band_pairs(512, 64)


def test_triton_kernels_with_documents_lower_for_cuda():
  """The Triton-backend kernels (fp32), with the document ranges' scalar reads, lower for CUDA without a GPU."""
  q = jax.ShapeDtypeStruct((2, 1000, 4, 64), jnp.float32)
  k = jax.ShapeDtypeStruct((2, 1000, 2, 64), jnp.float32)
  seg = jax.ShapeDtypeStruct((2, 1000), jnp.int32)

  def loss(q, k, v, seg):
    return flash_gpu.flash_attention(q, k, v, sliding_window=300, segment_ids=seg, backend='triton').sum()

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, seg).lower(lowering_platforms=('cuda',))
  assert lowered.as_text().count('__gpu$xla.gpu.triton') == 3  # forward, dQ and dK/dV kernels


@pytest.mark.slow
def test_mosaic_kernels_lower_for_cuda():
  """The Hopper kernels (forward, dQ, dK/dV) trace and lower to Mosaic GPU without a GPU."""
  q = jax.ShapeDtypeStruct((2, 1000, 14, 128), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, 1000, 2, 128), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, 1000), jnp.int32)

  def loss(q, k, v, seg):
    out = flash_gpu.flash_attention(q, k, v, sliding_window=300, segment_ids=seg, backend='mosaic')
    return out.astype(jnp.float32).sum()

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, seg).lower(lowering_platforms=('cuda',))
  text = lowered.as_text()
  for kernel in ('flash_forward', 'flash_dq', 'flash_dkv'):  # named, so a profile tells the three apart
    assert f'{kernel}_mosaic_gpu' in text, kernel


@pytest.mark.parametrize('seq_len', [8, 128])
def test_mosaic_kernels_lower_for_short_sequences(seq_len):
  """One key block, fewer than the pipeline's slots: no load past the end may even be traced."""
  q = jax.ShapeDtypeStruct((1, seq_len, 4, 128), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, seq_len, 2, 128), jnp.bfloat16)

  def loss(q, k, v):
    return flash_gpu.flash_attention(q, k, v, backend='mosaic').astype(jnp.float32).sum()

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(lowering_platforms=('cuda',))
  assert lowered.as_text().count('mosaic_gpu') >= 3


@pytest.mark.parametrize('window,segments', [pytest.param(None, False, marks=pytest.mark.slow), (20, True)])
def test_query_offset_chunks_equal_the_whole_sequence(window, segments):
  """Context parallelism's chunks: queries at a (traced) offset against the whole sequence give the rows of the
  whole attention, and their gradients add up to the whole's."""
  keys = jax.random.split(jax.random.key(3), 5)
  q = jax.random.normal(keys[0], (1, 64, 2, 64))
  k, v = (jax.random.normal(key, (1, 64, 1, 64)) for key in keys[1:3])
  d_out = jax.random.normal(keys[3], q.shape)
  ids = jnp.cumsum(jax.random.bernoulli(keys[4], 3 / 64, (1, 64)), axis=1) if segments else None
  whole, whole_vjp = jax.vjp(functools.partial(reference, window=window, segment_ids=ids), q, k, v)

  def chunks(q, k, v):  # the zig-zag pair of device 0 of 2: chunks 0 and 3 of 16 rows
    run = jax.jit(lambda rows, offset: flash_gpu.flash_attention(rows, k, v, sliding_window=window, segment_ids=ids,
                                                                   q_offset=offset, interpret=True))
    return run(q[:, :16], 0), run(q[:, 48:], 48)

  (first, last), vjp = jax.vjp(chunks, q, k, v)
  assert _rel(first, whole[:, :16]) < 1e-5 and _rel(last, whole[:, 48:]) < 1e-5
  zero = jnp.zeros_like(d_out)
  grads = vjp((d_out[:, :16], d_out[:, 48:]))
  expected = whole_vjp(zero.at[:, :16].set(d_out[:, :16]).at[:, 48:].set(d_out[:, 48:]))
  for name, grad, expected_grad in zip('qkv', grads, expected):
    assert _rel(grad, expected_grad) < 1e-5, name


@pytest.mark.slow
def test_mosaic_kernels_with_a_query_offset_lower_for_cuda():
  q = jax.ShapeDtypeStruct((2, 256, 14, 128), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, 1024, 2, 128), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, 1024), jnp.int32)
  offset = jax.ShapeDtypeStruct((), jnp.int32)

  def loss(q, k, v, seg, offset):
    out = flash_gpu.flash_attention(q, k, v, sliding_window=300, segment_ids=seg, q_offset=offset, backend='mosaic')
    return out.astype(jnp.float32).sum()

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, seg, offset).lower(lowering_platforms=('cuda',))
  text = lowered.as_text()
  for kernel in ('flash_forward', 'flash_dq', 'flash_dkv'):
    assert f'{kernel}_mosaic_gpu' in text, kernel
  with pytest.raises(ValueError, match='multiples of 128'):
    flash_gpu.flash_attention(jnp.zeros((1, 64, 2, 64), jnp.bfloat16), jnp.zeros((1, 256, 2, 64), jnp.bfloat16),
                              jnp.zeros((1, 256, 2, 64), jnp.bfloat16), q_offset=0, backend='mosaic')


def test_mosaic_rejects_too_much_shared_memory():
  q = jax.ShapeDtypeStruct((1, 1024, 4, 128), jnp.bfloat16)
  blocks = flash_gpu_common.BlockSizes(stages=3)  # 3 K/V slots of 128 x 128 do not fit next to Q
  fn = functools.partial(flash_gpu.flash_attention, backend='mosaic', block_sizes=blocks)
  with pytest.raises(ValueError, match='shared memory'):
    jax.jit(fn).trace(q, q, q).lower(lowering_platforms=('cuda',))


def test_bad_inputs_raise_clear_errors():
  x = jnp.zeros((1, 8, 2, 64), jnp.float32)
  with pytest.raises(ValueError, match='head_dim'):
    flash_gpu.flash_attention(jnp.zeros((1, 8, 2, 32)), jnp.zeros((1, 8, 2, 32)), jnp.zeros((1, 8, 2, 32)),
                              interpret=True)
  with pytest.raises(ValueError, match='multiple of kv heads'):
    flash_gpu.flash_attention(jnp.zeros((1, 8, 3, 64)), x, x, interpret=True)
  with pytest.raises(ValueError, match='share a dtype'):
    flash_gpu.flash_attention(x, x.astype(jnp.bfloat16), x, interpret=True)
  with pytest.raises(ValueError, match='sliding_window'):
    flash_gpu.flash_attention(x, x, x, sliding_window=0, interpret=True)
  with pytest.raises(ValueError, match='segment_ids'):
    flash_gpu.flash_attention(x, x, x, segment_ids=jnp.zeros((1, 7), jnp.int32), interpret=True)
  with pytest.raises(ValueError, match='interpret=True'):
    flash_gpu.flash_attention(x, x, x)  # CPU, no interpreter
