"""The training job end to end on 8 fake CPU devices: learning, exact resume, checkpoint fallback, errors, one
compiled step for every schedule length."""

import dataclasses
import gc
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from model_utils import random_params
from qwenjax import checkpoint
from qwenjax import cli
from qwenjax import config as config_lib
from qwenjax import data
from qwenjax import loss as loss_lib
from qwenjax import tokenizer as tokenizer_lib
from qwenjax import train
from train_utils import (ROOT, TINY, config_from_overrides, first_batches, losses, read_metrics, small_config,
                         tiny_overrides, train_command)

# Reading the corrupt checkpoint below leaves orbax read coroutines that fail when garbage-collected; they are
# collected at the end of this module (fixture below) and their "exception ignored" reports are not warnings.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


@pytest.fixture(scope='module', autouse=True)
def _collect_abandoned_reads():
  yield
  gc.collect()


@pytest.mark.slow
def test_training_on_the_default_corpus_beats_the_unigram_entropy(tmp_path):
  config = small_config()  # tokenizer='train': trained on the stdlib files into the workdir
  workdir = str(tmp_path / 'run')
  final = train.train_and_evaluate(config, workdir)

  # The unigram entropy of the eval targets: the loss of the best model that ignores context.
  _, held_out = data.prepared_corpora(config_lib.settings(config).data,
                                      tokenizer_lib.load(os.path.join(workdir, 'tokenizer')))
  batches = data.eval_batches(held_out, seq_len=64, batch_size=16, num_batches=4, local_rows=range(16))
  targets = np.concatenate([b['targets'][b['weights'] > 0] for b in batches])
  p = np.bincount(targets, minlength=512) / len(targets)
  unigram_entropy = float(-np.sum(p[p > 0] * np.log(p[p > 0])))

  records = read_metrics(workdir)
  print(f'eval loss {final["eval_loss"]:.3f}, unigram entropy {unigram_entropy:.3f}, train losses '
        f'{[round(r["loss"], 3) for r in records if "loss" in r]}')
  assert records[0]['loss'] > records[-2]['loss'] + 1.0  # steps 1-50 vs 251-300
  assert final['eval_tokens'] == len(targets)
  assert final['eval_loss'] < unigram_entropy - 0.6, (final['eval_loss'], unigram_entropy)
  assert abs(final['eval_perplexity'] - np.exp(final['eval_loss'])) < 1e-3 * final['eval_perplexity']
  # Logged fields, a TensorBoard event file, the final checkpoint.
  assert {'step', 'loss', 'lr', 'grad_norm', 'tokens_per_sec', 'step_time'} <= set(records[-2])
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  assert checkpoint.Checkpointer(workdir).all_steps() == [300]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, tokenizer_file):
  """Six steps straight through, checkpoints at 2, 4, 6, steps 3-4 traced by the profiler."""
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  config = small_config(steps=6, log_every=1, checkpoint_every=2, warmup_steps=2, profile_from=2, profile_steps=2)
  config.data.tokenizer = tokenizer_file
  train.train_and_evaluate(config, workdir)
  return config, workdir, losses(read_metrics(workdir))


@pytest.mark.slow
def test_stopped_and_resumed_run_matches_an_uninterrupted_one(tmp_path, uninterrupted):
  config, _, expected = uninterrupted
  config = config.copy_and_resolve_references()
  config.train.profile_steps = 0  # the same steps, without writing a second trace (seconds) that nothing reads
  workdir = str(tmp_path)
  train.train_and_evaluate(config, workdir, stop_after=3)  # as if preempted after step 3
  assert checkpoint.Checkpointer(workdir).all_steps() == [2, 3]
  train.train_and_evaluate(config, workdir)
  got = losses(read_metrics(workdir))
  assert sorted(got) == list(range(1, 7))
  np.testing.assert_allclose([got[s] for s in range(4, 7)], [expected[s] for s in range(4, 7)], rtol=0,
                             atol=1e-6)


@pytest.mark.slow
def test_profile_steps_writes_a_trace_that_profile_summary_reads(uninterrupted):
  _, workdir, _ = uninterrupted
  profile_dir = os.path.join(workdir, 'profile')
  script = os.path.join(os.path.dirname(TINY), '..', 'benchmarks', 'profile_summary.py')
  done = subprocess.run([sys.executable, script, profile_dir, '--steps', '2'], capture_output=True, text=True,
                        timeout=120, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.startswith('GPU: wall') and '| ms/step | launches |' in done.stdout


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, uninterrupted, caplog):
  config, source_dir, expected = uninterrupted
  workdir = str(tmp_path / 'run')
  shutil.copytree(source_dir, workdir)
  os.remove(os.path.join(workdir, 'metrics.jsonl'))
  data_dir = os.path.join(workdir, 'checkpoints', '6', 'state', 'ocdbt.process_0', 'd')
  for name in os.listdir(data_dir):  # a write that never finished: the array data is gone
    os.remove(os.path.join(data_dir, name))
  train.train_and_evaluate(config, workdir)
  assert 'checkpoint at step 6 is corrupt' in caplog.text
  assert os.path.isdir(os.path.join(workdir, 'checkpoints_corrupt', '6'))
  got = losses(read_metrics(workdir))
  assert sorted(got) == [5, 6]  # resumed from step 4
  np.testing.assert_allclose([got[5], got[6]], [expected[5], expected[6]], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_checkpoint_of_another_model_shape_names_the_parameter(uninterrupted):
  config, workdir, _ = uninterrupted
  config = config.copy_and_resolve_references()
  config.model.intermediate_size = 256
  with pytest.raises(checkpoint.ShapeMismatchError, match=r'mlp/down_proj/kernel of shape \(384, 128\) but the '
                     r'model config gives \(256, 128\)'):
    train.train_and_evaluate(config, workdir)


@pytest.mark.slow
def test_checkpoint_of_another_model_names_the_parameter_not_the_optimizer_state(uninterrupted):
  """The optimizer state follows the parameters, so another model's shape shows in both: the message names the
  parameter and the model config (and ends its sentence before the settings that differ)."""
  config, workdir, _ = uninterrupted
  config = config.copy_and_resolve_references()
  config.model.tie_word_embeddings = False
  with pytest.raises(checkpoint.ShapeMismatchError, match=r"has no params/lm_head, which the model being "
                     r"trained needs: the checkpoint was written for a different model config\. Settings that differ "
                     r"from the workdir's config.json: model.tie_word_embeddings: True -> False\.$"):
    train.train_and_evaluate(config, workdir)


def test_checkpoint_of_the_other_layer_layout_names_scan_layers():
  stacked = {'params': {'layers': {'w': np.zeros((2, 3))}}}
  unrolled = {'params': {'layers_0': {'w': np.zeros(3)}, 'layers_1': {'w': np.zeros(3)}}}
  with pytest.raises(checkpoint.ShapeMismatchError, match=r'written with model.scan_layers=True'):
    checkpoint.check_shapes(stacked, unrolled, 'checkpoint 4')
  with pytest.raises(checkpoint.ShapeMismatchError, match=r'written with model.scan_layers=False'):
    checkpoint.check_shapes(unrolled, stacked, 'checkpoint 4')


@pytest.mark.slow
def test_init_from_hf_checks_the_model_shape(tmp_path, tokenizer_file):
  import jax  # pylint: disable=g-import-not-at-top
  from qwenjax import hf, model as model_lib, sharding, train_step  # pylint: disable=g-import-not-at-top
  from qwenjax.model_config import ModelConfig  # pylint: disable=g-import-not-at-top
  config = small_config()
  model_config = ModelConfig.from_dict(config.model)
  params = random_params(model_config, seed=3)
  hf.save_pretrained(str(tmp_path / 'hf'), model_config, params)
  loaded = train.load_hf_params(str(tmp_path / 'hf'), model_config)
  run = config_lib.settings(config)
  mesh = sharding.make_mesh(run.mesh)
  rules = sharding.logical_axis_rules(run.mesh.rules, mesh, model_config)
  tx = train_step.make_optimizer(run.optimizer)
  state = train_step.create_state(model_config, tx, train_step.state_shardings(model_config, tx, mesh, rules),
                                  params=loaded)
  np.testing.assert_array_equal(np.asarray(state.params['layers_1']['mlp']['up_proj']['kernel']),
                                params['layers_1']['mlp']['up_proj']['kernel'])
  other = ModelConfig.from_dict({**config.model, 'hidden_size': 64})
  with pytest.raises(ValueError, match=r'hidden_size=128 but the config has model.hidden_size=64'):
    train.load_hf_params(str(tmp_path / 'hf'), other)
  moe = ModelConfig.from_dict({**config.model, 'num_experts': 4, 'moe_intermediate_size': 32})
  with pytest.raises(ValueError, match=r'num_experts=0 but the config has model.num_experts=4'):
    train.load_hf_params(str(tmp_path / 'hf'), moe)

  # Through the command's code path: the first step's loss is the loss of the checkpoint's parameters.
  config.update(init_from_hf=str(tmp_path / 'hf'))
  config.data.tokenizer = tokenizer_file
  config.train.update(steps=1, log_every=1, eval_steps=0, z_loss=0.0)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  first = read_metrics(workdir)[0]
  batch = first_batches(config, tokenizer_file, 1)[0]
  logits = jax.jit(lambda p, b: model_lib.Qwen2(model_config).apply(
      {'params': p}, b['inputs'], b['positions'], b['segment_ids']))(params, batch)
  nll, _ = loss_lib.full_logits_cross_entropy(logits, batch['targets'], batch['weights'])
  np.testing.assert_allclose(first['loss'], float(nll) / batch['weights'].sum(), rtol=1e-5)


@pytest.mark.parametrize('change,error,message', [
    (lambda c: None, ValueError, 'the workdir is empty'),
    (lambda c: c.train.update(batch_size=12), ValueError,
     r'batch_size=12.*does not divide over the 8 data-parallel shards'),
    (lambda c: c.train.update(batch_size=16, grad_accum_steps=4), ValueError,
     r'micro-batches of 4.*multiple of 32'),
    (lambda c: c.mesh.update(data=3, fsdp=1, tensor=1), ValueError, 'multiply to 3 but there are 8 devices'),
    (lambda c: c.data.update(train_files='/nonexistent/*.jsonl'), FileNotFoundError,
     r"no files match data.train_files='/nonexistent/\*.jsonl'"),
    (lambda c: c.model.update(vocab_size=256), ValueError,
     r"has 512 ids but the model's vocab_size \(embedding rows\) is 256"),
    (lambda c: c.train.update(logits_dtype='bf16'), ValueError,
     r"train.logits_dtype must be 'float32' or 'bfloat16', got 'bf16'"),
])
def test_clear_errors(tmp_path, tokenizer_file, change, error, message):
  config = small_config()
  config.data.tokenizer = tokenizer_file
  change(config)
  workdir = '' if message.startswith('the workdir') else str(tmp_path)
  with pytest.raises(error, match=message):
    train.train_and_evaluate(config, workdir)


@pytest.mark.slow
def test_unknown_config_key_on_the_command_line():
  argv = ['train', f'--config={TINY}', '--workdir=/tmp/x', '--config.train.steps=5',
          '--config.train.lr_shedule=x']
  message = train.config_override_error(argv)
  assert "config.train has no key 'lr_shedule'. Did you mean config.train.lr_schedule?" in message
  assert train.config_override_error(argv[:-1]) is None
  assert "config has no key 'trian'" in train.config_override_error(argv[:2] + ['--config.trian.steps=1'])
  # On the command line (one error line, status 2): tests/test_cli.py.


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_a_run_of_the_same_shape_compiles_nothing_new(tmp_path, tokenizer_file):
  """`python -m qwenjax.train` as users run it, SIGTERM (preemption) mid-run: a checkpoint, the lock released, the
  compiled step kept for the next run (train.compilation_cache_dir='workdir'). Then a second run of the same shape
  with other steps, warmup and learning rate on that cache (as the points of one shape in a sweep share one): it
  compiles nothing new, and its learning rate follows its own schedule."""
  from qwenjax import train_step  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  command, env = train_command(workdir, tiny_overrides(tokenizer_file))
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'  # keep every program, however fast it compiled
  process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None and len(read_metrics(workdir)) < 3:
    time.sleep(0.5)
  assert process.poll() is None, process.stdout.read().decode()[-3000:]
  process.send_signal(signal.SIGTERM)
  output = process.communicate(timeout=120)[0].decode()
  assert process.returncode == 143, output[-3000:]  # stopped, not finished: `train && export` exports nothing
  assert 'SIGTERM received' in output
  last = max(r['step'] for r in read_metrics(workdir))
  assert 3 <= last < 100_000
  assert checkpoint.Checkpointer(workdir).all_steps() == [last]
  assert not os.path.exists(os.path.join(workdir, 'lock.json'))  # released
  cache = os.path.join(workdir, 'compilation_cache')
  entries = sorted(os.listdir(cache))
  assert any(name.startswith('jit_train_step') for name in entries), entries

  overrides = dict(tiny_overrides(tokenizer_file), **{
      'train.steps': 5, 'train.warmup_steps': 3, 'train.lr': 1e-3, 'train.lr_final_fraction': 0.5,
      'train.compilation_cache_dir': cache})
  command, env = train_command(str(tmp_path / 'other'), overrides)
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300,
                        check=False)
  assert done.returncode == 0, done.stdout.decode()[-3000:]
  assert sorted(os.listdir(cache)) == entries  # nothing compiled anew for the second run
  schedule = train_step.learning_rate_schedule(config_lib.settings(config_from_overrides(overrides)).optimizer)
  lrs = [r['lr'] for r in read_metrics(str(tmp_path / 'other')) if 'lr' in r]
  np.testing.assert_allclose(lrs, [float(schedule(k)) for k in range(5)], rtol=1e-6)


def test_ctrl_c_saves_a_checkpoint_and_stops(tmp_path, tokenizer_file, monkeypatch, caplog):
  """Ctrl-C (SIGINT) mid-run, here in this process (the job's handler is the one the SIGTERM test above runs
  through the command line): the run finishes the step, saves a checkpoint, releases the lock and raises
  cli.Stopped (the command's status 130)."""
  from qwenjax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  original = metrics_lib.MetricWriter.write

  def write_then_interrupt(self, step, values):
    original(self, step, values)
    if step == 3:
      os.kill(os.getpid(), signal.SIGINT)  # as a terminal does: the main thread's handler runs at once

  monkeypatch.setattr(metrics_lib.MetricWriter, 'write', write_then_interrupt)
  workdir = str(tmp_path / 'run')
  with pytest.raises(cli.Stopped, match='SIGINT received: stopped at step 4 of 100000, checkpoint saved') as stop:
    train.train_and_evaluate(config_from_overrides(tiny_overrides(tokenizer_file)), workdir)
  assert stop.value.status == 130  # the command's exit status
  assert 'SIGINT received' in caplog.text
  last = max(r['step'] for r in read_metrics(workdir))
  assert last == 4  # the step after the signal's, then a stop
  assert checkpoint.Checkpointer(workdir).all_steps() == [last]
  assert not os.path.exists(os.path.join(workdir, 'lock.json'))  # released


@pytest.mark.slow
def test_one_compiled_train_step_serves_every_schedule_length():
  """`train.steps`, `train.warmup_steps`, `train.lr` and `train.lr_final_fraction` are inputs of the jitted step:
  one trace, and AdamW steps with the learning rate of the horizon it is given."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from qwenjax import sharding, train_step  # pylint: disable=g-import-not-at-top
  config = small_config()
  config.model.update(num_hidden_layers=1, hidden_size=64, intermediate_size=128)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  run = config_lib.settings(config)
  model_config = run.model
  mesh = sharding.make_mesh(run.mesh, devices=jax.devices()[:1])
  rules = sharding.logical_axis_rules(run.mesh.rules, mesh, model_config)
  tx = train_step.make_optimizer(run.optimizer)
  shardings = train_step.state_shardings(model_config, tx, mesh, rules)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 512, (4, 33)).astype(np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'weights': np.ones((4, 32), np.float32)}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = jax.jit(train_step.make_train_step(model_config, run.optimizer, run.loss),  # as the main job jits it
                   in_shardings=(shardings, sharding.batch_sharding(mesh, rules), sharding.replicated(mesh)),
                   out_shardings=(shardings, None))
    initial = train_step.create_state(model_config, tx, shardings, rng=jax.random.key(0))
    first = jax.device_get(initial.params)
    for warmup, steps, lr, final in ((0, 10, 3e-3, 0.1), (2, 10, 1e-2, 0.1), (3, 50, 3e-3, 0.5), (0, 4, 1e-3, 0.0)):
      train = dataclasses.replace(run.optimizer, warmup_steps=warmup, steps=steps, lr=lr, lr_final_fraction=final)
      state = initial
      schedule = train_step.learning_rate_schedule(train)
      for k in range(3):
        state, metrics = step(state, batch, train_step.schedule_horizon(train))
        np.testing.assert_allclose(float(metrics['lr']), float(schedule(k)), rtol=1e-6)
        if k == 0:  # warmup from 0: the first update moves nothing; without warmup it moves the weights
          moved = max(np.abs(np.asarray(new) - old).max()
                      for new, old in zip(jax.tree.leaves(state.params), jax.tree.leaves(first)))
          assert (moved == 0) if warmup else (moved > 1e-4), (warmup, moved)
  assert step._cache_size() == 1  # pylint: disable=protected-access
