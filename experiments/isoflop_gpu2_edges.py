"""A further rate for each point of the second GPU study whose best rate was the lowest or highest of its grid.

    python -m qwenjax.sweep --sweep=experiments/isoflop_gpu2_edges.py:0.25 --workdir=DIR  # or :4; then :0.125, :8
    bash experiments/gpu_piece.sh isoflop_gpu2_edges:0.25 555                          # a 600-s device call's piece
    python -m qwenjax.scaling fit experiments/results/isoflop_gpu2 experiments/results/isoflop_gpu2_edges/*

experiments/isoflop_gpu2.py trains every point at 1/2, 1 and 2x one rule's rate, lr = 187 N^-0.744. The best rate
moves with the run's length as well as with N: in its first 30 runs the small, data-rich points (10-33k steps)
were best at 1/2x and C1e16-s15 (4k steps) at 2x (results/isoflop_gpu2). A best rate at the grid's end may not
be the best rate, and the quality bar fails it (`rates_inside`).

This file trains, at FACTOR times the rule's rate, every point of the study whose best rate so far (over
results/isoflop_gpu2 and the rounds of this file committed under results/isoflop_gpu2_edges/FACTOR/) is at its
grid's end, and for which FACTOR is the next rate out: half the lowest rate tried, or twice the highest. The
point is otherwise the study's own (shape, batch, steps, warmup, corpus): run it under the study's pinned code.
A point still best at the new end is picked up by the next round (:0.125 after :0.25). The fit reads the study
and its rounds together (`fit DIR [DIR ...]`), each point at its best rate.
"""

import glob
import math
import os

from qwenjax import config
from qwenjax import scaling

HERE = os.path.dirname(os.path.abspath(__file__))
STUDY = os.path.join(HERE, 'results', 'isoflop_gpu2')
ROUNDS = os.path.join(HERE, 'results', 'isoflop_gpu2_edges')


def factor(name: str) -> float:
  """The rate factor of a study point's name (C1e16-s15-lrx2: 2.0)."""
  return float(name.rsplit('-lrx', 1)[1])


def next_rates(directories: list[str]) -> dict[str, tuple[float, int, float]]:
  """{point: (budget, size, the factor to try next)} for the points of `directories`' results whose best rate is
  the lowest or highest they were trained at (`scaling.rates_at_edge`); point names drop the -lrx suffix."""
  results = [r for d in directories for r in scaling.read_results(d)]
  by_name = {r['name']: r for r in results}
  out = {}
  for edge in scaling.rates_at_edge(results):  # the best rate is the lowest or the highest tried
    point, best = edge['name'].rsplit('-lrx', 1)[0], factor(edge['name'])
    out[point] = (by_name[edge['name']]['budget'], int(point.rsplit('-s', 1)[1]),
                  best / 2 if edge['lr'] == min(edge['tried']) else best * 2)
  return out


def directories() -> list[str]:
  """The study's directory and those of the rounds committed so far."""
  return [STUDY] + sorted(os.path.dirname(p) for p in glob.glob(os.path.join(ROUNDS, '*', 'results.jsonl')))


def get_config(rate_factor: str = ''):
  try:
    wanted = float(rate_factor)
  except ValueError:
    raise ValueError(f'isoflop_gpu2_edges.py takes the rate factor to train, e.g. '
                     f'--sweep=experiments/isoflop_gpu2_edges.py:0.25; got {rate_factor!r}') from None
  edges = next_rates(directories())
  points = {p: (b, s) for p, (b, s, f) in edges.items() if math.isclose(f, wanted, rel_tol=1e-9)}
  if not points:
    needed = ', '.join(f'{f:g} ({p})' for p, (_, _, f) in sorted(edges.items())) or 'none'
    raise ValueError(f'no point of the study needs the rate factor {wanted:g}; the points at their grid\'s end need: '
                     f'{needed}')
  sweep = config.load(os.path.join(HERE, 'isoflop_gpu2.py'))
  budgets = sorted({b for b, _ in points.values()})
  sweep.budgets = tuple(budgets)
  sweep.budget_sizes = tuple((b, tuple(sorted(s for bb, s in points.values() if bb == b))) for b in budgets)
  sweep.lr_factors = (wanted,)
  return sweep
