"""experiments/design_power.py: simulated studies on a sweep's plan, scored by the fit's quality bar."""

import json
import os
import subprocess
import sys

import pytest

from test_sweep import load_sweep  # pylint: disable=g-bad-import-order
from train_utils import ROOT, experiment_module  # pylint: disable=g-bad-import-order


def _module():
  return experiment_module('design_power.py')


def test_noise_widens_the_interval_and_a_clean_study_recovers_the_law():
  power = _module()
  points = power.isoflop_points(load_sweep('isoflop_gpu.py'))
  assert len(points) == 24 and all(p['budget'] and p['stage'] == 'isoflop' for p in points)
  # The second study trains each of the same points, a size more at 1e16 and 3e16 and six at 3e14, at three rates:
  # each counts once, as in its fit.
  tuned = power.isoflop_points(load_sweep('isoflop_gpu2.py'))
  first = {(p['budget'], p['params'], p['tokens']) for p in points}
  assert len(tuned) == 32 and first < {(p['budget'], p['params'], p['tokens']) for p in tuned}
  clean = power.simulate(points, power.BESIROGLU, 0.0, 1, bootstrap=20)
  noisy = power.simulate(points, power.BESIROGLU, 0.05, 3, bootstrap=20)
  assert clean['true_a'] == pytest.approx(0.3658 / (0.3478 + 0.3658))
  assert abs(clean['a_error_mean']) < 0.03 and clean['all'] == 1.0
  assert noisy['a_interval_median'] > 2 * clean['a_interval_median']
  assert 0.0 <= noisy['all'] <= noisy['a_interval'] <= 1.0


def test_law_from_a_fit(tmp_path):
  power = _module()
  law = dict(E=1.5, A=400.0, alpha=0.3, B=900.0, beta=0.3)
  (tmp_path / 'fit.json').write_text(json.dumps(dict(approach3=dict(law, a=0.5, ci={}))))
  assert power.law_from_fit(str(tmp_path / 'fit.json')) == law
  (tmp_path / 'bad.json').write_text(json.dumps(dict(approach3=dict(error='too few points'))))
  with pytest.raises(ValueError, match='too few points'):
    power.law_from_fit(str(tmp_path / 'bad.json'))


@pytest.mark.parametrize('args,status,message', [
    (['--sweep=experiments/isoflop_gpu.py', '--noise=0.01,x'], 2, '--noise'),
    (['--noise=0.01'], 2, '--sweep'),
    (['--sweep=experiments/isoflop_gpu.py', '--law=/nonexistent/fit.json'], 1, 'nonexistent'),
])
def test_command_errors(args, status, message):
  done = subprocess.run([sys.executable, 'experiments/design_power.py', *args], cwd=ROOT, capture_output=True,
                        text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300)
  assert done.returncode == status, done.stderr
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith('error:') and message in last
