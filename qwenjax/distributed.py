"""Several processes, one job: `jax.distributed` set up from flags or from the cluster jax detects.

`python -m qwenjax.train` (and the sweep, sample and evaluate commands) take `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`; without them, `jax.distributed.initialize()` is called when jax can detect the
cluster by itself (a multi-host TPU slice, SLURM, Open MPI, Kubernetes through jax's cluster plugins) or when
`--multihost` asks for it. On CPUs the processes talk through jax's gloo collectives, so the same code runs as
several processes on one machine (how the tests check multi-host runs).
"""

from __future__ import annotations

import os

from absl import flags
from absl import logging
import jax

COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0, for multi-process runs.')
NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes of a multi-process run.')
PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s index in a multi-process run.')
MULTIHOST = flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() even if no cluster is detected '
                              '(it then finds the coordinator from the environment).')

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


def initialize() -> None:
  """Joins the multi-process job described by the flags or the environment; a no-op for a single process."""
  explicit = COORDINATOR.value is not None or NUM_PROCESSES.value is not None or PROCESS_ID.value is not None
  if explicit:
    missing = [f'--{f.name}' for f in (COORDINATOR, NUM_PROCESSES, PROCESS_ID) if f.value is None]
    if missing:
      raise ValueError(f'a multi-process run needs --coordinator_address, --num_processes and --process_id; '
                       f'missing {", ".join(missing)}')
    if not 0 <= PROCESS_ID.value < NUM_PROCESSES.value:
      raise ValueError(f'--process_id={PROCESS_ID.value} must be in [0, --num_processes={NUM_PROCESSES.value})')
  elif not (MULTIHOST.value or _cluster_detected()):
    return
  # CPU devices of several processes need a collectives implementation; it changes nothing for accelerators.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if explicit:
    jax.distributed.initialize(coordinator_address=COORDINATOR.value, num_processes=NUM_PROCESSES.value,
                               process_id=PROCESS_ID.value)
  else:
    jax.distributed.initialize()
  logging.info('process %d of %d, %d local and %d global devices', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())

