"""Timing, error and input helpers shared by the GPU benchmark scripts (which import it from this folder)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import numpy as np


def median_seconds(fn: Callable, *args, warmup: int = 2, iters: int = 10, calls: int = 1) -> tuple[float, Any]:
  """(median seconds per call, the first call's output): `warmup` untimed calls first (the first compiles).

  Each of the `iters` samples times `calls` calls issued back to back with one wait at the end, divided by
  `calls`. With `calls=1` a sample also holds the dispatch and the launch of a call on an idle GPU, which adds
  time and spread to short kernels; comparisons of kernels use more calls, as a training loop runs them
  (docs/performance.md)."""
  out = jax.block_until_ready(fn(*args))
  for _ in range(warmup - 1):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    for _ in range(calls):
      result = fn(*args)
    jax.block_until_ready(result)
    times.append((time.perf_counter() - start) / calls)
  return statistics.median(times), out


def rel_err(a, b) -> float:
  """||a - b|| / ||b||, in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def packed_batches(path: str, rows: int, seq_len: int) -> list[dict[str, np.ndarray]]:
  """Every whole batch of `rows` rows of packed documents in a `data_throughput.py --save` file (inputs,
  targets, positions, segment_ids, weights), so that qwenjax and the peer step on the same batches, in order."""
  with np.load(path) as f:
    arrays = {key: f[key] for key in f.files}
  if arrays['inputs'].shape[1] != seq_len:
    raise SystemExit(f'{path} has rows of {arrays["inputs"].shape[1]} tokens, not the config\'s {seq_len}')
  count = arrays['inputs'].shape[0] // rows
  if count < 2:
    raise SystemExit(f'{path} holds {arrays["inputs"].shape[0]} rows, less than two batches of {rows}: save '
                     f'more with data_throughput.py --batches')
  return [{key: x[i * rows:(i + 1) * rows] for key, x in arrays.items()} for i in range(count)]
