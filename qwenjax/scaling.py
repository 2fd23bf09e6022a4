r"""Scaling-law fits of a sweep's results, with plots: `python -m qwenjax.scaling fit DIR [DIR ...]`.

Reads `DIR/results.jsonl` (one JSON object per finished point, written by `qwenjax.sweep`; with more directories,
theirs too, e.g. a follow-up sweep's further rates) and writes `DIR/fit.json` and PNG plots into `DIR`. N is the
parameter count the sweep's `counting` names (`params`: with the output head and without the input embedding by
default, as Porian et al. 2024 count it; Kaplan et al.'s non-embedding count for `counting='kaplan'`), D the
tokens trained on (`tokens`), C the compute budget of an IsoFLOP point (`budget`), L the final eval loss
(`eval_loss`). The points of a sweep's learning-rate stage (`stage` 'lr') are left out: they only chose the
others' learning rates.

* Approach 2 (Hoffmann et al. 2022): for each IsoFLOP budget a parabola in log N through the losses; its
  vertex is N_opt(C) (and a parabola in log D gives D_opt(C)); then power laws N_opt = k_N C^a and
  D_opt = k_D C^b by least squares in log-log.
* Approach 3: L(N, D) = E + A / N^alpha + B / D^beta, fitted as Hoffmann et al. did and as Besiroglu et al.
  (2024) repeated it: the Huber loss (delta 1e-3) between log L and its prediction
  LSE(a - alpha log N, b - beta log D, e), with A = e^a, B = e^b, E = e^e, minimized by L-BFGS from the best
  starts of a grid. Its compute-optimal N grows as C^(beta / (alpha + beta)) (`a`), D as C^(alpha / (alpha +
  beta)) (`b`), under C = 6 N D.
* Bootstrap: every key of both approaches gets a 95% percentile interval from refits on points resampled with
  replacement (within each budget, so every budget keeps its number of points).
* Quality (`quality` in fit.json, `quality()`): whether the fit can be trusted, criterion by criterion: approach
  2's a known to within a 95% interval no wider than 0.2, a + b within 0.05 of 1, approaches 2 and 3 within 0.1 on
  a, no approach-3 parameter on its search bound, every budget's minimum inside the sizes it tried and bracketed by
  them (a size on each side measured a higher loss), every point trained by one code version.
* Shift (`exponent_shift`): an ablation's approach-2 a against its study's, both fitted on the budgets they
  share, with a bootstrap interval for the difference.

`python -m qwenjax.scaling plot DIR1 DIR2 ... --out=FILE.png` puts several sweeps on one figure: loss against
compute by default, or against any result field with `--x=lr --group=width` (a learning-rate sweep across
widths, one panel per sweep).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

from absl import flags
import numpy as np

from qwenjax import cli
from qwenjax import files

# scipy's L-BFGS-B calls BLAS on 5-vectors; OpenBLAS threads then cost 50x the work on a busy machine (2 s
# instead of 0.05 s a fit). Read when scipy's BLAS loads, so only if nothing imported scipy.optimize before.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')
from scipy import optimize  # pylint: disable=g-import-not-at-top,g-bad-import-order

HUBER_DELTA = 1e-3
# Hoffmann et al.'s grid of starting points for approach 3 (a, b, e are the logs of A, B, E).
START_GRID = dict(a=(0.0, 5.0, 10.0, 15.0, 20.0, 25.0), b=(0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
                  e=(-1.0, -0.5, 0.0, 0.5, 1.0), alpha=(0.0, 0.5, 1.0, 1.5, 2.0), beta=(0.0, 0.5, 1.0, 1.5, 2.0))
# Approach 3's search box. Exponents >= 0: a loss that grows with N or D is no scaling law (and has no
# compute-optimal point); <= 3, beyond any fitted language-model law (Hoffmann et al.'s grid spans 0-2). log A, log
# B and log E in [-20, 60]: wide for any sweep (a term below e^-20 contributes nothing), yet finite, so that points
# which cannot determine a parameter end the search at a bound (reported under `at_bounds`) instead of sending it
# past float range. In the order of theta, the vector L-BFGS searches.
BOUNDS = dict(log_A=(-20.0, 60.0), log_B=(-20.0, 60.0), log_E=(-20.0, 60.0), alpha=(0.0, 3.0), beta=(0.0, 3.0))
APPROACH2_KEYS = ('a', 'b', 'k_N', 'k_D')
APPROACH3_KEYS = ('E', 'A', 'B', 'alpha', 'beta', 'a', 'b')


def read_results(directory: str) -> list[dict[str, Any]]:
  """The finished points of a sweep (`DIR/results.jsonl`); a later line for the same name wins. A line that is not
  a point's record (no `name`) is left out with a warning."""
  path = os.path.join(directory, 'results.jsonl')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: give the --workdir of a sweep run with python -m qwenjax.sweep')
  by_name = {}
  for record in read_jsonl(path, required={'name': str}):
    by_name[record['name']] = record
  return list(by_name.values())


def read_jsonl(path: str, required: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
  """The records of a .jsonl file that runs append to (a local path or a gs:// URL), each a JSON object with the
  `required` keys and types (`files.read_records`: other lines are left out with a warning naming them)."""
  return files.read_records(path, required or {})


LR_STAGE = 'learning-rate stage: it chose the other points\' rates'  # why its points are left out of the fits


def usable_points(results: Sequence[Mapping[str, Any]], rate_loss: str = 'best'
                  ) -> tuple[list[Mapping[str, Any]], list[dict[str, str]]]:
  """(points with a finite, positive eval loss, [{name, reason}] of the others): diverged points, points
  without eval data, the points of a learning-rate stage, and the worse rates of a point trained at several
  (`best_rates`, with `rate_loss`). The fits and plots use the first; fit.json lists the second under
  `excluded`."""
  kept, excluded = [], []
  for r in results:
    loss = r.get('eval_loss')
    if r.get('stage') == 'lr':
      excluded.append(dict(name=r.get('name'), reason=LR_STAGE))
    elif r.get('diverged'):
      excluded.append(dict(name=r.get('name'), reason=f'diverged: {r.get("error", "a non-finite loss")}'))
    elif loss is None:
      excluded.append(dict(name=r.get('name'), reason='no eval_loss (no eval data?)'))
    elif not _positive(loss):
      excluded.append(dict(name=r.get('name'), reason=f'eval_loss {loss!r} is not a positive finite number'))
    elif not (_positive(r.get('params')) and _positive(r.get('tokens'))):
      excluded.append(dict(name=r.get('name'), reason=f'params {r.get("params")!r} and tokens {r.get("tokens")!r} '
                                                      'must be positive finite numbers'))
    else:
      kept.append(r)
  return best_rates(kept, excluded, rate_loss)


def _rate_sweeps(points: Sequence[Mapping[str, Any]], loss: Callable[[Mapping[str, Any]], float]
                 ) -> list[dict[float, tuple[float, list[Mapping[str, Any]]]]]:
  """Per point (one budget, N and D) trained at two recorded rates or more: {lr: (mean `loss`, its records)}."""
  same = {}
  for r in points:
    same.setdefault((r.get('budget'), r['params'], r['tokens']), {}).setdefault(r.get('lr'), []).append(r)
  return [{lr: (float(np.mean([loss(r) for r in rs])), rs) for lr, rs in rates.items()}
          for rates in same.values() if len(rates) >= 2 and None not in rates]


def rate_vertex(lrs: Sequence[float], losses: Sequence[float | None]) -> tuple[float, float, bool]:
  """(the best learning rate of a grid, the loss there, whether it is at the grid's edge). Between two others,
  the vertex of the parabola in log lr through the lowest loss and its neighbours, and the parabola's loss
  there; at the edge (or next to a diverged rate), the lowest loss measured. A diverged rate (None, NaN) counts
  as worse than any."""
  order = np.argsort(lrs)
  grid = np.asarray(lrs, float)[order]
  x = np.log(grid)
  y = np.array([v if v is not None and math.isfinite(v) else math.inf for v in np.asarray(losses, object)[order]])
  if not np.isfinite(y).any():
    raise ValueError(f'every learning rate of {sorted(lrs)} diverged or has no eval loss: lower the rates')
  i = int(np.argmin(y))
  if i == 0 or i == len(y) - 1 or not np.isfinite(y[i - 1:i + 2]).all():
    return float(grid[i]), float(y[i]), i in (0, len(y) - 1)
  c2, c1, c0 = np.polyfit(x[i - 1:i + 2], y[i - 1:i + 2], 2)
  if c2 <= 0:
    return float(grid[i]), float(y[i]), False
  vertex = float(np.clip(-c1 / (2 * c2), x[i - 1], x[i + 1]))
  return float(np.exp(vertex)), float(min(y[i], c2 * vertex**2 + c1 * vertex + c0)), False


RATE_LOSSES = ('best', 'parabola')


def best_rates(points: Sequence[Mapping[str, Any]], excluded: list[dict[str, str]], rate_loss: str = 'best'
               ) -> tuple[list[Mapping[str, Any]], list[dict[str, str]]]:
  """A point (one budget, N and D) trained at several learning rates (`lr`) is a point tuned by a rate sweep: it
  counts at the rate with the lowest mean eval loss (every point at that rate: repeats of other seeds stay), and
  its other rates go to `excluded`, naming the rate that won.

  `rate_loss='parabola'` counts it at the loss of `rate_vertex` instead, where the best rate has a neighbour on
  each side: a grid of factor-2 rates misses the best rate by up to a factor of 1.4, a loss that varies from point
  to point like noise. Its records at the best rate then carry that loss as `eval_loss` (their own, minus the
  mean's distance to the vertex), the measured one as `eval_loss_measured` and the vertex's rate as `lr_vertex`."""
  if rate_loss not in RATE_LOSSES:
    raise ValueError(f'rate_loss={rate_loss!r}: use one of {", ".join(RATE_LOSSES)}')
  worse, vertices = {}, {}
  for rates in _rate_sweeps(points, lambda r: r['eval_loss']):
    best = min(rates, key=lambda lr: rates[lr][0])
    for lr, (mean, rs) in rates.items():
      for r in rs if lr != best else ():
        worse[id(r)] = (f'another rate of the same point did better: lr {best:.3g} (eval loss {rates[best][0]:.4f}) '
                        f'against {lr:.3g} ({mean:.4f})')
    if rate_loss == 'parabola':
      lr, loss, _ = rate_vertex(list(rates), [mean for mean, _ in rates.values()])
      for r in rates[best][1]:
        vertices[id(r)] = dict(eval_loss=r['eval_loss'] + loss - rates[best][0], eval_loss_measured=r['eval_loss'],
                               lr_vertex=lr)
  excluded.extend(dict(name=r.get('name'), reason=worse[id(r)]) for r in points if id(r) in worse)
  return [dict(r, **vertices[id(r)]) if id(r) in vertices else r for r in points if id(r) not in worse], excluded


def _at_vertex(point: Mapping[str, Any]) -> bool:
  """Whether `best_rates` (rate_loss='parabola') moved this point's loss from its measured one to its vertex's."""
  return point.get('eval_loss_measured', point['eval_loss']) != point['eval_loss']


def rates_at_edge(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Points tuned by a rate sweep (three rates or more of one budget, N and D) whose best rate is the lowest or
  highest tried: the sweep did not bracket it, so a better rate may lie beyond. A diverged rate counts as tried
  and worst. [{name, lr, tried}], the best rate's point named."""
  tuned = [r for r in results if r.get('stage') != 'lr' and r.get('lr') is not None
           and _positive(r.get('params')) and _positive(r.get('tokens'))]
  out = []
  for rates in _rate_sweeps(tuned, lambda r: r['eval_loss'] if _positive(r.get('eval_loss')) else math.inf):
    best = min(rates, key=lambda lr: rates[lr][0])
    if len(rates) >= 3 and math.isfinite(rates[best][0]) and best in (min(rates), max(rates)):
      out.append(dict(name=rates[best][1][0].get('name'), lr=best, tried=sorted(rates)))
  return out


def _positive(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


# ---------------------------------------------------------------------------------------------------------
# Approach 2: IsoFLOP parabolas.

@dataclasses.dataclass
class Parabola:
  """loss = c2 x^2 + c1 x + c0 with x = ln(N) (or ln(D)); the vertex is the optimum when c2 > 0."""
  c2: float
  c1: float
  c0: float

  @property
  def has_minimum(self) -> bool:
    return self.c2 > 0

  @property
  def argmin(self) -> float:
    return float(np.exp(-self.c1 / (2 * self.c2)))

  @property
  def min_loss(self) -> float:
    return float(self.c0 - self.c1**2 / (4 * self.c2))

  def __call__(self, value):
    x = np.log(value)
    return self.c2 * x * x + self.c1 * x + self.c0


def fit_parabola(values: np.ndarray, losses: np.ndarray) -> Parabola:
  c2, c1, c0 = np.polyfit(np.log(values), losses, 2)
  return Parabola(float(c2), float(c1), float(c0))


def _power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
  """(exponent, coefficient) of y = coefficient * x^exponent, least squares in log-log."""
  slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
  return float(slope), float(np.exp(intercept))


def isoflop_minima(budgets: np.ndarray, params: np.ndarray, tokens: np.ndarray,
                   losses: np.ndarray) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """(minima, skipped): per budget, the vertices of the parabolas in log N and log D through its losses, with the
  range of N it tried (`N_range`), whether the vertex lies inside it (`inside`: else it is extrapolated) and
  whether a size on each side measured a higher loss than the best (`bracketed`: else the lowest loss is at the
  smallest or largest size, and the vertex leans on the parabola's shape, not on points past it); or,
  under `skipped`, why a budget has none: fewer than 3 distinct sizes or token counts, or a parabola that opens
  downward (the optimum is outside the sizes tried)."""
  minima, skipped = [], []
  for budget in np.unique(budgets):
    at = budgets == budget
    sizes = len(np.unique(params[at]))
    if sizes < 3:  # (bootstrap resamples repeat points: a parabola through 2 distinct sizes is arbitrary)
      skipped.append(dict(budget=float(budget), reason=f'{sizes} distinct size(s); a parabola needs 3'))
      continue
    lengths = len(np.unique(tokens[at]))
    if lengths < 3:  # short runs round D to whole steps: two sizes can train on the same number of tokens
      skipped.append(dict(budget=float(budget), reason=f'{lengths} distinct token count(s); a parabola needs 3'))
      continue
    by_n, by_d = fit_parabola(params[at], losses[at]), fit_parabola(tokens[at], losses[at])
    if not (by_n.has_minimum and by_d.has_minimum):
      skipped.append(dict(budget=float(budget), reason='the parabola has no minimum (opens downward)'))
      continue
    low, high = float(params[at].min()), float(params[at].max())
    sizes_tried = np.unique(params[at])  # repeats of a size count by their mean loss
    best = int(np.argmin([losses[at][params[at] == n].mean() for n in sizes_tried]))
    minima.append(dict(budget=float(budget), N_opt=by_n.argmin, D_opt=by_d.argmin, loss_opt=by_n.min_loss,
                       parabola_N=dataclasses.asdict(by_n), parabola_D=dataclasses.asdict(by_d),
                       points=int(at.sum()), N_range=[low, high], inside=bool(low <= by_n.argmin <= high),
                       bracketed=0 < best < len(sizes_tried) - 1,
                       residual_ss=float(np.sum((losses[at] - by_n(params[at])) ** 2)), dof=int(at.sum()) - 3))
  return minima, skipped


def scatter(minima: Sequence[Mapping[str, Any]]) -> float | None:
  """How far the losses lie from their budgets' parabolas in log N: the root of the residual sum of squares over
  the degrees of freedom left (points - 3 a budget), pooled over budgets; None with none left. Run-to-run noise
  plus any bend a parabola misses: an upper bound on the noise, the figure a design-power simulation needs."""
  dof = sum(m['dof'] for m in minima)
  return float(np.sqrt(sum(m['residual_ss'] for m in minima) / dof)) if dof > 0 else None


def approach2(budgets: np.ndarray, params: np.ndarray, tokens: np.ndarray, losses: np.ndarray) -> dict[str, Any]:
  """Per-budget parabolas in log N and log D (`isoflop_minima`), and power laws N_opt = k_N C^a, D_opt = k_D C^b.

  Budgets with fewer than 3 points, or whose parabola opens downward (the optimum is outside the sizes tried),
  give no minimum and are listed under `skipped`. Needs minima at 2 budgets or more.
  """
  minima, skipped = isoflop_minima(budgets, params, tokens, losses)
  if len(minima) < 2:
    raise ValueError(f'approach 2 needs IsoFLOP minima at 2 budgets or more, got {len(minima)} '
                     f'(skipped: {skipped}); sweep more budgets, or sizes on both sides of each optimum')
  c = np.array([m['budget'] for m in minima])
  a, k_n = _power_law(c, np.array([m['N_opt'] for m in minima]))
  b, k_d = _power_law(c, np.array([m['D_opt'] for m in minima]))
  return dict(a=a, b=b, k_N=k_n, k_D=k_d, minima=minima, skipped=skipped, scatter=scatter(minima))


# ---------------------------------------------------------------------------------------------------------
# Approach 3: the parametric loss.

def _huber_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray,
                     delta: float) -> tuple[float, np.ndarray]:
  """Sum of Huber losses of log-loss residuals, and its gradient in theta = (a, b, e, alpha, beta)."""
  a, b, e, alpha, beta = theta
  term_n, term_d = a - alpha * log_n, b - beta * log_d
  predicted = np.logaddexp(np.logaddexp(term_n, term_d), e)
  # d predicted / d term: the softmax weights of the three terms.
  w_n, w_d, w_e = np.exp(term_n - predicted), np.exp(term_d - predicted), np.exp(e - predicted)
  r = predicted - log_loss
  small = np.abs(r) <= delta
  loss = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum()
  slope = np.where(small, r, delta * np.sign(r))
  grad = np.array([slope @ w_n, slope @ w_d, slope @ w_e, -(slope * w_n) @ log_n, -(slope * w_d) @ log_d])
  return float(loss), grad


def _grid_objective(grid: np.ndarray, log_n, log_d, log_loss, delta) -> np.ndarray:
  """The Huber objective at every row of `grid` ([starts, 5]) at once, to rank the starts."""
  a, b, e, alpha, beta = (grid[:, i:i + 1] for i in range(5))
  predicted = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)
  r = np.abs(predicted - log_loss)
  return np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta)).sum(axis=1)


def _start_grid() -> np.ndarray:
  return np.array(list(itertools.product(*(START_GRID[k] for k in ('a', 'b', 'e', 'alpha', 'beta')))))


def _lbfgs(theta0, args) -> optimize.OptimizeResult:
  bounds = list(BOUNDS.values())
  theta0 = np.clip(theta0, *zip(*bounds))  # the bootstrap's offset starts can step outside the box
  return optimize.minimize(_huber_objective, theta0, args=args, jac=True, method='L-BFGS-B', bounds=bounds,
                           options=dict(maxiter=2000, ftol=1e-15, gtol=1e-10))


def _at_bounds(theta: np.ndarray) -> list[str]:
  """The parameters of a fit that ended on the search box's edge: there the data did not determine them."""
  return [k for k, x in zip(BOUNDS, theta) if min(abs(x - b) for b in BOUNDS[k]) < 1e-6]


def approach3(params: np.ndarray, tokens: np.ndarray, losses: np.ndarray, *, delta: float = HUBER_DELTA,
              starts: int = 32, extra_starts: Sequence[np.ndarray] = ()) -> dict[str, Any]:
  """L = E + A / N^alpha + B / D^beta by L-BFGS on the Huber loss of log-loss residuals.

  The objective is evaluated at all 4500 points of Hoffmann et al.'s grid (`START_GRID`); L-BFGS runs from the
  `starts` best of them (and from `extra_starts`), and the lowest optimum wins. Bootstrap refits start from
  the full fit's optimum instead (`starts=0`). `at_bounds` names the parameters left on the edge of `BOUNDS`
  (an exponent of 0: the loss does not fall with N or D over these points; E at e^-20: the points are far from
  the irreducible loss), which the data did not determine.
  """
  if len(losses) < 5:
    raise ValueError(f'approach 3 fits 5 parameters and needs at least 5 points, got {len(losses)}')
  args = (np.log(params), np.log(tokens), np.log(losses), delta)
  ranked = []
  if starts:
    grid = _start_grid()
    ranked = grid[np.argsort(_grid_objective(grid, *args))[:starts]]
  best = None
  for theta0 in itertools.chain(ranked, extra_starts):
    result = _lbfgs(np.asarray(theta0, float), args)
    if best is None or result.fun < best.fun or not np.isfinite(best.fun):
      best = result
  a, b, e, alpha, beta = best.x
  # An exponent of 0 (the loss does not fall with N, or with D) has no compute-optimal split: all compute would
  # go to the other factor (compute_optimal divides by zero), so a and b are None.
  split = alpha > 0 and beta > 0
  return dict(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha), beta=float(beta),
              a=float(beta / (alpha + beta)) if split else None, b=float(alpha / (alpha + beta)) if split else None,
              huber_loss=float(best.fun), theta=[float(x) for x in best.x], at_bounds=_at_bounds(best.x))


def predicted_loss(fit: Mapping[str, float], params, tokens):
  return fit['E'] + fit['A'] / np.power(params, fit['alpha']) + fit['B'] / np.power(tokens, fit['beta'])


def compute_optimal(fit: Mapping[str, float], compute, flops_per_nd: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
  """(N_opt, D_opt) of an approach-3 fit at compute C, under C = k N D (Hoffmann et al.'s eq. 4 with k = 6).

  With N the non-embedding parameters and C the FLOPs MFU counts (output head and attention included), small
  models spend more than 6 FLOPs per parameter and token: the plots use the sweep's median k (`flops_per_nd` in
  fit.json). The exponents a and b do not depend on k.
  """
  alpha, beta = fit['alpha'], fit['beta']
  g = (alpha * fit['A'] / (beta * fit['B']))**(1 / (alpha + beta))
  n_opt = g * (np.asarray(compute) / flops_per_nd)**(beta / (alpha + beta))
  return n_opt, np.asarray(compute) / (flops_per_nd * n_opt)


# ---------------------------------------------------------------------------------------------------------
# The whole fit, with bootstrap intervals.

def _columns(results: Sequence[Mapping[str, Any]]):
  if not results:
    raise ValueError('no point has a finite eval loss to fit (fit.json\'s `excluded` says why for each)')
  for r in results:
    missing = [k for k in ('params', 'tokens', 'eval_loss') if r.get(k) is None]
    if missing:
      raise ValueError(f'point {r.get("name")!r} has no {", ".join(missing)}: each result needs params (N), '
                       'tokens (D) and eval_loss')
  params = np.array([r['params'] for r in results], float)
  tokens = np.array([r['tokens'] for r in results], float)
  losses = np.array([r['eval_loss'] for r in results], float)
  budgets = np.array([r.get('budget') or np.nan for r in results], float)
  return params, tokens, losses, budgets


def _interval(values: list[float]) -> list[float] | None:
  """The 95% percentile interval of bootstrap refits; None when they do not vary, e.g. approach 2 on 3 sizes a
  budget, where the only resamples that keep 3 distinct sizes are the points themselves."""
  values = np.array([v for v in values if v is not None and np.isfinite(v)])
  if len(values) < 2 or np.ptp(values) <= 1e-9 * np.max(np.abs(values)):
    return None
  return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def _budget_groups(budgets: np.ndarray) -> list[np.ndarray]:
  return [np.flatnonzero(budgets == b) for b in np.unique(budgets)]


def _resample(groups: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
  """Indices of a bootstrap resample: each group's points drawn with replacement, as many as it has."""
  return np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])


def fit(results: Sequence[Mapping[str, Any]], *, bootstrap: int = 200, seed: int = 0,
        rate_loss: str = 'best') -> dict[str, Any]:
  """Approaches 2 (when the points have IsoFLOP budgets) and 3, each key with a 95% bootstrap interval
  under `ci` (`[low, high]`, or None when fewer than 2 resamples could be fitted). An approach the points
  cannot support is `{'error': why}`. Points without a finite eval loss (diverged, no eval data) are left out
  and listed under `excluded`; a point trained at several rates counts as `best_rates` says (`rate_loss`)."""
  edges = rates_at_edge(results)
  results, excluded = usable_points(results, rate_loss)
  if not results:
    raise ValueError(f'no point has a finite eval loss to fit: {excluded[:5]}')
  params, tokens, losses, budgets = _columns(results)
  flops = np.array([r.get('flops', 6 * r['params'] * r['tokens']) for r in results], float)
  countings = sorted({r.get('counting', 'unrecorded') for r in results})
  out: dict[str, Any] = dict(points=len(losses), excluded=excluded, bootstrap=bootstrap,
                             flops_per_nd=float(np.median(flops / (params * tokens))), counting=countings,
                             code_versions=code_versions(results), rates_at_edge=edges, rate_loss=rate_loss,
                             notes=f'N: parameters as counted by {"/".join(countings)} (qwenjax.sweep\'s counting: '
                                   'porian counts the output head, not the input embedding; kaplan neither); D: '
                                   'training tokens; C: IsoFLOP budget in FLOPs')
  if rate_loss != 'best':
    out['interpolated'] = [dict(name=r.get('name'), lr=r['lr'], lr_vertex=r['lr_vertex'],
                                eval_loss_measured=r['eval_loss_measured'], eval_loss=r['eval_loss'])
                           for r in results if _at_vertex(r)]
  isoflop = bool(np.all(np.isfinite(budgets)))
  rng = np.random.default_rng(seed)
  # A sweep too small or too noisy for one approach still gets the other; fit.json says why one is missing.
  if isoflop:
    try:
      out['approach2'] = approach2(budgets, params, tokens, losses)
    except ValueError as e:  # the budgets' own minima (or why they have none) still go to fit.json and the plot
      minima, skipped = isoflop_minima(budgets, params, tokens, losses)
      out['approach2'] = dict(error=str(e), minima=minima, skipped=skipped)
      isoflop = False
  try:
    out['approach3'] = approach3(params, tokens, losses)
  except ValueError as e:
    out['approach3'] = dict(error=str(e))
  if 'error' in out['approach3']:
    out['quality'] = quality(out)
    return out
  if bootstrap:
    groups = _budget_groups(budgets) if isoflop else [np.arange(len(losses))]
    samples2 = {k: [] for k in APPROACH2_KEYS}
    samples3 = {k: [] for k in APPROACH3_KEYS}
    theta = np.array(out['approach3']['theta'])
    best = [theta, theta + np.array([1.0, 1.0, 0.0, 0.1, 0.1]), theta - np.array([1.0, 1.0, 0.0, 0.1, 0.1])]
    for _ in range(bootstrap):
      idx = _resample(groups, rng)
      if isoflop:
        try:
          fit2 = approach2(budgets[idx], params[idx], tokens[idx], losses[idx])
          for k in APPROACH2_KEYS:
            samples2[k].append(fit2[k])
        except (ValueError, np.linalg.LinAlgError):
          pass  # a resample with too few distinct sizes at a budget: no parabola
      fit3 = approach3(params[idx], tokens[idx], losses[idx], starts=0, extra_starts=best)
      for k in APPROACH3_KEYS:
        samples3[k].append(fit3[k])
    if isoflop:
      out['approach2']['ci'] = {k: _interval(v) for k, v in samples2.items()}
      out['approach2']['bootstrap_fits'] = len(samples2['a'])
    out['approach3']['ci'] = {k: _interval(v) for k, v in samples3.items()}
  out['quality'] = quality(out)
  return out


def exponent_shift(results: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]], *,
                   bootstrap: int = 200, seed: int = 0, rate_loss: str = 'best') -> dict[str, Any]:
  """How far approach 2's a of `results` (an ablation's) lies from that of `reference` (the study it ablates),
  both fitted on the budgets they share: {budgets, a, a_reference, shift = a - a_reference, ci: the shift's 95%
  interval from bootstrap refits of each (points resampled within budgets, the two independently; None with
  fewer than 2 that fit), bootstrap_fits}. A study's a depends on its budgets' span, so an a fitted on other
  budgets is no comparison."""
  columns = []
  for points in (results, reference):
    kept, _ = usable_points(points, rate_loss)
    columns.append([r for r in kept if r.get('budget')])
  shared = sorted(set(r['budget'] for r in columns[0]) & set(r['budget'] for r in columns[1]))
  if len(shared) < 2:
    raise ValueError(f'the two studies share {len(shared)} IsoFLOP budget(s) ({shared}); comparing their a needs '
                     '2 or more, each with 3 sizes or more in both')
  arrays = [_columns([r for r in points if r['budget'] in shared]) for points in columns]
  fits = [approach2(budgets, params, tokens, losses) for params, tokens, losses, budgets in arrays]
  groups = [_budget_groups(budgets) for *_, budgets in arrays]
  rng = np.random.default_rng(seed)
  shifts = []
  for _ in range(bootstrap):
    refits = []
    for (params, tokens, losses, budgets), by_budget in zip(arrays, groups):
      idx = _resample(by_budget, rng)
      try:
        refits.append(approach2(budgets[idx], params[idx], tokens[idx], losses[idx])['a'])
      except (ValueError, np.linalg.LinAlgError):
        break  # a resample with too few distinct sizes at a budget: no parabola
    if len(refits) == 2:
      shifts.append(refits[0] - refits[1])
  return dict(budgets=shared, a=fits[0]['a'], a_reference=fits[1]['a'], shift=fits[0]['a'] - fits[1]['a'],
              ci=_interval(shifts), bootstrap_fits=len(shifts))


def code_versions(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """The code versions the points were trained by, with how many points each: a version is the sources' hash and
  the jax and jaxlib versions of each result's `code`; the git commits recorded with it are labels (a copy of the
  tree has none, or its enclosing checkout's), listed under `commits`. Points from before versions were recorded
  count under None."""
  counts: dict[str, dict[str, Any]] = {}
  for r in results:
    code = r.get('code')
    version = None if code is None else {k: code.get(k) for k in ('source', 'jax', 'jaxlib')}
    entry = counts.setdefault(json.dumps(version, sort_keys=True), dict(code=version, points=0, commits=set()))
    entry['points'] += 1
    if code is not None and code.get('commit'):
      entry['commits'].add(code['commit'])
  return [dict(entry, commits=sorted(entry['commits'])) for entry in counts.values()]


QUALITY_LIMITS = dict(a_interval=0.2, a_plus_b=0.05, approaches_agree=0.1)


def quality(fitted: Mapping[str, Any]) -> dict[str, Any]:
  """Whether a fit can be trusted, per criterion: {name: {passed, value, limit, what}} and `passed` (all of them).

  a_interval: approach 2's a has a 95% bootstrap interval no wider than 0.2. a_plus_b: approach 2's a + b within
  0.05 of 1 (N_opt D_opt grows as C). approaches_agree: approaches 2 and 3 within 0.1 on a. no_bounds: no
  approach-3 parameter on the edge of its search box. minima_inside: every budget has a minimum, inside the sizes
  it tried and bracketed by them (`isoflop_minima`'s `bracketed`). one_code_version: every point was trained by
  one recorded code version. rates_inside: no point tuned by a rate sweep has its best rate at the sweep's end
  (`rates_at_edge`).
  """
  fit2 = fitted.get('approach2') or {'error': 'no IsoFLOP budgets'}
  fit3 = fitted.get('approach3') or {'error': 'not fitted'}
  ok2, ok3 = 'error' not in fit2, 'error' not in fit3 and fit3.get('a') is not None
  out = {}

  def criterion(name, passed, value, what, limit=None):
    out[name] = dict(passed=bool(passed), value=value, limit=limit, what=what)

  interval = fit2.get('ci', {}).get('a') if ok2 else None
  width = None if interval is None else interval[1] - interval[0]
  criterion('a_interval', width is not None and width <= QUALITY_LIMITS['a_interval'], width,
            "width of approach 2's 95% interval on a" + ('' if interval else ' (no interval: no approach 2, or no '
                                                         'bootstrap)'), QUALITY_LIMITS['a_interval'])
  total = fit2['a'] + fit2['b'] if ok2 else None
  criterion('a_plus_b', total is not None and abs(total - 1) <= QUALITY_LIMITS['a_plus_b'], total,
            "approach 2's a + b, which should be 1", QUALITY_LIMITS['a_plus_b'])
  gap = abs(fit2['a'] - fit3['a']) if ok2 and ok3 else None
  criterion('approaches_agree', gap is not None and gap <= QUALITY_LIMITS['approaches_agree'], gap,
            'difference between approaches 2 and 3 on a', QUALITY_LIMITS['approaches_agree'])
  bounds = fit3.get('at_bounds') if 'error' not in fit3 else None
  criterion('no_bounds', bounds == [], bounds, 'approach-3 parameters on the edge of the search (scaling.BOUNDS)'
            + ('' if bounds is not None else ': approach 3 not fitted'))
  skipped = [x['budget'] for x in fit2.get('skipped', [])]
  outside = [m['budget'] for m in fit2.get('minima', []) if not m.get('inside', True)]
  unbracketed = [m['budget'] for m in fit2.get('minima', []) if not m.get('bracketed', True)]
  criterion('minima_inside', ok2 and not skipped and not outside and not unbracketed,
            dict(skipped=skipped, outside=outside, unbracketed=unbracketed),
            'budgets without a minimum, whose minimum lies outside the sizes they tried, or whose lowest loss is '
            'at their smallest or largest size'
            + ('' if ok2 else ' (approach 2 not fitted)'))
  versions = fitted.get('code_versions', [])
  criterion('one_code_version', len(versions) == 1 and versions[0]['code'] is not None, len(versions),
            'code versions the points were trained by' + (' (some unrecorded)' if any(v['code'] is None
                                                                                    for v in versions) else ''))
  edges = fitted.get('rates_at_edge', [])
  criterion('rates_inside', not edges, [f'{e["name"]} (best of {len(e["tried"])} rates: the '
                                        f'{"lowest" if e["lr"] == e["tried"][0] else "highest"})' for e in edges],
            'points whose best rate is the lowest or highest of the rates they were trained at')
  out['passed'] = all(v['passed'] for v in out.values())
  return out


# ---------------------------------------------------------------------------------------------------------
# Plots.

def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _budget_colors(plt, budgets):
  cmap = plt.get_cmap('viridis')
  return {b: cmap(i / max(len(budgets) - 1, 1)) for i, b in enumerate(budgets)}


def _budget_label(budget: float) -> str:
  return f'C = {budget:.2g}'


def plot_fit(results: Sequence[Mapping[str, Any]], fitted: Mapping[str, Any], directory: str) -> list[str]:
  """Writes isoflop.png (whenever the points have budgets), frontier.png and optimal.png (that one needs approach
  2) into `directory`.

  isoflop.png marks what approach 2 could not use: a budget without a minimum draws its points hollow and says
  why in the legend; a minimum outside the sizes its budget tried, or not bracketed by them, is a hollow star. An
  approach-3 fit with a parameter on its search bound is drawn dashed and labelled so. Fitted lines span the
  budgets measured, not more. A point counted at its rates' vertex (`rate_loss='parabola'`) is drawn there, a grey
  line up to its best rate's measured loss.
  """
  plt = _pyplot()
  results = usable_points(results, fitted.get('rate_loss', 'best'))[0]
  params, tokens, losses, budgets = _columns(results)
  flops = np.array([r.get('flops', 6 * r['params'] * r['tokens']) for r in results], float)
  written = []
  fit3 = fitted['approach3'] if 'error' not in fitted['approach3'] else None
  if fit3 and fit3['a'] is None:
    fit3 = None  # an exponent of 0: no compute-optimal frontier to draw
  bounds = fit3.get('at_bounds', []) if fit3 else []
  style3 = dict(ls='--' if bounds else '-', lw=1)
  note3 = f' (at search bounds: {", ".join(bounds)}; not determined)' if bounds else ''
  fit2 = fitted.get('approach2') if 'error' not in fitted.get('approach2', {}) else None

  measured = budgets[np.isfinite(budgets)]
  if len(measured):
    unique = sorted(np.unique(measured))
    colors = _budget_colors(plt, unique)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    isoflop = fitted.get('approach2', {})
    minima = {m['budget']: m for m in isoflop.get('minima', [])}
    skipped = {s['budget']: s['reason'] for s in isoflop.get('skipped', [])}
    for budget in unique:
      at = budgets == budget
      if budget in minima:
        m = minima[budget]
        ax.scatter(params[at], losses[at], color=colors[budget], label=_budget_label(budget))
        grid = np.geomspace(params[at].min() / 1.5, params[at].max() * 1.5, 100)
        ax.plot(grid, Parabola(**m['parabola_N'])(grid), color=colors[budget], lw=1)
        sure = m.get('inside', True) and m.get('bracketed', True)  # else a hollow star, saying why
        why = 'outside the sizes tried' if not m.get('inside', True) else 'not bracketed (lowest loss at an end)'
        ax.scatter([m['N_opt']], [m['loss_opt']], marker='*', s=180, zorder=3,
                   color=colors[budget] if sure else 'none', edgecolor='k' if sure else colors[budget],
                   label=None if sure else f'{_budget_label(budget)}: minimum {why}')
      else:
        reason = skipped.get(budget, 'no minimum')
        ax.scatter(params[at], losses[at], facecolor='none', edgecolor=colors[budget],
                   label=f'{_budget_label(budget)}: no minimum ({reason})')
    moved = [(n, r['eval_loss_measured'], r['eval_loss']) for n, b, r in zip(params, budgets, results)
             if np.isfinite(b) and _at_vertex(r)]
    if moved:  # --rate_loss=parabola: from the best rate's measured loss down to its parabola's vertex
      n, measured_loss, counted = (np.array(x) for x in zip(*moved))
      ax.vlines(n, counted, measured_loss, color='0.5', lw=1)
      ax.scatter(n, measured_loss, marker='_', color='0.5', label='best rate measured (counted at its vertex)')
    failed = f' (approach 2 not fitted: {isoflop["error"][:60]}...)' if 'error' in isoflop else ''
    ax.set(xscale='log', xlabel='parameters N', ylabel='final eval loss',
           title=f'IsoFLOP curves (stars: parabola minima){failed}')
    ax.title.set_fontsize(9)
    ax.xaxis.set_minor_formatter(plt.NullFormatter())  # a decade or two of N: minor labels would overlap
    ax.legend(fontsize=7)
    written.append(_save(fig, directory, 'isoflop.png'))

  fig, ax = plt.subplots(figsize=(6.4, 4.8))
  sc = ax.scatter(flops, losses, c=np.log10(params), cmap='plasma', s=25)
  fig.colorbar(sc, ax=ax, label='log10 N')
  if fit3:
    span = measured if len(measured) else flops
    grid = np.geomspace(span.min(), span.max(), 100)
    n_opt, d_opt = compute_optimal(fit3, grid, fitted['flops_per_nd'])
    ax.plot(grid, predicted_loss(fit3, n_opt, d_opt), 'k', **style3,
            label=f'approach 3 frontier: E={fit3["E"]:.2f}, alpha={fit3["alpha"]:.2f}, beta={fit3["beta"]:.2f}'
                  + note3)
  order = np.argsort(flops)
  ax.step(flops[order], np.minimum.accumulate(losses[order]), 'k:', where='post', lw=1, label='best so far')
  if fit2:
    ax.scatter([m['budget'] for m in fit2['minima']], [m['loss_opt'] for m in fit2['minima']], marker='*',
               s=150, color='tab:red', edgecolor='k', zorder=3, label='approach 2 minima')
  ax.set(xscale='log', yscale='log', xlabel='training FLOPs C', ylabel='final eval loss', title='loss against compute')
  ax.legend(fontsize=7)
  written.append(_save(fig, directory, 'frontier.png'))

  if fit2:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    c = np.array([m['budget'] for m in fit2['minima']])
    grid = np.geomspace(c.min(), c.max(), 50)
    n3, d3 = compute_optimal(fit3, grid, fitted['flops_per_nd']) if fit3 else (None, None)
    ci = fit2.get('ci', {})
    for ax, key, exponent, coef, line3, label in (
        (axes[0], 'N_opt', 'a', 'k_N', n3, 'N_opt (parameters)'),
        (axes[1], 'D_opt', 'b', 'k_D', d3, 'D_opt (tokens)')):
      inside = np.array([m.get('inside', True) for m in fit2['minima']])
      values = np.array([m[key] for m in fit2['minima']])
      ax.scatter(c[inside], values[inside], color='tab:blue', zorder=3, label='IsoFLOP minima')
      if not inside.all():
        ax.scatter(c[~inside], values[~inside], facecolor='none', edgecolor='tab:blue', zorder=3,
                   label='minima outside the sizes tried')
      interval = ci.get(exponent)
      span = f' [{interval[0]:.2f}, {interval[1]:.2f}]' if interval else ''
      ax.plot(grid, fit2[coef] * grid**fit2[exponent], 'tab:blue', label=f'approach 2: C^{fit2[exponent]:.3f}{span}')
      if fit3:
        ax.plot(grid, line3, 'k', **style3, label=f'approach 3: C^{fit3[exponent]:.3f}{note3}')
      ax.set(xscale='log', yscale='log', xlabel='training FLOPs C', ylabel=label)
      ax.legend(fontsize=7)
    written.append(_save(fig, directory, 'optimal.png'))
  return written


def _save(fig, directory: str, name: str) -> str:
  path = os.path.join(directory, name)
  fig.tight_layout()
  _savefig(fig, path)
  _pyplot().close(fig)
  return path


def _savefig(fig, path: str) -> None:
  """The figure written whole (`files.write`), in the format its name's extension gives (PNG by default)."""
  kind = os.path.splitext(path)[1].lstrip('.').lower() or 'png'
  files.write(path, lambda tmp: fig.savefig(tmp, dpi=110, format=kind))


def _value(record: Mapping[str, Any], key: str):
  """A result field, or a config override by its dotted name or last component (`lr` finds `train.lr`)."""
  if key in record:
    return record[key]
  overrides = record.get('overrides', {})
  if key in overrides:
    return overrides[key]
  matches = [v for k, v in overrides.items() if k.rsplit('.', 1)[-1] == key]
  if len(matches) == 1:
    return matches[0]
  raise KeyError(f'{record.get("name")}: no result field or override {key!r} (fields: {sorted(record)}, '
                 f'overrides: {sorted(overrides)})')


def _plottable(record: Mapping[str, Any], y: str) -> bool:
  """Whether a point has a finite y (a diverged point's eval_loss is null)."""
  try:
    return math.isfinite(float(_value(record, y)))
  except (KeyError, TypeError, ValueError):
    return False


def plot_compare(directories: Sequence[str], out: str, *, x: str = 'flops', y: str = 'eval_loss',
                 group: str = '', panel: str = '') -> str:
  """Several sweeps on one figure: y against x, one series per sweep; with `group`, one panel per sweep (or per
  value of `panel`) and one line per value of `group` (e.g. `--x=lr --group=width --panel=mup_base_width` for a
  learning-rate sweep across widths with and without μP)."""
  plt = _pyplot()
  names = [os.path.basename(os.path.normpath(d)) for d in directories]
  runs = [[r for r in read_results(d) if _plottable(r, y)] for d in directories]
  if panel:
    rows = [(name, r) for name, results in zip(names, runs) for r in results]
    values = sorted({_value(r, panel) for _, r in rows})
    names = [f'{panel} = {v}' for v in values]
    runs = [[r for _, r in rows if _value(r, panel) == v] for v in values]
  if group:
    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 4.4), sharey=True, squeeze=False)
    for ax, name, results in zip(axes[0], names, runs):
      values = sorted({_value(r, group) for r in results})
      colors = _budget_colors(plt, values)
      for value in values:
        rows = sorted((float(_value(r, x)), float(_value(r, y))) for r in results if _value(r, group) == value)
        xs, ys = zip(*rows)
        ax.plot(xs, ys, 'o-', color=colors[value], label=f'{group} = {value}')
        best = int(np.argmin(ys))
        ax.scatter([xs[best]], [ys[best]], marker='*', s=160, color=colors[value], edgecolor='k', zorder=3)
      ax.set(xscale='log', xlabel=x, title=name)
      ax.legend(fontsize=8)
    axes[0][0].set_ylabel(y)
  else:
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for name, results in zip(names, runs):
      rows = sorted((float(_value(r, x)), float(_value(r, y))) for r in results)
      xs, ys = np.array(rows).T
      line = ax.scatter(xs, ys, s=18, label=name)
      ax.step(xs, np.minimum.accumulate(ys), ':', where='post', color=line.get_facecolor()[0])
    ax.set(xscale='log', yscale='log' if y == 'eval_loss' else 'linear', xlabel=x, ylabel=y)
    ax.legend(fontsize=8)
  fig.tight_layout()
  _savefig(fig, out)
  plt.close(fig)
  return out


def fit_directory(directory: str, *, bootstrap: int = 200, seed: int = 0, rate_loss: str = 'best',
                  more: Sequence[str] = ()) -> dict[str, Any]:
  """Fits `DIR/results.jsonl`, with the points of the `more` directories (a follow-up sweep's, e.g. further rates
  of points whose best rate was at their grid's edge; fit.json lists them under `more`, relative to DIR), writes
  `DIR/fit.json` and the plots; returns the fit."""
  results = read_results(directory)
  seen = {r['name']: directory for r in results}
  for source in more:
    for r in read_results(source):
      if r['name'] in seen:
        raise ValueError(f'{r["name"]} is in both {seen[r["name"]]} and {source}: give each point\'s directory once')
      seen[r['name']] = source
      results.append(r)
  fitted = fit(results, bootstrap=bootstrap, seed=seed, rate_loss=rate_loss)
  if more:  # relative to DIR, so that a clone elsewhere (the scaling notebook) can refit the same points
    fitted['more'] = [m if '://' in m else os.path.relpath(m, directory) for m in more]
  fitted['plots'] = [os.path.basename(p) for p in plot_fit(results, fitted, directory)]
  files.write_json(os.path.join(directory, 'fit.json'), fitted)  # whole or not at all; strict JSON (NaN: null)
  return fitted


def summary(fitted: Mapping[str, Any]) -> str:
  lines = []
  if fitted.get('excluded'):
    excluded = fitted['excluded']
    lr_stage = [x for x in excluded if x['reason'] == LR_STAGE]
    if lr_stage:
      lines.append(f'left out the {len(lr_stage)} point(s) of the learning-rate stage (they chose the others\' rates)')
    others = [x for x in excluded if x not in lr_stage]
    if others:
      lines.append(f'left out {len(others)} point(s): ' + '; '.join(f'{x["name"]} ({x["reason"]})' for x in others[:5])
                   + ('; ...' if len(others) > 5 else ''))
  if fitted.get('interpolated'):
    shifts = [x['eval_loss_measured'] - x['eval_loss'] for x in fitted['interpolated']]
    lines.append(f'{len(shifts)} point(s) counted at the vertex of the parabola in log lr through their best rate and '
                 f'its neighbours (--rate_loss=parabola): {np.mean(shifts):.4f} nats below the best measured on '
                 f'average, {max(shifts):.4f} at most')
  for approach, keys in (('approach2', APPROACH2_KEYS[:2]), ('approach3', APPROACH3_KEYS)):
    if approach not in fitted:
      continue
    if 'error' in fitted[approach]:
      lines.append(f'{approach}: not fitted: {fitted[approach]["error"]}')
      continue
    ci = fitted[approach].get('ci', {})
    parts = []
    for k in keys:
      interval, value = ci.get(k), fitted[approach][k]
      parts.append(f'{k}=' + ('none' if value is None else f'{value:.4g}')
                   + (f' [{interval[0]:.4g}, {interval[1]:.4g}]' if interval else ''))
    lines.append(f'{approach}: ' + ', '.join(parts))
    if approach == 'approach2' and fitted[approach].get('scatter') is not None:
      dof = sum(m['dof'] for m in fitted[approach]['minima'])
      lines.append(f'approach2: the losses lie {fitted[approach]["scatter"]:.3g} nats (root mean square, {dof} degrees '
                   'of freedom) from their budgets\' parabolas: noise, plus any bend a parabola misses')
    if fitted[approach].get('at_bounds'):
      lines.append(f'{approach}: {", ".join(fitted[approach]["at_bounds"])} ended on the edge of the search '
                   '(scaling.BOUNDS): these points do not determine the fit; sweep more sizes and budgets')
  if 'quality' in fitted:
    lines.append(quality_summary(fitted['quality']))
  return '\n'.join(lines)


def _show(value: Any) -> str:
  if isinstance(value, dict):
    return '{' + ', '.join(f'{k}: {_show(v)}' for k, v in value.items()) + '}'
  if isinstance(value, (list, tuple)):
    return '[' + ', '.join(map(_show, value)) + ']'
  return f'{value:.3g}' if isinstance(value, float) else str(value)


def quality_summary(checks: Mapping[str, Any]) -> str:
  """One line per criterion of `quality`, after the verdict."""
  lines = [f'quality: {"PASS" if checks["passed"] else "FAIL"} (a study a reader can trust passes every line)']
  for name, c in checks.items():
    if name != 'passed':
      limit = f' (limit {c["limit"]})' if c['limit'] is not None else ''
      lines.append(f'  {"pass" if c["passed"] else "FAIL"} {name}: {c["what"]} = {_show(c["value"])}{limit}')
  return '\n'.join(lines)


def _define_flags() -> None:
  """The command line's flags (defined when it runs: the sweep imports this module and adds none of them)."""
  flags.DEFINE_integer('bootstrap', 200, 'fit: bootstrap resamples for the confidence intervals (0: none).')
  flags.DEFINE_integer('seed', 0, 'fit: seed of the bootstrap resampling.')
  flags.DEFINE_enum('rate_loss', 'best', RATE_LOSSES, 'fit: the loss of a point trained at several rates: the best '
                    'measured, or the vertex of the parabola in log lr through the best and its neighbours.')
  flags.DEFINE_string('out', 'compare.png', 'plot: the PNG file to write.')
  flags.DEFINE_string('x', 'flops', 'plot: result field (or config override, e.g. lr) on the x axis.')
  flags.DEFINE_string('y', 'eval_loss', 'plot: result field on the y axis.')
  flags.DEFINE_string('group', '', 'plot: one line per value of this field, one panel per sweep.')
  flags.DEFINE_string('panel', '', 'plot: one panel per value of this field (e.g. mup_base_width).')


_ARGS = 'fit DIR [DIR ...] | plot DIR [DIR ...] --out=FILE.png'


def main(argv: list[str]) -> None:
  if not argv or argv[0] not in ('fit', 'plot'):
    raise cli.UsageError(f'give a subcommand: python -m qwenjax.scaling {_ARGS}'
                         + (f' (got {argv[0]!r})' if argv else ''))
  f = flags.FLAGS
  if argv[0] == 'fit':
    if len(argv) < 2:
      raise cli.UsageError('fit takes a sweep directory (and any follow-up sweeps\' after it): '
                           'python -m qwenjax.scaling fit DIR [DIR ...]')
    fitted = fit_directory(argv[1], bootstrap=f.bootstrap, seed=f.seed, rate_loss=f.rate_loss, more=argv[2:])
    print(summary(fitted))
    print(f'wrote {os.path.join(argv[1], "fit.json")} and {", ".join(fitted["plots"])}')
  else:
    if len(argv) < 2:
      raise cli.UsageError('plot takes one or more sweep directories: python -m qwenjax.scaling plot DIR [DIR ...] '
                           '--out=FILE.png')
    out = plot_compare(argv[1:], f.out, x=f.x, y=f.y, group=f.group, panel=f.panel)
    print(f'wrote {out}')


if __name__ == '__main__':
  cli.run(main, _define_flags, args=_ARGS)
