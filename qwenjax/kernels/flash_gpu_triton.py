"""The blocked flash-attention algorithm as plain `pallas_call`s: Triton backend on GPU, interpreter on CPU.

Same tiling, masking and block skipping as the Mosaic GPU kernels (`flash_gpu_mosaic`), through the block
ranges of `flash_gpu_common`: each query block walks only the key blocks of its band, split into masked edges and an
unmasked middle; the dK/dV program of a key block walks the query blocks of its band for every query head of
its KV group. Used for fp32 inputs and non-Hopper GPUs, and with `interpret=True` as the CPU test of the
algorithm. K/V (and Q/dO in dK/dV) are whole-sequence blocks left in GPU memory and sliced in the loop, so a
program reads only the blocks it visits.

With packed documents (`segment_ids` in contiguous runs), the ranges also skip key blocks before a query
block's first document and query blocks after a key block's last document, and blocks inside one document run
unmasked (`flash_gpu_common.kv_ranges`, `q_ranges`), as in the Mosaic kernels.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from qwenjax.kernels import attention_contract
from qwenjax.kernels import flash_gpu_common as fg

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _precision(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.dtype(jnp.float32) else None


def _dot(a, b, dims, precision):
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _call(kernel, grid, in_specs, out_specs, out_shape, interpret, name):
  kwargs = {}
  if not interpret:
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
    kwargs['compiler_params'] = pltriton.CompilerParams(num_warps=4, num_stages=2)
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                        interpret=interpret, name=name, **kwargs)



def _offset_spec():
  return pl.BlockSpec((1,), lambda *_: (0,))


def forward(q, k, v, segment_ids, *, window, blocks: fg.BlockSizes, interpret: bool, q_offset=None):
  """Returns (out [b, s, hq, d], lse [b, hq, s] fp32, base-2 logsumexp of the scaled scores).

  `q_offset` (an int32 `[1]` array): q holds the rows q_offset .. of the sequence of k, v and segment_ids."""
  batch, q_len, q_heads, head_dim = q.shape
  seq_len = k.shape[1]
  groups = q_heads // k.shape[2]
  bq, bkv = blocks.block_q, blocks.block_kv
  scale = fg.LOG2E / math.sqrt(head_dim)
  precision = _precision(q.dtype)
  has_seg = segment_ids is not None
  has_off = q_offset is not None

  def kernel(q_ref, k_ref, v_ref, *refs):
    if has_off:
      off_ref, *refs = refs
    if has_seg:
      qseg_ref, kseg_ref, qdoc_ref, o_ref, lse_ref = refs
    else:
      o_ref, lse_ref = refs
    q_start = pl.program_id(2) * bq + off_ref[0] if has_off else pl.program_id(2) * bq
    qs = q_ref[...]
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (bq, bkv), 0)
    q_seg = qseg_ref[...][:, None] if has_seg else None
    lo, hi, f_lo, f_hi = fg.kv_ranges(q_start, bq, bkv, window, (qdoc_ref[0], qdoc_ref[bq - 1]) if has_seg else None)

    def step(j, carry, masked):
      acc, m, l = carry
      start = pl.multiple_of(j * bkv, bkv)
      s = _dot(qs, k_ref[pl.ds(start, bkv), :], _NT, precision) * scale
      if masked:
        k_pos = start + lax.broadcasted_iota(jnp.int32, (bq, bkv), 1)
        k_seg = kseg_ref[pl.ds(start, bkv)][None, :] if has_seg else None
        s = jnp.where(attention_contract.visible(q_pos, k_pos, window, q_seg, k_seg), s, fg.MASK_VALUE)
      m_new = jnp.maximum(m, s.max(axis=1))
      m_use = fg.safe_max(m_new) if masked else m_new
      alpha = jnp.exp2(m - m_use)
      p = jnp.exp2(s - m_use[:, None])
      l = l * alpha + p.sum(axis=1)
      pv = _dot(p.astype(v_ref.dtype), v_ref[pl.ds(start, bkv), :], _NN, precision)
      return acc * alpha[:, None] + pv, m_new, l

    carry = (jnp.zeros((bq, head_dim), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    carry = fg.fori(lo, f_lo, lambda j, c: step(j, c, True), carry)
    carry = fg.fori(f_lo, f_hi, lambda j, c: step(j, c, False), carry)
    acc, m, l = fg.fori(f_hi, hi, lambda j, c: step(j, c, True), carry)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(l)

  in_specs = [
      pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0)),
      pl.BlockSpec((None, seq_len, None, head_dim), lambda b, h, i: (b, 0, h // groups, 0)),
      pl.BlockSpec((None, seq_len, None, head_dim), lambda b, h, i: (b, 0, h // groups, 0)),
  ]
  args = [q, k, v]
  if has_off:
    in_specs.append(_offset_spec())
    args.append(q_offset)
  if has_seg:
    in_specs += [pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
                 pl.BlockSpec((None, seq_len), lambda b, h, i: (b, 0)),
                 pl.BlockSpec((None, bq), lambda b, h, i: (b, i))]
    q_ids, q_doc = fg.chunk_inputs(segment_ids, q_offset, q_len, 0)
    args += [q_ids, segment_ids, q_doc]
  out_specs = [pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0)),
               pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((batch, q_heads, q_len), jnp.float32)]
  out, lse = _call(kernel, (batch, q_heads, q_len // bq), in_specs, out_specs, out_shape, interpret,
                   'flash_gpu_fwd')(*args)
  return out, lse


def backward(q, k, v, segment_ids, d_out, lse, delta, *, window, blocks: fg.BlockSizes, interpret: bool,
             q_offset=None):
  """Returns (dq, dk, dv) in the input dtype."""
  dq = _backward_dq(q, k, v, segment_ids, d_out, lse, delta, window, blocks, interpret, q_offset)
  dk, dv = _backward_dkv(q, k, v, segment_ids, d_out, lse, delta, window, blocks, interpret, q_offset)
  return dq, dk, dv


def _backward_dq(q, k, v, segment_ids, d_out, lse, delta, window, blocks, interpret, q_offset):
  batch, q_len, q_heads, head_dim = q.shape
  seq_len = k.shape[1]
  groups = q_heads // k.shape[2]
  bq, bkv = blocks.block_q, blocks.block_kv_dq
  scale = fg.LOG2E / math.sqrt(head_dim)
  precision = _precision(q.dtype)
  has_seg = segment_ids is not None
  has_off = q_offset is not None

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
    if has_off:
      off_ref, *refs = refs
    if has_seg:
      qseg_ref, kseg_ref, qdoc_ref, dq_ref = refs
    else:
      (dq_ref,) = refs
    q_start = pl.program_id(2) * bq + off_ref[0] if has_off else pl.program_id(2) * bq
    qs, dos = q_ref[...], do_ref[...]
    lse_rows, delta_rows = lse_ref[...][:, None], delta_ref[...][:, None]
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (bq, bkv), 0)
    q_seg = qseg_ref[...][:, None] if has_seg else None
    lo, hi, f_lo, f_hi = fg.kv_ranges(q_start, bq, bkv, window, (qdoc_ref[0], qdoc_ref[bq - 1]) if has_seg else None)

    def step(j, dq, masked):
      start = pl.multiple_of(j * bkv, bkv)
      ks = k_ref[pl.ds(start, bkv), :]
      s = _dot(qs, ks, _NT, precision) * scale
      if masked:
        k_pos = start + lax.broadcasted_iota(jnp.int32, (bq, bkv), 1)
        k_seg = kseg_ref[pl.ds(start, bkv)][None, :] if has_seg else None
        s = jnp.where(attention_contract.visible(q_pos, k_pos, window, q_seg, k_seg), s, fg.MASK_VALUE)
      p = jnp.exp2(s - lse_rows)
      dp = _dot(dos, v_ref[pl.ds(start, bkv), :], _NT, precision)
      ds = p * (dp - delta_rows)
      return dq + _dot(ds.astype(ks.dtype), ks, _NN, precision)

    dq = jnp.zeros((bq, head_dim), jnp.float32)
    dq = fg.fori(lo, f_lo, lambda j, c: step(j, c, True), dq)
    dq = fg.fori(f_lo, f_hi, lambda j, c: step(j, c, False), dq)
    dq = fg.fori(f_hi, hi, lambda j, c: step(j, c, True), dq)
    dq_ref[...] = (dq * (1 / math.sqrt(head_dim))).astype(dq_ref.dtype)

  row_spec = pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, seq_len, None, head_dim), lambda b, h, i: (b, 0, h // groups, 0))
  vec_spec = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
  in_specs = [row_spec, kv_spec, kv_spec, row_spec, vec_spec, vec_spec]
  args = [q, k, v, d_out, lse, delta]
  if has_off:
    in_specs.append(_offset_spec())
    args.append(q_offset)
  if has_seg:
    in_specs += [pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
                 pl.BlockSpec((None, seq_len), lambda b, h, i: (b, 0)),
                 pl.BlockSpec((None, bq), lambda b, h, i: (b, i))]
    q_ids, q_doc = fg.chunk_inputs(segment_ids, q_offset, q_len, 0)
    args += [q_ids, segment_ids, q_doc]
  return _call(kernel, (batch, q_heads, q_len // bq), in_specs, row_spec,
               jax.ShapeDtypeStruct(q.shape, q.dtype), interpret, 'flash_gpu_dq')(*args)


def _backward_dkv(q, k, v, segment_ids, d_out, lse, delta, window, blocks, interpret, q_offset):
  batch, q_len, q_heads, head_dim = q.shape
  seq_len = k.shape[1]
  kv_heads = k.shape[2]
  groups = q_heads // kv_heads
  bq, bkv = blocks.block_q_dkv, blocks.block_kv_dkv
  num_q_blocks = q_len // bq
  scale = fg.LOG2E / math.sqrt(head_dim)
  precision = _precision(q.dtype)
  has_seg = segment_ids is not None
  has_off = q_offset is not None

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
    if has_off:
      off_ref, *refs = refs
    if has_seg:
      qseg_ref, kseg_ref, kdoc_ref, dk_ref, dv_ref = refs
    else:
      dk_ref, dv_ref = refs
    kv_head = pl.program_id(1)
    k_start = pl.program_id(2) * bkv
    ks, vs = k_ref[...], v_ref[...]
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (bkv, bq), 0)
    k_seg = kseg_ref[...][:, None] if has_seg else None
    doc_ends = (kdoc_ref[0], kdoc_ref[bkv - 1]) if has_seg else None
    if has_off:  # block indices into the chunk of queries; positions still count from the sequence's start
      lo, hi, f_lo, f_hi = fg.chunk_q_ranges(k_start, bkv, bq, window, seq_len // bq, off_ref[0], num_q_blocks,
                                             doc_ends)
    else:
      lo, hi, f_lo, f_hi = fg.q_ranges(k_start, bkv, bq, window, num_q_blocks, doc_ends)

    def step(i, carry, head, masked):
      dk, dv = carry
      start = pl.multiple_of(i * bq, bq)
      qs = q_ref[pl.ds(start, bq), head, :]
      dos = do_ref[pl.ds(start, bq), head, :]
      s_t = _dot(ks, qs, _NT, precision) * scale  # [keys, queries]
      if masked:
        q_start = start + off_ref[0] if has_off else start  # the block's first position in the sequence
        q_pos = q_start + lax.broadcasted_iota(jnp.int32, (bkv, bq), 1)
        q_seg = qseg_ref[pl.ds(start, bq)][None, :] if has_seg else None
        s_t = jnp.where(attention_contract.visible(q_pos, k_pos, window, q_seg, k_seg), s_t, fg.MASK_VALUE)
      p_t = jnp.exp2(s_t - lse_ref[head, pl.ds(start, bq)][None, :])
      dv = dv + _dot(p_t.astype(dos.dtype), dos, _NN, precision)
      dp_t = _dot(vs, dos, _NT, precision)
      ds_t = p_t * (dp_t - delta_ref[head, pl.ds(start, bq)][None, :])
      dk = dk + _dot(ds_t.astype(qs.dtype), qs, _NN, precision)
      return dk, dv

    def head_loop(g, carry):
      head = kv_head * groups + g
      carry = fg.fori(lo, f_lo, lambda i, c: step(i, c, head, True), carry)
      carry = fg.fori(f_lo, f_hi, lambda i, c: step(i, c, head, False), carry)
      return fg.fori(f_hi, hi, lambda i, c: step(i, c, head, True), carry)

    zeros = jnp.zeros((bkv, head_dim), jnp.float32)
    dk, dv = fg.fori(0, groups, head_loop, (zeros, zeros))
    dk_ref[...] = (dk * (1 / math.sqrt(head_dim))).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)

  full_spec = pl.BlockSpec((None, q_len, q_heads, head_dim), lambda b, h, j: (b, 0, 0, 0))
  kv_spec = pl.BlockSpec((None, bkv, None, head_dim), lambda b, h, j: (b, j, h, 0))
  vec_spec = pl.BlockSpec((None, q_heads, q_len), lambda b, h, j: (b, 0, 0))
  in_specs = [full_spec, kv_spec, kv_spec, full_spec, vec_spec, vec_spec]
  args = [q, k, v, d_out, lse, delta]
  if has_off:
    in_specs.append(_offset_spec())
    args.append(q_offset)
  if has_seg:
    in_specs += [pl.BlockSpec((None, q_len), lambda b, h, j: (b, 0)),
                 pl.BlockSpec((None, bkv), lambda b, h, j: (b, j)),
                 pl.BlockSpec((None, bkv), lambda b, h, j: (b, j))]
    q_ids, _ = fg.chunk_inputs(segment_ids, q_offset, q_len, 1)
    args += [q_ids, segment_ids, fg.document_bounds(segment_ids)[1]]
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  return _call(kernel, (batch, kv_heads, seq_len // bkv), in_specs, [kv_spec, kv_spec], out_shape, interpret,
               'flash_gpu_dkv')(*args)
