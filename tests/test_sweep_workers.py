"""experiments/sweep_workers.py: a sweep trained by several processes at once gives what one sweep gives."""

import json
import os
import subprocess
import sys
import types

import pytest

from qwenjax import sweep as sweep_lib
from test_sweep import lr_staged_sweep, read_lines  # pylint: disable=g-bad-import-order
from train_utils import ROOT, experiment_module  # pylint: disable=g-bad-import-order

SCRIPT = os.path.join(ROOT, 'experiments', 'sweep_workers.py')


def load_script():
  return experiment_module('sweep_workers.py')


def test_a_free_worker_starts_the_longest_group_its_time_left_can_finish():
  script = load_script()
  pick, slow = script.pick, script.SLOWDOWN
  # Size 11's lr groups by the GPU study's estimate: 410 s and 320 s. 490 s left: the longer one does not fit once
  # shared (410 x SLOWDOWN > 490), the shorter does.
  assert 410.0 * slow > 490.0 >= 320.0 * slow
  assert pick([410.0, 320.0], 490.0, started=False) == 1
  assert pick([410.0, 320.0], 600.0, started=False) == 0
  assert pick([410.0, 320.0], None, started=True) == 0  # no deadline: the longest
  assert pick([100.0, 300.0, 300.0, 90.0], 380.0, started=True) == 1  # ties: the first in run order
  assert pick([100.0, 300.0, 250.0, 90.0], 120.0, started=True) == 3
  # Nothing fits: the shortest when this command has started nothing (a group longer than any piece still runs),
  # else the worker stays idle.
  assert pick([900.0, 700.0], 480.0, started=False) == 1
  assert pick([320.0], 80.0, started=True) is None
  assert pick([], 480.0, started=False) is None


class FakeWorker:
  """A worker process that ends `seconds` after it starts on the test's clock, or at once when stopped."""

  def __init__(self, clock, name, seconds):
    self.clock, self.name, self.end, self.returncode = clock, name, clock[0] + seconds, None

  def poll(self):
    if self.returncode is None and self.clock[0] >= self.end:
      self.returncode = 0
    return self.returncode

  def send_signal(self, sig):
    del sig
    self.returncode = 143

  def kill(self):
    self.returncode = -9


def fake_workers(monkeypatch, tmp_path, seconds, real=None):
  """sweep_workers with its processes, plan and DIR replaced: groups of one point each, estimated at `seconds`
  apiece and taking as long (or `real`'s seconds); returns (the script, the clock, the log of starts, the names
  finished)."""
  real = real or seconds
  script, clock, starts, done = load_script(), [0.0], [], []
  homes = {}

  def ready(sweep, root, busy):
    del sweep, root
    names = [n for n in seconds if n not in done and n not in busy]
    return [[types.SimpleNamespace(name=n)] for n in names], [seconds[n] for n in names]

  def prepare_worker(root, i, names):
    del root
    home = tmp_path / f'worker{i}'
    home.mkdir(exist_ok=True)
    homes[home] = names
    return home

  def popen(command, **kwargs):
    del kwargs
    names = command[-1].removeprefix('--only=').split(',')
    starts.append((clock[0], names))
    processes[names[0]] = FakeWorker(clock, names[0], real[names[0]])
    return processes[names[0]]

  def merge(root, finished):  # a stopped worker's point is unfinished
    del root
    names = [n for home in finished for n in homes[home] if processes[n].returncode == 0]
    done.extend(names)
    return names

  processes = {}
  monkeypatch.setattr(script, 'ready', ready)
  monkeypatch.setattr(script, 'prepare_worker', prepare_worker)
  monkeypatch.setattr(script, 'merge', merge)
  monkeypatch.setattr(script.subprocess, 'Popen', popen)
  monkeypatch.setattr(script, 'time', types.SimpleNamespace(time=lambda: clock[0],
                                                          sleep=lambda s: clock.__setitem__(0, clock[0] + s)))
  return script, clock, starts, done


def test_a_worker_that_ends_starts_the_next_group_without_waiting_for_the_others(monkeypatch, tmp_path):
  script, clock, starts, done = fake_workers(monkeypatch, tmp_path, {'a': 3.0, 'b': 1.0, 'c': 1.0, 'd': 1.0})
  assert script.run_workers([], None, tmp_path, 2, deadline=None) == []
  # a (the longest) and b start together; b's worker goes on to c, then d, while a trains.
  assert [(t, names) for t, names in starts] == [(0.0, ['a']), (0.0, ['b']), (1.0, ['c']), (2.0, ['d'])]
  assert sorted(done) == ['a', 'b', 'c', 'd'] and clock[0] <= 4.0


def test_at_the_deadline_the_workers_stop_and_nothing_new_starts(monkeypatch, tmp_path):
  seconds = {'a': 10.0, 'b': 2.0, 'c': 2.0}
  script, clock, starts, done = fake_workers(monkeypatch, tmp_path, seconds)
  assert script.run_workers([], None, tmp_path, 2, deadline=5.0) == []
  # a does not fit in 5 s, so the two short groups start, then nothing (a would be cut short): a is left.
  assert [names for _, names in starts] == [['b'], ['c']]
  assert sorted(done) == ['b', 'c'] and clock[0] < 6.0
  script, clock, starts, done = fake_workers(monkeypatch, tmp_path, {'a': 10.0})
  assert script.run_workers([], None, tmp_path, 2, deadline=5.0) == []  # nothing fits: the shortest, stopped
  assert [names for _, names in starts] == [['a']] and done == [] and 5.0 <= clock[0] <= 7.0


def test_groups_that_take_longer_than_estimated_make_the_next_estimates_longer(monkeypatch, tmp_path):
  """b, estimated at 4 s, takes 8: with 4 s left, a (estimated 3 s) would take 6, so it does not start (at
  SLOWDOWN alone it would, and the deadline would cut it)."""
  script = load_script()
  assert script.slowdown([]) == script.SLOWDOWN and script.slowdown([2.0, 1.0, 3.0]) == 2.0
  assert script.slowdown([0.5]) == script.SLOWDOWN  # faster than estimated: the floor
  assert 3.0 * script.SLOWDOWN <= 4.0 < 3.0 * 2.0
  script, clock, starts, done = fake_workers(monkeypatch, tmp_path, {'a': 3.0, 'b': 4.0},
                                             real={'a': 6.0, 'b': 8.0})
  assert script.run_workers([], None, tmp_path, 1, deadline=12.0) == []
  assert starts == [(0.0, ['b'])] and done == ['b'] and clock[0] < 12.0


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
