"""Is a point's extrapolated learning rate right? A point of experiments/isoflop_gpu.py at 1/2, 1, 2 and 4x its rate.

    python -m qwenjax.sweep --sweep=experiments/isoflop_gpu_lrcheck.py --workdir=DIR              # C3e16-s20
    python -m qwenjax.sweep --sweep=experiments/isoflop_gpu_lrcheck.py:C3e15-s5 --workdir=DIR     # another point
    WORKERS=1 bash experiments/gpu_piece.sh isoflop_gpu_lrcheck:C1e16-s15 SECONDS   # a device call's piece

The study's lr stage measures the best rate at four sizes (N 1.8M-11.6M, at their own batches); every other point
takes lr = k N^gamma fitted through them, clipped to the grid, times the square root of its batch over its size's
lr-stage batch where it trains at fewer rows. The points furthest from what was measured are the ends of the
ladder: size 20 (55.9M, 5x the largest size measured, 40 rows where its size's lr-stage point would take 256) and
sizes 4-5 (their rate clipped at the grid's top, trained 10-30k steps). A wrong rate there tilts the IsoFLOP
curves at their ends, and so the fitted exponents. (Under the study's first batches, C3e15-s5 trained at 64 rows
and 8e-3; this check found 4e-3 0.19 nats better: results/isoflop_gpu/README.md.)

This file trains the named point (default C3e16-s20) exactly as the study plans it (shape, batch, steps, warmup,
corpus, evaluation), at the rate the study gives it (from the committed results/isoflop_gpu/lr.json) and at half,
twice and four times that, as one group (`group_size`: one vmapped step). The rate is right if it is the best or
within the study's noise of the best (twice and four times: the finished study's large models lie above its
IsoFLOP parabolas, as a rate set too low would leave them); its loss is also a rerun of the study's own point
(the study's `--check` reads it the same way: within 0.02). Run it under the study's pinned code, as the study's
pieces.
"""

import json
import os

import ml_collections

from qwenjax import config
from qwenjax import sweep as sweep_lib

HERE = os.path.dirname(os.path.abspath(__file__))
MULTIPLIERS = (0.5, 1.0, 2.0, 4.0)  # of the study's rate for the point


def study():
  """experiments/isoflop_gpu.py's sweep."""
  return config.load(os.path.join(HERE, 'isoflop_gpu.py'))


def studied_rate(name: str) -> tuple[float, int, float]:
  """(budget, size, rate) of the study's point `name`, its rate chosen by the committed lr stage."""
  with open(os.path.join(HERE, 'results', 'isoflop_gpu', 'lr.json')) as f:
    rates = {int(size): float(lr) for size, lr in json.load(f)['lr'].items()}
  points = {p.name: p for p in sweep_lib.plan(study(), '/tmp/isoflop_gpu_lrcheck_plan', lrs=rates)}
  if name not in points or points[name].stage != 'isoflop':
    raise ValueError(f'{name} is not an IsoFLOP point of experiments/isoflop_gpu.py; name one such as C3e16-s20')
  return points[name].budget, points[name].size, points[name].lr


def get_config(name: str = 'C3e16-s20'):
  sweep = study()
  budget, size, rate = studied_rate(name or 'C3e16-s20')
  sweep.budgets = (budget,)
  sweep.budget_sizes = ((budget, (size,)),)
  sweep.lr_sweep = {}
  sweep.lr_batch_exponent = 0.0  # the rates below are the point's own, at its batch
  rates = tuple(float(f'{rate * m:.3g}') for m in MULTIPLIERS)
  sweep.axes = ml_collections.ConfigDict(dict(train=dict(lr=rates)))
  sweep.group_size = len(rates)  # one vmapped step for all of them
  return sweep
