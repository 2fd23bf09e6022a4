"""The command-line convention (qwenjax/cli.py) on every command, as users run them: `python -m qwenjax.<command>`.

Usage errors: one `error:` line naming the flag, status 2. Failures at run time: one `error:` line, status 1.
Ctrl-C: a checkpoint and status 130; SIGTERM: a checkpoint and 143; a second Ctrl-C stops at once. `--help`
lists the command's own flags alone.
"""

import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from qwenjax import checkpoint
from qwenjax import config as config_lib
from train_utils import ROOT, TINY, read_metrics, tiny_overrides, train_command

SWEEP = os.path.join(ROOT, 'experiments', 'isoflop_small.py')

# (command line, what the one error line must say). Each is a usage error: status 2, before anything runs.
USAGE_ERRORS = {
    'train unknown flag': (['train', f'--config={TINY}', '--workdir=/tmp/unused', '--worksdir=x'],
                           ['--worksdir', 'did you mean --workdir?']),
    'train missing flag': (['train', f'--config={TINY}'], ['--workdir is required']),
    'train unknown config key': (['train', f'--config={TINY}', '--workdir=/tmp/unused', '--config.train.stepz=1'],
                                 ['config.train.stepz', 'Did you mean config.train.steps?']),
    'train config value of the wrong type': (
        ['train', f'--config={TINY}', '--workdir=/tmp/unused', '--config.train.steps=abc'],
        ['--config.train.steps=abc', 'takes an integer']),
    'train stray argument': (['train', f'--config={TINY}', '--workdir=/tmp/unused', 'steps=3'],
                             ["unexpected argument 'steps=3'", '--config.SECTION.KEY=VALUE']),
    'sample unknown flag': (['sample', '--workdir=/tmp/unused', '--promt=hi'], ['--promt', 'did you mean --prompt?']),
    'sample missing flag': (['sample', '--workdir=/tmp/unused'], ['--prompt is required']),
    'sample system without chat': (['sample', '--workdir=/tmp/unused', '--prompt=hi', '--system=Be brief.'],
                                   ['--system', '--chat']),
    'train chat data without files': (['train', f'--config={TINY}', '--workdir=/tmp/unused', '--config.data.format=chat'],
                                      ["data.format='chat'", 'data.train_files']),
    'evaluate unknown flag': (['evaluate', '--workdir=/tmp/unused', '--file=a.txt'], ['--file', 'did you mean']),
    'evaluate missing flag': (['evaluate', '--files=a.txt'], ['give one of --workdir']),
    'export unknown flag': (['export', '--workdir=/tmp/unused', '--output=/tmp/out'], ['--output']),
    'export missing flag': (['export', '--workdir=/tmp/unused'], ['--out is required']),
    'sweep unknown flag': (['sweep', f'--sweep={SWEEP}', '--workdir=/tmp/unused', '--emitt'], ['--emitt']),
    'sweep missing flag': (['sweep', f'--sweep={SWEEP}'], ['--workdir is required']),
    'scaling unknown flag': (['scaling', 'fit', '/tmp/unused', '--boostrap=5'], ['--boostrap', '--bootstrap']),
    'scaling missing subcommand': (['scaling'], ['fit DIR', 'plot DIR']),
    'prepare unknown flag': (['prepare', f'--config={TINY}', '--confg.data.seq_len=8'], ['--confg.data.seq_len']),
    'prepare missing flag': (['prepare'], ['--config is required']),
}


def _command(args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', f'qwenjax.{args[0]}', *args[1:]], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


def _commands(cases):
  """Runs the command lines of `cases` a few at a time (each spends seconds importing jax); their results by name."""
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    futures = {name: pool.submit(_command, args) for name, args in cases.items()}
    return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope='module')
def usage_results():
  return _commands({name: args for name, (args, _) in USAGE_ERRORS.items()})


@pytest.mark.parametrize('case', list(USAGE_ERRORS))
def test_a_usage_error_is_one_line_and_status_2(usage_results, case):
  done = usage_results[case]
  lines = done.stderr.splitlines()
  assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), (done.returncode, done.stderr)
  for words in USAGE_ERRORS[case][1]:
    assert words in lines[0], lines[0]
  assert not done.stdout


@pytest.mark.slow
def test_help_lists_the_commands_own_flags_one_line_each():
  results = _commands({'sweep': ['sweep', '--help'], 'train': ['train', '--help'], 'scaling': ['scaling', '-h']})
  for name, done in results.items():
    assert done.returncode == 0 and not done.stderr, done.stderr
    flag_lines = done.stdout.split(' flags:\n', 1)[1].splitlines()
    assert all(line.startswith('  --') or line.startswith('  (') for line in flag_lines), (name, flag_lines)
  sweep = results['sweep'].stdout
  assert '--sweep=FILE' in sweep and '--workdir=PATH' in sweep and '--coordinator_address' in sweep
  assert '--config=' not in sweep and '--bootstrap' not in sweep  # train's and scaling's, which the sweep imports
  assert '--config=FILE' in results['train'].stdout and '--bootstrap=N' in results['scaling'].stdout


@pytest.mark.slow
def test_importing_a_command_defines_no_flags():
  """The sweep imports train and scaling; notebooks import any command: their flags come only with running them."""
  code = ('from absl import flags\n'
          'import qwenjax.train, qwenjax.sweep, qwenjax.scaling, qwenjax.sample, qwenjax.evaluate, qwenjax.export\n'
          'import qwenjax.prepare, qwenjax.distributed, qwenjax.pretrained, qwenjax.cli\n'
          'print(sorted(m for m in flags.FLAGS.flags_by_module_dict() if "qwenjax" in m))')
  done = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                        capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0 and done.stdout.strip() == '[]', (done.stdout, done.stderr[-2000:])


@pytest.fixture
def workdir_without_checkpoints(tmp_path, tokenizer_file):
  """A training run's workdir as a run leaves it before its first checkpoint: config.json and the tokenizer."""
  workdir = tmp_path / 'run'
  (workdir / 'tokenizer').mkdir(parents=True)
  shutil.copy(tokenizer_file, workdir / 'tokenizer' / 'tokenizer.model')
  config = config_lib.load(TINY)
  (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
  return str(workdir)


@pytest.mark.slow
def test_a_failure_at_run_time_is_one_line_and_status_1(workdir_without_checkpoints, tmp_path):
  workdir = workdir_without_checkpoints
  (tmp_path / 'a.txt').write_text('some text')
  results = _commands({
      'sample': ['sample', f'--workdir={workdir}', '--prompt=hi'],
      'evaluate': ['evaluate', f'--workdir={workdir}', f'--files={tmp_path}/a.txt'],
      'export': ['export', f'--workdir={workdir}', f'--out={tmp_path}/hf'],
      'scaling': ['scaling', 'fit', str(tmp_path / 'nonexistent')],
  })
  for name, done in results.items():
    errors = [line for line in done.stderr.splitlines() if line.startswith('error: ')]
    assert done.returncode == 1 and len(errors) == 1, (name, done.stderr)
    assert done.stderr.rstrip().endswith(errors[0]) and 'Traceback' not in done.stderr, (name, done.stderr)
    if name in ('sample', 'evaluate', 'export'):
      assert f'no checkpoint in {workdir}/checkpoints' in errors[0], (name, errors[0])
  assert not os.path.exists(tmp_path / 'hf' / 'config.json')


def _start(workdir, tokenizer_file, tmp_path, name):
  command, env = train_command(workdir, tiny_overrides(tokenizer_file))
  out = open(tmp_path / f'{name}.out', 'w')  # pylint: disable=consider-using-with
  err = open(tmp_path / f'{name}.err', 'w')  # pylint: disable=consider-using-with  (files: pipes could fill)
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err), err


def _wait_for_steps(process, workdir, steps, err):
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None and (
      max((r['step'] for r in read_metrics(workdir)), default=0) < steps):
    time.sleep(0.2)
  assert process.poll() is None, open(err.name).read()[-3000:]


def _finish(process, err):
  process.wait(timeout=180)
  err.close()
  return open(err.name).read()


@pytest.mark.slow
def test_ctrl_c_and_sigterm_save_and_exit_130_and_143(tmp_path, tokenizer_file):
  """One tiny run, stopped three times: Ctrl-C (saves, 130), SIGTERM after resuming (saves, 143), then Ctrl-C twice
  (stops at once, 130, one line and no traceback)."""
  workdir = str(tmp_path / 'run')
  saved = []
  for name, signals, status in (('sigint', [signal.SIGINT], 130), ('sigterm', [signal.SIGTERM], 143),
                                ('twice', [signal.SIGINT, signal.SIGINT], 130)):
    process, err = _start(workdir, tokenizer_file, tmp_path, name)
    _wait_for_steps(process, workdir, (saved[-1] if saved else 0) + 2, err)
    for sig in signals:
      process.send_signal(sig)
    stderr = _finish(process, err)
    assert process.returncode == status, stderr[-3000:]
    last = stderr.rstrip().splitlines()[-1]
    assert last.startswith('stopped: ') and 'Traceback' not in stderr and 'error:' not in stderr, stderr[-3000:]
    if name == 'twice':
      continue  # saved or not, depending on whether the second signal came before the save
    assert f'{signal.Signals(signals[0]).name} received: stopped at step' in last and 'checkpoint saved' in last
    step = max(r['step'] for r in read_metrics(workdir))
    assert checkpoint.Checkpointer(workdir).all_steps()[-1] == step
    assert not saved or step > saved[-1]  # resumed, then saved again
    saved.append(step)
  assert not os.path.exists(os.path.join(workdir, 'lock.json'))  # released every time


SWEEP_FILE = '''
import ml_collections


def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.base = 'configs/tiny.py'
  sweep.overrides = ml_collections.ConfigDict(dict(
      model=dict(vocab_size=512, use_sliding_window=False),
      data=dict(seq_len=32, tokenizer={tokenizer!r}, train_files={files!r}, eval_files={files!r}),
      train=dict(batch_size=8, log_every=1, eval_steps=1)))
  sweep.ladder = ml_collections.ConfigDict(dict(sizes=(1,), width_per_size=32, depth=1, head_dim=16, q_per_kv=1,
                                                mlp_ratio=2.0))
  sweep.tokens = (8 * 32 * 100_000,)  # one point of 100,000 steps: stopped long before its end
  sweep.max_epochs = 1e9
  return sweep
'''


@pytest.mark.slow
def test_a_sweep_stopped_by_sigterm_saves_its_point_and_exits_143(tmp_path, tokenizer_file):
  files = os.path.join(os.path.dirname(os.__file__), 'json', '*.py')
  (tmp_path / 'sweep.py').write_text(SWEEP_FILE.format(tokenizer=tokenizer_file, files=files))
  workdir = str(tmp_path / 'sweep')
  command = [sys.executable, '-m', 'qwenjax.sweep', f'--sweep={tmp_path}/sweep.py', f'--workdir={workdir}']
  err = open(tmp_path / 'sweep.err', 'w')  # pylint: disable=consider-using-with
  process = subprocess.Popen(command, cwd=ROOT, env=train_command(workdir, {})[1], stdout=subprocess.DEVNULL,
                             stderr=err)
  point = os.path.join(workdir, 'D2.56e7-s1')
  _wait_for_steps(process, point, 2, err)
  process.send_signal(signal.SIGTERM)
  stderr = _finish(process, err)
  assert process.returncode == 143, stderr[-3000:]
  last = stderr.rstrip().splitlines()[-1]
  assert last.startswith('stopped: sweep point D2.56e7-s1: SIGTERM received: stopped at step'), last
  step = max(r['step'] for r in read_metrics(point))
  assert checkpoint.Checkpointer(point).all_steps() == [step]
  assert not os.path.exists(os.path.join(workdir, 'results.jsonl'))  # not a result: it resumes
