"""Checkpoints of the train state and the data iterator, with orbax, in `workdir/checkpoints/<step>`.

Saves are asynchronous (training continues while the files are written). Restoring takes the latest step; if
that one cannot be read (a partial or corrupt write), it is moved to `workdir/checkpoints_corrupt/` with a
warning and the previous one is tried. A checkpoint whose parameter shapes differ from the model being trained
is an error naming the first parameter that differs, never a fallback.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp


class ShapeMismatchError(ValueError):
  """The checkpoint holds a differently shaped (or differently structured) train state."""


class _IteratorSnapshot:
  """The data iterator's state at save time, in the form grain's orbax handler writes.

  Saving a snapshot rather than the live iterator keeps the saved state right even if the handler runs after
  the training loop has read further batches.
  """

  def __init__(self, iterator: grain.DatasetIterator):
    self._state = json.dumps(iterator.get_state(), indent=1).encode()

  def get_state(self) -> bytes:
    return self._state


class _IteratorRestorer:
  """Receives the saved iterator state from grain's orbax handler and sets it on the real iterator.

  grain 0.2.18's ConcatThenSplit packer keeps `remainder_slices` as tuples and compares them with a tuple
  sentinel; the JSON round trip turns them into lists, so a restored packer mistakes "no remainder" for an
  empty one and drops a document. The tuples are put back here.
  """

  def __init__(self, iterator: grain.DatasetIterator):
    self._iterator = iterator

  def set_state(self, state: bytes) -> None:
    self._iterator.set_state(_slices_as_tuples(json.loads(state)))

  def start_prefetch(self) -> None:
    pass


def _slices_as_tuples(state: Any) -> Any:
  if isinstance(state, dict):
    return {k: ({n: tuple(s) for n, s in v.items()} if k == 'remainder_slices' and isinstance(v, dict)
                else _slices_as_tuples(v)) for k, v in state.items()}
  if isinstance(state, list):
    return [_slices_as_tuples(v) for v in state]
  return state


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
            'or convert with qwenjax.model.stack_layers / unstack_layers)')
  return ''


def check_shapes(saved: Any, expected: Any, where: str) -> None:
  """Raises ShapeMismatchError naming the first array whose presence or shape differs."""
  saved, expected = _shapes(saved), _shapes(expected)
  hint = _layout_hint(set(saved), set(expected))
  for name in sorted(set(saved) | set(expected)):
    if name not in saved:
      raise ShapeMismatchError(f'{where} has no {name}, which the model being trained needs: the checkpoint '
                               f'was written for a different model config{hint}')
    if name not in expected:
      raise ShapeMismatchError(f'{where} holds {name}, which the model being trained does not have: the '
                               f'checkpoint was written for a different model config{hint}')
    if saved[name] != expected[name]:
      raise ShapeMismatchError(
          f'{where} has {name} of shape {saved[name]} but the model config gives {expected[name]}. Train with '
          'the config the checkpoint was written with, or use a new --workdir.')


class Checkpointer:
  """Async orbax CheckpointManager for `{'state': train state, 'data': grain iterator}`."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self._corrupt_dir = os.path.join(os.path.abspath(workdir), 'checkpoints_corrupt')
    self._keep = keep
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True, enable_async_checkpointing=True)
    handlers = {'state': ocp.StandardCheckpointHandler(), 'data': grain.checkpoint.CheckpointHandler()}
    return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator) -> None:
    """Starts writing step `step`; returns once the arrays are copied off the devices."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator)))
    self._manager.save(step, args=args, force=True)

  def restore(self, abstract_state: Any, data_iterator: grain.DatasetIterator) -> tuple[Any, int] | None:
    """(state, step) from the newest readable checkpoint, or None if there is none.

    `abstract_state` holds ShapeDtypeStructs with shardings: arrays come back directly in those shardings.
    `data_iterator` is set to the saved position.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      where = f'checkpoint {os.path.join(self.directory, str(step))}'
      try:
        saved = self._manager.item_metadata(step)['state']
        if saved is None:
          raise ValueError('no metadata for the train state')
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, e)
        continue
      check_shapes(saved, abstract_state, where)  # a mismatch is the user's config, not corruption: raise
      try:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=grain.checkpoint.CheckpointRestore(_IteratorRestorer(data_iterator)))
        restored = self._manager.restore(step, args=args)
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, e)
        continue
      return restored['state'], step
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    """Moves an unreadable checkpoint out of the way (kept for inspection) and reopens the manager."""
    os.makedirs(self._corrupt_dir, exist_ok=True)
    target = os.path.join(self._corrupt_dir, str(step))
    if os.path.exists(target):
      shutil.rmtree(target)
    first_line = str(error).splitlines()[0][:300] if str(error) else ''
    logging.warning('checkpoint at step %d cannot be read (%s: %s); moving it to %s and trying the previous '
                    'one', step, type(error).__name__, first_line, target)
    if jax.process_index() == 0:
      shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'qwenjax checkpoint {step} set aside')
    self._manager.close()
    self._manager = self._open()

  def reached_preemption(self, step: int) -> bool:
    """True when jax's multi-host preemption service says all hosts should checkpoint and stop now."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_params(workdir: str, step: int | None = None,
                   shardings: Any = None) -> tuple[ml_collections.ConfigDict, Any, int]:
  """(the run's config, its parameters, the step) from a training workdir, for sampling, evaluation and export.

  Reads only the `params` of the saved train state (an orbax partial restore): no optimizer state is read and
  no data pipeline is needed. `step` None takes the latest checkpoint. Parameters come back as jax arrays
  placed in `shardings` (a tree of shardings matching the parameters, e.g. from `sharding.param_shardings`),
  or on the default device; they keep the dtype they were saved in.
  """
  workdir = os.path.abspath(os.path.expanduser(str(workdir)))
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'no config.json in {workdir}: give the --workdir of a training run (the directory '
                            'python -m qwenjax.train wrote its checkpoints/ and config.json to)')
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  directory = os.path.join(workdir, 'checkpoints')
  steps = []
  if os.path.isdir(directory):
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    manager = ocp.CheckpointManager(directory, options=options,
                                    item_handlers={'state': ocp.PyTreeCheckpointHandler()})
    steps = sorted(manager.all_steps())
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {directory}: the run has not saved one yet (train.checkpoint_every; '
                            'a run also saves at its last step and when stopped)')
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f'no checkpoint of step {step} in {directory}; its steps are {steps}')
  where = f'checkpoint {os.path.join(directory, str(step))}'
  try:
    saved = manager.item_metadata(step)['state']
    if saved is None or 'params' not in saved:
      raise ValueError(f'{where} holds no train state parameters (state/params)')
    saved = jax.tree.map(lambda x: x, dict(saved['params']))  # plain dicts of ArrayMetadata
    if shardings is None:
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      shardings = jax.tree.map(lambda _: device, saved)
    else:
      shardings = _matching(saved, shardings, where)
    target = {'params': jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), saved,
                                     shardings)}
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    restored = manager.restore(step, args=ocp.args.Composite(state=args))
  finally:
    manager.close()
  return config, restored['state']['params'], step


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
