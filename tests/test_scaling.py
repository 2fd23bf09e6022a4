"""The scaling-law fitter on synthetic IsoFLOP data drawn from known laws with 0.5% noise; its quality bar and plots."""

import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from qwenjax import scaling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (E, A, B, alpha, beta), budgets (FLOPs).
CHINCHILLA = (1.69, 406.4, 410.7, 0.34, 0.28)  # Hoffmann et al. (2022), approach 3
BESIROGLU = (1.82, 482.0, 2085.4, 0.35, 0.37)  # Besiroglu et al. (2024), their refit
SMALL_DATA = (0.8, 30.0, 600.0, 0.25, 0.4)  # a data-hungry law at the scale of our sweeps
LAWS = [(CHINCHILLA, (1e18, 1e21)), (BESIROGLU, (1e18, 1e21)), (SMALL_DATA, (1e14, 1e17))]


def as_dict(law):
  return dict(zip(('E', 'A', 'B', 'alpha', 'beta'), law))


def isoflop_points(law, budget_range, budgets=5, sizes=9, noise=0.005, seed=0):
  """IsoFLOP results: per budget, sizes from 1/8x to 8x the law's optimum, D = C / (6 N), loss x (1 + noise)."""
  rng = np.random.default_rng(seed)
  rows = []
  for c in np.geomspace(*budget_range, budgets):
    n_opt, _ = scaling.compute_optimal(as_dict(law), c)
    for n in n_opt * np.geomspace(1 / 8, 8, sizes):
      d = c / (6 * n)
      loss = scaling.predicted_loss(as_dict(law), n, d) * (1 + noise * rng.standard_normal())
      rows.append(dict(name=f'C{c:.3g}-N{n:.3g}', params=float(n), params_total=float(n) * 1.1, tokens=float(d),
                       flops=float(c), budget=float(c), eval_loss=float(loss)))
  return rows


def true_a(law):
  return law[4] / (law[3] + law[4])


@pytest.mark.slow
@pytest.mark.parametrize('law,budget_range', LAWS, ids=['chinchilla', 'besiroglu', 'small'])
def test_fits_recover_the_law(law, budget_range):
  fitted = scaling.fit(isoflop_points(law, budget_range), bootstrap=0)
  fit3, fit2 = fitted['approach3'], fitted['approach2']
  # Tolerances: 0.5% noise on 45 points moves the exponents by about 0.01 (measured on these seeds: at most 0.008).
  assert fit3['alpha'] == pytest.approx(law[3], abs=0.02)
  assert fit3['beta'] == pytest.approx(law[4], abs=0.02)
  assert fit3['E'] == pytest.approx(law[0], rel=0.02)
  assert fit3['a'] == pytest.approx(true_a(law), abs=0.02)
  assert fit2['a'] == pytest.approx(true_a(law), abs=0.02)
  assert fit2['b'] == pytest.approx(1 - true_a(law), abs=0.02)
  assert len(fit2['minima']) == 5 and not fit2['skipped']


@pytest.mark.slow
def test_bootstrap_intervals_contain_the_truth():
  fitted = scaling.fit(isoflop_points(CHINCHILLA, (1e18, 1e21)), bootstrap=40, seed=1)
  truth = dict(as_dict(CHINCHILLA), a=true_a(CHINCHILLA), b=1 - true_a(CHINCHILLA))
  for key in ('E', 'alpha', 'beta', 'a', 'b'):
    low, high = fitted['approach3']['ci'][key]
    assert low <= truth[key] <= high, (key, low, high, truth[key])
    assert low < fitted['approach3'][key] < high or key == 'E' and low <= fitted['approach3'][key] <= high
  for key in ('a', 'b'):
    low, high = fitted['approach2']['ci'][key]
    assert low <= truth[key] <= high, (key, low, high, truth[key])
    assert high - low < 0.1  # informative, not a blanket interval
  assert fitted['approach2']['bootstrap_fits'] == 40


def test_an_ablations_shift_in_a_is_measured_on_the_budgets_both_studies_share():
  """scaling.exponent_shift: approach 2's a of an ablation against its study's, on their common budgets only (an a
  depends on the span it is fitted over), with a bootstrap interval for the difference."""
  data_hungry = (1.82, 482.0, 2085.4, 0.25, 0.6)  # a = 0.6 / 0.85 = 0.71, about Kaplan et al.'s
  at = lambda law, budgets, seed: [row for i, c in enumerate(budgets)
                                   for row in isoflop_points(law, (c, c), budgets=1, seed=seed + i)]
  study = at(BESIROGLU, (1e18, 1e19, 1e20, 1e21), seed=0)  # one budget more than the ablation
  ablation = at(data_hungry, (1e18, 1e19, 1e20), seed=10)
  shift = scaling.exponent_shift(ablation, study, bootstrap=40, seed=0)
  truth = true_a(data_hungry) - true_a(BESIROGLU)
  assert shift['budgets'] == [1e18, 1e19, 1e20]
  assert shift['a'] == pytest.approx(true_a(data_hungry), abs=0.03)
  assert shift['a_reference'] == pytest.approx(true_a(BESIROGLU), abs=0.03)
  assert shift['shift'] == pytest.approx(shift['a'] - shift['a_reference'])
  low, high = shift['ci']
  assert low <= truth <= high and high - low < 0.25 and shift['bootstrap_fits'] >= 30
  with pytest.raises(ValueError, match='share 1 IsoFLOP budget'):
    scaling.exponent_shift(at(data_hungry, (1e21, 1e22), seed=20), study, bootstrap=0)


def test_parabola_vertex_is_exact():
  n = np.geomspace(1e6, 1e9, 7)
  loss = 0.05 * (np.log(n) - np.log(3e7))**2 + 2.5
  parabola = scaling.fit_parabola(n, loss)
  assert parabola.argmin == pytest.approx(3e7, rel=1e-6)
  assert parabola.min_loss == pytest.approx(2.5, abs=1e-9)


def columns(rows):
  return [np.array([r[k] for r in rows], float) for k in ('budget', 'params', 'tokens', 'eval_loss')]


@pytest.mark.slow
def test_bootstrap_gives_no_interval_where_resamples_cannot_vary_the_fit():
  """3 sizes a budget: a resample keeps 3 distinct sizes only as the points themselves, so approach 2's refits
  all equal the fit (no interval); 5 sizes give an interval around it. Repeated sizes are never fitted."""
  law, budget_range = CHINCHILLA, (1e18, 1e21)
  three = scaling.fit(isoflop_points(law, budget_range, budgets=3, sizes=3), bootstrap=30)
  assert three['approach2']['bootstrap_fits'] > 0
  assert all(v is None for v in three['approach2']['ci'].values())
  five = scaling.fit(isoflop_points(law, budget_range, budgets=3, sizes=5), bootstrap=30)
  low, high = five['approach2']['ci']['a']
  assert low < five['approach2']['a'] < high


def test_approach2_skips_budgets_it_cannot_fit_and_names_the_problem():
  rows = isoflop_points(CHINCHILLA, (1e18, 1e21), budgets=3)
  budgets = sorted({r['budget'] for r in rows})
  middle = [r for r in rows if r['budget'] == budgets[1]][:2]  # 2 points: no parabola
  rows = [r for r in rows if r['budget'] != budgets[1]] + middle
  fitted = scaling.approach2(*columns(rows))
  assert [s['budget'] for s in fitted['skipped']] == [budgets[1]]
  assert '2 distinct size(s); a parabola needs 3' in fitted['skipped'][0]['reason']
  # Losses that only fall with N (all sizes far below the optimum): the parabola has no minimum.
  falling = [dict(r, eval_loss=10.0 - np.log(r['params']) ** 1.5 / 10) for r in rows if r['budget'] == budgets[0]]
  with pytest.raises(ValueError, match='needs IsoFLOP minima at 2 budgets'):
    scaling.approach2(*columns(falling + [r for r in rows if r['budget'] == budgets[2]]))


def test_approach2_reports_how_far_the_losses_lie_from_their_parabolas():
  """`scatter`: the residuals' root mean square around each budget's parabola in log N, pooled over budgets with
  points - 3 degrees of freedom each; on average the noise added to a law's losses (over 10 draws), and the
  summary says it. None where no budget has more than 3 points."""
  ratios = []
  for seed in range(10):
    rows = isoflop_points(CHINCHILLA, (1e18, 1e21), noise=0.01, seed=seed)
    fitted = scaling.approach2(*columns(rows))
    losses = np.array([r['eval_loss'] for r in rows])
    assert sum(m['dof'] for m in fitted['minima']) == len(rows) - 3 * 5
    ratios.append(fitted['scatter'] / (0.01 * np.sqrt(np.mean(losses ** 2))))
  assert 0.85 < np.mean(ratios) < 1.15 and min(ratios) > 0.5
  budget = rows[0]['budget']
  at = [r for r in rows if r['budget'] == budget]
  log_n, loss = np.log([r['params'] for r in at]), np.array([r['eval_loss'] for r in at])
  residuals = loss - np.polyval(np.polyfit(log_n, loss, 2), log_n)
  assert fitted['minima'][0]['residual_ss'] == pytest.approx(np.sum(residuals ** 2), rel=1e-6)
  summary = scaling.summary(dict(approach2=dict(fitted, ci={})))
  assert f'the losses lie {fitted["scatter"]:.3g} nats (root mean square, 30 degrees of freedom)' in summary
  three = [r for r in rows if sorted({q['params'] for q in rows if q['budget'] == r['budget']}).index(r['params'])
           in (3, 4, 5)]
  assert scaling.approach2(*columns(three))['scatter'] is None


@pytest.mark.slow
def test_points_without_a_law_give_a_finite_fit_that_says_so(tmp_path):
  """Losses that do not fall with N (here they grow) or do not depend on N and D at all: the fit stays finite
  (strict JSON, no overflow warnings), names the parameters it left on the edge of its bounds, and plots."""
  rows = isoflop_points(SMALL_DATA, (1e14, 1e17), budgets=2, sizes=4)
  growing = [dict(r, eval_loss=3.0 + 0.1 * np.log(r['params'])) for r in rows]
  rng = np.random.default_rng(6)
  flat = [dict(r, eval_loss=4.5 + 0.2 * rng.standard_normal()) for r in rows]
  for points in (growing, flat):
    with warnings.catch_warnings():
      warnings.simplefilter('error')  # overflow in exp, division by zero, a rank-deficient parabola
      fitted = scaling.fit(points, bootstrap=20)
      plots = scaling.plot_fit(points, fitted, str(tmp_path))
    fit3 = fitted['approach3']
    json.dumps(fitted, allow_nan=False)
    assert all(np.isfinite(fit3[k]) for k in ('E', 'A', 'B', 'alpha', 'beta'))
    assert 'frontier.png' in [os.path.basename(p) for p in plots]
  fitted = scaling.fit(growing, bootstrap=0)
  assert 'alpha' in fitted['approach3']['at_bounds']
  # Losses that fall with D alone: beta is found, alpha stays at 0, and there is no compute-optimal split.
  tokens_only = [dict(r, eval_loss=2.0 + 400.0 / r['tokens']**0.3) for r in rows]
  fitted = scaling.fit(tokens_only, bootstrap=0)
  fit3 = fitted['approach3']
  assert fit3['at_bounds'] == ['alpha'] and fit3['alpha'] == 0 and abs(fit3['beta'] - 0.3) < 1e-3
  assert fit3['a'] is None and fit3['b'] is None
  assert 'frontier.png' in [os.path.basename(p) for p in scaling.plot_fit(tokens_only, fitted, str(tmp_path))]
  summary = scaling.summary(fitted).splitlines()
  quality_line = next(i for i, line in enumerate(summary) if line.startswith('quality:'))
  assert 'ended on the edge of the search' in summary[quality_line - 1]  # the last line before the quality bar


def test_approach2_needs_three_token_counts_a_budget():
  """Short runs round D to whole steps, so two sizes of a budget can train on the same tokens: no D parabola."""
  rows = isoflop_points(CHINCHILLA, (1e18, 1e21), budgets=3, sizes=5)
  first = min(r['budget'] for r in rows)
  same = [dict(r, tokens=1e9 if i % 2 else 2e9) if r['budget'] == first else r for i, r in enumerate(rows)]
  fitted = scaling.approach2(*columns(same))
  assert [s['budget'] for s in fitted['skipped']] == [first]
  assert '2 distinct token count(s); a parabola needs 3' in fitted['skipped'][0]['reason']


def write_results(directory, rows):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'results.jsonl'), 'w') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')


@pytest.mark.slow
def test_fit_command_writes_fit_json_and_plots(tmp_path):
  directory = str(tmp_path / 'sweep')
  write_results(directory, isoflop_points(SMALL_DATA, (1e14, 1e17), budgets=3, sizes=5))
  out = subprocess.run([sys.executable, '-m', 'qwenjax.scaling', 'fit', directory, '--bootstrap=5'],
                       capture_output=True, text=True, check=True).stdout
  assert 'approach2: a=' in out and 'approach3: E=' in out
  with open(os.path.join(directory, 'fit.json')) as f:
    on_disk = json.load(f)
  assert on_disk['approach3']['alpha'] == pytest.approx(SMALL_DATA[3], abs=0.05)
  assert on_disk['bootstrap'] == 5
  assert set(on_disk['approach3']['ci']) == set(scaling.APPROACH3_KEYS)
  assert set(on_disk['approach2']['ci']) == set(scaling.APPROACH2_KEYS)
  for name in ('isoflop.png', 'frontier.png', 'optimal.png'):
    with open(os.path.join(directory, name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert on_disk['plots'] == ['isoflop.png', 'frontier.png', 'optimal.png']


def test_plot_compares_sweeps_on_one_figure(tmp_path):
  for name, law in (('sp', SMALL_DATA), ('mup', CHINCHILLA)):
    rows = isoflop_points(law, (1e14, 1e17), budgets=2, sizes=3)
    for i, row in enumerate(rows):
      row['overrides'] = {'train.lr': [1e-3, 3e-3, 1e-2][i % 3], 'model.hidden_size': 64 * (1 + i // 3)}
      row['width'] = row['overrides']['model.hidden_size']
    write_results(str(tmp_path / name), rows)
  dirs = [str(tmp_path / 'sp'), str(tmp_path / 'mup')]
  out = scaling.plot_compare(dirs, str(tmp_path / 'compare.png'))
  assert os.path.getsize(out) > 1000
  out = scaling.plot_compare(dirs, str(tmp_path / 'lr.png'), x='lr', group='width')
  assert os.path.getsize(out) > 1000
  with pytest.raises(KeyError, match="no result field or override 'momentum'"):
    scaling.plot_compare(dirs, str(tmp_path / 'bad.png'), x='momentum')


def test_missing_results_file_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match='python -m qwenjax.sweep'):
    scaling.read_results(str(tmp_path))


def with_code(rows, source='abc'):
  return [dict(r, code=dict(source=source, commit=None, dirty=None, jax='0')) for r in rows]


@pytest.mark.slow
def test_quality_passes_a_study_that_recovers_its_law_and_fails_the_committed_h200_one(tmp_path):
  fitted = scaling.fit(with_code(isoflop_points(CHINCHILLA, (1e18, 1e21))), bootstrap=40, seed=1)
  quality = fitted['quality']
  assert quality['passed'], scaling.quality_summary(quality)
  assert set(quality) == {'a_interval', 'a_plus_b', 'approaches_agree', 'no_bounds', 'minima_inside',
                          'one_code_version', 'rates_inside', 'passed'}
  assert quality['a_interval']['value'] <= 0.2 and quality['a_interval']['limit'] == 0.2
  # Points of two code versions fail the last criterion alone.
  rows = isoflop_points(CHINCHILLA, (1e18, 1e21))
  mixed = scaling.fit(with_code(rows[:20]) + with_code(rows[20:], 'other'), bootstrap=0)['quality']
  assert not mixed['one_code_version']['passed'] and mixed['one_code_version']['value'] == 2
  # One source under two commit labels (a pinned copy of the tree run from two checkouts) is one version.
  relabelled = [dict(r, code=dict(r['code'], commit=f'c{i % 2}')) for i, r in enumerate(with_code(rows))]
  versions = scaling.code_versions(relabelled)
  assert [(v['code']['source'], v['points'], v['commits']) for v in versions] == [('abc', len(rows), ['c0', 'c1'])]
  # The committed H200 study: every criterion fails, and fit.json and the command's summary say so.
  directory = str(tmp_path / 'h200')
  os.makedirs(directory)
  with open(os.path.join(ROOT, 'experiments', 'results', 'isoflop_h200', 'results.jsonl')) as f:
    write_results(directory, [json.loads(line) for line in f])
  out = subprocess.run([sys.executable, '-m', 'qwenjax.scaling', 'fit', directory, '--bootstrap=20'],
                       capture_output=True, text=True, check=True).stdout
  with open(os.path.join(directory, 'fit.json')) as f:
    quality = json.load(f)['quality']
  # Every criterion fails but rates_inside: one rate a point, nothing to bracket.
  assert not quality['passed'] and [k for k, c in quality.items() if k != 'passed' and c['passed']] == ['rates_inside']
  assert quality['minima_inside']['value']['outside'] == [1e14]  # its 1e14 minimum lies below the sizes tried
  assert 'quality: FAIL' in out and 'FAIL no_bounds' in out


class Figures:
  """Keeps the figures plot_fit saves, by file name, to read their lines and legends."""

  def __init__(self, monkeypatch):
    self.figures = {}
    monkeypatch.setattr(scaling, '_save', self.save)

  def save(self, fig, directory, name):
    self.figures[name] = fig
    return os.path.join(directory, name)

  def legend(self, name):
    return [t.get_text() for ax in self.figures[name].axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def test_isoflop_plot_is_drawn_and_marks_budgets_without_a_minimum(tmp_path, monkeypatch):
  """Approach 2 fails (one budget has 2 sizes, another only falls with N): isoflop.png still shows every budget,
  saying which have no minimum and why."""
  rows = isoflop_points(SMALL_DATA, (1e14, 1e17), budgets=3, sizes=5)
  budgets = sorted({r['budget'] for r in rows})
  rows = ([r for r in rows if r['budget'] == budgets[0]][:2] + [r for r in rows if r['budget'] == budgets[1]]
          + [dict(r, eval_loss=10.0 - np.log(r['params'])**1.5 / 10) for r in rows if r['budget'] == budgets[2]])
  fitted = scaling.fit(rows, bootstrap=0)
  assert 'error' in fitted['approach2'] and len(fitted['approach2']['skipped']) == 2
  figures = Figures(monkeypatch)
  plots = scaling.plot_fit(rows, fitted, str(tmp_path))
  assert [os.path.basename(p) for p in plots][0] == 'isoflop.png'
  legend = figures.legend('isoflop.png')
  assert f'C = {budgets[0]:.2g}: no minimum (2 distinct size(s); a parabola needs 3)' in legend
  assert f'C = {budgets[2]:.2g}: no minimum (the parabola has no minimum (opens downward))' in legend
  assert f'C = {budgets[1]:.2g}' in legend
  assert not fitted['quality']['minima_inside']['passed']


def test_fits_at_their_bounds_are_dashed_and_lines_span_the_budgets_measured(tmp_path, monkeypatch):
  rows = isoflop_points(SMALL_DATA, (1e14, 1e17), budgets=3, sizes=5)
  fitted = scaling.fit(rows, bootstrap=0)
  figures = Figures(monkeypatch)
  scaling.plot_fit(rows, fitted, str(tmp_path))
  (frontier,) = [l for l in figures.figures['frontier.png'].axes[0].get_lines()
                 if l.get_label().startswith('approach 3 frontier')]
  assert frontier.get_linestyle() == '-' and 'bounds' not in frontier.get_label()
  assert (min(frontier.get_xdata()), max(frontier.get_xdata())) == pytest.approx((1e14, 1e17))
  for ax in figures.figures['optimal.png'].axes:
    for line in ax.get_lines():
      assert (min(line.get_xdata()), max(line.get_xdata())) == pytest.approx((1e14, 1e17))
  # The same fit with E on its bound: dashed and labelled, in both plots.
  at_bounds = dict(fitted, approach3=dict(fitted['approach3'], at_bounds=['log_E']))
  figures = Figures(monkeypatch)
  scaling.plot_fit(rows, at_bounds, str(tmp_path))
  (frontier,) = [l for l in figures.figures['frontier.png'].axes[0].get_lines()
                 if l.get_label().startswith('approach 3 frontier')]
  assert frontier.get_linestyle() == '--' and 'at search bounds: log_E' in frontier.get_label()
  lines3 = [l for ax in figures.figures['optimal.png'].axes for l in ax.get_lines()
            if l.get_label().startswith('approach 3')]
  assert len(lines3) == 2 and all(l.get_linestyle() == '--' for l in lines3)


def test_learning_rate_stage_points_are_left_out_of_the_fits():
  rows = isoflop_points(SMALL_DATA, (1e14, 1e17), budgets=3, sizes=5)
  stage = [dict(r, name=f'LR-{i}', stage='lr', budget=None, eval_loss=r['eval_loss'] + 1.0)
           for i, r in enumerate(rows[:4])]
  fitted = scaling.fit(rows + stage, bootstrap=0)
  assert fitted['points'] == len(rows) and 'error' not in fitted['approach2']
  assert [x['name'] for x in fitted['excluded']] == [r['name'] for r in stage]


def test_the_summary_names_points_left_out_and_counts_the_learning_rate_stage_apart():
  rows = isoflop_points(CHINCHILLA, (1e18, 1e21), budgets=3, sizes=5)
  lr_stage = [dict(rows[0], name=f'LR-{i}', stage='lr') for i in range(4)]
  diverged = [dict(rows[1], name='C-big', eval_loss=None, diverged=True, error='loss nan at step 3')]
  fitted = scaling.fit(rows + lr_stage + diverged, bootstrap=0)
  lines = scaling.summary(fitted).splitlines()
  assert lines[0] == "left out the 4 point(s) of the learning-rate stage (they chose the others' rates)"
  assert lines[1] == 'left out 1 point(s): C-big (diverged: loss nan at step 3)'


def test_a_budget_whose_lowest_loss_is_at_its_smallest_size_is_not_bracketed():
  """A budget that tried only sizes from its optimum up has its best loss at an end: its parabola's vertex may
  still fall inside the sizes (fitted by the shape alone), but the quality check names the budget."""
  rows = isoflop_points(CHINCHILLA, (1e18, 1e21), budgets=3, noise=0.0)
  budgets = sorted({r['budget'] for r in rows})
  last = [r for r in rows if r['budget'] == budgets[-1]]
  rows = [r for r in rows if r['budget'] != budgets[-1]] + sorted(last, key=lambda r: r['params'])[4:]
  fitted = scaling.fit(rows, bootstrap=0)
  assert [m['bracketed'] for m in fitted['approach2']['minima']] == [True, True, False]
  quality = fitted['quality']['minima_inside']
  assert not quality['passed'] and quality['value']['unbracketed'] == [budgets[-1]]
  # Its smallest size measured the lowest loss: with one size below the optimum added back, it is bracketed.
  fixed = rows + [sorted(last, key=lambda r: r['params'])[3]]
  assert scaling.fit(fixed, bootstrap=0)['quality']['minima_inside']['value']['unbracketed'] == []


def test_a_point_trained_at_several_rates_counts_at_its_best():
  """An IsoFLOP point rerun at other learning rates (a rate check) is one point, at the rate whose mean eval loss
  is lowest, its repeats at that rate all kept; the other rates are left out, naming the rate that won. Points of
  one rate, or without a recorded rate, are untouched."""
  rows = [dict(r, lr=1e-3) for r in isoflop_points(CHINCHILLA, (1e18, 1e21), budgets=3, sizes=5)]
  point = rows[2]
  worse = dict(point, name='worse', lr=5e-4, eval_loss=point['eval_loss'] + 0.1)
  better = [dict(point, name=f'better-{seed}', lr=2e-3, eval_loss=point['eval_loss'] - d)
            for seed, d in enumerate((0.01, 0.03))]
  kept, excluded = scaling.usable_points(rows + [worse] + better)
  assert [r['name'] for r in kept] == [r['name'] for r in rows if r is not point] + ['better-0', 'better-1']
  reasons = {x['name']: x['reason'] for x in excluded}
  assert set(reasons) == {point['name'], 'worse'}
  assert reasons['worse'].startswith('another rate of the same point did better: lr 0.002 (eval loss ')
  assert scaling.usable_points(rows)[0] == rows  # one rate a point: nothing left out
  unrecorded = [{k: v for k, v in r.items() if k != 'lr'} for r in rows]
  assert len(scaling.usable_points(unrecorded + [dict(unrecorded[2], name='again')])[0]) == len(rows) + 1
  fitted = scaling.fit(rows + [worse] + better, bootstrap=0)
  assert fitted['points'] == len(rows) + 1 and {x['name'] for x in fitted['excluded']} == {point['name'], 'worse'}


def test_a_point_whose_best_rate_is_the_lowest_or_highest_tried_fails_the_bar():
  """Three rates or more of one point: the best at either end means the rate sweep did not bracket it (a diverged
  rate counts as tried and worst); two rates, or the best between others, pass."""
  rows = [dict(r, lr=1e-3) for r in isoflop_points(CHINCHILLA, (1e18, 1e21), budgets=3, sizes=5)]
  point = rows[2]
  inside = [dict(point, name='low', lr=5e-4, eval_loss=point['eval_loss'] + 0.1),
            dict(point, name='high', lr=2e-3, eval_loss=point['eval_loss'] + 0.05)]
  assert scaling.rates_at_edge(rows + inside) == []
  edge = [dict(point, name='low', lr=5e-4, eval_loss=point['eval_loss'] + 0.1),
          dict(point, name='high', lr=2e-3, eval_loss=point['eval_loss'] - 0.05)]
  assert scaling.rates_at_edge(rows + edge) == [dict(name='high', lr=2e-3, tried=[5e-4, 1e-3, 2e-3])]
  diverged = [inside[0], dict(point, name='high', lr=2e-3, eval_loss=None, diverged=True)]
  assert scaling.rates_at_edge(rows + diverged) == []  # the highest rate diverged: 1e-3 is inside
  assert scaling.rates_at_edge(rows + edge[1:]) == []  # two rates: no bracket to ask for
  checks = scaling.quality(scaling.fit(rows + edge, bootstrap=0))
  assert not checks['rates_inside']['passed'] and checks['rates_inside']['value'] == [
      'high (best of 3 rates: the highest)']
  assert scaling.quality(scaling.fit(rows + inside, bootstrap=0))['rates_inside']['passed']


def test_a_follow_up_sweeps_rates_join_the_study_they_follow(tmp_path):
  """`fit DIR MORE`: a point whose best rate was the highest of its grid, trained at a further rate in another
  directory, is bracketed there; the fit counts both directories, writes into the first, names the second
  (relative to the first), and refuses a point that is in both."""
  rows = [dict(r, lr=1e-3) for r in isoflop_points(CHINCHILLA, (1e18, 1e21), budgets=3, sizes=5)]
  point = rows[2]
  grid = [dict(point, name='p-low', lr=5e-4, eval_loss=point['eval_loss'] + 0.1),
          dict(point, name='p-high', lr=2e-3, eval_loss=point['eval_loss'] - 0.05)]
  study, more = str(tmp_path / 'study'), str(tmp_path / 'more')
  write_results(study, rows + grid)
  write_results(more, [dict(point, name='p-higher', lr=4e-3, eval_loss=point['eval_loss'])])
  alone = scaling.fit_directory(study, bootstrap=0)
  assert alone['quality']['rates_inside']['value'] == ['p-high (best of 3 rates: the highest)'] and 'more' not in alone
  joined = scaling.fit_directory(study, bootstrap=0, more=[more])
  assert joined['quality']['rates_inside']['passed'] and joined['more'] == [os.path.join('..', 'more')]
  assert joined['points'] == alone['points'] and 'p-higher' in {x['name'] for x in joined['excluded']}
  with open(os.path.join(study, 'fit.json')) as f:
    assert json.load(f)['more'] == ['../more']  # relative to the study's directory
  assert not os.path.exists(os.path.join(more, 'fit.json'))
  write_results(more, [dict(point, name='p-high', lr=4e-3, eval_loss=point['eval_loss'])])
  with pytest.raises(ValueError, match=f'p-high is in both {study} and {more}'):
    scaling.fit_directory(study, bootstrap=0, more=[more])


def test_a_point_trained_at_several_rates_can_count_at_the_vertex_of_its_rates(tmp_path):
  """`rate_loss='parabola'`: a tuned point counts at the vertex of the parabola in log lr through its best rate and
  its neighbours (an exact parabola's own minimum, between the grid's rates); its best measured loss is kept
  beside it. A best rate at the grid's edge keeps its measured loss; 'best' (the default) counts the measured."""
  rows = [dict(r, lr=1e-3) for r in isoflop_points(CHINCHILLA, (1e18, 1e21), budgets=3, sizes=5)]
  point, floor = rows[2], rows[2]['eval_loss'] - 0.05
  curve = lambda lr: floor + 0.1 * math.log(lr / 1.5e-3) ** 2  # best rate 1.5e-3, between the grid's 1e-3 and 2e-3
  rates = [dict(point, name=f'{point["name"]}-{lr:g}', lr=lr, eval_loss=curve(lr)) for lr in (5e-4, 1e-3, 2e-3, 4e-3)]
  others = [r for r in rows if r is not point]
  assert scaling.rate_vertex([r['lr'] for r in rates], [r['eval_loss'] for r in rates]) == (
      pytest.approx(1.5e-3, rel=1e-6), pytest.approx(floor, abs=1e-9), False)
  kept = scaling.usable_points(others + rates, rate_loss='parabola')[0]
  tuned = [r for r in kept if r['params'] == point['params'] and r['tokens'] == point['tokens']]
  assert len(kept) == len(rows) and len(tuned) == 1 and tuned[0]['lr'] == 2e-3
  assert tuned[0]['eval_loss'] == pytest.approx(floor, abs=1e-9)
  assert tuned[0]['eval_loss_measured'] == curve(2e-3) > floor and tuned[0]['lr_vertex'] == pytest.approx(1.5e-3)
  assert [r['eval_loss'] for r in scaling.usable_points(others + rates)[0] if r['lr'] == 2e-3] == [curve(2e-3)]
  fitted = scaling.fit(others + rates, bootstrap=0, rate_loss='parabola')
  assert fitted['rate_loss'] == 'parabola' and [x['name'] for x in fitted['interpolated']] == [tuned[0]['name']]
  assert 'vertex of the parabola' in scaling.summary(fitted)
  assert str(tmp_path / 'isoflop.png') in scaling.plot_fit(others + rates, fitted, str(tmp_path))  # at the vertex
  # Still falling at the highest rate: the edge's measured loss stays, as does a point of one rate.
  edge = [dict(r, eval_loss=curve(r['lr'] / 8)) for r in rates]
  kept = scaling.usable_points(others + edge, rate_loss='parabola')[0]
  assert [r['eval_loss'] for r in kept if r['lr'] == 4e-3] == [curve(5e-4)]
  assert scaling.usable_points(rows, rate_loss='parabola')[0] == rows
  with pytest.raises(ValueError, match="rate_loss='mean': use one of best, parabola"):
    scaling.usable_points(rows, rate_loss='mean')
