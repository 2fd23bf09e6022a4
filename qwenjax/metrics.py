"""Training metrics: model FLOPs and MFU, and where numbers are written (metrics.jsonl, TensorBoard, the log).
"""

from __future__ import annotations

import functools
import json
import numbers
import os
import tempfile
from typing import Any, Mapping

from absl import logging
from etils import epath
import jax
import numpy as np

from qwenjax import files
from qwenjax.kernels import attention_contract
from qwenjax.model_config import ModelConfig
from qwenjax.params import count_params

# Dense bf16 peak FLOP/s per device, from the vendors' datasheets (no sparsity).
PEAK_FLOPS = {
    'H100': 989e12,  # SXM; 'NVIDIA H100 80GB HBM3'
    'H200': 989e12,
    'A100': 312e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,  # v5e
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v5': 459e12,
    'TPU v6 lite': 918e12,  # v6e (Trillium)
    'TPU v6e': 918e12,
}


@functools.lru_cache(maxsize=64)
def _weight_params(config: ModelConfig) -> int:
  """N of `6 * N`: every weight a token multiplies (see `flops_per_token`); counted once per shape (it traces the
  model's init)."""
  params = count_params(config)
  if not config.tie_word_embeddings:
    params -= config.vocab_size * config.hidden_size  # the input embedding is a lookup
  # Qwen2-MoE: a token multiplies only its top-k routed experts (router and shared expert count in full).
  moe_layers = sum(config.is_moe(i) for i in range(config.num_hidden_layers))
  idle_experts = config.num_experts - config.num_experts_per_tok if config.num_experts else 0
  return params - moe_layers * idle_experts * 3 * config.hidden_size * config.moe_intermediate_size


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Training FLOPs (forward + backward) per token of a `seq_len`-token row, as MFU counts them.

  `6 * N` for every weight a token multiplies: all parameters except the embedding lookup (a gather, no
  FLOPs); with tied embeddings the table is counted once, as the LM head; in MoE layers only the
  `num_experts_per_tok` experts a token is routed to. Plus attention's two matmuls
  (scores and weighted values), `2 * 2 * heads * head_dim` FLOPs per (query, visible key) pair forward and
  3x that for forward + backward, counting only the keys a query sees: causal (position i sees i + 1 keys)
  and capped by the sliding window on the layers that use one. Recomputation (remat) is not counted. A row of
  packed documents does less attention work than one document: `batch_flops` counts that.
  """
  attention = 0.0
  for window in _layer_windows(config):
    visible = attention_contract.band_pairs(seq_len, window) / seq_len  # keys a query sees, on average
    attention += 12 * config.num_attention_heads * config.head_dim * visible
  return 6 * _weight_params(config) + attention


def _layer_windows(config: ModelConfig) -> list[int | None]:
  """Each layer's sliding window, None for full attention."""
  return [config.sliding_window if config.is_sliding(i) else None for i in range(config.num_hidden_layers)]


def batch_flops(config: ModelConfig, segment_ids: np.ndarray) -> float:
  """Training FLOPs of a batch of rows of packed documents, as `flops_per_token` counts them, but with each
  document's own causal band: its queries see only its keys, and the attention kernels skip the rest. So MFU
  stays the share of the peak the device did useful work at, whatever the documents' lengths (with
  `flops_per_token(seq_len)` a row of many short documents would count work never done, and pass 100%)."""
  lengths = attention_contract.document_lengths(segment_ids)
  pairs = sum(attention_contract.documents_band_pairs(lengths, window) for window in _layer_windows(config))
  return 6 * _weight_params(config) * int(lengths.sum()) + 12 * config.num_attention_heads * config.head_dim * pairs


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of a device named `device_kind` (jax's `device_kind`, or torch's device name) from
  `PEAK_FLOPS`, or None for unknown kinds (e.g. CPUs)."""
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):  # 'TPU v5 lite' before 'TPU v5'
    if name.lower() in device_kind.lower():
      return PEAK_FLOPS[name]
  return None


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  """`peak_flops` of a jax device (the first one by default)."""
  return peak_flops((device or jax.devices()[0]).device_kind)


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s' if m else f'{s}s'


def progress_line(step: int, steps: int, metrics: Mapping[str, float], eta_seconds: float | None) -> str:
  """One human-readable line: step, loss (and an MoE model's router losses), lr, grad norm, throughput, MFU, ETA."""
  parts = [f'step {step}/{steps}', f'loss {metrics["loss"]:.4f}']
  if 'moe_load_balancing_loss' in metrics:  # MoE models only; dense models log moe_aux_loss = 0 alone
    parts.append(f'load_balancing {metrics["moe_load_balancing_loss"]:.4f}')
    parts.append(f'router_z {metrics["moe_router_z_loss"]:.4f}')
  if 'rewards/accuracies' in metrics:  # DPO (qwenjax.dpo)
    parts.append(f'rewards/accuracies {metrics["rewards/accuracies"]:.3f}')
    parts.append(f'rewards/margins {metrics["rewards/margins"]:.4f}')
  if 'lr' in metrics:
    parts.append(f'lr {metrics["lr"]:.2e}')
  if 'grad_norm' in metrics:
    parts.append(f'grad_norm {metrics["grad_norm"]:.3f}')
  if 'tokens_per_sec' in metrics:
    parts.append(f'{metrics["tokens_per_sec"]:,.0f} tok/s')
  if 'step_time' in metrics:
    parts.append(f'{metrics["step_time"]:.3f} s/step')
  if 'mfu' in metrics:
    parts.append(f'MFU {100 * metrics["mfu"]:.1f}%')
  if eta_seconds is not None:
    parts.append(f'ETA {format_duration(eta_seconds)}')
  return ' | '.join(parts)


class MetricWriter:
  """Appends `{'step': n, ...}` lines to `workdir/metrics.jsonl` and scalars to TensorBoard event files.

  Only process 0 writes. A run resumed at step `resume_step` replays the steps after it, which a run that stopped
  before checkpointing them may have logged already: it first drops their lines from metrics.jsonl, and its event
  file starts with TensorBoard's purge marker (a SessionLog START at `resume_step + 1`), so neither shows a step
  twice. A run that starts from step 0 over an earlier run's lines moves them to metrics.<n>.jsonl. Lines are
  strict JSON (a NaN loss is null). The event file is opened at the first write: a run with nothing to train writes
  none. The workdir may be a URL (gs://...): metrics.jsonl then goes through epath, rewritten whole at each write
  (`files.write`), and TensorBoard files are written locally and copied there at the end.
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    self._active = jax.process_index() == 0
    if not self._active:
      return
    self._path = epath.Path(workdir) / 'metrics.jsonl'
    self._local = '://' not in str(workdir)
    self._lines = self._earlier_lines(resume_step)
    self._jsonl = None
    self._tb = None
    self._tb_dir = None
    self._workdir = workdir
    self._resume_step = resume_step

  def _earlier_lines(self, resume_step: int) -> list[str]:
    """The lines of metrics.jsonl that stay: those up to `resume_step`. Lines that are not records are kept (with a
    warning), and a line cut short by a kill is dropped. A run starting from step 0 over an earlier run's lines
    (its checkpoints deleted, or a restart asked for) moves the old file aside, never drops it."""
    text = self._path.read_text() if self._path.exists() else ''
    lines = text.splitlines(keepends=True)
    kept, later = [], 0
    for number, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:
        value = files.record(line, f'{self._path} line {number}', {'step': numbers.Real})
      except json.JSONDecodeError:  # a line cut short by a kill: dropped
        continue
      if value is not None and value['step'] > resume_step:
        later += 1
      else:
        kept.append(line if line.endswith('\n') else line + '\n')
    if resume_step == 0 and later:
      aside, n = self._path.parent / 'metrics.1.jsonl', 1
      while aside.exists():
        n += 1
        aside = self._path.parent / f'metrics.{n}.jsonl'
      logging.warning('%s holds %d line(s) of an earlier run, but this run starts from step 0 (no checkpoint to '
                      'resume from): they are moved to %s', self._path, later, aside.name)
      self._path.rename(aside)
      return []
    if ''.join(kept) != text:
      files.write(self._path, ''.join(kept))
    return kept

  def _open(self) -> None:
    import tensorboardX  # pylint: disable=g-import-not-at-top  (only the process that writes needs it)
    if self._local:
      self._jsonl = open(self._path, 'a')
    self._tb_dir = self._workdir if self._local else tempfile.mkdtemp(prefix='qwenjax-tensorboard-')
    self._tb = tensorboardX.SummaryWriter(logdir=self._tb_dir, flush_secs=30, purge_step=self._resume_step + 1)

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    if not self._active:
      return
    if self._tb is None:
      self._open()
    values = {k: float(v) for k, v in values.items()}
    line = files.dumps({'step': int(step), **values}) + '\n'  # strict JSON: a NaN loss is null
    if self._jsonl is not None:
      self._jsonl.write(line)
      self._jsonl.flush()
    else:
      self._lines.append(line)
      files.write(self._path, ''.join(self._lines))
    for name, value in values.items():
      self._tb.add_scalar(name, value, int(step))

  def close(self) -> None:
    if not self._active or self._tb is None:
      return
    if self._jsonl is not None:
      self._jsonl.close()
    self._tb.close()
    if not self._local:
      for name in os.listdir(self._tb_dir):
        epath.Path(self._tb_dir, name).copy(epath.Path(self._workdir) / name, overwrite=True)

