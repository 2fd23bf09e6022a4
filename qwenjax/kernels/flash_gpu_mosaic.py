"""Hopper flash-attention kernels on the Mosaic GPU backend (TMA, wgmma, warpgroup specialisation).

Every kernel is one CTA of three warpgroups: two consumers doing the math on 64-row tiles and one producer
that streams the other operand through `stages` shared-memory slots with TMA. The producer walks the union of
the two consumers' block ranges (from `flash_gpu_common`'s range helpers); a consumer walks the same steps and, for
steps outside its own band, only keeps the barrier protocol (waits on the data barriers so their phases stay
in step, arrives on the "slot free" barriers). Inside its band, blocks fully visible run without a mask.

With packed documents the ranges also follow the documents (`flash_gpu_common.kv_ranges` / `q_ranges` with
`document_bounds`): key blocks before a query block's first document and query blocks after a key block's last
document are skipped, and blocks inside one document run unmasked. Each warpgroup reads the two bounds of its
rows (and the producer those of the CTA's rows) from global memory, so all three agree on the steps.

* forward: CTA = 128 query rows of one query head, the last rows launched first (they see the most keys);
  producer streams K/V blocks of its KV head. The two consumers ping-pong on a schedule barrier so one's softmax
  overlaps the other's matmuls (FlashAttention-3).
* dQ: CTA = 128 query rows, the last rows launched first (they see the most keys); producer streams K/V
  blocks; dQ accumulates in registers.
* dK/dV: CTA = 128 keys of one KV head (the first keys, seen by the most queries, launched first); producer
  streams (Q, dO, lse, delta) blocks of every query head of the group over the band; dK and dV accumulate in
  registers and are written once, in [b, s, kv_heads, d].

In both backward kernels a step issues the S and dP wgmmas, waits for S only, and computes P's exponentials
while dP's wgmma runs.

With a query offset (context parallelism's chunks, `flash_gpu`) every warpgroup reads it from global memory like
the document bounds: the forward and dQ kernels add it to their rows' positions, the dK/dV kernel clips its query
block range to the chunk (`flash_gpu_common.chunk_q_ranges`); loads and stores stay in the chunk's own rows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from qwenjax.kernels import attention_contract
from qwenjax.kernels import flash_gpu_common as fg

_WGS = 2  # consumer warpgroups per CTA
_RCP_LN2 = 1 / math.log(2)


def _tiled(shape, dtype):
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def _rows(x, shape):
  """Broadcasts a per-row vector (layout WGMMA.reduce(1)) over columns."""
  return lax.broadcast_in_dim(x, shape, [0])


def _cols(x, shape):
  """Broadcasts a per-column vector (layout WGMMA.reduce(0)) over rows."""
  return lax.broadcast_in_dim(x, shape, [1])


def _zeros(shape):
  return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _visible(shape, row_start, col_start, *, rows_are_queries: bool, window, row_seg=None, col_seg=None):
  """Mask of a [rows, cols] tile in WGMMA layout; seg arguments are already broadcast to the tile."""
  row = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
  col = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
  mask = attention_contract.tile_visible(row, col, row_start, col_start, rows_are_queries=rows_are_queries,
                                        window=window)
  if row_seg is not None:
    mask = mask & (row_seg == col_seg)
  return mask



def _shift(off_ref):
  """Chunk row -> sequence position: adds the query offset read from `off_ref` (None: no offset, no op)."""
  if off_ref is None:
    return lambda x: x
  offset = off_ref[0]
  return lambda x: x + offset


def _doc_pair(doc_ref, b, start, rows: int):
  """The `document_bounds` values of rows `start` and `start + rows - 1` of batch row b: two scalar reads from
  global memory that the producer and both consumers make alike, so they walk the same block ranges."""
  return doc_ref[b, start], doc_ref[b, start + (rows - 1)]


class _PingPong:
  """Optional schedule barrier that makes the two consumer warpgroups take turns on the tensor cores.

  Each step does two rendezvous: after issuing its first matmuls (`issued`) and, split around the
  elementwise work, before its second matmuls (`done_elementwise` / `before_second`). Warpgroup 1 starts one
  rendezvous late and warpgroup 0 ends one late, so one's elementwise work overlaps the other's matmuls.
  Steps outside a warpgroup's band rendezvous twice too (`skip_step`), keeping the counts equal.
  """

  def __init__(self, barrier, wg):
    self.barrier, self.wg = barrier, wg

  def _sync(self):
    if self.barrier is not None:
      plgpu.barrier_arrive(self.barrier)
      plgpu.barrier_wait(self.barrier)

  def start(self):
    pl.when(self.wg == 1)(self._sync)

  def finish(self):
    pl.when(self.wg == 0)(self._sync)

  def issued(self):
    self._sync()

  def done_elementwise(self):
    if self.barrier is not None:
      plgpu.barrier_arrive(self.barrier)

  def before_second(self):
    if self.barrier is not None:
      plgpu.barrier_wait(self.barrier)

  def skip_step(self):
    self._sync()
    self._sync()


def _compiler_params():
  return plgpu.CompilerParams(approx_math=True)


def _kernel(body, out_type, scratch, grid, grid_names):
  """The kernel is named after `body` (`flash_forward_mosaic_gpu_kernel` in a profile)."""
  return plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=grid_names,
                      num_threads=_WGS + 1, thread_name='wg', compiler_params=_compiler_params())


def _check(blocks: fg.BlockSizes, head_dim: int):
  if blocks.block_q != 64 or blocks.block_q_dkv % 64 or blocks.block_kv_dkv != 64:
    raise ValueError(f'Mosaic GPU kernels need block_q = block_kv_dkv = 64 (one wgmma M tile per warpgroup) '
                     f'and block_q_dkv a multiple of 64; got {blocks}')
  if blocks.block_kv % 64 or blocks.block_kv_dq % 64:
    raise ValueError(f'block_kv and block_kv_dq must be multiples of 64; got {blocks}')
  if head_dim % 64:
    raise ValueError(f'Mosaic GPU kernels need head_dim a multiple of 64, got {head_dim}')


# ----------------------------------------------------------------------------------------------------------
# Forward.


def forward(q, k, v, segment_ids, *, window, blocks: fg.BlockSizes, interpret: bool = False, q_offset=None):
  """Returns (out [b, s, hq, d], lse [b, hq, s] fp32 base-2 logsumexp of the scaled scores).

  `q_offset` (an int32 `[1]` array): q holds the rows q_offset .. of the sequence of k, v and segment_ids."""
  del interpret  # The Mosaic GPU interpreter of jax 0.10 cannot run these kernels; see flash_gpu.
  batch, q_len, q_heads, head_dim = q.shape
  seq_len = k.shape[1]
  groups = q_heads // k.shape[2]
  _check(blocks, head_dim)
  bq, bkv, stages = blocks.block_q, blocks.block_kv, blocks.stages
  dtype = q.dtype
  scale = fg.LOG2E / math.sqrt(head_dim)
  has_seg = segment_ids is not None
  has_off = q_offset is not None

  def flash_forward(q_ref, k_ref, v_ref, *refs):
    if has_off:
      off_ref, *refs = refs
    if has_seg:
      if has_off:  # the chunk's own ids, then the sequence's
        qseg_ref, seg_ref, doc_ref, out_ref, lse_ref, smem, bars = refs
      else:
        seg_ref, doc_ref, out_ref, lse_ref, smem, bars = refs
        qseg_ref = seg_ref
      qo_smem2, k_smem, v_smem, lse_smem2, qseg_smem2, kseg_smem = smem
    else:
      out_ref, lse_ref, smem, bars = refs
      qo_smem2, k_smem, v_smem, lse_smem2 = smem
    q_bar, k_bar, v_bar, k_free, v_free, sched = bars
    b, h = lax.axis_index('batch'), lax.axis_index('heads')
    wg = lax.axis_index('wg')
    shift = _shift(off_ref if has_off else None)  # chunk rows -> sequence positions
    # Last query block first: later blocks see more keys (up to the window), so the light ones fill the last wave.
    q0 = (q_len // (_WGS * bq) - 1 - lax.axis_index('q_seq')) * (_WGS * bq)

    def ranges(start, rows):  # start: the first of the rows, in the chunk
      docs = _doc_pair(doc_ref, b, start, rows) if has_seg else None
      return fg.kv_ranges(shift(start), rows, bkv, window, docs)

    lo, hi, _, _ = ranges(q0, _WGS * bq)

    def slot_of(j):
      return lax.rem(j - lo, stages)

    def sched_sync():
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(sched)

    @pl.when(wg < _WGS)
    def _consumer():
      plgpu.set_max_registers(232, action='increase')
      qo_smem = qo_smem2.at[wg]
      qw = q0 + wg * bq
      rows = pl.ds(qw, bq)
      plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], qo_smem, q_bar.at[wg])
      if has_seg:
        plgpu.copy_gmem_to_smem(qseg_ref.at[b, rows], qseg_smem2.at[wg], q_bar.at[wg])
      lo_w, hi_w, f_lo, f_hi = ranges(qw, bq)
      plgpu.barrier_wait(q_bar.at[wg])
      q_seg = None
      if has_seg:
        q_seg = plgpu.load(qseg_smem2.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(1))

      m = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
      l = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
      acc = _zeros((bq, head_dim))
      plgpu.barrier_wait(k_bar.at[0])
      pl.when(wg == 1)(sched_sync)

      def wait_next_k(j):
        @pl.when(j + 1 < hi)
        def _():
          plgpu.barrier_wait(k_bar.at[slot_of(j + 1)])

      def compute(j, carry, masked):
        acc, m, l = carry
        slot = slot_of(j)

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
          sched_sync()
          return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((bq, bkv), jnp.float32))
        if masked:
          row_seg = col_seg = None
          if has_seg:
            k_seg = plgpu.load(kseg_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
            row_seg, col_seg = _rows(q_seg, (bq, bkv)), _cols(k_seg, (bq, bkv))
          plgpu.barrier_arrive(k_free.at[slot])
          mask = _visible((bq, bkv), shift(qw), j * bkv, rows_are_queries=True, window=window,
                          row_seg=row_seg, col_seg=col_seg)
          s = jnp.where(mask, s, fg.MASK_VALUE)
        else:
          plgpu.barrier_arrive(k_free.at[slot])
        m_new = jnp.maximum(m, s.max(axis=1) * scale)
        m_use = fg.safe_max(m_new) if masked else m_new
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s * scale - _rows(m_use, s.shape))
        acc = acc * _rows(alpha, acc.shape)
        l = l * alpha + p.sum(axis=1)
        p16 = p.astype(dtype)
        acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
        plgpu.barrier_arrive(sched)  # softmax done: the other warpgroup may issue its matmul
        plgpu.barrier_wait(v_bar.at[slot])
        plgpu.barrier_wait(sched)

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
          wait_next_k(j)

        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l

      def skip(j, carry):
        slot = slot_of(j)
        plgpu.barrier_arrive(k_free.at[slot])
        plgpu.barrier_wait(v_bar.at[slot])
        plgpu.barrier_arrive(v_free.at[slot])
        sched_sync()
        sched_sync()
        wait_next_k(j)
        return carry

      carry = (acc, m, l)
      carry = fg.fori(lo, lo_w, skip, carry)
      carry = fg.fori(lo_w, f_lo, lambda j, c: compute(j, c, True), carry)
      carry = fg.fori(f_lo, f_hi, lambda j, c: compute(j, c, False), carry)
      carry = fg.fori(f_hi, hi_w, lambda j, c: compute(j, c, True), carry)
      acc, m, l = fg.fori(hi_w, hi, skip, carry)
      pl.when(wg == 0)(sched_sync)

      qo_smem[...] = (acc / _rows(l, acc.shape)).astype(dtype)
      lse_smem2.at[wg][...] = m + jnp.log(l) * _RCP_LN2
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[b, rows, h])
      plgpu.copy_smem_to_gmem(lse_smem2.at[wg], lse_ref.at[b, h, rows])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _WGS)
    def _producer():
      plgpu.set_max_registers(40, action='decrease')
      kv_head = lax.div(h, groups)
      n = hi - lo

      def load(t, slot, wait):
        keys = pl.ds((lo + t) * bkv, bkv)
        if wait:
          plgpu.barrier_wait(k_free.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kv_head], k_smem.at[slot], k_bar.at[slot])
        if has_seg:
          plgpu.copy_gmem_to_smem(seg_ref.at[b, keys], kseg_smem.at[slot], k_bar.at[slot])
        if wait:
          plgpu.barrier_wait(v_free.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kv_head], v_smem.at[slot], v_bar.at[slot])

      # A short sequence has fewer key blocks than slots: never even trace a load past its end.
      for i in range(min(stages, seq_len // bkv)):
        pl.when(i < n)(lambda i=i: load(i, i, False))

      @pl.loop(0, n - stages)
      def _(t):
        load(t + stages, lax.rem(t, stages), True)

  smem = [_tiled((_WGS, bq, head_dim), dtype), _tiled((stages, bkv, head_dim), dtype),
          _tiled((stages, bkv, head_dim), dtype), plgpu.SMEM((_WGS, bq), jnp.float32)]
  if has_seg:
    smem += [plgpu.SMEM((_WGS, bq), jnp.int32), plgpu.SMEM((stages, bkv), jnp.int32)]
  bars = (
      plgpu.Barrier(num_arrivals=1 + has_seg, num_barriers=_WGS),  # q loaded
      plgpu.Barrier(num_arrivals=1 + has_seg, num_barriers=stages),  # k loaded
      plgpu.Barrier(num_barriers=stages),  # v loaded
      plgpu.Barrier(num_arrivals=_WGS, num_barriers=stages),  # k slot free
      plgpu.Barrier(num_arrivals=_WGS, num_barriers=stages),  # v slot free
      plgpu.Barrier(num_arrivals=_WGS),  # consumer ping-pong
  )
  out_type = (jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((batch, q_heads, q_len), jnp.float32))
  args = (q, k, v) + ((q_offset,) if has_off else ())
  if has_seg:
    q_ids, q_doc = fg.chunk_inputs(segment_ids, q_offset, q_len, 0)
    args += ((q_ids,) if has_off else ()) + (segment_ids, q_doc)
  grid = (q_heads, q_len // (_WGS * bq), batch)
  out, lse = _kernel(flash_forward, out_type, (tuple(smem), bars), grid, ('heads', 'q_seq', 'batch'))(*args)
  return out, lse


# ----------------------------------------------------------------------------------------------------------
# Backward.


def backward(q, k, v, segment_ids, d_out, lse, delta, *, window, blocks: fg.BlockSizes, interpret: bool = False,
             q_offset=None):
  """Returns (dq, dk, dv) in the input dtype."""
  del interpret
  _check(blocks, q.shape[3])
  dq = _backward_dq(q, k, v, segment_ids, d_out, lse, delta, window, blocks, q_offset)
  dk, dv = _backward_dkv(q, k, v, segment_ids, d_out, lse, delta, window, blocks, q_offset)
  return dq, dk, dv


def _backward_dq(q, k, v, segment_ids, d_out, lse, delta, window, blocks, q_offset):
  batch, q_len, q_heads, head_dim = q.shape
  seq_len = k.shape[1]
  groups = q_heads // k.shape[2]
  bq, bkv, stages = blocks.block_q, blocks.block_kv_dq, blocks.stages_bwd
  dtype = q.dtype
  scale = fg.LOG2E / math.sqrt(head_dim)
  has_seg = segment_ids is not None
  has_off = q_offset is not None

  def flash_dq(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
    if has_off:
      off_ref, *refs = refs
    if has_seg:
      if has_off:  # the chunk's own ids, then the sequence's
        qseg_ref, seg_ref, doc_ref, dq_ref, smem, bars = refs
      else:
        seg_ref, doc_ref, dq_ref, smem, bars = refs
        qseg_ref = seg_ref
      q_smem2, do_smem2, lse_smem2, delta_smem2, k_smem, v_smem, qseg_smem2, kseg_smem = smem
    else:
      dq_ref, smem, bars = refs
      q_smem2, do_smem2, lse_smem2, delta_smem2, k_smem, v_smem = smem
    q_bar, kv_bar, free, *sched = bars
    b, h = lax.axis_index('batch'), lax.axis_index('heads')
    wg = lax.axis_index('wg')
    pingpong = _PingPong(sched[0] if sched else None, wg)
    shift = _shift(off_ref if has_off else None)  # chunk rows -> sequence positions
    # Last query block first: later blocks see more keys (up to the window), so the light ones fill the last wave.
    q0 = (q_len // (_WGS * bq) - 1 - lax.axis_index('q_seq')) * (_WGS * bq)

    def ranges(start, rows):  # start: the first of the rows, in the chunk
      docs = _doc_pair(doc_ref, b, start, rows) if has_seg else None
      return fg.kv_ranges(shift(start), rows, bkv, window, docs)

    lo, hi, _, _ = ranges(q0, _WGS * bq)

    def slot_of(j):
      return lax.rem(j - lo, stages)

    @pl.when(wg < _WGS)
    def _consumer():
      plgpu.set_max_registers(232, action='increase')
      q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
      qw = q0 + wg * bq
      rows = pl.ds(qw, bq)
      plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem, q_bar.at[wg])
      plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem, q_bar.at[wg])
      plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem2.at[wg], q_bar.at[wg])
      plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem2.at[wg], q_bar.at[wg])
      if has_seg:
        plgpu.copy_gmem_to_smem(qseg_ref.at[b, rows], qseg_smem2.at[wg], q_bar.at[wg])
      lo_w, hi_w, f_lo, f_hi = ranges(qw, bq)
      plgpu.barrier_wait(q_bar.at[wg])
      row_layout = plgpu.Layout.WGMMA.reduce(1)
      lse_r = plgpu.load(lse_smem2.at[wg], (), layout=row_layout)
      delta_r = plgpu.load(delta_smem2.at[wg], (), layout=row_layout)
      q_seg = plgpu.load(qseg_smem2.at[wg], (), layout=row_layout) if has_seg else None

      def compute(j, dq, masked):
        slot = slot_of(j)
        plgpu.barrier_wait(kv_bar.at[slot])

        def s_dp(s_ref, dp_ref):
          plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
          plgpu.wgmma(dp_ref, do_smem, v_smem.at[slot].transpose((1, 0)))
          pingpong.issued()
          s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # P's exponentials overlap dP's wgmma
          if masked:
            row_seg = col_seg = None
            if has_seg:
              k_seg = plgpu.load(kseg_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
              row_seg, col_seg = _rows(q_seg, (bq, bkv)), _cols(k_seg, (bq, bkv))
            mask = _visible((bq, bkv), shift(qw), j * bkv, rows_are_queries=True, window=window,
                            row_seg=row_seg, col_seg=col_seg)
            s = jnp.where(mask, s, fg.MASK_VALUE)
          p = jnp.exp2(s * scale - _rows(lse_r, s.shape))
          return p, plgpu.wgmma_accumulator_load(dp_ref, wait_n=0)

        p, dp = pl.run_scoped(s_dp, plgpu.ACC((bq, bkv), jnp.float32), plgpu.ACC((bq, bkv), jnp.float32))
        ds = (p * (dp - _rows(delta_r, dp.shape))).astype(dtype)
        pingpong.done_elementwise()
        pingpong.before_second()

        def dq_update(acc_ref):
          plgpu.wgmma(acc_ref, ds, k_smem.at[slot])

        dq = pl.run_state(dq_update)(plgpu.ACC.init(dq))
        plgpu.barrier_arrive(free.at[slot])
        return dq

      def skip(j, dq):
        slot = slot_of(j)
        plgpu.barrier_wait(kv_bar.at[slot])
        plgpu.barrier_arrive(free.at[slot])
        pingpong.skip_step()
        return dq

      dq = _zeros((bq, head_dim))
      pingpong.start()
      dq = fg.fori(lo, lo_w, skip, dq)
      dq = fg.fori(lo_w, f_lo, lambda j, c: compute(j, c, True), dq)
      dq = fg.fori(f_lo, f_hi, lambda j, c: compute(j, c, False), dq)
      dq = fg.fori(f_hi, hi_w, lambda j, c: compute(j, c, True), dq)
      dq = fg.fori(hi_w, hi, skip, dq)
      pingpong.finish()
      q_smem[...] = (dq * (1 / math.sqrt(head_dim))).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, rows, h])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _WGS)
    def _producer():
      plgpu.set_max_registers(40, action='decrease')
      kv_head = lax.div(h, groups)
      n = hi - lo

      def load(t, slot, wait):
        keys = pl.ds((lo + t) * bkv, bkv)
        if wait:
          plgpu.barrier_wait(free.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kv_head], k_smem.at[slot], kv_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kv_head], v_smem.at[slot], kv_bar.at[slot])
        if has_seg:
          plgpu.copy_gmem_to_smem(seg_ref.at[b, keys], kseg_smem.at[slot], kv_bar.at[slot])

      # A short sequence has fewer key blocks than slots: never even trace a load past its end.
      for i in range(min(stages, seq_len // bkv)):
        pl.when(i < n)(lambda i=i: load(i, i, False))

      @pl.loop(0, n - stages)
      def _(t):
        load(t + stages, lax.rem(t, stages), True)

  smem = [_tiled((_WGS, bq, head_dim), dtype), _tiled((_WGS, bq, head_dim), dtype),
          plgpu.SMEM((_WGS, bq), jnp.float32), plgpu.SMEM((_WGS, bq), jnp.float32),
          _tiled((stages, bkv, head_dim), dtype), _tiled((stages, bkv, head_dim), dtype)]
  if has_seg:
    smem += [plgpu.SMEM((_WGS, bq), jnp.int32), plgpu.SMEM((stages, bkv), jnp.int32)]
  bars = (
      plgpu.Barrier(num_arrivals=4 + has_seg, num_barriers=_WGS),  # q, dO, lse, delta loaded
      plgpu.Barrier(num_arrivals=2 + has_seg, num_barriers=stages),  # k, v loaded
      plgpu.Barrier(num_arrivals=_WGS, num_barriers=stages),  # slot free
  ) + ((plgpu.Barrier(num_arrivals=_WGS),) if blocks.pingpong_bwd else ())
  args = (q, k, v, d_out, lse, delta) + ((q_offset,) if has_off else ())
  if has_seg:
    q_ids, q_doc = fg.chunk_inputs(segment_ids, q_offset, q_len, 0)
    args += ((q_ids,) if has_off else ()) + (segment_ids, q_doc)
  grid = (q_heads, q_len // (_WGS * bq), batch)
  return _kernel(flash_dq, jax.ShapeDtypeStruct(q.shape, dtype), (tuple(smem), bars), grid,
                 ('heads', 'q_seq', 'batch'))(*args)


def _backward_dkv(q, k, v, segment_ids, d_out, lse, delta, window, blocks, q_offset):
  batch, q_len, q_heads, head_dim = q.shape
  seq_len = k.shape[1]
  kv_heads = k.shape[2]
  groups = q_heads // kv_heads
  bq, bkv, stages = blocks.block_q_dkv, blocks.block_kv_dkv, blocks.stages_bwd
  num_q_blocks = q_len // bq
  dtype = q.dtype
  scale = fg.LOG2E / math.sqrt(head_dim)
  has_seg = segment_ids is not None
  has_off = q_offset is not None

  def flash_dkv(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
    if has_off:
      off_ref, *refs = refs
    if has_seg:
      if has_off:  # the chunk's own ids, then the sequence's
        qseg_ref, seg_ref, doc_ref, dk_ref, dv_ref, smem, bars = refs
      else:
        seg_ref, doc_ref, dk_ref, dv_ref, smem, bars = refs
        qseg_ref = seg_ref
      k_smem2, v_smem2, q_smem, do_smem, lse_smem, delta_smem, kseg_smem2, qseg_smem = smem
    else:
      dk_ref, dv_ref, smem, bars = refs
      k_smem2, v_smem2, q_smem, do_smem, lse_smem, delta_smem = smem
    kv_bar, q_bar, free, *sched = bars
    b, h = lax.axis_index('batch'), lax.axis_index('heads')
    wg = lax.axis_index('wg')
    pingpong = _PingPong(sched[0] if sched else None, wg)
    k0 = lax.axis_index('kv_seq') * (_WGS * bkv)
    shift = _shift(off_ref if has_off else None)  # chunk rows -> sequence positions

    def ranges(start, rows):  # query blocks of the chunk
      doc_ends = _doc_pair(doc_ref, b, start, rows) if has_seg else None
      if has_off:
        return fg.chunk_q_ranges(start, rows, bq, window, seq_len // bq, off_ref[0], num_q_blocks, doc_ends)
      return fg.q_ranges(start, rows, bq, window, num_q_blocks, doc_ends)

    lo, hi, _, _ = ranges(k0, _WGS * bkv)
    nq = hi - lo

    @pl.when(wg < _WGS)
    def _consumer():
      plgpu.set_max_registers(232, action='increase')
      k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
      kw = k0 + wg * bkv
      keys = pl.ds(kw, bkv)
      plgpu.copy_gmem_to_smem(k_ref.at[b, keys, h], k_smem, kv_bar.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[b, keys, h], v_smem, kv_bar.at[wg])
      if has_seg:
        plgpu.copy_gmem_to_smem(seg_ref.at[b, keys], kseg_smem2.at[wg], kv_bar.at[wg])
      lo_w, hi_w, f_lo, f_hi = ranges(kw, bkv)
      plgpu.barrier_wait(kv_bar.at[wg])
      col_layout = plgpu.Layout.WGMMA.reduce(0)
      k_seg = plgpu.load(kseg_smem2.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(1)) if has_seg else None
      shape = (bkv, bq)

      def compute(i, carry, base, masked):
        dk, dv = carry
        slot = lax.rem(base + i, stages)
        plgpu.barrier_wait(q_bar.at[slot])

        def st_dpt(s_ref, dp_ref):
          plgpu.wgmma(s_ref, k_smem, q_smem.at[slot].transpose((1, 0)))
          plgpu.wgmma(dp_ref, v_smem, do_smem.at[slot].transpose((1, 0)))
          pingpong.issued()
          lse_c = plgpu.load(lse_smem.at[slot], (), layout=col_layout)
          s_t = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # P's exponentials overlap dP's wgmma
          if masked:
            row_seg = col_seg = None
            if has_seg:
              q_seg = plgpu.load(qseg_smem.at[slot], (), layout=col_layout)
              row_seg, col_seg = _rows(k_seg, shape), _cols(q_seg, shape)
            mask = _visible(shape, kw, shift(i * bq), rows_are_queries=False, window=window,
                            row_seg=row_seg, col_seg=col_seg)
            s_t = jnp.where(mask, s_t, fg.MASK_VALUE)
          p_t = jnp.exp2(s_t * scale - _cols(lse_c, shape))
          return p_t, plgpu.wgmma_accumulator_load(dp_ref, wait_n=0)

        p_t, dp_t = pl.run_scoped(st_dpt, plgpu.ACC(shape, jnp.float32), plgpu.ACC(shape, jnp.float32))
        delta_c = plgpu.load(delta_smem.at[slot], (), layout=col_layout)
        ds_t = (p_t * (dp_t - _cols(delta_c, shape))).astype(dtype)
        p_t = p_t.astype(dtype)
        pingpong.done_elementwise()
        pingpong.before_second()

        def update(dk_ref, dv_ref):
          plgpu.wgmma(dv_ref, p_t, do_smem.at[slot])
          plgpu.wgmma(dk_ref, ds_t, q_smem.at[slot])

        dk, dv = pl.run_state(lambda refs: update(*refs))((plgpu.ACC.init(dk), plgpu.ACC.init(dv)))
        plgpu.barrier_arrive(free.at[slot])
        return dk, dv

      def skip(i, carry, base):
        slot = lax.rem(base + i, stages)
        plgpu.barrier_wait(q_bar.at[slot])
        plgpu.barrier_arrive(free.at[slot])
        pingpong.skip_step()
        return carry

      def head_loop(g, carry):
        base = g * nq - lo  # step index = base + query block
        carry = fg.fori(lo, lo_w, lambda i, c: skip(i, c, base), carry)
        carry = fg.fori(lo_w, f_lo, lambda i, c: compute(i, c, base, True), carry)
        carry = fg.fori(f_lo, f_hi, lambda i, c: compute(i, c, base, False), carry)
        carry = fg.fori(f_hi, hi_w, lambda i, c: compute(i, c, base, True), carry)
        return fg.fori(hi_w, hi, lambda i, c: skip(i, c, base), carry)

      zeros = _zeros((bkv, head_dim))
      pingpong.start()
      dk, dv = fg.fori(0, groups, head_loop, (zeros, zeros))
      pingpong.finish()
      k_smem[...] = (dk * (1 / math.sqrt(head_dim))).astype(dtype)
      v_smem[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[b, keys, h], commit_group=False)
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[b, keys, h], commit_group=False)
      plgpu.commit_smem_to_gmem_group()
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _WGS)
    def _producer():
      plgpu.set_max_registers(40, action='decrease')
      total = groups * nq

      def load(t, slot, wait):
        g = lax.div(t, nq)
        head = h * groups + g
        rows = pl.ds((lo + t - g * nq) * bq, bq)
        if wait:
          plgpu.barrier_wait(free.at[slot])
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, head], q_smem.at[slot], q_bar.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[b, rows, head], do_smem.at[slot], q_bar.at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[b, head, rows], lse_smem.at[slot], q_bar.at[slot])
        plgpu.copy_gmem_to_smem(delta_ref.at[b, head, rows], delta_smem.at[slot], q_bar.at[slot])
        if has_seg:
          plgpu.copy_gmem_to_smem(qseg_ref.at[b, rows], qseg_smem.at[slot], q_bar.at[slot])

      for i in range(stages):
        pl.when(i < total)(lambda i=i: load(i, i, False))

      @pl.loop(0, total - stages)
      def _(t):
        load(t + stages, lax.rem(t, stages), True)

  smem = [_tiled((_WGS, bkv, head_dim), dtype), _tiled((_WGS, bkv, head_dim), dtype),
          _tiled((stages, bq, head_dim), dtype), _tiled((stages, bq, head_dim), dtype),
          plgpu.SMEM((stages, bq), jnp.float32), plgpu.SMEM((stages, bq), jnp.float32)]
  if has_seg:
    smem += [plgpu.SMEM((_WGS, bkv), jnp.int32), plgpu.SMEM((stages, bq), jnp.int32)]
  bars = (
      plgpu.Barrier(num_arrivals=2 + has_seg, num_barriers=_WGS),  # k, v loaded
      plgpu.Barrier(num_arrivals=4 + has_seg, num_barriers=stages),  # q, dO, lse, delta loaded
      plgpu.Barrier(num_arrivals=_WGS, num_barriers=stages),  # slot free
  ) + ((plgpu.Barrier(num_arrivals=_WGS),) if blocks.pingpong_bwd else ())
  args = (q, k, v, d_out, lse, delta) + ((q_offset,) if has_off else ())
  if has_seg:
    q_ids, _ = fg.chunk_inputs(segment_ids, q_offset, q_len, 1)
    args += ((q_ids,) if has_off else ()) + (segment_ids, fg.document_bounds(segment_ids)[1])
  out_type = (jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype))
  grid = (kv_heads, seq_len // (_WGS * bkv), batch)
  return _kernel(flash_dkv, out_type, (tuple(smem), bars), grid, ('heads', 'kv_seq', 'batch'))(*args)
