r"""Trains a Qwen2 model: `python -m qwenjax.train --config=configs/tiny.py --workdir=/tmp/run`.

Every config value can be overridden on the command line, e.g. `--config.train.steps=2000
--config.data.train_files='data/*.jsonl' --config.mesh.tensor=4`. Running the same command again resumes
from the latest checkpoint in `workdir`.

The workdir holds `checkpoints/`, `metrics.jsonl` (one JSON object per line, each with a `step`), TensorBoard
event files, `config.json`, `compilation_cache/` (compiled steps for the next run) and `tokenizer/` (the tokenizer
the run trains with, which sampling, evaluation and export read).

Ctrl-C or SIGTERM saves a checkpoint after the current step and exits with status 130 or 143 (a second Ctrl-C
stops at once, without saving); errors are one `error:` line, status 2 for the command line, 1 otherwise
(`qwenjax.cli`).

Read top to bottom: set up the mesh, data and tokenizer; create or restore the sharded train state; then the
loop: step, log, evaluate, checkpoint. The step itself is `qwenjax.train_step`; sharding is
`qwenjax.sharding`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging as pylogging
import os
import shutil
import signal
import threading
import time
from typing import Any

from absl import flags
from absl import logging
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import ml_collections
from ml_collections import config_flags
import numpy as np

from qwenjax import chat_data
from qwenjax import checkpoint
from qwenjax import cli
from qwenjax import config as config_lib
from qwenjax import data
from qwenjax import distributed
from qwenjax import documents
from qwenjax import dpo
from qwenjax import fit
from qwenjax import group as group_lib
from qwenjax import lock as lock_lib
from qwenjax import metrics as metrics_lib
from qwenjax import sharding
from qwenjax import train_step
from qwenjax import workdir as workdir_lib
from qwenjax.model_config import ModelConfig

# Fields that fix parameter shapes: a Hugging Face checkpoint must agree with the config on these.
_SHAPE_FIELDS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
                 'num_key_value_heads', 'head_dim', 'tie_word_embeddings')
_MOE_SHAPE_FIELDS = ('num_experts', 'moe_intermediate_size', 'shared_expert_intermediate_size', 'decoder_sparse_step',
                     'mlp_only_layers')
# Fields that change what the model computes without changing shapes: a difference is only warned about.
_ARCH_FIELDS = ('rope_theta', 'rope_scaling', 'rms_norm_eps', 'use_sliding_window')
_WINDOW_FIELDS = ('sliding_window', 'max_window_layers')  # when either side has a window
_MOE_ARCH_FIELDS = ('num_experts_per_tok', 'norm_topk_prob')


def check_workdir(workdir: str | None) -> str:
  """The workdir as an absolute path (or a URL such as gs://bucket/run, read and written through epath). A run
  creates it when it starts (`train_and_evaluate`)."""
  if workdir is None or not str(workdir).strip():
    raise ValueError('the workdir is empty: pass --workdir=DIR, a directory for checkpoints, metrics and the '
                     'tokenizer (e.g. --workdir=/tmp/qwenjax-run); the same DIR later resumes the run')
  workdir = str(workdir)
  if '://' in workdir:
    return workdir
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f'--workdir={workdir} is a file, not a directory: give a directory (new or of an earlier run)')
  return workdir


def _first_missing(path: str) -> str | None:
  """The outermost directory of a local `path` that does not exist yet (what creating `path` adds), or None."""
  if '://' in path or os.path.exists(path):
    return None
  while not os.path.exists(os.path.dirname(path)):
    path = os.path.dirname(path)
  return path


def compilation_cache_dir(setting: str, workdir: str) -> str | None:
  """Where jax's persistent compilation cache goes for `train.compilation_cache_dir`; None: off."""
  if not setting:
    return None
  return os.path.join(workdir, 'compilation_cache') if setting == 'workdir' else os.path.expanduser(setting)


def check_batch(batch: int, accum: int, batch_shards: int, mesh: jax.sharding.Mesh) -> int:
  """Checks that the global batch's micro-batches (`batch / accum`: RunConfig has checked that accum divides it)
  split over devices and hosts; returns the per-host batch."""
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


def load_hf_params(path: str, model_config: ModelConfig, shardings: Any = None) -> Any:
  """Parameters of a Hugging Face checkpoint, after checking (from its config.json and headers alone) that it has
  the shapes of the run's model config. With `shardings` (of the params), each process reads only the blocks its
  devices hold, and the parameters come back placed."""
  from qwenjax import hf  # pylint: disable=g-import-not-at-top
  hf_config = hf.load_config(path, scan_layers=model_config.scan_layers)
  moe = bool(model_config.num_experts or hf_config.num_experts)
  for name in _SHAPE_FIELDS + (_MOE_SHAPE_FIELDS if moe else ('num_experts',)):
    ours, theirs = getattr(model_config, name), getattr(hf_config, name)
    if ours != theirs:
      raise ValueError(
          f'init_from_hf={path} has {name}={theirs} but the config has model.{name}={ours}. The model section '
          f'must match the checkpoint: set --config.model.{name}={theirs} (or use the matching configs/ file).')
  window = model_config.use_sliding_window or hf_config.use_sliding_window
  for name in _ARCH_FIELDS + (_WINDOW_FIELDS if window else ()) + (_MOE_ARCH_FIELDS if moe else ()):
    if getattr(model_config, name) != getattr(hf_config, name):
      logging.warning('init_from_hf: checkpoint has %s=%s, the config %s; training with the config\'s value',
                      name, getattr(hf_config, name), getattr(model_config, name))
  _, params = hf.from_pretrained(path, model_config.param_dtype, shardings=shardings,
                                 scan_layers=model_config.scan_layers)
  return params


class _StopSignal:
  """Turns SIGTERM (preemption) and Ctrl-C (SIGINT) into a flag the loop checks after each step: the run saves a
  checkpoint and stops, raising `cli.Stopped` (exit status 128 + the signal). A second Ctrl-C stops at once."""

  def __init__(self):
    self.signum: int | None = None  # the first signal received
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  @property
  def received(self) -> bool:
    return self.signum is not None

  def _handle(self, signum, frame):
    del frame
    if self.received and signum == signal.SIGINT:
      raise cli.Stopped(signum, 'Ctrl-C again: stopped at once, without saving; the same command resumes from the '
                        'last checkpoint', at_once=True)
    logging.warning('%s received: saving a checkpoint after this step, then stopping%s', signal.Signals(signum).name,
                    ' (Ctrl-C again to stop at once, without saving)' if signum == signal.SIGINT else '')
    self.signum = self.signum or signum

  def close(self):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


def evaluate(eval_fn, params, batches: list[dict[str, np.ndarray]], batch_sharding, rows: list[int],
             batch_size: int, objective: str = 'cross_entropy', frozen: tuple = ()
             ) -> dict[str, float] | list[dict[str, float]]:
  """Eval loss, perplexity and token count over `batches` (DPO: the pairs' loss and rewards, as in training); a
  list of them, one per member, when `eval_fn` returns a group's `[K]` sums. `frozen`: the eval step's read-only
  inputs (LoRA's base, DPO's reference)."""
  if objective == 'dpo':
    sums = [eval_fn(params, _global_batch(batch, batch_sharding, rows, batch_size), *frozen) for batch in batches]
    total = jax.tree.map(lambda *x: sum(float(v) for v in x), *sums)
    return {f'eval_{k}': float(v) for k, v in dpo.metrics(total).items() if k != 'target_tokens'}
  nll, count = 0.0, 0.0
  for batch in batches:
    n, c = jax.device_get(eval_fn(params, _global_batch(batch, batch_sharding, rows, batch_size), *frozen))
    nll, count = nll + np.asarray(n, np.float64), count + np.asarray(c, np.float64)

  def values(nll, count):
    loss = float(nll) / max(float(count), 1.0)
    return {'eval_loss': loss, 'eval_perplexity': float(np.exp(min(loss, 80.0))), 'eval_tokens': float(count)}

  return values(nll, count) if np.ndim(nll) == 0 else [values(n, c) for n, c in zip(nll, count)]


def _global_batch(batch: dict[str, np.ndarray], batch_sharding, rows: list[int], batch_size: int,
                  members: int = 0) -> dict[str, jax.Array]:
  """This process's rows (`rows` of the global batch, in that order) -> global arrays sharded over the batch axes
  of the mesh; each device takes its rows from them. `members` > 0: the arrays are `[members, rows, ...]`, each
  member's batch of a group (`member_batches`), and so are the global ones (the member axis whole on every device:
  `batch_sharding` is then the stacked sharding)."""
  where = {row: i for i, row in enumerate(rows)}
  n = 1 if members else 0  # axes before the rows'
  global_rows = (members, batch_size) if members else (batch_size,)

  def global_array(local: np.ndarray) -> jax.Array:
    def shard(index):
      picked = [where[r] for r in range(batch_size)[index[n]]]
      return local[tuple(index[:n]) + (picked,)][(slice(None),) * (n + 1) + tuple(index[n + 1:])]
    return jax.make_array_from_callback(global_rows + local.shape[n + 1:], batch_sharding, shard)

  return {k: global_array(v) for k, v in batch.items()}


def local_rows(batch_sharding: jax.sharding.Sharding, batch_size: int, process: int | None = None) -> list[int]:
  """The rows of the global batch that a process's devices hold (this process's by default), in order: the only
  rows it reads."""
  process = jax.process_index() if process is None else process
  rows = set()
  for device, index in batch_sharding.devices_indices_map((batch_size, 1)).items():
    if device.process_index == process:
      rows.update(range(batch_size)[index[0]])
  return sorted(rows)


@dataclasses.dataclass
class Member:
  """One run the loop trains: a plain run's, or one of a group's (`train_group`)."""
  settings: config_lib.RunConfig
  config: ml_collections.ConfigDict
  workdir: str
  checkpointer: checkpoint.Checkpointer
  stream: dict[str, Any]  # what fixes its data stream, saved with each checkpoint


@dataclasses.dataclass
class Run:
  """Everything the step loop needs, made by `setup` (or `setup_group`)."""
  settings: config_lib.RunConfig
  config: ml_collections.ConfigDict  # what config.json records
  workdir: str
  mesh: jax.sharding.Mesh
  rules: Any
  batch_sharding: jax.sharding.Sharding
  shardings: train_step.TrainState
  tx: Any
  corpus: Any  # the prepared training corpus
  rows: list[int]  # this process's rows of each global batch
  eval_data: list[dict[str, np.ndarray]]
  checkpointer: checkpoint.Checkpointer
  state: train_step.TrainState
  start: int
  stream: dict[str, Any]  # what fixes the data stream, saved with each checkpoint
  step_fn: Any = None  # the compiled train step (`jitted_steps`' as `qwenjax.fit` chose it; a group's vmapped)
  fit: fit.Choice | None = None  # its memory settings, what it needs and what the device has
  # The train and eval steps' last inputs, read and never written (`train_step.frozen_inputs`): the initial
  # model's parameters (`initial_params`), LoRA's frozen base (the state holds the adapters) or DPO's reference.
  frozen: tuple = ()
  frozen_shardings: tuple = ()
  tokenizer: Any = None
  members: list[Member] = dataclasses.field(default_factory=list)  # a group's: the state is stacked over them
  member_batches: bool = False  # a group whose members read their own data streams (their seeds differ)


def setup(settings: config_lib.RunConfig, config: ml_collections.ConfigDict, workdir: str, members: int = 1,
          member_batches: bool = False) -> Run:
  """Mesh, tokenizer and prepared data, then the train state: restored, or new. Only then does the workdir record
  the run's tokenizer and `config` (config.json). `members` > 1: the step is fitted and compiled for a group of that
  many runs (`setup_group` adds the others), with `member_batches` each member's own batch."""
  model_config, loop, data_config = settings.model, settings.loop, settings.data
  mesh = sharding.make_mesh(settings.mesh)
  rules = sharding.logical_axis_rules(settings.mesh.rules, mesh, model_config)
  check_batch(loop.batch_size, train_step.accum_steps(settings.loss), sharding.batch_shards(mesh, rules), mesh)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  logging.info('mesh %s over %d %s device(s), %d process(es)', dict(mesh.shape), mesh.size,
               jax.devices()[0].device_kind, jax.process_count())

  setup_start = time.time()
  chat_data.check_settings(settings)
  tokenizer = data.get_tokenizer(data_config, workdir, model_vocab_size=model_config.vocab_size,
                                 init_from_hf=settings.init_from_hf)
  if data_config.format == 'text':
    corpus, held_out = data.prepared_corpora(data_config, tokenizer)
  else:  # chat or preference records: encoded once, packed whole into rows (qwenjax.chat_data)
    encoded, held_out = chat_data.prepared(data_config, tokenizer)
    corpus = chat_data.PackedExamples(encoded, data_config.seq_len, settings.seed)
    logging.info('data: %s', corpus.describe())
  rows = local_rows(batch_sharding, loop.batch_size)
  if jax.process_count() > 1:
    for process in range(jax.process_count()):
      logging.info('process %d of %d reads rows %s of each global batch', process, jax.process_count(),
                   local_rows(batch_sharding, loop.batch_size, process))
  eval_data = []
  if held_out is not None and loop.eval_steps > 0:
    batches_of = data.eval_batches if data_config.format == 'text' else chat_data.eval_batches
    eval_data = batches_of(held_out, seq_len=data_config.seq_len, batch_size=loop.batch_size,
                           num_batches=loop.eval_steps, local_rows=rows)
  if not eval_data:
    logging.info('no eval data (set data.eval_files): eval loss is not computed')
  logging.info('data: tokenizer and prepared corpora ready in %.1f s', time.time() - setup_start)

  setup_start = time.time()
  tx = train_step.make_optimizer(settings.optimizer)
  shardings = train_step.state_shardings(model_config, tx, mesh, rules, settings.lora)
  frozen_shardings = (train_step.param_shardings(model_config, mesh, rules),) * train_step.frozen_inputs(
      settings.loss, settings.lora)
  if members > 1 and frozen_shardings:
    raise group_lib.GroupError('a group trains runs of the whole model (no LoRA, no DPO): train them one at a time')
  # The step fitted to the device's memory ('auto' resolved) and compiled: the program the loop runs.
  settings, step_fn, choice = fit.fit_step(
      settings, mesh=mesh, rules=rules, tx=tx, shardings=shardings,
      batch=abstract_batch(settings, batch_sharding, members if member_batches else 0),
      jit_step=lambda s: jitted_steps(s, mesh, rules, members, member_batches)[0],
      frozen=tuple(train_step.abstract_params(model_config, sh) for sh in frozen_shardings), members=members,
      member_batches=member_batches)
  config = fit.record(config, choice)
  if data_config.format == 'text':
    stream = data.stream_record(data_config, corpus, seed=settings.seed, batch_size=loop.batch_size)
  else:
    stream = chat_data.stream_record(corpus.encoded, seq_len=data_config.seq_len, seed=settings.seed,
                                     batch_size=loop.batch_size)
  if settings.loss.objective == 'dpo':
    stream['reference'] = _reference_source(settings)
  member, state, start = _start_member(settings, config, workdir, tx, shardings, stream, tokenizer)
  frozen = tuple(initial_params(settings, sh) for sh in frozen_shardings)
  trained = sum(x.size for x in jax.tree.leaves(state.params))
  if not settings.lora.lora_rank:
    logging.info('model: %s parameters; train state ready in %.1f s', f'{trained:,}', time.time() - setup_start)
  else:
    base_size = sum(x.size for x in jax.tree.leaves(frozen))
    logging.info('LoRA: %s adapter parameters train (%.3f%% of the %s frozen ones); train state ready in %.1f s',
                 f'{trained:,}', 100 * trained / base_size, f'{base_size:,}', time.time() - setup_start)
  return Run(settings, config, workdir, mesh, rules, batch_sharding, shardings, tx, corpus, rows, eval_data,
             member.checkpointer, state, start, stream, step_fn, choice, frozen, frozen_shardings, tokenizer,
             [member], member_batches)


def abstract_batch(settings: config_lib.RunConfig, batch_sharding, members: int = 0
                   ) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch a step takes, as ShapeDtypeStructs: the keys and dtypes of the data pipeline's batches;
  `members` > 0: a group's members' own batches, stacked in front."""
  rows, seq_len = settings.loop.batch_size, settings.data.seq_len
  packed = {k: np.zeros((1, seq_len + 1), np.int32) for k in ('tokens', 'segment_ids', 'positions')}
  lead = (members,) if members else ()
  where = group_lib.stacked_shardings(batch_sharding) if members else batch_sharding
  return {k: jax.ShapeDtypeStruct(lead + (rows, seq_len), v.dtype, sharding=where)
          for k, v in data.to_model_batch(packed).items()}


def _reference_source(settings: config_lib.RunConfig) -> dict[str, Any]:
  """What DPO's reference model is made from, in the stream record: a resumed run that makes another one is
  warned about (`data.stream_changes`)."""
  if settings.init_from_hf:
    files = sorted(f for f in os.listdir(settings.init_from_hf) if f.endswith('.safetensors'))
    identity = documents.file_identity([os.path.join(settings.init_from_hf, f) for f in files])
    return {'init_from_hf': os.path.abspath(settings.init_from_hf), 'files': [list(f) for f in identity]}
  return {'seed': settings.seed, 'mup_base_width': settings.optimizer.mup_base_width}


def initial_params(settings: config_lib.RunConfig, param_shardings: Any) -> Any:
  """The run's initial model, made again as every run of the workdir starts (fresh or resumed) and never trained:
  a LoRA run's frozen base, and DPO's reference model (with LoRA the same base, applied without adapters: no
  second copy; see `qwenjax.dpo`). The `init_from_hf` checkpoint, else the random parameters of `train.seed`
  (the ones a new train state draws), so a resumed run has what the interrupted one had."""
  model_config = settings.model
  if settings.init_from_hf:
    logging.info('the initial model (frozen%s) is the Hugging Face checkpoint %s',
                 ': the LoRA base' if settings.lora.lora_rank else ': the DPO reference', settings.init_from_hf)
    return load_hf_params(settings.init_from_hf, model_config, param_shardings)
  if settings.lora.lora_rank:
    logging.warning('LoRA without init_from_hf: the base is random (train.seed=%d); fine for tests and benchmarks',
                    settings.seed)
  return train_step.random_params(model_config, param_shardings, jax.random.key(settings.seed),
                                  settings.optimizer.mup_base_width)


def _start_member(settings, config, workdir, tx, shardings, stream, tokenizer) -> tuple[Member, Any, int]:
  """(the run, its train state restored or new, the first step); then its workdir records its tokenizer and
  settings (a run that failed before did not)."""
  checkpointer = checkpoint.Checkpointer(workdir, settings.checkpoint)
  state, start = _restore_or_init(settings, config, workdir, tx, shardings, checkpointer, stream)
  state = jax.block_until_ready(state)
  data.keep_tokenizer(workdir, tokenizer, settings.data, init_from_hf=settings.init_from_hf)
  if jax.process_index() == 0:
    workdir_lib.write_config(workdir, config, start)
  return Member(settings, config, workdir, checkpointer, stream), state, start


def setup_group(points: list[tuple[config_lib.RunConfig, ml_collections.ConfigDict, str]]) -> Run:
  """`setup` of the first member, then the others' train states, each restored from its own workdir or new, all
  stacked along a leading member axis. Every member must resume from the same step (GroupError otherwise)."""
  own = group_lib.member_batches([s.seed for s, _, _ in points])
  if own and points[0][0].data.format != 'text':
    raise group_lib.GroupError('members with other train.seed values read their own data streams, which only '
                               "data.format='text' gives: train them one at a time")
  run = setup(*points[0], members=len(points), member_batches=own)
  # Each member takes the first one's memory settings ('auto' resolved once: the members have one shape).
  a, p = run.settings.loss.grad_accum_steps, run.settings.model.remat_policy
  streams = [data.stream_record(s.data, run.corpus, seed=s.seed, batch_size=s.loop.batch_size) if own
             else run.stream for s, _, _ in points[1:]]
  others = [_start_member(fit.resolved(s, a, p), fit.record(c, run.fit), w, run.tx, run.shardings, stream,
                          run.tokenizer) for (s, c, w), stream in zip(points[1:], streams)]
  starts = [run.start] + [start for _, _, start in others]
  if len(set(starts)) > 1:
    for member in run.members + [m for m, _, _ in others]:
      member.checkpointer.close()
    where = ', '.join(f'{workdir}: step {start}' for (_, _, workdir), start in zip(points, starts))
    raise group_lib.GroupError(f'the members of the group resume from different steps ({where}): train them one '
                               'at a time (train_and_evaluate) until they agree')
  state = group_lib.stack([run.state] + [state for _, state, _ in others], run.shardings)
  logging.info('group of %d runs: one step vmapped over them', len(points))
  return dataclasses.replace(run, state=state, members=run.members + [m for m, _, _ in others])


def _restore_or_init(settings, config, workdir, tx, shardings, checkpointer, stream):
  """(state, first step): the latest readable checkpoint, else a Hugging Face checkpoint or random init.

  Errors leave every file as it was and say which setting differs from the workdir's config.json."""
  model_config = settings.model
  saved_steps = checkpointer.all_steps()
  try:
    restored = checkpointer.restore(train_step.abstract_state(model_config, tx, shardings, settings.lora))
  except (checkpoint.ShapeMismatchError, checkpoint.RestoreError) as e:
    changes = workdir_lib.config_changes(workdir_lib.saved_config(workdir) or {}, config)
    differs = ('Settings that differ from the workdir\'s config.json: ' + '; '.join(changes) + '.') if changes else ''
    raise type(e)(f'{e} {differs}'.strip()) from e
  if restored is not None:
    state, start, saved_stream = restored
    changes = data.stream_changes(saved_stream or {}, stream)
    if saved_stream and changes:
      logging.warning('resuming at step %d with a different data stream than the checkpoint was trained on (%s): '
                      'the batches from here on are not those the interrupted run would have seen', start,
                      '; '.join(changes))
    logging.info('resumed from %s/%d', checkpointer.directory, start)
    return state, start
  lost = saved_steps or checkpointer.set_aside_steps()
  if lost and not settings.checkpoint.restart_if_unreadable:
    raise checkpoint.RestoreError(
        f'no checkpoint in {checkpointer.directory} can be read (unreadable ones were moved to '
        f'{checkpointer.corrupt_directory}: {", ".join(checkpointer.set_aside_steps())}). The run does not start '
        'over by itself: pass --config.train.restart_if_unreadable=True to train again from step 0 in this '
        'workdir, or use a new --workdir.')
  if settings.lora.lora_rank:  # new adapters; the base is loaded apart (initial_params)
    return train_step.create_state(model_config, tx, shardings, rng=jax.random.fold_in(
        jax.random.key(settings.seed), 1), lora=settings.lora, optimizer_key=_static_optimizer(settings)), 0
  if settings.init_from_hf:
    logging.info('initializing from the Hugging Face checkpoint %s', settings.init_from_hf)
    return train_step.create_state(
        model_config, tx, shardings, params=load_hf_params(settings.init_from_hf, model_config, shardings.params)), 0
  return train_step.create_state(model_config, tx, shardings, rng=jax.random.key(settings.seed),
                                 mup_base_width=settings.optimizer.mup_base_width,
                                 optimizer_key=_static_optimizer(settings)), 0


def _save(member: Member, stream: dict[str, Any], step: int, state) -> None:
  try:
    member.checkpointer.save(step, state, stream)
  except checkpoint.NonFiniteError as e:
    raise checkpoint.NonFiniteError(f'{e}. Stopping: lower train.lr or look for bad data before the last good '
                                    'checkpoint; the run resumes from it.') from e


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after: int | None = None) -> dict[str, float]:
  """Trains (or resumes) to `config.train.steps`; returns the last logged metrics.

  The config is read once, here (`config.settings`): a bad setting stops the run before anything is written.
  A run that fails before its train state exists leaves no new directory behind; a workdir that existed stays as
  it was. `stop_after`: stop after that step, checkpointing as on SIGTERM (tests and time-sliced jobs). Stopped by
  SIGTERM or Ctrl-C before the last step, it checkpoints and raises `cli.Stopped`.
  """
  return _train([config], [workdir], stop_after=stop_after)[0]


def train_group(configs: list[ml_collections.ConfigDict], workdirs: list[str], *, stop_after: int | None = None
                ) -> list[dict[str, float] | checkpoint.NonFiniteError]:
  """Trains (or resumes) several runs of one shape at once, as one step vmapped over them (`qwenjax.group`): the
  configs may differ only in `group.MEMBER_KEYS` (learning rate, schedule, seed). Each member's workdir is written as
  `train_and_evaluate` would write it, and each member computes what it would alone.

  Returns each member's last logged metrics, or the NonFiniteError that stopped it (a diverging member stops
  alone; the others go on). All members must resume from the same step (`group.GroupError` otherwise).
  """
  group_lib.check(configs, [check_workdir(w) for w in workdirs])
  return _train(configs, workdirs, stop_after=stop_after)


def _train(configs, workdirs, *, stop_after):
  points = [(config_lib.settings(c), c, check_workdir(w)) for c, w in zip(configs, workdirs)]
  new = [_first_missing(workdir) for _, _, workdir in points]
  for _, _, workdir in points:
    if '://' not in workdir:
      try:
        os.makedirs(workdir, exist_ok=True)
      except OSError as e:
        raise OSError(e.errno, f'cannot create the workdir {workdir} ({e.strerror}): give a --workdir where you '
                      'can write') from None
  run = None
  try:
    with contextlib.ExitStack() as locks:
      for _, _, workdir in points:
        locks.enter_context(_workdir_lock(workdir))
      run = setup(*points[0]) if len(points) == 1 else setup_group(points)
      return train_loop(run, stop_after=stop_after)
  finally:
    for path in new:
      if path and run is None:  # nothing of this run's is worth keeping: its tokenizer and data are in the cache
        shutil.rmtree(path, ignore_errors=True)


def jitted_steps(settings: config_lib.RunConfig, mesh: jax.sharding.Mesh, rules: Any, members: int = 1,
                 member_batches: bool = False) -> tuple[Any, Any]:
  """(train step, eval step) as the loop calls them, `(state, batch, horizon, *frozen) -> (state, metrics)` and
  `(params, batch, *frozen) -> sums`: jitted with explicit shardings, the state donated, the frozen inputs (LoRA's
  base, DPO's reference) never. Lowered and compiled under the mesh and the logical axis rules.

  Kept for later runs of this process with the same shape, optimizer settings and group size: the points of one
  shape in a sweep reuse the compiled programs, whatever their learning rate and schedule (inputs of the step,
  zeroed in the key). `members` > 1: vmapped over a group's stacked state; the batch is the members' one, or with
  `member_batches` each member's own (stacked in front). Evaluation reads one batch for all."""
  return _jitted_steps(settings.model, _static_optimizer(settings), settings.loss, settings.lora, mesh, rules, members,
                       member_batches)


def _static_optimizer(settings: config_lib.RunConfig) -> config_lib.OptimizerConfig:
  """The optimizer settings a compiled program depends on: the learning rate and its schedule zeroed (inputs of
  the step; the optimizer state holds none of them)."""
  return dataclasses.replace(settings.optimizer, lr=0.0, lr_final_fraction=0.0, warmup_steps=0, steps=0)


@functools.lru_cache(maxsize=16)
def _jitted_steps(model_config: ModelConfig, optimizer: config_lib.OptimizerConfig, loss: config_lib.LossConfig,
                  lora: config_lib.LoraConfig, mesh: jax.sharding.Mesh, rules: Any, members: int,
                  member_batches: bool = False):
  shardings = train_step.state_shardings(model_config, train_step.make_optimizer(optimizer), mesh, rules, lora)
  frozen = (train_step.param_shardings(model_config, mesh, rules),) * train_step.frozen_inputs(loss, lora)
  batch_sharding, replicated = sharding.batch_sharding(mesh, rules), sharding.replicated(mesh)
  step = train_step.make_train_step(model_config, optimizer, loss, lora)
  evaluate_step = train_step.make_eval_step(model_config, loss, lora)
  train_batch_sharding = batch_sharding
  if members > 1:  # a group: whole models only (`setup_group`), no frozen inputs
    step = jax.vmap(step, in_axes=(0, 0 if member_batches else None, 0))
    evaluate_step = jax.vmap(evaluate_step, in_axes=(0, None))
    shardings = group_lib.stacked_shardings(shardings)
    if member_batches:
      train_batch_sharding = group_lib.stacked_shardings(batch_sharding)
  step_fn = jax.jit(step, in_shardings=(shardings, train_batch_sharding, replicated) + frozen,
                    out_shardings=(shardings, None), donate_argnums=(0,))
  eval_fn = jax.jit(evaluate_step, in_shardings=(shardings.params, batch_sharding) + frozen)
  return step_fn, eval_fn


def train_loop(run: Run, *, stop_after: int | None = None) -> list[dict[str, float] | checkpoint.NonFiniteError]:
  """Steps from `run.start` to `train.steps`: step, log, evaluate, checkpoint, for each of `run.members` (one, or
  a group's); on SIGTERM / Ctrl-C (or a preemption another host saw) it checkpoints and raises `cli.Stopped` once
  everything is closed. Returns each member's last logged metrics, or, in a group, the NonFiniteError that
  stopped a member (a plain run raises it)."""
  settings, state, members = run.settings, run.state, run.members
  loop, steps, seq_len = settings.loop, settings.loop.steps, settings.data.seq_len
  grouped, ckpt = len(members) > 1, run.checkpointer
  if run.start >= steps:
    logging.info('already trained to step %d of train.steps=%d: nothing to do', run.start, steps)
  if settings.data.format == 'text':
    text_batches = lambda seed: data.train_batches(
        run.corpus, seq_len=seq_len, batch_size=loop.batch_size, seed=seed,
        shuffle_window=settings.data.shuffle_window, local_rows=run.rows, start=run.start, steps=steps,
        read_threads=settings.data.read_threads)
    if run.member_batches:  # each member's own stream, stacked: `[members, rows, ...]`
      batches = (({k: np.stack([b[k] for b in each]) for k in each[0]}) for each in
                 zip(*[text_batches(m.settings.seed) for m in members]))
    else:
      batches = text_batches(settings.seed)
  else:
    batches = chat_data.train_batches(run.corpus, batch_size=loop.batch_size, local_rows=run.rows, start=run.start,
                                      steps=steps, read_threads=settings.data.read_threads)
  writers = [metrics_lib.MetricWriter(m.workdir, resume_step=run.start) for m in members]
  peak = loop.peak_tflops * 1e12 or metrics_lib.peak_flops_per_device()
  tokens_per_step = loop.batch_size * seq_len * len(members)  # a group's: all its members'
  log_every, eval_every = max(loop.log_every, 1), loop.eval_every
  stop, profiler = _StopSignal(), _Profiler(run.workdir, loop.profile_steps, loop.profile_from, steps)
  nonfinite = _NonFiniteSteps(loop.max_nonfinite_steps, [m.workdir for m in members] if grouped else None)
  outcomes: list[Any] = [{} for _ in members]  # each member's last values, or the error that stopped it
  take = group_lib.taker(run.shardings) if grouped else (lambda state, _: state)
  label = (lambda k: f'{os.path.basename(members[k].workdir)}: ') if grouped else (lambda _: '')
  stopped_by = None  # (signal, message) of a stop before train.steps
  unsaved_end: dict[int, int] = {}  # member -> the last step, when its state was not saved (non-finite steps)
  where = [f'train step {run.start + 1}']  # what an out-of-memory error names

  def diverged(errors: dict[int, checkpoint.NonFiniteError]) -> None:
    for k, error in errors.items():
      if not grouped:
        raise error
      if isinstance(outcomes[k], dict):  # the member stops here; the others go on
        logging.warning('%s%s', label(k), error)
        outcomes[k] = error

  def report(done: int, values_by_member: list[dict[str, float]], line) -> None:
    """Each training member's values to its metrics.jsonl, its outcome and the log (`line(values)`)."""
    for k, values in enumerate(values_by_member):
      if isinstance(outcomes[k], dict):
        writers[k].write(done, values)
        logging.info(label(k) + line(values))
        outcomes[k].update(values)

  try:
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules), fit.out_of_memory(lambda: where[0], run.fit):
      # The schedule (lr, warmup, length) is an input, not a constant: runs of one shape share the compiled step.
      step_fn, eval_fn = jitted_steps(settings, run.mesh, run.rules, len(members))
      step_fn, frozen = run.step_fn or step_fn, run.frozen  # the one `qwenjax.fit` compiled
      optimizers = [m.settings.optimizer for m in members]
      horizon = jax.device_put(group_lib.horizon(optimizers) if grouped
                               else train_step.schedule_horizon(optimizers[0]), sharding.replicated(run.mesh))
      timer = _StepTimer(run.start)
      stacked = len(members) if run.member_batches else 0  # members' own batches, stacked in front
      train_sharding = group_lib.stacked_shardings(run.batch_sharding) if stacked else run.batch_sharding
      for step in range(run.start, steps):
        where[0] = f'train step {step + 1}'
        profiler.before(step)
        host_batch = next(batches)
        state, step_metrics = step_fn(state, _global_batch(host_batch, train_sharding, run.rows, loop.batch_size,
                                                           stacked), horizon, *frozen)
        done = step + 1
        # The FLOPs MFU counts: each document's own attention band (this process's rows scaled to the global
        # batch; a group's: all its members').
        segments = host_batch['segment_ids']
        work = (metrics_lib.batch_flops(settings.model, segments.reshape(-1, segments.shape[-1])) * loop.batch_size
                / len(run.rows) * (1 if stacked else len(members))) if peak else 0.0
        timer.queued(step_metrics, work)  # waits for the previous step: the host runs one step ahead
        diverged(nonfinite.check(timer.previous, done - 1))
        profiler.after(done, step_metrics)
        stopping = stop.received or done == stop_after or ckpt.reached_preemption(done)

        if done % log_every == 0 or done == steps or stopping:
          diverged(nonfinite.check(step_metrics, done))
          collected = timer.collect(done, tokens_per_step, peak, len(members))
          for values in collected:
            if settings.data.format != 'text' and 'step_time' in values:  # rows hold padding, untrained tokens
              values['trained_tokens_per_sec'] = values['target_tokens'] / values['step_time']
          report(done, collected, lambda v: metrics_lib.progress_line(done, steps, v, timer.eta(done, steps)))

        if run.eval_data and ((eval_every > 0 and done % eval_every == 0) or done == steps):
          where[0] = f'evaluation at step {done}'
          evaluated = evaluate(eval_fn, state.params, run.eval_data, run.batch_sharding, run.rows, loop.batch_size,
                               settings.loss.objective, frozen)
          if settings.loss.objective == 'dpo':
            line = lambda v: (f'step {done}/{steps} | eval_loss {v["eval_loss"]:.4f} | eval_rewards/accuracies '
                              f'{v["eval_rewards/accuracies"]:.3f} | eval_rewards/margins '
                              f'{v["eval_rewards/margins"]:.4f}')
          else:
            line = lambda v: (f'step {done}/{steps} | eval_loss {v["eval_loss"]:.4f} | eval_perplexity '
                              f'{v["eval_perplexity"]:.2f}')
          report(done, evaluated if grouped else [evaluated], line)
          timer.restart(done)  # keep eval time out of the step timings

        if ckpt.due(done) or done == steps or stopping:
          diverged(nonfinite.check(step_metrics, done))
          saved = True
          for k, member in enumerate(members):
            if not isinstance(outcomes[k], dict):
              continue  # stopped by non-finite steps: its last good checkpoint stays
            if nonfinite.in_a_row[k]:  # the state that gave a non-finite loss (e.g. blown up by a huge lr) is
              saved = False  # suspect: rotation would delete good ones
              logging.warning('%sstep %d: not saving a checkpoint while steps are skipped for a non-finite loss '
                              'or gradient; the last good checkpoint stays', label(k), done)
              if done == steps or done == stop_after:  # the run ends without its final state: a failure
                unsaved_end[k] = done
            else:
              _save(member, member.stream, done, take(state, k))
        if not any(isinstance(o, dict) for o in outcomes):
          break  # every member of the group stopped on non-finite steps
        if stopping:
          outcome = 'checkpoint saved' if saved else 'no checkpoint written'
          if done < steps and done != stop_after:  # a signal, or a preemption that another host received
            stopped_by = (stop.signum or signal.SIGTERM,
                          f'{signal.Signals(stop.signum or signal.SIGTERM).name} received: stopped at step {done} '
                          f'of {steps}, {outcome}; the same command resumes the run')
          else:
            logging.info('stopping at step %d (%s)', done, outcome)
          break
  finally:  # also on errors: finish the async checkpoints, close the files, give the signals back
    try:
      profiler.close()
      _close_all([member.checkpointer for member in members])  # checkpoint.SaveError: a last save failed
    finally:
      for writer in writers:
        writer.close()
      stop.close()
  if stopped_by:
    raise cli.Stopped(*stopped_by)
  # Exit status 0 means the run's final state is saved: `train && export` relies on it.
  for k, end in unsaved_end.items():
    what = (f'every one of its {nonfinite.checked} steps was skipped' if nonfinite.skipped[k] == nonfinite.checked
            else f'its last {nonfinite.in_a_row[k]} step(s) (from step {nonfinite.first[k]}) were skipped')
    error = checkpoint.NonFiniteError(
        f'the run reached step {end} but {what} for a non-finite loss or gradient, so its final state was not '
        f'saved (checkpoints kept: {members[k].checkpointer.all_steps() or "none"}). Look at train.lr, '
        f'model.param_dtype ({settings.model.param_dtype}), model.dtype ({settings.model.dtype}) and the data, or '
        'at the checkpoint the run resumed from.')
    if not grouped:
      raise error
    logging.warning('%s%s', label(k), error)
    outcomes[k] = error
  return outcomes


def _close_all(checkpointers: list[checkpoint.Checkpointer]) -> None:
  """Closes every checkpointer (each finishes its save in progress), then raises the first failure."""
  first = None
  for checkpointer in checkpointers:
    try:
      checkpointer.close()
    except Exception as e:  # pylint: disable=broad-except
      first = first or e
  if first is not None:
    raise first


class _StepTimer:
  """Step times and throughput over the steps since the last log, leaving out the first (compiling) step."""

  def __init__(self, start: int):
    self.start, self.timed_from, self.time, self.flops = start, start, time.time(), 0.0
    self.pending: list[dict[str, jax.Array]] = []
    self.previous: dict[str, jax.Array] | None = None
    self.last_step_time: float | None = None

  def queued(self, step_metrics, flops: float = 0.0) -> None:
    """A step was queued; `flops`: what it computes (`metrics.batch_flops`), for MFU."""
    if self.pending:
      jax.block_until_ready(self.pending[-1])
      self.previous = self.pending[-1]
    self.pending.append(step_metrics)
    self.flops += flops
    if len(self.pending) == 1 and self.timed_from == self.start:  # the first step compiles
      jax.block_until_ready(step_metrics)
      logging.info('first step (compilation included) took %.1f s', time.time() - self.time)
      self.restart(self.start + 1)

  def restart(self, done: int) -> None:
    self.timed_from, self.time, self.flops = done, time.time(), 0.0

  def collect(self, done: int, tokens_per_step: int, peak: float | None, members: int = 1
              ) -> list[dict[str, float]]:
    """Each member's metrics averaged over the steps since the last call, with the step time and throughput
    (a group's: `tokens_per_step` counts all its members, and so do tokens_per_sec and mfu)."""
    pending = jax.device_get(self.pending)
    means = {k: np.mean(np.stack([m[k] for m in pending]), axis=0) for k in pending[0]}
    means['skipped'] = sum(m['skipped'] for m in pending)
    values = [{k: float(np.reshape(v, -1)[i]) for k, v in means.items()} for i in range(members)]
    self.pending, self.previous = [], None
    if done > self.timed_from:
      step_time = (time.time() - self.time) / (done - self.timed_from)
      timing = dict(step_time=step_time, tokens_per_sec=tokens_per_step / step_time)
      if peak:
        timing['mfu'] = self.flops / (done - self.timed_from) / step_time / (peak * jax.device_count())
      if members > 1:
        timing['group_size'] = float(members)
      for v in values:
        v.update(timing)
      self.last_step_time = step_time
      self.restart(done)
    return values

  def eta(self, done: int, steps: int) -> float | None:
    return None if self.last_step_time is None else (steps - done) * self.last_step_time


class _NonFiniteSteps:
  """Counts steps skipped for a non-finite loss or gradient, per member (`names`: a group's workdirs; None: a
  plain run); too many in a row stop the run (in a group, that member)."""

  def __init__(self, limit: int, names: list[str] | None = None):
    self.names = names
    members = len(names) if names else 1
    self.limit, self.in_a_row, self.first, self.seen = max(limit, 1), [0] * members, [None] * members, -1
    self.checked, self.skipped = 0, [0] * members  # steps of this run checked, and of those each member skipped

  def check(self, step_metrics, step: int) -> dict[int, checkpoint.NonFiniteError]:
    """The members that have just reached the limit, with the error that stops each."""
    if step_metrics is None or step <= self.seen:
      return {}
    self.seen = step
    skipped = np.reshape(jax.device_get(step_metrics['skipped']), -1)
    self.checked += 1
    for k in np.flatnonzero(skipped):
      self.skipped[k] += 1
    if not skipped.any():
      self.in_a_row, self.first = [0] * len(skipped), [None] * len(skipped)
      return {}
    loss, grad_norm = (np.reshape(jax.device_get(step_metrics[k]), -1) for k in ('loss', 'grad_norm'))
    errors = {}
    for k in range(len(skipped)):
      if not skipped[k]:
        self.in_a_row[k], self.first[k] = 0, None
        continue
      self.in_a_row[k] += 1
      self.first[k] = self.first[k] or step
      if self.in_a_row[k] > self.limit:
        continue  # a group's member that has stopped already
      where = f' ({self.names[k]})' if self.names else ''
      logging.warning('step %d%s: loss or gradient not finite (loss %s, grad_norm %s): update skipped (%d in a row)',
                      step, where, float(loss[k]), float(grad_norm[k]), self.in_a_row[k])
      if self.in_a_row[k] == self.limit:
        errors[k] = checkpoint.NonFiniteError(
            f'{self.in_a_row[k]} steps in a row (steps {self.first[k]}-{step}) had a non-finite loss or gradient, so '
            f'their updates were skipped (train.max_nonfinite_steps={self.limit}). Stopping without saving: lower '
            'train.lr, look at the data of those steps, or check the checkpoint the run resumed from.')
    return errors


class _Profiler:
  """jax.profiler trace of steps profile_from + 1 ... profile_from + profile_steps into workdir/profile."""

  def __init__(self, workdir: str, profile_steps: int, profile_from: int, steps: int):
    self.dir, self.count, self.first, self.steps = os.path.join(workdir, 'profile'), profile_steps, profile_from, steps
    self.active = False

  def before(self, step: int) -> None:
    if self.count and step == self.first:
      jax.profiler.start_trace(self.dir, create_perfetto_trace=True)
      self.active = True

  def after(self, done: int, step_metrics) -> None:
    if self.active and (done == self.first + self.count or done == self.steps):
      jax.block_until_ready(step_metrics)
      self.close()
      logging.info('profile of steps %d-%d written to %s (python benchmarks/profile_summary.py %s --steps %d)',
                   self.first + 1, done, self.dir, self.dir, done - self.first)

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


@contextlib.contextmanager
def _workdir_lock(workdir: str):
  """One run per workdir: process 0 takes the lock; every process stops if it cannot."""
  lock = lock_lib.Lock(workdir) if jax.process_index() == 0 else None
  error = None
  if lock is not None:
    try:
      lock.acquire()
    except lock_lib.WorkdirBusyError as e:
      error = e
  if jax.process_count() > 1:
    busy = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if busy and error is None:
      raise lock_lib.WorkdirBusyError(f'the workdir {workdir} is in use by another run (see process 0)')
  if error is not None:
    raise error
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def config_override_error(argv: list[str]) -> str | None:
  """What is wrong with `--config=FILE` and its `--config.KEY=VALUE` overrides in `argv` (e.g. an unknown key,
  with the closest one), or None: what the command line reports before anything runs (`cli.parse`)."""
  return cli.config_override_error(argv, 'config')


class _LibraryInfoFilter(pylogging.Filter):
  """Drops INFO lines from orbax and grain (dozens per checkpoint); their warnings and errors still show."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    quiet = f'{os.sep}orbax{os.sep}' in record.pathname or f'{os.sep}grain{os.sep}' in record.pathname
    return record.levelno >= pylogging.WARNING or not quiet


# Errors that are about the run's input or state, and whose message says how to proceed.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, lock_lib.WorkdirBusyError, checkpoint.RestoreError,
               checkpoint.NonFiniteError, fit.OutOfMemoryError)


def _define_flags() -> None:
  """The command line's flags (defined when it runs, so importing this module, as the sweep does, adds none)."""
  config_flags.DEFINE_config_file('config', None, 'Training config file, e.g. configs/tiny.py.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, TensorBoard files and the tokenizer '
                      '(tokenizer/); running again with the same workdir resumes.')
  distributed.define_flags()


def main(argv: list[str]) -> None:
  del argv  # cli.run: no positional arguments
  config = flags.FLAGS.config
  try:  # a value out of range or of the wrong kind is a usage error, found before anything starts
    chat_data.check_settings(config_lib.settings(config))
    workdir = check_workdir(flags.FLAGS.workdir)
  except ValueError as e:
    raise cli.UsageError(str(e)) from None
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())
  distributed.initialize_from_flags()
  if jax.process_index() != 0 and not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # process 0 alone logs progress; the others only what goes wrong
  # The cache is jax's process-wide setting, made once before anything compiles: here, not in
  # train_and_evaluate, which tests and notebooks call in processes that configure jax themselves.
  cache = compilation_cache_dir(str(config.train.compilation_cache_dir), workdir)
  if cache:
    jax.config.update('jax_compilation_cache_dir', cache)
  train_and_evaluate(config, workdir)


if __name__ == '__main__':
  cli.run(main, _define_flags, required=('config', 'workdir'), expected=USER_ERRORS)
