"""Multi-process training: two processes of 4 CPU devices each run what one process of 8 devices runs.

The processes are started as users start them on a cluster: `python -m qwenjax.train --coordinator_address=...
--num_processes=2 --process_id=I`, with jax's CPU (gloo) collectives between them.
"""

import re
import socket
import subprocess

import numpy as np
import pytest

from qwenjax import train
from train_utils import (ROOT, config_from_overrides, losses, read_metrics, subprocess_xla_flags, tiny_overrides,
                         train_command)

pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def run_two_processes(workdir, overrides, local_disks=False):
  """Runs the job as 2 processes of 4 devices; returns their outputs. `local_disks`: each process gets its own
  cache directory (the default data.prepared_dir), as the hosts of a TPU pod each have their own disk."""
  port = _free_port()
  processes = []
  for i in range(2):
    command, env = train_command(workdir, overrides)
    command += [f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}']
    env['XLA_FLAGS'] = subprocess_xla_flags(4)
    env['JAX_PLATFORMS'] = 'cpu'
    if local_disks:
      env['QWENJAX_CACHE'] = f'{workdir}-host{i}-cache'
    processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
  outputs = [p.communicate(timeout=600)[0].decode() for p in processes]
  for p, out in zip(processes, outputs):
    assert p.returncode == 0, out[-4000:]
  return outputs


@pytest.fixture(scope='module')
def overrides(tokenizer_file):
  return {**tiny_overrides(tokenizer_file), 'train.checkpoint_every': 2,
          'train.batch_size': 16, 'data.shuffle_window': 8, 'mesh.data': 2, 'mesh.fsdp': -1}


@pytest.fixture(scope='module')
def one_process(tmp_path_factory, overrides):
  """The reference: 5 steps in this process, on its 8 devices."""
  workdir = str(tmp_path_factory.mktemp('one_process'))
  train.train_and_evaluate(config_from_overrides({**overrides, 'train.steps': 5}), workdir)
  return losses(read_metrics(workdir))


@pytest.mark.slow
def test_two_processes_train_like_one_and_share_checkpoints(tmp_path, overrides, one_process):
  """One process trains steps 1-2, two processes resume to step 4, one process finishes step 5: every step's loss
  is the uninterrupted one-process run's."""
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config_from_overrides({**overrides, 'train.steps': 2}), workdir)
  outputs = run_two_processes(workdir, {**overrides, 'train.steps': 4}, local_disks=True)
  assert 'process 0 of 2' in outputs[0] and 'step 4/4' in outputs[0]
  assert 'is not shared by the 2 processes' in outputs[0]  # each host tokenized its own copy
  assert 'step 4/4' not in outputs[1]  # process 0 alone logs progress
  # Each process read its own rows of every batch, and together all of them.
  rows = [set(map(int, re.search(rf'process {p} of 2 reads rows \[([\d, ]+)\]', outputs[0]).group(1).split(', ')))
          for p in range(2)]
  assert not rows[0] & rows[1] and rows[0] | rows[1] == set(range(16))
  # Only process 0 wrote metrics: each step once.
  assert [r['step'] for r in read_metrics(workdir) if 'loss' in r] == [1, 2, 3, 4]
  # The checkpoint the two processes wrote at step 4 restores in one process, which continues the same run.
  train.train_and_evaluate(config_from_overrides({**overrides, 'train.steps': 5}), workdir)
  got = losses(read_metrics(workdir))
  assert sorted(got) == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([got[s] for s in range(1, 6)], [one_process[s] for s in range(1, 6)], rtol=0,
                             atol=1e-5)
