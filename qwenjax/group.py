"""Groups of training runs of one shape, trained as one step vmapped over a leading member axis.

A small model cannot fill a GPU: its matmuls are too small and its kernels too short. K runs that differ only in
values the compiled step takes as inputs (`MEMBER_KEYS`: the learning rate and its schedule) or in `train.seed` can
share everything else: the model shape and the step count. `qwenjax.train.train_group` then stacks their train
states along a new leading axis and runs `jax.vmap` of the ordinary train step over it: one program, K times the
work per kernel. Members of one seed read one data stream, each step's batch read once; members of other seeds
(other initial parameters, another order of the data) each read their own, stacked along the member axis
(`member_batches`). Each member keeps its own workdir, written as a run of its own would write it (metrics.jsonl,
checkpoints of its own unstacked state, config.json with its own values), so evaluation, export and resuming it
alone work as for any run.

This module holds what the loop needs to know about the member axis: which configs may form a group, the stacked
shardings, stacking and taking states apart, and the members' schedule inputs.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from qwenjax import config as config_lib
from qwenjax import train_step

# Config values the members of a group may set differently: inputs of the compiled step (`schedule_horizon`), and
# the seed (each member's initial parameters and data stream).
MEMBER_KEYS = ('train.lr', 'train.lr_final_fraction', 'train.warmup_steps', 'train.seed')


class GroupError(ValueError):
  """The runs cannot be trained as one group (they differ elsewhere, or resume from different steps)."""


def _flat(config: ml_collections.ConfigDict) -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update({f'{key}.{k}': v for k, v in _flat(value).items()})
    else:
      out[key] = value
  return out


def check(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str]) -> None:
  """Raises GroupError unless the configs differ only in `MEMBER_KEYS` and the workdirs are distinct."""
  if len(configs) != len(workdirs) or not configs:
    raise GroupError(f'a group needs one workdir per config (got {len(configs)} configs, {len(workdirs)} workdirs)')
  if len(set(workdirs)) != len(workdirs):
    raise GroupError(f'the members of a group need workdirs of their own, got {list(workdirs)}')
  first = _flat(configs[0])
  for config, workdir in zip(configs[1:], workdirs[1:]):
    other = _flat(config)
    differ = sorted(k for k in set(first) | set(other) if k not in MEMBER_KEYS and first.get(k) != other.get(k))
    if differ:
      raise GroupError(f'the run in {workdir} differs from the one in {workdirs[0]} in {", ".join(differ)}: the '
                       f'members of a group may differ only in {", ".join(MEMBER_KEYS)} (one model shape, one data '
                       'source, one step count)')


def member_batches(seeds: Sequence[int]) -> bool:
  """Whether the members read their own data streams (stacked batches): when their seeds differ."""
  return len(set(seeds)) > 1


def horizon(optimizers: Sequence[config_lib.OptimizerConfig]) -> dict[str, np.ndarray]:
  """The members' `schedule_horizon`s stacked: `[K]` arrays, the step's schedule inputs."""
  each = [train_step.schedule_horizon(o) for o in optimizers]
  return {k: np.stack([h[k] for h in each]) for k in each[0]}


def stacked_shardings(shardings: Any) -> Any:
  """The shardings of a stacked tree: each leaf's, with the member axis in front, whole on every device."""
  return jax.tree.map(lambda s: NamedSharding(s.mesh, P(None, *s.spec)), shardings)


def stack(trees: Sequence[Any], shardings: Any) -> Any:
  """K trees of one structure (placed in `shardings`) -> one tree of `[K, ...]` arrays."""
  return jax.jit(lambda *xs: jax.tree.map(lambda *leaves: jnp.stack(leaves), *xs),
                 out_shardings=stacked_shardings(shardings))(*trees)


def taker(shardings: Any):
  """`take(tree, k)`: member k of a stacked tree, placed in `shardings` (one compiled program for every k)."""
  fn = jax.jit(lambda tree, k: jax.tree.map(lambda x: x[k], tree), out_shardings=shardings)
  return lambda tree, k: fn(tree, np.int32(k))
