"""The step fits the device (issue 36): train.grad_accum_steps and train.remat_policy 'auto', and out of memory as
one error line, wherever it happens."""

import json
import logging
import os
import subprocess
import types

import jax
import numpy as np
import pytest

from qwenjax import config as config_lib
from qwenjax import fit
from qwenjax import train
from qwenjax import workdir as workdir_lib
from train_utils import ROOT, read_metrics, small_config, step_bytes, train_command

GIB = fit.GIB


# ---------------------------------------------------------------------------------------------------------
# The rule, on configs/1b.py with the memory one H100 measured (docs/performance.md); nothing is compiled.

class _Compiled:
  """What `fit.choose` reads of a compiled step: its memory analysis."""

  def __init__(self, needed: float):
    self.needed = int(needed)

  def memory_analysis(self):
    return types.SimpleNamespace(argument_size_in_bytes=self.needed, output_size_in_bytes=0, temp_size_in_bytes=0,
                                 generated_code_size_in_bytes=0, alias_size_in_bytes=0)


def _one_b(seq_len: int, batch: int) -> config_lib.RunConfig:
  config = config_lib.load(os.path.join(ROOT, 'configs', '1b.py'))
  config.data.seq_len, config.train.batch_size = seq_len, batch
  # cuDNN: attention outputs the policies can keep by name, as on a GPU.
  config.model.update(max_position_embeddings=max(seq_len, 32768), attention_impl='cudnn')
  return config_lib.settings(config)


def _choose(settings, needs, limit_gib, bounds=None):
  """fit.choose with steps that need `needs[(grad_accum_steps, policy)]` GiB; returns (choice, compiled keys)."""
  compiled = []

  def compile_step(s):
    compiled.append((s.loss.grad_accum_steps, s.model.remat_policy))
    return _Compiled(needs[compiled[-1]] * GIB)

  saved = None if bounds is None else lambda s: bounds[(s.loss.grad_accum_steps, s.model.remat_policy)] * GIB
  choice, _ = fit.choose(settings, 1, int(limit_gib * GIB), compile_step, saved)
  return choice, compiled


@pytest.mark.slow
def test_auto_picks_the_fastest_measured_setting_of_configs_1b_on_one_h100():
  """At 64 x 8192 the first candidate is 16 micro-batches of 4 rows with 'activations_saveable', the fastest
  setting measured (67,150 tokens/s against 63,626 for micro-batch 2 without remat and 64,507 for 8 with
  'dots'); its 52.8 GiB fit 59.6 GiB (75% of 80 GB, jax's default share of a GPU): one compile."""
  settings = _one_b(8192, 64)
  order = [(c.grad_accum_steps, c.remat_policy) for c in fit.candidates(settings, 1)]
  assert order[:3] == [(16, 'activations_saveable'), (16, 'dots_and_attention_saveable'),
                       (32, 'activations_saveable')]
  assert all(a >= 16 for a, _ in order)  # never more than 4 x 8192 tokens a micro-batch: no gain, more memory
  choice, compiled = _choose(settings, {(16, 'activations_saveable'): 52.8}, 59.6)
  assert (choice.grad_accum_steps, choice.remat_policy, choice.rows, compiled) == (
      16, 'activations_saveable', 4, [(16, 'activations_saveable')])


@pytest.mark.slow
def test_long_context_picks_attention_saveable_then_full_then_says_what_the_smallest_needs():
  """At 131,072 tokens 'attention_saveable' is the fastest that fits (it never recomputes attention); the
  policies whose saved activations alone exceed the device are not compiled."""
  settings = _one_b(131072, 1)
  policies = [c.remat_policy for c in fit.candidates(settings, 1)]
  assert policies.index('attention_saveable') < policies.index('dots_with_no_batch_dims_saveable')
  needs = {(1, 'activations_saveable'): 150, (1, 'dots_and_attention_saveable'): 100,
           (1, 'attention_saveable'): 52, (1, 'dots_with_no_batch_dims_saveable'): 90, (1, 'full'): 32.3}
  bounds = {(1, 'activations_saveable'): 137.7, (1, 'dots_and_attention_saveable'): 97.7,
            (1, 'attention_saveable'): 41.7, (1, 'dots_with_no_batch_dims_saveable'): 89.5, (1, 'full'): 21.5}
  choice, compiled = _choose(settings, needs, 79.6, bounds)
  assert (choice.remat_policy, compiled, choice.skipped) == ('attention_saveable', [(1, 'attention_saveable')], 2)
  choice, _ = _choose(settings, needs, 40, bounds)
  assert choice.remat_policy == 'full'
  with pytest.raises(fit.OutOfMemoryError, match=r"nothing train.grad_accum_steps='auto' and train.remat_policy="
                     r"'auto' can choose fits .*the device has 20.00 GiB.*The smallest setting, "
                     r"train.grad_accum_steps=1 \(micro-batches of 1 x 131072 tokens.*'full', needs 32.30 GiB"):
    _choose(settings, needs, 20, bounds)


def test_without_a_memory_figure_auto_is_one_micro_batch_without_remat():
  settings = _one_b(8192, 64)
  compiled = []
  choice, _ = fit.choose(settings, 1, None, lambda s: compiled.append(s) or _Compiled(1))
  assert (choice.grad_accum_steps, choice.remat_policy, len(compiled)) == (1, 'none', 1)
  assert fit.device_memory(config_lib.FitConfig()) is None  # a CPU reports none
  assert fit.device_memory(config_lib.FitConfig(device_memory_gib=2)) == 2 * GIB


def test_an_explicit_setting_over_the_device_is_an_error_naming_what_to_change():
  settings = fit.resolved(_one_b(8192, 64), 1, 'none')
  with pytest.raises(fit.OutOfMemoryError, match=r'the train step, train.grad_accum_steps=1 \(micro-batches of 64 '
                     r"x 8192 .*'none', needs 541.59 GiB per device and the device has 79.60 GiB. Use "
                     r"--config.train.grad_accum_steps=auto .* or 2 or more; or --config.train.remat_policy=auto"):
    _choose(settings, {(1, 'none'): 541.59}, 79.6)


def test_a_config_json_that_differs_only_in_memory_settings_is_not_a_change(tmp_path, caplog):
  """Resumed where 'auto' chose differently (or with other explicit memory settings): the same steps, so
  config.json says what this run uses and no config.<step>.json is kept."""
  config = config_lib.load(os.path.join(ROOT, 'configs', 'tiny.py'))
  old = json.loads(config.to_json_best_effort())
  old['train'].update(grad_accum_steps=4, remat_policy='full', device_memory_gib=8.0)
  (tmp_path / 'config.json').write_text(json.dumps(old))
  recorded = fit.record(config, fit.Choice(1, 'activations_saveable', None, None, (), 8, 256, 8))
  workdir_lib.write_config(str(tmp_path), recorded, 7)
  assert os.listdir(tmp_path) == ['config.json'] and 'config changed' not in caplog.text
  assert json.loads((tmp_path / 'config.json').read_text())['train']['grad_accum_steps'] == 1
  assert workdir_lib.config_changes(old, recorded) == []
  assert 'train.grad_accum_steps: 4 -> 1' in workdir_lib.config_changes(old, recorded, memory=True)


# ---------------------------------------------------------------------------------------------------------
# Runs on 8 CPU devices: a model whose activations outweigh its state, so micro-batches save memory.

def _config(tokenizer_file, **train_overrides):
  config = small_config(**{'batch_size': 16, 'steps': 3, 'log_every': 1, 'eval_steps': 0, 'checkpoint_every': 0,
                           **train_overrides})
  config.model.update(num_hidden_layers=1, hidden_size=64, intermediate_size=128)
  config.data.update(tokenizer=tokenizer_file, seq_len=128, shuffle_window=0)
  return config


def _saved_config(workdir):
  with open(os.path.join(workdir, 'config.json')) as f:
    return json.load(f)


def _losses(workdir):
  return [r['loss'] for r in read_metrics(workdir) if 'loss' in r]


@pytest.mark.slow
def test_auto_picks_one_micro_batch_with_plenty_of_memory_and_trains_as_that_value(tmp_path, tokenizer_file):
  auto = str(tmp_path / 'auto')
  train.train_and_evaluate(_config(tokenizer_file, device_memory_gib=1000.0), auto)
  saved = _saved_config(auto)['train']
  assert (saved['grad_accum_steps'], saved['remat_policy']) == (1, 'activations_saveable')
  assert isinstance(saved['grad_accum_steps'], int)
  explicit = str(tmp_path / 'explicit')
  train.train_and_evaluate(_config(tokenizer_file, grad_accum_steps=1, remat_policy='activations_saveable'),
                           explicit)
  np.testing.assert_allclose(_losses(auto), _losses(explicit), rtol=1e-6)
  assert len(_losses(auto)) == 3


@pytest.mark.slow
def test_auto_picks_more_micro_batches_with_little_memory_and_a_resumed_run_may_pick_others(
    tmp_path, tokenizer_file, caplog):
  """Little memory: 2 micro-batches, config.json holds the int, the losses are those of the explicit 2. Resumed
  with plenty of memory (another device), 'auto' picks 1 and the run goes on without a word about a changed
  config."""
  one, two = (step_bytes(_config(tokenizer_file, grad_accum_steps=a, remat_policy='full')) for a in (1, 2))
  assert two < one
  little = (one + two) / 2 / (1 - fit.MARGIN) / GIB  # usable memory between the two
  auto = str(tmp_path / 'auto')
  train.train_and_evaluate(_config(tokenizer_file, device_memory_gib=little, remat_policy='full'), auto,
                           stop_after=2)
  assert _saved_config(auto)['train']['grad_accum_steps'] == 2
  explicit = str(tmp_path / 'explicit')
  train.train_and_evaluate(_config(tokenizer_file, grad_accum_steps=2, remat_policy='full'), explicit)
  np.testing.assert_allclose(_losses(auto), _losses(explicit)[:2], rtol=1e-6)

  caplog.clear()
  caplog.set_level(logging.INFO)
  train.train_and_evaluate(_config(tokenizer_file, device_memory_gib=1000.0, remat_policy='full'), auto)
  assert _saved_config(auto)['train']['grad_accum_steps'] == 1
  assert sorted(f for f in os.listdir(auto) if f.startswith('config')) == ['config.json']
  assert 'config changed' not in caplog.text and 'resumed with other memory settings' in caplog.text
  np.testing.assert_allclose(_losses(auto), _losses(explicit), rtol=1e-5)  # one micro-batch, the same update


# ---------------------------------------------------------------------------------------------------------
# Out of memory, wherever it happens: one line naming what to change.

@pytest.mark.slow
def test_when_nothing_fits_the_error_says_what_the_smallest_setting_needs(tmp_path, tokenizer_file):
  workdir = str(tmp_path / 'new')
  with pytest.raises(fit.OutOfMemoryError, match=r"nothing train.grad_accum_steps='auto' can choose fits in .* "
                     r"\(train.device_memory_gib has 1.0 MiB, less a 5% margin\). The smallest setting, "
                     r"train.grad_accum_steps=2 \(micro-batches of 1 x 128 tokens per data shard\) with "
                     r"train.remat_policy='full', needs [0-9.]+ MiB. Use a smaller data.seq_len \(now 128\); or a "
                     r'larger train.device_memory_gib \(now 0.000977\); or more devices'):
    train.train_and_evaluate(_config(tokenizer_file, device_memory_gib=1 / 1024, remat_policy='full'), workdir)
  assert not os.path.exists(workdir)  # a run that fails before its train state exists leaves nothing


def _raise_out_of_memory(*args, **kwargs):
  del args, kwargs
  raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 541.59GiB.')


@pytest.mark.slow
@pytest.mark.parametrize('where,patch', [
    ('compiling the train step', lambda m: m.setattr(jax.stages.Lowered, 'compile', _raise_out_of_memory)),
    ('train step 1', lambda m: m.setattr(jax.stages.Compiled, '__call__', _raise_out_of_memory)),
    ('evaluation at step 1', lambda m: m.setattr(train, 'evaluate', _raise_out_of_memory)),
])
def test_out_of_memory_is_a_message(tmp_path, tokenizer_file, monkeypatch, where, patch):
  """XLA's RESOURCE_EXHAUSTED (simulated) compiling, at the first step and in evaluation: an OutOfMemoryError
  (one `error:` line from the command, exit status 1) saying where, with which settings, and what to change."""
  patch(monkeypatch)
  config = _config(tokenizer_file, grad_accum_steps=1, remat_policy='none', eval_steps=1, eval_every=1)
  with pytest.raises(fit.OutOfMemoryError) as error:
    train.train_and_evaluate(config, str(tmp_path))
  assert str(error.value).startswith(
      f"out of memory {where} with train.grad_accum_steps=1 (micro-batches of 2 x 128 tokens per data shard) with "
      "train.remat_policy='none' [XLA: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 541.59GiB.]. "
      "Use --config.train.grad_accum_steps=auto (the fewest micro-batches that fit) or 2 or more; or "
      "--config.train.remat_policy=auto"), str(error.value)
  assert fit.OutOfMemoryError in train.USER_ERRORS  # the command prints its message alone


@pytest.mark.slow
def test_the_command_says_out_of_memory_in_one_line(tmp_path, tokenizer_file):
  overrides = {'data.tokenizer': tokenizer_file, 'data.seq_len': 32, 'model.num_hidden_layers': 1,
               'model.hidden_size': 64, 'model.intermediate_size': 128, 'model.vocab_size': 512,
               'train.batch_size': 8, 'train.eval_steps': 0, 'train.device_memory_gib': 0.0001}
  command, env = train_command(str(tmp_path / 'run'), overrides)
  done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  lines = done.stderr.strip().splitlines()
  assert done.returncode == 1, done.stderr[-3000:]
  assert lines[-1].startswith('error: out of memory: nothing ') and 'needs' in lines[-1], lines[-1]
  assert 'Traceback' not in done.stderr
