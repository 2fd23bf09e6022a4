r"""Trains a Qwen2 model: `python -m qwenjax.train --config=configs/tiny.py --workdir=/tmp/run`.

Every config value can be overridden on the command line, e.g. `--config.train.steps=2000
--config.data.train_files='data/*.jsonl' --config.mesh.tensor=4`. Running the same command again resumes
from the latest checkpoint in `workdir`.

The workdir holds `checkpoints/`, `metrics.jsonl` (one JSON object per line, each with a `step`), TensorBoard
event files, `config.json`, `compilation_cache/` (compiled steps for the next run) and, with
`data.tokenizer='train'`, `tokenizer.model`.

Read top to bottom: set up the mesh, data and tokenizer; create or restore the sharded train state; then the
loop: step, log, evaluate, checkpoint. The step itself is `qwenjax.train_step`; sharding is
`qwenjax.sharding`.
"""

from __future__ import annotations

import difflib
import logging as pylogging
import os
import signal
import sys
import threading
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from qwenjax import checkpoint
from qwenjax import config as config_lib
from qwenjax import data
from qwenjax import metrics as metrics_lib
from qwenjax import sharding
from qwenjax import train_step
from qwenjax.model import ModelConfig

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file, e.g. configs/tiny.py.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, TensorBoard files and the '
                               'tokenizer. Running again with the same workdir resumes.')
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() first (multi-host TPU '
                               'slices, GPU clusters).')

# Fields that fix parameter shapes: a Hugging Face checkpoint must agree with the config on these.
_SHAPE_FIELDS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
                 'num_key_value_heads', 'head_dim', 'tie_word_embeddings')
# Fields that change what the model computes without changing shapes: a difference is only warned about.
_ARCH_FIELDS = ('rope_theta', 'rms_norm_eps', 'use_sliding_window', 'sliding_window', 'max_window_layers')


def check_workdir(workdir: str | None) -> str:
  if workdir is None or not str(workdir).strip():
    raise ValueError('the workdir is empty: pass --workdir=DIR, a directory for checkpoints, metrics and the '
                     'tokenizer (e.g. --workdir=/tmp/qwenjax-run); the same DIR later resumes the run')
  return os.path.abspath(os.path.expanduser(str(workdir)))


def compilation_cache_dir(setting: str, workdir: str) -> str | None:
  """Where jax's persistent compilation cache goes for `train.compilation_cache_dir`; None: off."""
  if not setting:
    return None
  return os.path.join(workdir, 'compilation_cache') if setting == 'workdir' else os.path.expanduser(setting)


def check_batch(train: ml_collections.ConfigDict, batch_shards: int, mesh: jax.sharding.Mesh) -> int:
  """Checks that the global batch splits into micro-batches and over devices and hosts; returns the per-host
  batch."""
  batch, accum = int(train.batch_size), int(train.grad_accum_steps)
  if accum < 1 or batch % accum:
    raise ValueError(f'train.batch_size={batch} must be a positive multiple of train.grad_accum_steps={accum}')
  micro = batch // accum
  if micro % batch_shards:
    mesh_desc = ' x '.join(f'{a}={n}' for a, n in mesh.shape.items())
    raise ValueError(
        f'the global batch (train.batch_size={batch}, micro-batches of {micro} with grad_accum_steps={accum}) '
        f'does not divide over the {batch_shards} data-parallel shards (data x fsdp x expert of the mesh {mesh_desc}). '
        f'Use a batch_size that is a multiple of {batch_shards * accum}, or change the mesh.')
  if batch % jax.process_count():
    raise ValueError(f'train.batch_size={batch} must divide over the {jax.process_count()} processes')
  return batch // jax.process_count()


def load_hf_params(path: str, model_config: ModelConfig) -> Any:
  """Parameters of a Hugging Face checkpoint, after checking it has the shapes of the run's model config."""
  from qwenjax import hf  # pylint: disable=g-import-not-at-top
  hf_config, params = hf.from_pretrained(path, scan_layers=model_config.scan_layers)
  for name in _SHAPE_FIELDS:
    ours, theirs = getattr(model_config, name), getattr(hf_config, name)
    if ours != theirs:
      raise ValueError(
          f'init_from_hf={path} has {name}={theirs} but the config has model.{name}={ours}. The model section '
          f'must match the checkpoint: set --config.model.{name}={theirs} (or use the matching configs/ file).')
  for name in _ARCH_FIELDS:
    if getattr(model_config, name) != getattr(hf_config, name):
      logging.warning('init_from_hf: checkpoint has %s=%s, the config %s; training with the config\'s value',
                      name, getattr(hf_config, name), getattr(model_config, name))
  return params


class _StopSignal:
  """Turns SIGTERM (preemption) into a flag the loop checks after each step."""

  def __init__(self):
    self.received = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint after this step, then stopping')
    self.received = True

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def evaluate(eval_fn, params, batches, batch_sharding) -> dict[str, float]:
  nll, count = 0.0, 0.0
  for batch in batches:
    n, c = eval_fn(params, _global_batch(batch, batch_sharding))
    nll, count = nll + float(n), count + float(c)
  loss = nll / max(count, 1.0)
  return {'eval_loss': loss, 'eval_perplexity': float(np.exp(min(loss, 80.0))), 'eval_tokens': count}


def _global_batch(batch: dict[str, np.ndarray], batch_sharding) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over the batch axes of the mesh."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after: int | None = None) -> dict[str, float]:
  """Trains (or resumes) to `config.train.steps`; returns the last logged metrics.

  `stop_after`: stop after that step, checkpointing as on SIGTERM (tests and time-sliced jobs).
  """
  workdir = check_workdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  tc, seq_len = config.train, int(config.data.seq_len)
  model_config = ModelConfig.from_dict(config.model)
  if seq_len > model_config.max_position_embeddings:
    raise ValueError(f'data.seq_len={seq_len} exceeds model.max_position_embeddings='
                     f'{model_config.max_position_embeddings}')

  # Devices.
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_axis_rules(config.mesh.rules, mesh, model_config)
  local_batch = check_batch(tc, sharding.batch_shards(mesh, rules), mesh)
  logging.info('mesh %s over %d %s device(s), %d process(es)', dict(mesh.shape), mesh.size,
               jax.devices()[0].device_kind, jax.process_count())

  # Data.
  setup_start = time.time()
  train_source, eval_source = data.sources(config.data)
  tokenizer = data.get_tokenizer(config.data, workdir, train_source, model_config.vocab_size, int(tc.seed))
  train_iter = iter(data.train_dataset(
      train_source, tokenizer, seq_len=seq_len, batch_size=local_batch, seed=int(tc.seed),
      shuffle_window=int(config.data.shuffle_window), read_threads=int(config.data.read_threads),
      process_index=jax.process_index(), process_count=jax.process_count()))
  eval_data = []
  if eval_source is not None and int(tc.eval_steps) > 0:
    eval_data = data.eval_batches(
        eval_source, tokenizer, seq_len=seq_len, batch_size=local_batch, num_batches=int(tc.eval_steps),
        read_threads=int(config.data.read_threads), process_index=jax.process_index(),
        process_count=jax.process_count())
  if not eval_data:
    logging.info('no eval data (set data.eval_files): eval loss is not computed')
  logging.info('data: tokenizer, training pipeline and eval batches ready in %.1f s', time.time() - setup_start)
  setup_start = time.time()

  # Train state: restored, or from a Hugging Face checkpoint, or random; created sharded.
  tx = train_step.make_optimizer(tc)
  shardings = train_step.state_shardings(model_config, tx, mesh, rules)
  ckpt = checkpoint.Checkpointer(workdir, int(tc.keep_checkpoints))
  restored = ckpt.restore(train_step.abstract_state(model_config, tx, shardings), train_iter)
  if restored is not None:
    state, start = restored
    logging.info('resumed from %s/%d', ckpt.directory, start)
  elif config.init_from_hf:
    state, start = train_step.create_state(model_config, tx, shardings,
                                           params=load_hf_params(config.init_from_hf, model_config)), 0
    logging.info('initialized from the Hugging Face checkpoint %s', config.init_from_hf)
  else:
    state, start = train_step.create_state(model_config, tx, shardings, rng=jax.random.key(int(tc.seed))), 0
  state = jax.block_until_ready(state)
  steps = int(tc.steps)
  flops = metrics_lib.flops_per_token(model_config, seq_len)
  logging.info('model: %s parameters, %.3g training FLOPs per token at seq_len %d; train state ready in %.1f s',
               f'{sum(x.size for x in jax.tree.leaves(state.params)):,}', flops, seq_len, time.time() - setup_start)
  if start >= steps:
    logging.info('already trained to step %d of train.steps=%d: nothing to do', start, steps)

  batch_sharding = sharding.batch_sharding(mesh, rules)
  writer = metrics_lib.MetricWriter(workdir)
  peak = float(tc.peak_tflops) * 1e12 or metrics_lib.peak_flops_per_device()
  tokens_per_step = int(tc.batch_size) * seq_len
  log_every, eval_every = max(int(tc.log_every), 1), int(tc.eval_every)
  stop = _StopSignal()
  last: dict[str, float] = {}
  profile_steps, profile_from = int(tc.profile_steps), int(tc.profile_from)
  profile_dir, profiling = os.path.join(workdir, 'profile'), False

  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      step_fn = jax.jit(train_step.make_train_step(model_config, tx, tc),
                        in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                        donate_argnums=(0,))
      eval_fn = jax.jit(train_step.make_eval_step(model_config, tc),
                        in_shardings=(shardings.params, batch_sharding))

      pending, timed_from, timer = [], start, time.time()
      for step in range(start, steps):
        if profile_steps and step == profile_from:
          jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
          profiling = True
        state, step_metrics = step_fn(state, _global_batch(next(train_iter), batch_sharding))
        done = step + 1
        if pending:  # with this step queued behind it, wait for the previous one: the host runs one step ahead
          jax.block_until_ready(pending[-1])
        pending.append(step_metrics)
        if done == start + 1:  # the first step compiles: keep it out of the timings
          jax.block_until_ready(step_metrics)
          logging.info('first step (compilation included) took %.1f s', time.time() - timer)
          timed_from, timer = done, time.time()
        if profiling and (done == profile_from + profile_steps or done == steps):
          jax.block_until_ready(step_metrics)
          jax.profiler.stop_trace()
          profiling = False
          logging.info('profile of steps %d-%d written to %s (python benchmarks/profile_summary.py %s --steps %d)',
                       profile_from + 1, done, profile_dir, profile_dir, done - profile_from)
        stopping = stop.received or done == stop_after or ckpt.reached_preemption(done)

        if done % log_every == 0 or done == steps or stopping:
          values = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
          pending = []
          eta = None
          if done > timed_from:
            step_time = (time.time() - timer) / (done - timed_from)
            values.update(step_time=step_time, tokens_per_sec=tokens_per_step / step_time)
            if peak:
              values['mfu'] = tokens_per_step * flops / step_time / (peak * jax.device_count())
            eta = (steps - done) * step_time
            timed_from, timer = done, time.time()
          writer.write(done, values)
          logging.info(metrics_lib.progress_line(done, steps, values, eta))
          last.update(values)

        if eval_data and ((eval_every > 0 and done % eval_every == 0) or done == steps):
          values = evaluate(eval_fn, state.params, eval_data, batch_sharding)
          writer.write(done, values)
          logging.info('step %d/%d | eval_loss %.4f | eval_perplexity %.2f', done, steps, values['eval_loss'],
                       values['eval_perplexity'])
          last.update(values)
          timed_from, timer = done, time.time()  # keep eval time out of the step timings

        if done % int(tc.checkpoint_every) == 0 or done == steps or stopping:
          ckpt.save(done, state, train_iter)
        if stopping:
          logging.info('stopping at step %d (checkpoint saved)', done)
          break
  finally:  # also on errors: finish the async checkpoint, close the files, give SIGTERM back
    if profiling:
      jax.profiler.stop_trace()
    ckpt.close()
    writer.close()
    stop.close()
  return last


def config_override_error(argv: list[str]) -> str | None:
  """A clear message if a `--config.KEY=VALUE` argument names a key the config file does not have.

  ml_collections would raise a bare AttributeError deep in flag parsing; this check runs first.
  """
  config_path = None
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      config_path = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(argv):
      config_path = argv[i + 1]
  if not config_path:
    return None
  if not os.path.exists(config_path) and ':' in config_path:
    config_path = config_path.split(':', 1)[0]
  if not os.path.exists(config_path):
    return f'--config={config_path}: no such file (give a config file such as configs/tiny.py)'
  config = config_lib.load(config_path)
  for arg in argv:
    name = arg.lstrip('-').split('=', 1)[0]
    if name.startswith('noconfig.'):
      name = name[2:]
    if not name.startswith('config.'):
      continue
    node, parts = config, name.split('.')[1:]
    for depth, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict):
        break  # indexing into a tuple or a value: left to ml_collections
      if part not in node:
        section = '.'.join(['config'] + parts[:depth])
        keys = sorted(node.keys())
        close = difflib.get_close_matches(part, keys, n=1)
        hint = f' Did you mean {section}.{close[0]}?' if close else ''
        return (f'unknown config key in {arg}: {section} has no key {part!r}.{hint} Its keys are: '
                f'{", ".join(keys)}.')
      node = node[part]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a clear error for unknown config keys."""
  error = config_override_error(argv)
  if error:
    sys.stderr.write(f'error: {error}\n')
    sys.exit(2)
  return app.parse_flags_with_usage(argv)


class _LibraryInfoFilter(pylogging.Filter):
  """Drops INFO lines from orbax and grain (dozens per checkpoint); their warnings and errors still show."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    quiet = f'{os.sep}orbax{os.sep}' in record.pathname or f'{os.sep}grain{os.sep}' in record.pathname
    return record.levelno >= pylogging.WARNING or not quiet


def main(argv):
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; set config values as --config.SECTION.KEY=VALUE')
  if _MULTIHOST.value:
    jax.distributed.initialize()
  try:
    workdir = check_workdir(_WORKDIR.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  # The cache is jax's process-wide setting, made once before anything compiles: here, not in
  # train_and_evaluate, which tests and notebooks call in processes that configure jax themselves.
  cache = compilation_cache_dir(str(_CONFIG.value.train.compilation_cache_dir), workdir)
  if cache:
    jax.config.update('jax_compilation_cache_dir', cache)
  train_and_evaluate(_CONFIG.value, workdir)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=parse_flags)
