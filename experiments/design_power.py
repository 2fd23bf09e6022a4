r"""Can a sweep's design pass the fit's quality bar? Simulated studies on its planned points, before any GPU time:

    python experiments/design_power.py --sweep=experiments/isoflop_gpu.py --noise=0.005,0.01,0.02 --trials=20
    python experiments/design_power.py --sweep=experiments/isoflop_gpu.py --sweep.budgets='(1e15,1e16)' \
        --sweep.budget_sizes='((1e15,(4,5,6,7,8,9)),(1e16,(7,8,9,11,13,15)))'   # a variant: two budgets

Each trial gives every IsoFLOP point of the sweep's plan (its N, D and budget, as `python -m qwenjax.sweep --emit`
lists them) the loss of a known law L(N, D) = E + A / N^alpha + B / D^beta plus Gaussian noise of standard
deviation `--noise` (nats: a point's run-to-run spread, what `qwenjax.sweep --check` measures), fits it as
`python -m qwenjax.scaling fit` does (approaches 2 and 3, `--bootstrap` resamples) and scores the fit's quality
(`qwenjax.scaling.quality`). Per noise level it prints how often each criterion passed, the median width of approach
2's 95% interval on a, and approach 2's mean error on a against the law's own a = beta / (alpha + beta).

The law is Besiroglu et al.'s (2024) refit of Chinchilla by default; `--law=DIR/fit.json` takes approach 3 of a
fitted study instead (a pilot's, or the study's own so far). The criterion that needs the points' code versions
(one_code_version) is left out: simulated points have none.
"""

from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags
import numpy as np

from qwenjax import cli
from qwenjax import scaling
from qwenjax import sweep as sweep_lib

BESIROGLU = dict(E=1.8172, A=482.01, alpha=0.3478, B=2085.43, beta=0.3658)  # Besiroglu et al. 2024, Table 1

CRITERIA = ('a_interval', 'a_plus_b', 'approaches_agree', 'no_bounds', 'minima_inside')


def law_from_fit(path: str) -> dict[str, float]:
  """Approach 3's E, A, alpha, B, beta from a fit.json."""
  with open(path, encoding='utf-8') as f:
    fit3 = json.load(f).get('approach3', {})
  if 'error' in fit3 or not all(k in fit3 for k in BESIROGLU):
    raise ValueError(f'{path} has no approach-3 fit ({fit3.get("error", "keys missing")}): fit the study first, '
                     'or leave --law out for Besiroglu et al.\'s law')
  return {k: float(fit3[k]) for k in BESIROGLU}


def isoflop_points(sweep) -> list[dict[str, float]]:
  """The sweep's planned IsoFLOP points (its lr stage left out: the fits leave it out too), each (budget, N, D)
  once: a point trained at several rates (`lr_factors`) counts once in a fit, at its best rate."""
  points = {}
  for p in sweep_lib.plan(sweep, ''):
    if p.stage != 'lr' and p.budget:
      points.setdefault((p.budget, p.params, p.tokens), p)
  if not points:
    raise ValueError('the sweep plans no IsoFLOP points (no `budgets`): nothing for approach 2 to fit')
  return [dict(name=p.name, params=p.params, tokens=p.tokens, budget=p.budget, flops=p.flops, stage=p.stage)
          for p in points.values()]


def simulate(points: list[dict[str, float]], law: dict[str, float], noise: float, trials: int, *,
             bootstrap: int = 100, seed: int = 0) -> dict[str, float]:
  """How often `trials` simulated studies at `noise` pass each quality criterion, the median width of approach
  2's interval on a, and approach 2's mean error on a against the law's."""
  rng = np.random.default_rng(seed)
  params = np.array([p['params'] for p in points], float)
  tokens = np.array([p['tokens'] for p in points], float)
  clean = law['E'] + law['A'] / params**law['alpha'] + law['B'] / tokens**law['beta']
  true_a = law['beta'] / (law['alpha'] + law['beta'])
  passed = {k: 0 for k in CRITERIA + ('all',)}
  widths, errors = [], []
  for trial in range(trials):
    losses = clean + noise * rng.standard_normal(len(points))
    results = [dict(p, eval_loss=float(loss)) for p, loss in zip(points, losses)]
    fitted = scaling.fit(results, bootstrap=bootstrap, seed=seed + trial)
    checks = fitted['quality']
    for k in CRITERIA:
      passed[k] += checks[k]['passed']
    passed['all'] += all(checks[k]['passed'] for k in CRITERIA)
    if checks['a_interval']['value'] is not None:
      widths.append(checks['a_interval']['value'])
    if 'error' not in fitted['approach2']:
      errors.append(fitted['approach2']['a'] - true_a)
  out = {k: v / trials for k, v in passed.items()}
  out.update(a_interval_median=float(np.median(widths)) if widths else None,
             a_error_mean=float(np.mean(errors)) if errors else None, true_a=true_a)
  return out


def table(rows: dict[float, dict[str, float]]) -> str:
  header = ['noise'] + list(CRITERIA) + ['all', 'median a interval', 'mean a error']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
  for noise, row in rows.items():
    cells = [f'{noise:g}'] + [f'{row[k]:.0%}' for k in CRITERIA + ('all',)]
    cells += ['-' if row['a_interval_median'] is None else f'{row["a_interval_median"]:.3f}',
              '-' if row['a_error_mean'] is None else f'{row["a_error_mean"]:+.3f}']
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _define_flags() -> None:
  config_flags.DEFINE_config_file('sweep', None, 'the sweep file whose plan is simulated, e.g. '
                                  'experiments/isoflop_gpu.py; --sweep.KEY=VALUE tries a variant', lock_config=False)
  flags.DEFINE_string('noise', '0.005,0.01,0.02', "comma-separated noise levels: the standard deviation of a "
                      "point's eval loss, in nats")
  flags.DEFINE_integer('trials', 20, 'simulated studies per noise level')
  flags.DEFINE_integer('bootstrap', 100, 'bootstrap resamples per fit (the fit command uses 200)')
  flags.DEFINE_string('law', '', "a fit.json whose approach 3 is the simulated law ('': Besiroglu et al.)")
  flags.DEFINE_integer('seed', 0, 'seed of the noise')


def main(argv: list[str]) -> None:
  del argv  # no positional arguments (cli.run refuses them)
  f = flags.FLAGS
  try:
    noises = [float(x) for x in f.noise.split(',') if x.strip()]
  except ValueError:
    raise cli.UsageError(f'--noise={f.noise!r} is not a list of numbers: pass e.g. --noise=0.01,0.02') from None
  if not noises or min(noises) < 0:
    raise cli.UsageError(f'--noise={f.noise!r}: give one or more standard deviations >= 0, e.g. --noise=0.01')
  if f.trials < 1:
    raise cli.UsageError(f'--trials={f.trials}: give 1 or more simulated studies')
  if f.bootstrap < 2:
    raise cli.UsageError(f'--bootstrap={f.bootstrap}: a 95% interval needs 2 or more resamples, e.g. 100')
  law = law_from_fit(f.law) if f.law else BESIROGLU
  points = isoflop_points(f.sweep)
  print(f'{len(points)} IsoFLOP points; law E={law["E"]:.3g} A={law["A"]:.4g} alpha={law["alpha"]:.3f} '
        f'B={law["B"]:.4g} beta={law["beta"]:.3f} (a = {law["beta"] / (law["alpha"] + law["beta"]):.3f}); '
        f'{f.trials} trials, {f.bootstrap} bootstrap resamples each', flush=True)
  rows = {noise: simulate(points, law, noise, f.trials, bootstrap=f.bootstrap, seed=f.seed) for noise in noises}
  print(table(rows))


if __name__ == '__main__':
  cli.run(main, _define_flags, required=('sweep',))
