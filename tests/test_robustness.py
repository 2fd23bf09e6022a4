"""Nothing lost: checkpoints moved only when proven corrupt, non-finite steps never applied or saved, one run per
workdir, config.json kept, clear data errors, SIGINT and kill -9 handled (issue: 'Nothing lost')."""

import gc
import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from qwenjax import checkpoint
from qwenjax import config as config_lib
from qwenjax import data
from qwenjax import lock as lock_lib
from qwenjax import train
from train_utils import (ROOT, config_from_overrides, read_metrics, small_config, start_training, tiny_overrides,
                         train_command)

# Reading damaged checkpoints leaves orbax read coroutines that are never awaited (collected at the end).
pytestmark = [pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning'),
              pytest.mark.filterwarnings('ignore:coroutine .* was never awaited:RuntimeWarning')]


@pytest.fixture(scope='module', autouse=True)
def _collect_abandoned_reads():
  yield
  gc.collect()


def fast_config(tokenizer_file, **train_overrides):
  config = small_config(**{'steps': 4, 'log_every': 1, 'checkpoint_every': 2, 'warmup_steps': 2,
                           **train_overrides})
  config.model.update(num_hidden_layers=1, hidden_size=64, intermediate_size=128)
  config.data.update(tokenizer=tokenizer_file, seq_len=32, shuffle_window=0)
  config.train.update(batch_size=8, eval_steps=0)
  return config


def files_of(directory):
  return sorted(os.path.relpath(os.path.join(d, f), directory) for d, _, names in os.walk(directory) for f in names)


@pytest.fixture(scope='module')
def four_steps(tmp_path_factory, tokenizer_file):
  """A run of 4 steps with checkpoints at 2 and 4; tests copy it."""
  workdir = str(tmp_path_factory.mktemp('four_steps'))
  config = fast_config(tokenizer_file)
  train.train_and_evaluate(config, workdir)
  return config, workdir


def copy_run(four_steps, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  config, source = four_steps
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  return config.copy_and_resolve_references(), workdir


def test_changed_shuffle_window_resumes_with_a_warning_and_moves_nothing(four_steps, tmp_path, caplog):
  config, workdir = copy_run(four_steps, tmp_path)
  config.data.shuffle_window = 64
  config.train.steps = 6
  train.train_and_evaluate(config, workdir)
  assert 'data.shuffle_window: 0 -> 64' in caplog.text and 'resuming at step 4 with a different data stream' in caplog.text
  assert not os.path.exists(os.path.join(workdir, 'checkpoints_corrupt'))
  steps = [r['step'] for r in read_metrics(workdir) if 'loss' in r]
  assert steps == [1, 2, 3, 4, 5, 6]
  # The old config is kept beside the new one.
  with open(os.path.join(workdir, 'config.4.json')) as f:
    assert json.load(f)['data']['shuffle_window'] == 0
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['data']['shuffle_window'] == 64


def test_a_readable_checkpoint_that_fails_to_restore_is_left_alone(four_steps, tmp_path, monkeypatch):
  config, workdir = copy_run(four_steps, tmp_path)
  config.train.lr = 1e-3
  before = files_of(workdir)
  original = ocp.CheckpointManager.restore

  def failing_restore(self, step, args=None, **kwargs):
    if isinstance(args, ocp.args.Composite) and 'state' in args.keys() and any(
        isinstance(getattr(x, 'sharding', None), jax.sharding.NamedSharding) for x in jax.tree.leaves(
            args['state'].item)):  # into this run's mesh; the corruption test reads onto one CPU device
      raise ValueError('simulated: cannot place the arrays')
    return original(self, step, args=args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'restore', failing_restore)
  with pytest.raises(checkpoint.RestoreError, match=r'(?s)could not be restored into this run.*left where it is.*'
                     r'train.lr: 0.003 -> 0.001'):
    train.train_and_evaluate(config, workdir)
  assert files_of(workdir) == before  # nothing moved, config.json and metrics untouched

  # An out-of-memory error while reading is the machine's, not the checkpoint's: nothing moves either.
  monkeypatch.setattr(ocp.CheckpointManager, 'restore', lambda *a, **k: (_ for _ in ()).throw(
      MemoryError('RESOURCE_EXHAUSTED: out of memory')))
  with pytest.raises(checkpoint.RestoreError, match='could not be restored'):
    train.train_and_evaluate(config, workdir)
  assert files_of(workdir) == before


@pytest.mark.parametrize('damage', ['data record', 'array metadata'])
def test_damage_outside_the_arrays_is_corruption_too(four_steps, tmp_path, damage):
  """A garbled data record or emptied array metadata: the checkpoint does not restore as saved, so it is set
  aside and the run resumes from the previous one (not stopped as if the run's settings were at fault)."""
  config, workdir = copy_run(four_steps, tmp_path)
  latest = os.path.join(workdir, 'checkpoints', '4')
  if damage == 'data record':
    with open(os.path.join(latest, 'data', 'metadata'), 'w') as f:
      f.write('{"corpus": ')
  else:
    open(os.path.join(latest, 'state', 'array_metadatas', 'process_0'), 'w').close()
  config.train.steps = 5
  train.train_and_evaluate(config, workdir)
  assert os.listdir(os.path.join(workdir, 'checkpoints_corrupt')) == ['4']
  assert [r['step'] for r in read_metrics(workdir) if 'loss' in r] == [1, 2, 3, 4, 5]  # resumed from step 2


@pytest.mark.slow
def test_when_no_checkpoint_can_be_read_the_run_stops(four_steps, tmp_path):
  config, workdir = copy_run(four_steps, tmp_path)
  for step in ('2', '4'):  # both damaged: their array data is gone
    array_dir = os.path.join(workdir, 'checkpoints', step, 'state', 'ocdbt.process_0', 'd')
    for name in os.listdir(array_dir):
      os.remove(os.path.join(array_dir, name))
  with pytest.raises(checkpoint.RestoreError, match=r'no checkpoint in .* can be read.*restart_if_unreadable'):
    train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints_corrupt'))) == ['2', '4']
  assert max(r['step'] for r in read_metrics(workdir)) == 4  # no fresh start was logged
  with pytest.raises(checkpoint.RestoreError, match='no checkpoint'):  # and not on the next attempt either
    train.train_and_evaluate(config, workdir)
  config.train.restart_if_unreadable = True
  train.train_and_evaluate(config, workdir)
  assert [r['step'] for r in read_metrics(workdir) if 'loss' in r] == [1, 2, 3, 4]


def test_nonfinite_steps_are_skipped_and_never_saved(tmp_path, tokenizer_file, monkeypatch, caplog):
  """NaN weights in the batches of steps 3-5 (a bad batch), then every step from 8 on."""
  original = data.StepBatches.__call__
  bad = lambda step: 2 <= step <= 4 or step >= 7

  def poisoned(self, step):
    batch = original(self, step)
    if bad(step):
      batch['weights'] = batch['weights'] * np.nan
    return batch

  monkeypatch.setattr(data.StepBatches, '__call__', poisoned)
  workdir = str(tmp_path / 'run')
  config = fast_config(tokenizer_file, steps=20, checkpoint_every=2, keep_checkpoints=1, max_nonfinite_steps=4,
                       log_every=3)
  with pytest.raises(checkpoint.NonFiniteError, match=r'4 steps in a row \(steps 8-11\).*max_nonfinite_steps=4'):
    train.train_and_evaluate(config, workdir)
  records = [r for r in read_metrics(workdir) if 'loss' in r]
  assert [(r['step'], r['skipped']) for r in records] == [(3, 1), (6, 2), (9, 2)]  # skipped steps per line
  assert 'update skipped' in caplog.text
  # No checkpoint is written while steps are skipped (4 and 8, 10 were due): the state that gave a non-finite
  # loss is suspect (a huge lr blows the parameters up to finite garbage), and with keep_checkpoints=1 saving it
  # would delete the last good one. Skipped steps left the parameters as they were: step 6's holds finite values.
  assert checkpoint.Checkpointer(workdir).all_steps() == [6]
  assert 'not saving a checkpoint while steps are skipped' in caplog.text
  _, params, _ = checkpoint.restore_params(workdir)
  assert checkpoint.all_finite(params)


@pytest.mark.slow
def test_a_nonfinite_state_is_never_written_and_a_nonfinite_checkpoint_is_corrupt(four_steps, tmp_path, caplog):
  config, workdir = copy_run(four_steps, tmp_path)
  ckpt = checkpoint.Checkpointer(workdir, config_lib.CheckpointConfig(keep_checkpoints=1))
  _, params, _ = checkpoint.restore_params(workdir)
  bad = {'params': jax.tree.map(lambda x: x * np.nan, params)}
  with pytest.raises(checkpoint.NonFiniteError, match='not saved'):
    ckpt.save(6, bad, {})
  ckpt.close()
  assert checkpoint.Checkpointer(workdir).all_steps() == [2, 4]  # rotation deleted nothing
  # A checkpoint holding NaN (written by another tool, or damaged) is proven corrupt and set aside.
  ckpt = checkpoint.Checkpointer(workdir, config_lib.CheckpointConfig(keep_checkpoints=5))
  state, step, _ = ckpt.restore(_abstract_state(config))
  state = jax.tree.map(lambda x: x * np.nan if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x, state)
  ckpt._manager.save(6, args=ocp.args.Composite(state=ocp.args.StandardSave(state),  # pylint: disable=protected-access
                                                data=ocp.args.JsonSave({})), force=True)
  ckpt.close()
  config.train.steps = 6
  train.train_and_evaluate(config, workdir)
  assert 'checkpoint at step 6 is corrupt' in caplog.text and 'NaN or infinite' in caplog.text
  assert os.listdir(os.path.join(workdir, 'checkpoints_corrupt')) == ['6']
  assert step == 4 and [r['step'] for r in read_metrics(workdir) if 'loss' in r] == [1, 2, 3, 4, 5, 6]


def _abstract_state(config):
  from qwenjax import sharding, train_step  # pylint: disable=g-import-not-at-top
  run = config_lib.settings(config)
  model_config = run.model
  mesh = sharding.make_mesh(run.mesh)
  rules = sharding.logical_axis_rules(run.mesh.rules, mesh, model_config)
  tx = train_step.make_optimizer(run.optimizer)
  return train_step.abstract_state(model_config, tx, train_step.state_shardings(model_config, tx, mesh, rules))


def test_one_run_per_workdir(four_steps, tmp_path):
  config, workdir = copy_run(four_steps, tmp_path)
  config.train.steps = 6
  with lock_lib.Lock(workdir):  # another run, alive, holds the workdir
    with pytest.raises(lock_lib.WorkdirBusyError, match=rf'in use by process {os.getpid()} on host .*another --workdir'):
      train.train_and_evaluate(config, workdir)
  assert max(r['step'] for r in read_metrics(workdir)) == 4
  # A lock left by a process that died is stale: the next run takes it over.
  with open(os.path.join(workdir, 'lock.json'), 'w') as f:
    json.dump({'host': os.uname().nodename, 'pid': 2**22 + 12345, 'started': time.time(), 'heartbeat': time.time()},
              f)
  import socket  # pylint: disable=g-import-not-at-top
  assert socket.gethostname() == os.uname().nodename
  train.train_and_evaluate(config, workdir)
  assert max(r['step'] for r in read_metrics(workdir)) == 6
  assert not os.path.exists(os.path.join(workdir, 'lock.json'))
  # A holder on another host whose heartbeat stopped long ago is stale too; a recent one is not.
  for age, busy in ((3600, False), (5, True)):
    with open(os.path.join(workdir, 'lock.json'), 'w') as f:
      json.dump({'host': 'elsewhere', 'pid': 1, 'started': 0, 'heartbeat': time.time() - age}, f)
    lock = lock_lib.Lock(workdir)
    if busy:
      with pytest.raises(lock_lib.WorkdirBusyError, match='process 1 on host elsewhere'):
        lock.acquire()
    else:
      lock.acquire()
      lock.release()


@pytest.mark.slow
def test_a_failed_restart_leaves_config_json_as_it_was(four_steps, tmp_path):
  config, workdir = copy_run(four_steps, tmp_path)
  with open(os.path.join(workdir, 'config.json')) as f:
    before = f.read()
  config.model.hidden_size = 96
  with pytest.raises(checkpoint.ShapeMismatchError, match=r'model.hidden_size: 64 -> 96'):
    train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert f.read() == before
  assert not [n for n in os.listdir(workdir) if n.startswith('config.') and n != 'config.json']


@pytest.mark.slow
def test_switching_grad_clip_on_resume_works(four_steps, tmp_path):
  config, workdir = copy_run(four_steps, tmp_path)
  config.train.update(grad_clip=0.0, steps=5)
  train.train_and_evaluate(config, workdir)
  assert max(r['step'] for r in read_metrics(workdir)) == 5


def test_checkpoint_every_zero_saves_only_at_the_end(tmp_path, tokenizer_file):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(fast_config(tokenizer_file, checkpoint_every=0), workdir)
  assert checkpoint.Checkpointer(workdir).all_steps() == [4]


@pytest.mark.parametrize('content,message', [
    (b'{"text": "one"}\n{"text": "two"}\n{"text": broken}\n', r'docs.jsonl:3: malformed JSON'),
    (b'\x7fELF\x02\x01\x01\x00\x00\x00\x00', r'no text to train on: all 1 document\(s\) are not UTF-8 text \(e.g. .*docs.txt: binary data'),
    (b'', r'no text to train on: every document is empty'),
])
def test_bad_training_files_are_named(tmp_path, content, message):
  name = 'docs.jsonl' if content.startswith(b'{') else 'docs.txt'
  (tmp_path / name).write_bytes(content)
  config = small_config(steps=1)
  config.data.update(train_files=str(tmp_path / name), vocab_size=300, tokenizer='train')
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')  # nothing was trained: no workdir is left behind


@pytest.mark.slow
def test_a_run_that_fails_before_training_leaves_no_new_directory(tmp_path, tokenizer_file):
  config = fast_config(tokenizer_file)
  config.data.train_files = str(tmp_path / 'missing' / '*.jsonl')
  with pytest.raises(FileNotFoundError, match='no files match data.train_files'):
    train.train_and_evaluate(config, str(tmp_path / 'runs' / 'first'))
  assert os.listdir(tmp_path) == []  # neither the workdir nor the parent it needed
  existing = tmp_path / 'existing'
  existing.mkdir()
  (existing / 'notes.txt').write_text('mine')
  with pytest.raises(FileNotFoundError, match='no files match data.train_files'):
    train.train_and_evaluate(config, str(existing))
  assert files_of(existing) == ['notes.txt']
  # The command line too: one error line, status 1, no directory.
  command, env = train_command(str(tmp_path / 'cli'), {'data.train_files': config.data.train_files})
  done = subprocess.run(command, cwd=ROOT, env={**env, 'JAX_PLATFORMS': 'cpu'}, capture_output=True, text=True,
                        timeout=300, check=False)
  assert done.returncode == 1 and 'error: no files match data.train_files' in done.stderr, done.stderr[-2000:]
  assert not os.path.exists(tmp_path / 'cli')


def test_a_workdir_that_is_a_file_is_a_clear_error(tmp_path, tokenizer_file):
  (tmp_path / 'file').write_text('x')
  with pytest.raises(ValueError, match=r'--workdir=.*file is a file, not a directory'):
    train.train_and_evaluate(fast_config(tokenizer_file), str(tmp_path / 'file'))


@pytest.mark.slow
def test_kill_9_then_resume_logs_each_step_once(tmp_path, tokenizer_file):
  workdir = str(tmp_path / 'run')
  overrides = {**tiny_overrides(tokenizer_file), 'train.checkpoint_every': 3}
  process = start_training(workdir, overrides)
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None and len(read_metrics(workdir)) < 8:
    time.sleep(0.2)
  process.send_signal(signal.SIGKILL)
  process.communicate(timeout=60)
  saved = max(checkpoint.Checkpointer(workdir).all_steps())
  assert saved >= 3 and os.path.exists(os.path.join(workdir, 'lock.json'))  # the dead run's lock is left behind
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:  # as the kill may have left: a line past the
    f.write(json.dumps({'step': saved + 1, 'loss': 123.0}) + '\n{"step": ')  # checkpoint, and one cut short
  logged = max(r['step'] for r in read_metrics(workdir))
  assert logged > saved  # steps past the checkpoint were logged, then lost
  # The same run in this process, to a later step. The killed run's lock names a dead process of this host: it
  # is taken over.
  config = config_from_overrides({**overrides, 'train.steps': logged + 2})
  train.train_and_evaluate(config, workdir)
  records = [r for r in read_metrics(workdir) if 'loss' in r]
  assert [r['step'] for r in records] == list(range(1, logged + 3))
  assert all(r['loss'] != 123.0 for r in records)


def test_an_empty_lock_left_by_a_crash_is_taken_over(tmp_path):
  """A lock.json cut short (a power loss right after creating it) does not block the workdir forever."""
  path = tmp_path / 'lock.json'
  path.write_text('')
  old = time.time() - 60
  os.utime(path, (old, old))
  with lock_lib.Lock(str(tmp_path)):
    assert json.loads(path.read_text())['pid'] == os.getpid()
