"""Several processes, one job: `jax.distributed` set up from flags or from the cluster jax detects.

`python -m qwenjax.train` and `python -m qwenjax.sweep` take `--coordinator_address=HOST:PORT --num_processes=N
--process_id=I` (`define_flags`); without them, `jax.distributed.initialize()` is called when jax can detect the
cluster by itself (a multi-host TPU slice, SLURM, Open MPI, Kubernetes through jax's cluster plugins) or when
`--multihost` asks for it. On CPUs the processes talk through jax's gloo collectives, so the same code runs as
several processes on one machine (how the tests check multi-host runs).
"""

from __future__ import annotations

import os

from absl import flags
from absl import logging
import jax

from qwenjax import cli


def define_flags() -> None:
  """The flags of a multi-process run, defined by the commands that join one (train, sweep) when they run."""
  flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0, for multi-process runs.')
  flags.DEFINE_integer('num_processes', None, 'Number of processes of a multi-process run.')
  flags.DEFINE_integer('process_id', None, 'This process\'s index in a multi-process run.')
  flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() even if no cluster is detected (it then '
                    'finds the coordinator from the environment).')


# Environment variables that say a cluster manager started this process as one of several.
_CLUSTER_HINTS = (('SLURM_NTASKS', 1), ('OMPI_COMM_WORLD_SIZE', 1), ('TPU_WORKER_HOSTNAMES', None))


def _cluster_detected() -> bool:
  for name, single in _CLUSTER_HINTS:
    value = os.environ.get(name)
    if value is None:
      continue
    if single is None:  # a comma-separated host list: more than one host
      if ',' in value:
        return True
    elif value.isdigit() and int(value) > single:
      return True
  return False


def initialize_from_flags() -> None:
  """`initialize` with the values of the flags `define_flags` defined."""
  f = flags.FLAGS
  initialize(f.coordinator_address, f.num_processes, f.process_id, multihost=f.multihost)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, multihost: bool = False) -> None:
  """Joins the multi-process job described by the arguments (the flags) or the environment; a no-op for a single
  process. Arguments that cannot work together are a `cli.UsageError`."""
  given = {'--coordinator_address': coordinator_address, '--num_processes': num_processes,
           '--process_id': process_id}
  explicit = any(value is not None for value in given.values())
  if explicit:
    missing = [name for name, value in given.items() if value is None]
    if missing:
      raise cli.UsageError(f'a multi-process run needs --coordinator_address, --num_processes and --process_id; '
                           f'missing {", ".join(missing)}')
    if not 0 <= process_id < num_processes:
      raise cli.UsageError(f'--process_id={process_id} must be in [0, --num_processes={num_processes})')
  elif not (multihost or _cluster_detected()):
    return
  # CPU devices of several processes need a collectives implementation; it changes nothing for accelerators.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  else:
    jax.distributed.initialize()
  logging.info('process %d of %d, %d local and %d global devices', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
