"""Helpers for the tests that run the training job: a fast config, metrics, the batches a run reads, the memory
its compiled step needs, and jax's compile events; and experiments/' scripts loaded as modules."""

import contextlib
import importlib.util
import json
import os
import subprocess
import sys

import jax

from qwenjax import config as config_lib
from qwenjax import data
from qwenjax import fit
from qwenjax import sharding
from qwenjax import tokenizer as tokenizer_lib
from qwenjax import train
from qwenjax import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs', 'tiny.py')


def experiment_module(name: str):
  """experiments/<name> (a sweep file or a script; not a package) loaded as a module."""
  spec = importlib.util.spec_from_file_location(f'_experiment_{name[:-3]}', os.path.join(ROOT, 'experiments', name))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # as an import would: dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def small_config(**train_overrides):
  """configs/tiny.py shrunk so a step takes milliseconds: 2 layers of width 128, 512-token vocabulary."""
  config = config_lib.load(TINY)
  config.model.update(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=16, max_window_layers=1)
  config.data.update(seq_len=64, vocab_size=512, tokenizer_sentences=20_000, shuffle_window=4096)
  config.train.update(batch_size=16, lr=3e-3, warmup_steps=20, steps=300, log_every=50, eval_every=0,
                      eval_steps=4, checkpoint_every=1000)
  config.train.update(train_overrides)
  return config


def tiny_overrides(tokenizer_file: str) -> dict:
  """Command-line overrides of configs/tiny.py for a model whose step takes milliseconds."""
  return {
      'model.vocab_size': 512, 'model.hidden_size': 64, 'model.intermediate_size': 128,
      'model.num_hidden_layers': 1, 'data.seq_len': 32, 'data.tokenizer': tokenizer_file,
      'data.shuffle_window': 0, 'train.batch_size': 8, 'train.steps': 100_000, 'train.log_every': 1,
      'train.eval_steps': 0, 'train.checkpoint_every': 100_000,
  }


def config_from_overrides(overrides: dict):
  """configs/tiny.py with `--config.KEY=VALUE` overrides applied, as the command line would."""
  config = config_lib.load(TINY)
  for key, value in overrides.items():
    *sections, name = key.split('.')
    node = config
    for section in sections:
      node = node[section]
    node[name] = type(node[name])(value) if node[name] is not None else value
  return config


def subprocess_xla_flags(device_count: int = 0) -> str:
  """XLA_FLAGS for a subprocess: this session's (tests/conftest.py), with `device_count` fake CPU devices instead
  of 8 (0: jax's default, one device)."""
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  if device_count:
    flags.append(f'--xla_force_host_platform_device_count={device_count}')
  return ' '.join(flags)


def train_command(workdir: str, overrides: dict) -> tuple[list[str], dict]:
  """(argv, environment) of `python -m qwenjax.train` on configs/tiny.py, as a user runs it."""
  command = [sys.executable, '-m', 'qwenjax.train', f'--config={TINY}', f'--workdir={workdir}']
  command += [f'--config.{k}={v}' for k, v in overrides.items()]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))
  return command, env


def start_training(workdir: str, overrides: dict) -> subprocess.Popen:
  command, env = train_command(workdir, overrides)
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def read_metrics(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith('\n')]


def losses(records):
  """{step: loss} of the logged training steps."""
  return {r['step']: r['loss'] for r in records if 'loss' in r}


def first_batches(config, tokenizer_path, steps):
  """The global batches of the first `steps` steps of a run of `config`, read as the job reads them."""
  corpus, _ = data.prepared_corpora(config_lib.settings(config).data, tokenizer_lib.load(tokenizer_path))
  rows = data.PackedRows(corpus, int(config.data.seq_len), int(config.train.seed), int(config.data.shuffle_window))
  batch = int(config.train.batch_size)
  return [data.StepBatches(rows, batch, range(batch))(k) for k in range(steps)]


def step_bytes(config, members: int = 1) -> int:
  """Bytes per device of the compiled train step of an explicit config (vmapped over `members` runs for a group),
  as the run's memory fit computes them."""
  s = config_lib.settings(config)
  mesh = sharding.make_mesh(s.mesh)
  rules = sharding.logical_axis_rules(s.mesh.rules, mesh, s.model)
  tx = train_step.make_optimizer(s.optimizer)
  shardings = train_step.state_shardings(s.model, tx, mesh, rules)
  _, _, choice = fit.fit_step(s, mesh=mesh, rules=rules, tx=tx, shardings=shardings,
                              batch=train.abstract_batch(s, sharding.batch_sharding(mesh, rules)),
                              jit_step=lambda s: train.jitted_steps(s, mesh, rules, members)[0], members=members)
  return choice.needed


@contextlib.contextmanager
def jax_events():
  """The (event, function name) pairs jax reports while inside: traces ('jaxpr_trace_duration', 'train_step'),
  compiles ('backend_compile_duration', 'jit(train_step)'), ..."""
  events = []

  def listen(event, duration, **kwargs):
    del duration
    events.append((event.rsplit('/', 1)[-1], kwargs.get('fun_name')))

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
