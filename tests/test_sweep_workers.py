"""experiments/sweep_workers.py: a sweep trained by several processes at once gives what one sweep gives."""

import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest

from qwenjax import sweep as sweep_lib
from test_sweep import lr_staged_sweep, read_lines  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'experiments', 'sweep_workers.py')


def load_script():
  spec = importlib.util.spec_from_file_location('_sweep_workers', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_points_are_dealt_longest_first_to_the_least_loaded_worker():
  deal = load_script().deal
  units = [[types.SimpleNamespace(name=f'p{i}')] for i in range(5)]
  # Longest first: p1 (9 s) to worker 0, p2 (5) to 1, p0 (4) to 1, p3 (3) to 0 (9 against 9: the lower index),
  # p4 (1) to 1; each worker in run order.
  assert deal(units, [4.0, 9.0, 5.0, 3.0, 1.0], 2) == [['p1', 'p3'], ['p0', 'p2', 'p4']]
  assert deal(units[:1], [1.0], 3) == [['p0']]  # no idle worker is started


def test_a_piece_starts_only_what_its_time_left_can_finish():
  within = load_script().within
  # Size 11's lr groups by the GPU study's estimate: 410 s and 320 s. 490 s left: the longer one alone (the two
  # would take 730 s one after another); then 80 s left: nothing more this piece.
  assert within([410.0, 320.0], 490.0, started=False) == [0]
  assert within([320.0], 80.0, started=True) == []
  # Longest first, then whatever still fits, in run order.
  assert within([100.0, 300.0, 250.0, 90.0], 400.0, started=False) == [0, 1]
  assert within([100.0, 300.0, 250.0, 90.0], 500.0, started=False) == [0, 1, 3]
  assert within([100.0, 300.0, 250.0, 90.0], 560.0, started=False) == [1, 2]
  # A group longer than any piece still runs, alone, when the command has trained nothing yet.
  assert within([900.0, 700.0], 480.0, started=False) == [1]
  assert within([], 480.0, started=False) == []


@pytest.mark.slow
def test_two_workers_train_what_one_sweep_trains(tmp_path):
  sweep = lr_staged_sweep(str(tmp_path / 'prepared'))
  # One shape, compiled once and shared through the compilation cache: 3 rates, then 2 budgets at the chosen one.
  sweep.ladder.sizes, sweep.lr_sweep.sizes, sweep.budgets = (1,), (1,), (6e7, 2e8)
  sweep.group_size = 2
  sweep.overrides.train.compilation_cache_dir = str(tmp_path / 'cache')  # the workers reuse what `alone` compiled
  path = tmp_path / 'sweep_file.py'
  path.write_text(f'import ml_collections\n\n\ndef get_config():\n'
                  f'  return ml_collections.ConfigDict({sweep.to_dict()!r})\n')
  alone = {r['name']: r for r in sweep_lib.run(sweep, str(tmp_path / 'alone'))}
  workdir = tmp_path / 'together'
  out = subprocess.run([sys.executable, SCRIPT, f'--sweep={path}', f'--workdir={workdir}', '--workers=2'],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  lines = read_lines(workdir / 'results.jsonl')
  assert sorted(r['name'] for r in lines) == sorted(alone) and len(alone) == 5  # each point once
  for record in lines:
    want = alone[record['name']]
    assert record['eval_loss'] == pytest.approx(want['eval_loss'], rel=1e-5), record['name']
    assert record['lr'] == want['lr'] and record['steps'] == want['steps']
    assert str(workdir / 'workers') not in json.dumps(record['overrides'])  # DIR's paths, as one sweep records them
  assert json.loads((workdir / 'lr.json').read_text()) == json.loads((tmp_path / 'alone' / 'lr.json').read_text())
  logs = [(workdir / 'workers' / str(i) / 'sweep.log').read_text() for i in range(2)]
  assert all(' done: eval_loss ' in log for log in logs)  # both trained points
  assert '5 of 5 point(s) finished' in out.stdout
  # Finished: running it again trains nothing.
  again = subprocess.run([sys.executable, SCRIPT, f'--sweep={path}', f'--workdir={workdir}', '--workers=2'],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert again.returncode == 0 and len(read_lines(workdir / 'results.jsonl')) == 5
