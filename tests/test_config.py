"""The settings: config files and command-line overrides read once into typed values, every bad setting named
before a run does anything, and config.py light enough for anything to import."""

import dataclasses
import glob
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from qwenjax import config as config_lib
from qwenjax import sharding
from qwenjax import workdir as workdir_lib
from train_utils import ROOT, TINY, config_from_overrides


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))), ids=os.path.basename)
def test_every_config_file_reads_into_settings(path):
  config = config_lib.load(path)
  run = config_lib.settings(config)
  assert run.model.vocab_size == config.model.vocab_size and run.data.seq_len == config.data.seq_len
  assert run.loop.steps == run.optimizer.steps == config.train.steps
  assert run.mesh.rules == config_lib.DEFAULT_RULES and run.init_from_hf == ''


def test_sections_are_the_dataclasses_fields_and_defaults():
  fields = lambda *classes: {f.name: f.default for c in classes for f in dataclasses.fields(c)}
  assert config_lib.data_section().to_dict() == fields(config_lib.DataConfig)
  assert config_lib.mesh_section().to_dict() == fields(config_lib.MeshConfig)
  train = fields(config_lib.LoopConfig, config_lib.OptimizerConfig, config_lib.LossConfig, config_lib.FitConfig,
                 config_lib.CheckpointConfig, config_lib.LoraConfig)
  # A run fits the device's memory ('auto'); a LossConfig built directly accumulates nothing.
  assert config_lib.train_section().to_dict() == {**train, 'seed': 0, 'grad_accum_steps': 'auto'}
  assert 'remat_policy' not in config_lib.model_section()  # a train setting, handed to the model
  run = config_lib.settings(config_lib.base_config())
  assert (run.data, run.loop, run.optimizer, run.loss, run.checkpoint, run.lora, run.mesh, run.fit) == (
      config_lib.DataConfig(), config_lib.LoopConfig(), config_lib.OptimizerConfig(),
      config_lib.LossConfig(grad_accum_steps='auto'), config_lib.CheckpointConfig(), config_lib.LoraConfig(),
      config_lib.MeshConfig(), config_lib.FitConfig())
  assert run.model.remat_policy == run.fit.remat_policy == 'auto'
  assert sharding.DEFAULT_RULES is config_lib.DEFAULT_RULES and sharding.MESH_AXES is config_lib.MESH_AXES


def test_command_line_overrides_reach_the_typed_settings():
  run = config_lib.settings(config_from_overrides({
      'train.steps': '7', 'train.lr': '0.01', 'train.grad_accum_steps': '2', 'train.keep_checkpoints': '1',
      'train.seed': '3', 'data.seq_len': '64', 'mesh.fsdp': '2', 'mesh.data': '-1'}))
  assert (run.loop.steps, run.optimizer.steps, run.optimizer.lr, run.loss.grad_accum_steps) == (7, 7, 0.01, 2)
  assert (run.checkpoint.keep_checkpoints, run.seed, run.data.seq_len) == (1, 3, 64)
  assert (run.mesh.data, run.mesh.fsdp) == (-1, 2)


def test_grad_accum_steps_and_remat_policy_take_auto_or_a_value():
  """An int or 'auto' from the command line and from a program; the remat policy reaches the model."""
  run = config_lib.settings(config_from_overrides({'train.grad_accum_steps': '4', 'train.remat_policy': 'full',
                                                   'train.device_memory_gib': '8'}))
  assert (run.loss.grad_accum_steps, run.model.remat_policy, run.fit.device_memory_gib) == (4, 'full', 8.0)
  config = config_lib.load(TINY)
  config.train.grad_accum_steps = 2  # an int where the default is 'auto'
  assert config_lib.settings(config).loss.grad_accum_steps == 2
  config.train.grad_accum_steps = 'auto'
  assert config_lib.settings(config).loss.grad_accum_steps == 'auto'
  with pytest.raises(ValueError, match='remat_policy is a train setting: set config.train.remat_policy'):
    config_lib.model_section(remat_policy='full')


def test_a_config_json_of_before_keeps_its_remat_policy():
  """config.json files of earlier runs have the policy in the model section and no train.remat_policy."""
  old = config_lib.load(TINY).to_dict()
  old['model']['remat_policy'] = 'dots_with_no_batch_dims_saveable'
  for name in ('remat_policy', 'device_memory_gib'):
    del old['train'][name]
  old['train']['grad_accum_steps'] = 2
  run = config_lib.settings(ml_collections.ConfigDict(old))
  assert (run.model.remat_policy, run.fit.remat_policy, run.loss.grad_accum_steps) == (
      'dots_with_no_batch_dims_saveable', 'dots_with_no_batch_dims_saveable', 2)
  both = ml_collections.ConfigDict({**old, 'train': {**old['train'], 'remat_policy': 'full'}})
  with pytest.raises(ValueError, match='set train.remat_policy alone'):
    config_lib.settings(both)


def _with(section: str, **values) -> ml_collections.ConfigDict:
  """configs/tiny.py as a plain (unlocked, untyped) ConfigDict with `values` set in `section`, as a program or a
  config.json might hand it over."""
  config = config_lib.load(TINY).to_dict()
  config[section].update(values)
  return ml_collections.ConfigDict(config)


@pytest.mark.parametrize('config,message', [
    (_with('train', lr_shedule='x'),
     r"config.train has no key 'lr_shedule'. Did you mean config.train.lr_schedule\?"),
    (_with('data', eval_file='x'), r"config.data has no key 'eval_file'. Did you mean config.data.eval_files\?"),
    (_with('train', steps='abc'), r"train.steps must be an int, got 'abc' \(str\)"),
    (_with('train', steps=2.5), r'train.steps must be an int, got 2.5'),
    (_with('train', restart_if_unreadable=1), r'train.restart_if_unreadable must be a bool'),
    (_with('mesh', tensor=None), r'mesh.tensor must be an int, got None'),
    (_with('train', lr_schedule='linear'), r"unknown train.lr_schedule 'linear'; choose 'cosine' or 'constant'"),
    (_with('train', checkpoint_every=-1), r'train.checkpoint_every=-1 must be >= 0'),
    (_with('train', grad_accum_steps=0), r"train.grad_accum_steps must be 'auto' or an int >= 1, got 0"),
    (_with('train', grad_accum_steps='some'), r"train.grad_accum_steps must be 'auto' or an int, got 'some'"),
    (_with('train', remat_policy='most'), r"unknown train.remat_policy 'most'; choose 'auto' or one of"),
    (_with('train', device_memory_gib=-1), r'train.device_memory_gib must be >= 0'),
    (_with('train', batch_size=10, grad_accum_steps=4),
     r'train.batch_size=10 must be a positive multiple of train.grad_accum_steps=4'),
    (_with('train', logits_dtype='bf16'), r"train.logits_dtype must be 'float32' or 'bfloat16', got 'bf16'"),
    (_with('data', seq_len=4096), r'data.seq_len=4096 exceeds model.max_position_embeddings=2048'),
    (_with('mesh', data=-1, fsdp=-1),
     r'mesh sizes data=-1 x fsdp=-1 x tensor=1 x expert=1 x context=1: .*at most one may be -1'),
    (_with('mesh', context=3), r'data.seq_len=\d+ does not split into the 6 equal chunks that mesh.context=3 needs'),
    (_with('mesh', dcn_data=0), r'mesh.dcn_data must be a positive int \(the number of slices\), got 0'),
])
def test_a_bad_setting_is_named(config, message):
  with pytest.raises(ValueError, match=message):
    config_lib.settings(config)


def test_a_config_json_of_older_key_order_is_not_a_changed_config(tmp_path):
  """The train section's keys are ordered by dataclass: a workdir whose config.json has them in another order
  holds the same settings, so a resumed run keeps it as it is (no config.<step>.json)."""
  config = config_lib.load(TINY)
  shuffled = json.loads(config.to_json_best_effort())
  shuffled['train'] = dict(reversed(list(shuffled['train'].items())))
  (tmp_path / 'config.json').write_text(json.dumps(shuffled, indent=2))
  before = (tmp_path / 'config.json').read_text()
  workdir_lib.write_config(str(tmp_path), config, 4)
  assert os.listdir(tmp_path) == ['config.json'] and (tmp_path / 'config.json').read_text() == before


def test_config_imports_no_jax_and_no_model_code():
  code = ('import sys; import qwenjax.config; '
          'print(sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "flax", "torch") or m in '
          '("qwenjax.model", "qwenjax.sharding", "qwenjax.data", "qwenjax.kernels")))')
  done = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                        check=True)
  assert done.stdout.strip() == '[]', done.stdout
