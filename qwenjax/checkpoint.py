"""Checkpoints of the train state, with orbax, in `workdir/checkpoints/<step>`.

Saves are asynchronous (training continues while the files are written) and atomic (orbax writes a temporary
directory and renames it when complete, so a killed save leaves no half checkpoint). Each checkpoint holds the
train state (`state`) and a record of the data stream it was trained on (`data`, see `qwenjax.data`): the data
position is the step itself.

What survives what:
- A checkpoint is moved aside, to `workdir/checkpoints_corrupt/`, only when it is proven corrupt: its files fail
  to read as saved, or its parameters are not finite. Then the previous one is tried.
- A checkpoint that reads but does not fit this run (another model config, optimizer settings, mesh, or an
  out-of-memory or storage error) is left where it is, and `restore` raises an error saying what differs.
- A state holding non-finite values is never saved (`NonFiniteError`), so rotation (`keep`) can never delete the
  last good checkpoint for a bad one.
- A save that fails (a full disk, a read-only directory) removes its partial files and raises one `SaveError`
  saying why; the checkpoints before it are kept.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from qwenjax import files
from qwenjax.config import CheckpointConfig


class ShapeMismatchError(ValueError):
  """The checkpoint holds a differently shaped (or differently structured) train state."""


class RestoreError(RuntimeError):
  """A readable checkpoint could not be restored into this run; nothing was moved."""


class NonFiniteError(RuntimeError):
  """The train state holds NaN or infinite values."""


class SaveError(OSError):
  """A checkpoint could not be written (a full disk, a read-only or vanished directory); its partial files were
  removed and the checkpoints before it are kept."""


def _path(key_path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in key_path)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))[0]
  return {_path(p): tuple(x.shape) for p, x in leaves if hasattr(x, 'shape')}


def _layout_hint(saved: set[str], expected: set[str]) -> str:
  """Names the likely cause when one tree has scanned layers (`.../layers/...`) and the other unrolled ones."""
  stacked = lambda names: any('/layers/' in f'/{n}/' for n in names)
  if stacked(saved) != stacked(expected):
    written = 'True' if stacked(saved) else 'False'
    return (f' (it was written with model.scan_layers={written}: pass --config.model.scan_layers={written}, '
            'or convert with qwenjax.params.stack_layers / unstack_layers)')
  return ''


def _is_param(name: str) -> bool:
  return name.startswith('params/') or '/params/' in f'/{name}'


def _cause(name: str, hint: str) -> str:
  """What a difference in `name` means: model parameters come from the model config, the rest from train."""
  if _is_param(name):
    return f'the checkpoint was written for a different model config{hint}.'
  return ('the optimizer state differs: the checkpoint was written with different optimizer settings (train.*) '
          'or a different model config.')


def check_shapes(saved: Any, expected: Any, where: str) -> None:
  """Raises ShapeMismatchError naming the first array whose presence or shape differs: a parameter first, since
  the optimizer state follows the parameters, so another model's shape shows in both."""
  saved, expected = _shapes(saved), _shapes(expected)
  hint = _layout_hint(set(saved), set(expected))
  for name in sorted(set(saved) | set(expected), key=lambda n: (not _is_param(n), n)):
    if name not in saved:
      raise ShapeMismatchError(f'{where} has no {name}, which the model being trained needs: {_cause(name, hint)}')
    if name not in expected:
      raise ShapeMismatchError(f'{where} holds {name}, which the model being trained does not have: '
                               f'{_cause(name, hint)}')
    if saved[name] != expected[name]:
      raise ShapeMismatchError(
          f'{where} has {name} of shape {saved[name]} but the model config gives {expected[name]}. Train with '
          'the config the checkpoint was written with, or use a new --workdir.')


@jax.jit
def _finite(tree: Any) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def all_finite(tree: Any) -> bool:
  """True when every floating-point array of `tree` is finite (one reduction on the devices)."""
  return bool(jax.device_get(_finite(tree)))


SETTLE_S = 1.0  # after a failed save, how long no partial checkpoint may reappear before close() returns

# Errors of the machine or the storage rather than of the checkpoint's files: never a reason to move it. Whole
# words, so that a path such as /runs/BLOOM-7b does not read as an out-of-memory error.
_ENVIRONMENT = re.compile(r'\b(RESOURCE_EXHAUSTED|[Oo]ut of memory|OOM|UNAVAILABLE|DEADLINE_EXCEEDED|Permission '
                          r'denied|No space left|Connection (reset|refused|aborted|error)|ConnectionError|timed out|'
                          r'Too many open files)\b')


def _is_environment(error: BaseException) -> bool:
  return isinstance(error, (MemoryError, PermissionError, TimeoutError, ConnectionError)) or bool(
      _ENVIRONMENT.search(f'{type(error).__name__}: {error}'))


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return f'{type(error).__name__}: {text.splitlines()[0][:400] if text else ""}'


class Checkpointer:
  """Async orbax CheckpointManager for `{'state': train state, 'data': data stream record}`, keeping the latest
  `settings.keep_checkpoints`."""

  def __init__(self, workdir: str, settings: CheckpointConfig = CheckpointConfig()):
    workdir = epath.Path(workdir)
    self.directory = workdir / 'checkpoints'
    self.corrupt_directory = workdir / 'checkpoints_corrupt'
    self.settings = settings
    self._failed = False  # a save failed: its threads may write its temporary directory until the manager closes
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    # cleanup_tmp_directories: the partial checkpoint a killed save left behind is removed when the next run opens.
    options = ocp.CheckpointManagerOptions(max_to_keep=self.settings.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True, cleanup_tmp_directories=True)
    handlers = {'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def due(self, step: int) -> bool:
    """Whether `train.checkpoint_every` asks for a checkpoint at `step` (the loop also saves at its last step and
    when stopped)."""
    every = self.settings.checkpoint_every
    return bool(every) and step % every == 0

  def set_aside_steps(self) -> list[str]:
    """Checkpoints an earlier run moved to checkpoints_corrupt/."""
    return sorted(p.name for p in self.corrupt_directory.iterdir()) if self.corrupt_directory.exists() else []

  def save(self, step: int, state: Any, data_record: dict[str, Any]) -> None:
    """Starts writing step `step`; returns once the arrays are copied off the devices. Refuses (NonFiniteError)
    a state with non-finite values: rotation must never delete a good checkpoint for a bad one."""
    if not all_finite(state):
      raise NonFiniteError(f'the train state at step {step} holds NaN or infinite values; it is not saved (the '
                           f'checkpoints kept are {self.all_steps() or "none"})')
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_record))
    self._finishing(lambda: self._manager.save(step, args=args, force=True))  # it first waits for the last save

  def restore(self, abstract_state: Any) -> tuple[Any, int, dict[str, Any] | None] | None:
    """(state, step, data record) from the newest readable checkpoint, or None if no checkpoint is readable.

    `abstract_state` holds ShapeDtypeStructs with shardings: arrays come back directly in those shardings.
    Raises ShapeMismatchError or RestoreError (leaving every file where it is) when a readable checkpoint does
    not fit this run.
    """
    for step in reversed(self.all_steps()):
      where = f'checkpoint {self.directory / str(step)}'
      try:
        saved = self._manager.item_metadata(step)['state']
        if saved is None:
          raise ValueError('no metadata for the train state')
      except Exception as e:  # pylint: disable=broad-except
        self._unreadable(step, e, where)
        continue
      check_shapes(saved, abstract_state, where)  # a mismatch is the user's config, not corruption: raise
      try:
        args = {'state': ocp.args.StandardRestore(abstract_state)}
        if 'data' in self._manager.item_metadata(step).keys():
          args['data'] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
      except Exception as e:  # pylint: disable=broad-except
        if _is_environment(e) or self._readable_as_saved(step):
          raise RestoreError(
              f'{where} could not be restored into this run ({_first_line(e)}). Its files read correctly, so '
              'it was left where it is: the cause is this run\'s settings or this machine (memory, storage). '
              'Run again with the settings the checkpoint was written with (the workdir\'s config.json), or '
              'use a new --workdir.') from e
        self._set_aside(step, e)
        continue
      if not all_finite(restored['state'].params):
        self._set_aside(step, ValueError('its parameters hold NaN or infinite values'))
        continue
      return restored['state'], step, restored.get('data')
    return None

  def _unreadable(self, step: int, error: Exception, where: str) -> None:
    if _is_environment(error):
      raise RestoreError(f'{where} could not be read ({_first_line(error)}): a problem of this machine or its '
                         'storage, not of the checkpoint, which was left where it is. Fix it and run again.') from error
    self._set_aside(step, error)

  def _readable_as_saved(self, step: int) -> bool:
    """Whether the checkpoint restores as it was saved, every item (the state into its own shapes and dtypes on
    this host's CPU, and the data record): the test of corruption."""
    path = self.directory / str(step)
    try:
      cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend='cpu')[0])
      saved = self._manager.item_metadata(step)
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), saved['state'])
      args = {'state': ocp.args.StandardRestore(target)}
      if 'data' in saved.keys():
        args['data'] = ocp.args.JsonRestore()
      self._manager.restore(step, args=ocp.args.Composite(**args))
      return True
    except Exception as e:  # pylint: disable=broad-except
      if _is_environment(e):
        raise
      logging.warning('checkpoint %s does not read as saved: %s', path, _first_line(e))
      return False

  def _set_aside(self, step: int, error: Exception) -> None:
    """Moves a corrupt checkpoint out of the way (kept for inspection) and reopens the manager."""
    target = self.corrupt_directory / str(step)
    logging.warning('checkpoint at step %d is corrupt (%s); moving it to %s and trying the previous one', step,
                    _first_line(error), target)
    if jax.process_index() == 0:
      self.corrupt_directory.mkdir(parents=True, exist_ok=True)
      if target.exists():
        target = self.corrupt_directory / f'{step}.{len(self.set_aside_steps())}'
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'qwenjax checkpoint {step} set aside')
    self._manager.close()
    self._manager = self._open()

  def reached_preemption(self, step: int) -> bool:
    """True when jax's multi-host preemption service says all hosts should checkpoint and stop now."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._finishing(self._manager.wait_until_finished)

  def close(self) -> None:
    try:
      self.wait()
    except SaveError:
      try:
        self._manager.close()  # joins the save's threads, which may still be writing its temporary directory
      except Exception:  # pylint: disable=broad-except
        pass  # the same failure, reported once
      self._remove_partial(settle_s=SETTLE_S)  # what they wrote after the first removal
      raise
    self._manager.close()
    if self._failed:  # a failure reported earlier (an earlier wait): remove what its threads wrote since
      self._remove_partial(settle_s=SETTLE_S)

  def _finishing(self, operation) -> None:
    """`operation()`, which finishes the save in progress: if that save failed (orbax reports it here), its partial
    files are removed and one SaveError says why."""
    try:
      operation()
    except Exception as e:  # pylint: disable=broad-except
      self._failed = True
      removed = self._remove_partial()
      reason = re.search(r'No space left on device|Disk quota exceeded|Read-only file system|Permission denied|'
                         r'No such file or directory', str(e))
      raise SaveError(f'a checkpoint could not be written to {self.directory}: '
                      f'{reason.group(0) if reason else _first_line(e)}. Its partial files were removed'
                      f'{f" ({removed})" if removed else ""}; the checkpoints before it are kept '
                      f'({self.all_steps() or "none"}). Free space or fix the storage, then run again to resume.'
                      ) from e

  def _remove_partial(self, settle_s: float = 0.0) -> str:
    """Removes orbax's temporary directories of unfinished saves (process 0); returns their names. With
    `settle_s`, again until none has reappeared for that long (at most 10x it): after a failed save, writes still in
    flight in tensorstore's threads, which the manager's close does not wait for, can re-create one."""
    if jax.process_index() != 0 or not self.directory.exists():
      return ''
    removed: list[str] = []
    quiet_since, give_up = time.monotonic(), time.monotonic() + 10 * settle_s
    while True:
      partial = [p for p in self.directory.iterdir() if '.orbax-checkpoint-tmp' in p.name]
      for path in partial:
        try:
          path.rmtree()
        except OSError as e:  # a file written while it is removed: the next round
          if not settle_s:
            logging.warning('could not remove the partial checkpoint %s: %s', path, e)
      removed += [p.name for p in partial if p.name not in removed]
      now = time.monotonic()
      if partial:
        quiet_since = now
      if now - quiet_since >= settle_s or now >= give_up:
        if partial and settle_s:
          logging.warning('could not remove the partial checkpoint(s) %s: still written to after %.0f s', partial,
                          10 * settle_s)
        return ', '.join(removed)
      time.sleep(min(0.1, settle_s))


def restore_params(workdir: str, step: int | None = None,
                   shardings: Any = None) -> tuple[ml_collections.ConfigDict, Any, int]:
  """(the run's config, its parameters, the step) from a training workdir, for sampling, evaluation and export.

  Reads only the `params` of the saved train state (an orbax partial restore): no optimizer state is read and
  no data pipeline is needed. `step` None takes the latest checkpoint. Parameters come back as jax arrays
  placed in `shardings` (a tree of shardings matching the parameters, e.g. from `sharding.param_shardings`),
  or on the default device; they keep the dtype they were saved in.
  """
  workdir = epath.Path(workdir if '://' in str(workdir) else os.path.abspath(os.path.expanduser(workdir)))
  if not (workdir / 'config.json').exists():
    raise FileNotFoundError(f'no config.json in {workdir}: give the --workdir of a training run (the directory '
                            'python -m qwenjax.train wrote its checkpoints/ and config.json to)')
  config = ml_collections.ConfigDict(files.read_json(workdir / 'config.json'))
  step, saved = saved_params(str(workdir), step)
  path = workdir / 'checkpoints' / str(step) / 'state'
  where = f'checkpoint {workdir / "checkpoints" / str(step)}'
  reader = ocp.PyTreeCheckpointHandler()
  try:
    if shardings is None:
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      shardings = jax.tree.map(lambda _: device, saved)
    else:
      shardings = _matching(saved, shardings, where)
    target = {'params': jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), saved,
                                     shardings)}
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    try:
      restored = reader.restore(path, args=args)
    except Exception as e:  # pylint: disable=broad-except
      if _is_environment(e):
        raise
      raise ValueError(f'{where} cannot be read ({_first_line(e)}): its files are damaged or incomplete; use '
                       'another --step') from None
  finally:
    reader.close()
  if not all_finite(restored['params']):
    raise ValueError(f'{where} holds NaN or infinite parameters: use another --step')
  return config, restored['params'], step


def saved_params(workdir: str, step: int | None = None) -> tuple[int, Any]:
  """(step, the parameters' metadata: a tree of orbax ArrayMetadata, with shapes and dtypes) of a training run's
  checkpoint at `step` (None: the latest), read from its metadata alone: what a model config is checked against
  before anything is built from it."""
  directory = epath.Path(workdir) / 'checkpoints'
  steps = sorted(ocp.utils.checkpoint_steps(directory)) if directory.exists() else []
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {directory}: the run has not saved one yet (train.checkpoint_every; '
                            'a run also saves at its last step and when stopped)')
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f'no checkpoint of step {step} in {directory}; its steps are {steps}')
  where = f'checkpoint {directory / str(step)}'
  reader = ocp.PyTreeCheckpointHandler()
  try:
    saved = reader.metadata(directory / str(step) / 'state')
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{where} cannot be read ({_first_line(e)}): its files are damaged or incomplete') from None
  finally:
    reader.close()
  saved = getattr(saved, 'tree', saved)  # a TreeMetadata in recent orbax
  if not saved or 'params' not in saved:
    raise ValueError(f'{where} holds no train state parameters (state/params)')
  return step, jax.tree.map(lambda x: x, dict(saved['params']))  # plain dicts of ArrayMetadata


def _matching(saved: Any, shardings: Any, where: str) -> Any:
  """`shardings` rearranged into the saved parameters' tree, or an error naming the first parameter that is in
  only one of them."""
  leaves = lambda tree: {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  by_name = leaves(shardings)
  names = leaves(saved)
  for name in sorted(set(names) | set(by_name)):
    if name not in by_name:
      raise ShapeMismatchError(f'{where} holds {name}, which the shardings given do not place: the checkpoint '
                               f'was written for a different model config{_layout_hint(set(names), set(by_name))}')
    if name not in names:
      raise ShapeMismatchError(f'{where} has no {name}, which the shardings given place: the checkpoint was '
                               f'written for a different model config{_layout_hint(set(names), set(by_name))}')
  return jax.tree_util.tree_map_with_path(lambda p, _: by_name[_path(p)], saved)
