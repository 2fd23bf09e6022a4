"""experiments/study_speed.py: a study's device time and MFU against issue 35's speed goals."""

import json
import os
import subprocess
import sys

import pytest

from qwenjax import scaling
from train_utils import ROOT, experiment_module  # pylint: disable=g-bad-import-order

SCRIPT = os.path.join(ROOT, 'experiments', 'study_speed.py')


def study(peak=1e15):
  """Two points of 4e17 and 2e17 FLOPs (one of them large) in two pieces of 1,000 and 2,000 s."""
  results = [dict(name='big', params=20e6, flops_actual=4e17, mfu=0.35),
             dict(name='small', params=2e6, flops_actual=2e17, mfu=0.05)]
  pieces = [dict(piece=1, seconds=1000), dict(piece=2, seconds=2000)]
  return results, pieces, peak


def test_speed_against_the_goals():
  speed = experiment_module('study_speed.py').speed
  s = speed(*study())
  # 6e17 FLOPs in 3,000 s of a 1e15 peak: 20% MFU; at 40% they take 1,500 s, so the pieces took 2x (goal 1.5x).
  assert s['flops'] == 6e17 and s['seconds'] == 3000
  assert s['mfu'] == pytest.approx(0.2) and s['ratio'] == pytest.approx(2.0) and not s['ratio_passed']
  assert [r['name'] for r in s['large']] == ['big'] and s['large_passed'] == ['big']  # 10M or more, 30% or more
  faster = speed(study()[0], [dict(piece=1, seconds=2000)], 1e15)
  assert faster['ratio'] == pytest.approx(4 / 3) and faster['ratio_passed']


def test_the_command_reads_a_results_directory(tmp_path):
  results, pieces, peak = study()
  for name, rows in (('results.jsonl', results), ('pieces.jsonl', pieces)):
    (tmp_path / name).write_text(''.join(json.dumps(r) + '\n' for r in rows))
  (tmp_path / 'sweep.json').write_text(json.dumps({'sweep': {'estimate': {'peak_flops': peak}}}))
  done = subprocess.run([sys.executable, SCRIPT, f'--dir={tmp_path}'], cwd=ROOT, capture_output=True, text=True,
                        check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert '20.0% MFU' in done.stdout and '= 2.00 (goal: 1.5 or less): FAIL' in done.stdout
  assert '1 of 1' in done.stdout
  (tmp_path / 'pieces.jsonl').unlink()
  done = subprocess.run([sys.executable, SCRIPT, f'--dir={tmp_path}'], cwd=ROOT, capture_output=True, text=True,
                        check=False)
  assert done.returncode == 2 and 'error: --dir=' in done.stderr and 'pieces.jsonl' in done.stderr


@pytest.mark.parametrize('workers', [1, 3])
def test_gpu_piece_records_each_piece(tmp_path, workers):
  """experiments/gpu_piece.sh adds a line to pieces.jsonl per piece: its number after the committed pieces, its
  seconds, the GPU, the points finished before and after. Here python3 and nvidia-smi are stand-ins: the 'sweep'
  (or with workers, sweep_workers.py, whose two workers each leave a log) finishes one point. What comes back fits
  a device call's 8 files: the workers' logs in one, without step lines."""
  bin_dir, work, out = tmp_path / 'bin', tmp_path / 'work', tmp_path / 'out'
  bin_dir.mkdir()
  results = work / 'isoflop_gpu' / 'results.jsonl'
  logs = ''.join(f'mkdir -p {work}/isoflop_gpu/workers/{i}; printf "I0 step 5/10 | loss 2\\nsweep: p{i} done\\n" '
                 f'> {work}/isoflop_gpu/workers/{i}/sweep.log; ' for i in (0, 1))
  (bin_dir / 'python3').write_text(f'#!/bin/sh\ncase "$*" in *qwenjax.sweep*) echo "{{}}" >> {results};;\n'
                                   f'  *sweep_workers*) echo "{{}}" >> {results}; {logs};; esac\n')
  (bin_dir / 'nvidia-smi').write_text('#!/bin/sh\necho "Stand-in GPU"\n')
  for name in ('python3', 'nvidia-smi'):
    os.chmod(bin_dir / name, 0o755)
  env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', WORK=str(work), OUT=str(out),
             WORKERS=str(workers))
  done = subprocess.run(['bash', 'experiments/gpu_piece.sh', 'isoflop_gpu', '60'], cwd=ROOT, env=env,
                        capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
  committed = os.path.join(ROOT, 'experiments', 'results', 'isoflop_gpu')
  before = len(scaling.read_jsonl(os.path.join(committed, 'results.jsonl')))
  pieces = scaling.read_jsonl(str(out / 'isoflop_gpu' / 'pieces.jsonl'))
  assert pieces[:-1] == scaling.read_jsonl(os.path.join(committed, 'pieces.jsonl'))  # the committed ones, kept
  last = pieces[-1]
  assert last['piece'] == len(pieces) and 0 <= last['seconds'] < 60 and last['device'] == 'Stand-in GPU'
  assert (last['finished_before'], last['finished_after'], last['workers']) == (before, before + 1, workers)
  back = sorted(os.listdir(out / 'isoflop_gpu'))
  assert len(back) <= 8 and 'results.jsonl' in back and 'sweep.log' in back
  if workers > 1:
    assert 'workers.log' in back and not any(name.startswith('worker') and name != 'workers.log' for name in back)
    text = (out / 'isoflop_gpu' / 'workers.log').read_text()
    assert text.splitlines() == ['== worker 0', 'sweep: p0 done', '== worker 1', 'sweep: p1 done']


def test_gpu_piece_runs_a_sweep_file_with_an_argument_in_its_own_directories(tmp_path):
  """`gpu_piece.sh FILE:ARG` (a rate check of one point) passes the argument to the sweep file and keeps the piece
  under FILE/ARG: its directory, the committed one it starts from, and what comes back."""
  bin_dir, work, out = tmp_path / 'bin', tmp_path / 'work', tmp_path / 'out'
  bin_dir.mkdir()
  results = work / 'isoflop_gpu_lrcheck' / 'C3e15-s5' / 'results.jsonl'
  (bin_dir / 'python3').write_text(f'#!/bin/sh\ncase "$*" in *qwenjax.sweep*) echo "$*" > {tmp_path}/args; '
                                   f'echo "{{}}" >> {results};; esac\n')
  (bin_dir / 'nvidia-smi').write_text('#!/bin/sh\necho "Stand-in GPU"\n')
  for name in ('python3', 'nvidia-smi'):
    os.chmod(bin_dir / name, 0o755)
  env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', WORK=str(work), OUT=str(out))
  done = subprocess.run(['bash', 'experiments/gpu_piece.sh', 'isoflop_gpu_lrcheck:C3e15-s5', '60', '--only=x'],
                        cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
  args = (tmp_path / 'args').read_text().split()
  assert '--sweep=experiments/isoflop_gpu_lrcheck.py:C3e15-s5' in args and '--only=x' in args
  assert f'--workdir={work}/isoflop_gpu_lrcheck/C3e15-s5' in args
  back = out / 'isoflop_gpu_lrcheck' / 'C3e15-s5'
  assert sorted(os.listdir(back)) == ['pieces.jsonl', 'results.jsonl', 'sweep.log']
  (piece,) = scaling.read_jsonl(str(back / 'pieces.jsonl'))
  assert (piece['piece'], piece['finished_before'], piece['finished_after']) == (1, 0, 1)
  assert 'isoflop_gpu_lrcheck:C3e15-s5: exit 0' in done.stdout


def test_preflight_names_the_packages_setup_py_requires_and_this_python_lacks(tmp_path):
  """experiments/preflight.py, gpu_piece.sh's first step: one error line naming what is missing (exit 1), before
  a piece's workers each fail on it after their setup; nothing when all are there."""
  script = os.path.join(ROOT, 'experiments', 'preflight.py')
  setup = tmp_path / 'setup.py'
  setup.write_text("setup(name='x', install_requires=['numpy>=1', 'pytest',  # a comment\n"
                   "    'surely-not-installed-qwenjax-dep[extra]>=2; python_version >= \"3\"'])\n")
  run = lambda *args: subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=False)
  result = run(str(setup))
  assert result.returncode == 1 and result.stderr.count('\n') == 1
  assert result.stderr.startswith('error: this Python lacks surely-not-installed-qwenjax-dep (')
  assert 'numpy' not in result.stderr
  setup.write_text("setup(name='x', install_requires=['numpy', 'pytest'])\n")
  assert run(str(setup)).returncode == 0
  assert run(str(setup), 'extra').returncode == 2
