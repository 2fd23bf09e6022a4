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
  train = fields(config_lib.LoopConfig, config_lib.OptimizerConfig, config_lib.LossConfig,
                 config_lib.CheckpointConfig, config_lib.LoraConfig)
  assert config_lib.train_section().to_dict() == {**train, 'seed': 0}
  run = config_lib.settings(config_lib.base_config())
  assert (run.data, run.loop, run.optimizer, run.loss, run.checkpoint, run.lora, run.mesh) == (
      config_lib.DataConfig(), config_lib.LoopConfig(), config_lib.OptimizerConfig(), config_lib.LossConfig(),
      config_lib.CheckpointConfig(), config_lib.LoraConfig(), config_lib.MeshConfig())
  assert sharding.DEFAULT_RULES is config_lib.DEFAULT_RULES and sharding.MESH_AXES is config_lib.MESH_AXES


def test_command_line_overrides_reach_the_typed_settings():
  run = config_lib.settings(config_from_overrides({
      'train.steps': '7', 'train.lr': '0.01', 'train.grad_accum_steps': '2', 'train.keep_checkpoints': '1',
      'train.seed': '3', 'data.seq_len': '64', 'mesh.fsdp': '2', 'mesh.data': '-1'}))
  assert (run.loop.steps, run.optimizer.steps, run.optimizer.lr, run.loss.grad_accum_steps) == (7, 7, 0.01, 2)
  assert (run.checkpoint.keep_checkpoints, run.seed, run.data.seq_len) == (1, 3, 64)
  assert (run.mesh.data, run.mesh.fsdp) == (-1, 2)


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
    (_with('train', grad_accum_steps=0), r'train.grad_accum_steps must be >= 1, got 0'),
    (_with('train', batch_size=10, grad_accum_steps=4),
     r'train.batch_size=10 must be a positive multiple of train.grad_accum_steps=4'),
    (_with('train', logits_dtype='bf16'), r"train.logits_dtype must be 'float32' or 'bfloat16', got 'bf16'"),
    (_with('data', seq_len=4096), r'data.seq_len=4096 exceeds model.max_position_embeddings=2048'),
    (_with('mesh', data=-1, fsdp=-1), r'mesh sizes data=-1 x fsdp=-1 x tensor=1 x expert=1: .*at most one may be -1'),
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
