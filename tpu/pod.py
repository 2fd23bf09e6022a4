r"""Train on a Cloud TPU pod slice: create it, install qwenjax on every host, run one job, survive preemption.

    python tpu/pod.py COMMAND --name=NAME --zone=ZONE --accelerator=v5p-64 --workdir=gs://BUCKET/RUN [...]

Commands (each prints the `gcloud` commands it runs; `--dry_run` prints them and runs nothing):

    create   request the slice: a queued resource (default; spot with --spot) or, with --noqueued, `tpu-vm create`;
             waits until it is ACTIVE
    install  copy this checkout (`git archive HEAD`, through GCS) to every host and `pip install` it with jax[tpu]
    train    run `python -m qwenjax.train` on every host at once, streaming their output here
    logs     follow the training log of one host (--worker, default 0) from another terminal
    stop     SIGTERM the job on every host (it saves a checkpoint and exits with status 143)
    delete   delete the slice
    run      all of it: create, install, train; when the slice is preempted, delete it, create it again and
             relaunch (the job resumes from its latest checkpoint in --workdir); delete the slice at the end

A job stopped by Ctrl-C or SIGTERM (exit status 130 or 143, `qwenjax.cli`) saved a checkpoint and resumes: `train`
and `run` say so and exit with that status, not as a failure.

tpu/README.md walks through a run and gives the mesh for each slice shape.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import tempfile
import time
from typing import Sequence

from absl import flags

from qwenjax import cli  # the command convention (an installed qwenjax: pip install -e .)

COMMANDS = ('create', 'install', 'train', 'logs', 'stop', 'delete', 'run')

# TPU software versions for JAX (cloud.google.com/tpu/docs/runtimes), by accelerator type prefix.
RUNTIME_VERSIONS = {'v4': 'tpu-ubuntu2204-base', 'v5litepod': 'v2-alpha-tpuv5-lite', 'v5p': 'v2-alpha-tpuv5',
                    'v6e': 'v2-alpha-tpuv6e'}
# Generations whose type counts TensorCores (two per chip, one JAX device per chip), not chips.
_CORES_IN_NAME = ('v4', 'v5p')
# What `describe` says of a slice that can run, and of one that was preempted or taken away.
_READY = ('ACTIVE', 'READY')
_GONE = ('SUSPENDING', 'SUSPENDED', 'PREEMPTED', 'TERMINATED', 'FAILED', 'NOT_FOUND')
LOG = '~/qwenjax-train.log'
# Exit statuses of a training job stopped on a signal after saving a checkpoint (qwenjax/cli.py): it resumes.
STOPPED = {130: 'Ctrl-C (SIGINT)', 143: 'SIGTERM'}

def _define_flags() -> None:
  """The command's flags (defined when it runs, through `qwenjax.cli`)."""
  flags.DEFINE_string('name', None, 'Queued resource and TPU node name.')
  flags.DEFINE_string('zone', None, 'Zone, e.g. us-east5-a (v5p) or us-central2-b (v4).')
  flags.DEFINE_string('project', None, 'Google Cloud project (default: gcloud\'s configured one).')
  flags.DEFINE_string('accelerator', None, 'Accelerator type: v4-32, v5litepod-16, v5p-64, v6e-32, ...')
  flags.DEFINE_string('runtime_version', None, 'TPU software version (default: by generation).')
  flags.DEFINE_bool('spot', False, 'Spot capacity: cheaper, preemptible; `run` recreates it when taken.')
  flags.DEFINE_bool('queued', True, 'Request through a queued resource (needed for multi-slice); '
                    '--noqueued uses `tpu-vm create`.')
  flags.DEFINE_integer('num_slices', 1, 'Slices joined over the data-center network (multi-slice).')
  flags.DEFINE_string('workdir', None, 'The run\'s workdir on GCS (gs://BUCKET/PATH): checkpoints, logs, '
                      'and the uploaded source.')
  flags.DEFINE_string('config', 'configs/1b.py', 'Config file, relative to the repository root.')
  flags.DEFINE_string('mesh', 'auto', 'Mesh sizes, e.g. "fsdp=-1,tensor=4"; "auto": fsdp over every chip '
                      'of a slice and dcn_data over slices.')
  flags.DEFINE_multi_string('set', [], 'More config overrides KEY=VALUE, passed as --config.KEY=VALUE.')
  flags.DEFINE_string('worker', '0', 'Host whose log `logs` follows.')
  flags.DEFINE_integer('max_restarts', 20, 'Preemptions `run` recovers from before giving up.')
  flags.DEFINE_float('poll_seconds', 60, 'Seconds between state checks while waiting for the slice.')
  flags.DEFINE_bool('keep_slice', False, '`run` leaves the slice up at the end.')
  flags.DEFINE_bool('dry_run', False, 'Print the commands instead of running them (gcloud is never called).')


@dataclasses.dataclass(frozen=True)
class Slice:
  """One TPU pod slice (or several, multi-slice) and the gcloud commands that manage it."""
  name: str
  zone: str
  accelerator: str
  runtime_version: str
  spot: bool = False
  queued: bool = True
  num_slices: int = 1
  project: str | None = None

  @property
  def generation(self) -> str:
    return self.accelerator.rsplit('-', 1)[0]

  @property
  def chips(self) -> int:
    """Chips (= JAX devices) in one slice."""
    size = int(self.accelerator.rsplit('-', 1)[1])
    return size // 2 if self.generation in _CORES_IN_NAME else size

  @property
  def hosts(self) -> int:
    """Hosts (TPU VMs, one process each) in one slice: 4 chips a host, up to 8 on one-host v5e / v6e."""
    single_host = 4 if self.generation in _CORES_IN_NAME else 8
    return 1 if self.chips <= single_host else self.chips // 4

  def _gcloud(self, *args: str) -> list[str]:
    return ['gcloud', 'compute', 'tpus', *args, f'--zone={self.zone}'] + (
        [f'--project={self.project}'] if self.project else [])

  def create(self) -> list[str]:
    spot = ['--spot'] if self.spot else []
    if not self.queued:
      return self._gcloud('tpu-vm', 'create', self.name, f'--accelerator-type={self.accelerator}',
                          f'--version={self.runtime_version}', *spot)
    nodes = ([f'--node-id={self.name}'] if self.num_slices == 1 else
             [f'--node-count={self.num_slices}', f'--node-prefix={self.name}'])
    return self._gcloud('queued-resources', 'create', self.name, f'--accelerator-type={self.accelerator}',
                        f'--runtime-version={self.runtime_version}', *nodes, *spot)

  def state(self) -> list[str]:
    if not self.queued:
      return self._gcloud('tpu-vm', 'describe', self.name, '--format=value(state)')
    return self._gcloud('queued-resources', 'describe', self.name, '--format=value(state.state)')

  def delete(self) -> list[str]:
    if not self.queued:
      return self._gcloud('tpu-vm', 'delete', self.name, '--quiet')
    return self._gcloud('queued-resources', 'delete', self.name, '--force', '--quiet')

  def ssh(self, command: str, worker: str = 'all') -> list[str]:
    """`command` on every host (of every slice), or on one host of the first slice."""
    if self.num_slices > 1:
      node = '--node=all' if worker == 'all' else '--node=0'
      return self._gcloud('queued-resources', 'ssh', self.name, f'--worker={worker}', node,
                          f'--command={command}')
    return self._gcloud('tpu-vm', 'ssh', self.name, f'--worker={worker}', f'--command={command}')


def mesh_overrides(mesh: str, tpu: Slice) -> list[str]:
  """`--config.mesh.*` flags: "auto" is fsdp over one slice's chips and dcn_data over slices."""
  if mesh == 'auto':
    sizes = {'data': '1', 'fsdp': str(tpu.chips), 'tensor': '1', 'expert': '1', 'dcn_data': str(tpu.num_slices)}
  else:
    items = [item for item in mesh.split(',') if item]
    axes = ('data', 'fsdp', 'tensor', 'expert', 'dcn_data')
    if not all('=' in item and item.split('=', 1)[0] in axes and item.split('=', 1)[1].lstrip('-').isdigit()
               for item in items):
      raise cli.UsageError(f'--mesh={mesh}: give "auto" or comma-separated AXIS=SIZE with AXIS one of {axes} and '
                           'SIZE an integer (-1: the rest of the chips), e.g. --mesh=tensor=4,fsdp=-1')
    sizes = dict(item.split('=', 1) for item in items)
    if tpu.num_slices > 1:
      sizes.setdefault('dcn_data', str(tpu.num_slices))
  return [f'--config.mesh.{axis}={size}' for axis, size in sizes.items()]


def source_uri(workdir: str) -> str:
  return workdir.rstrip('/') + '/source/qwenjax.tar.gz'


def install_command(workdir: str) -> str:
  """What each host runs: this checkout from GCS, installed with the TPU build of jax."""
  return ('set -e; rm -rf ~/qwenjax && mkdir -p ~/qwenjax && '
          f'gcloud storage cp {source_uri(workdir)} ~/qwenjax.tar.gz && tar -xzf ~/qwenjax.tar.gz -C ~/qwenjax && '
          'python3 -m pip install -q -e ~/qwenjax "jax[tpu]" gcsfs')


def train_command(config: str, workdir: str, overrides: Sequence[str], multihost: bool) -> str:
  """What each host runs: the same training command everywhere (jax.distributed finds the other hosts),
  its output shown and appended to a log file."""
  args = ['python3', '-m', 'qwenjax.train', f'--config={config}', f'--workdir={workdir}', *overrides]
  if multihost:
    args.append('--multihost')
  return f'set -o pipefail; cd ~/qwenjax && {shlex.join(args)} 2>&1 | tee -a {LOG}'


class Runner:
  """Runs commands, printing each first; a dry run prints them only."""

  def __init__(self, dry_run: bool, poll_seconds: float):
    self.dry_run, self.poll_seconds = dry_run, poll_seconds

  def run(self, argv: Sequence[str]) -> int:
    print(shlex.join(argv), flush=True)
    return 0 if self.dry_run else subprocess.run(list(argv), check=False).returncode

  def output(self, argv: Sequence[str], dry_run_answer: str) -> str:
    print(shlex.join(argv), flush=True)
    if self.dry_run:
      return dry_run_answer
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else 'NOT_FOUND'

  def sleep(self) -> None:
    if not self.dry_run:
      time.sleep(self.poll_seconds)


def check(runner: Runner, argv: Sequence[str]) -> None:
  code = runner.run(argv)
  if code:
    raise RuntimeError(f'command failed (exit {code}): {shlex.join(argv)}')


def create(tpu: Slice, runner: Runner) -> None:
  """Requests the slice and waits until it can run (a spot request may queue for a long time)."""
  check(runner, tpu.create())
  while True:
    state = runner.output(tpu.state(), dry_run_answer=_READY[0])
    if state in _READY:
      return
    if state == 'FAILED':
      raise RuntimeError(f'{tpu.name} is {state}; see `gcloud compute tpus queued-resources describe {tpu.name}`')
    print(f'# {tpu.name}: {state or "no state yet"}; waiting', flush=True)
    runner.sleep()


def upload(workdir: str, runner: Runner) -> None:
  """This checkout's committed files (`git archive HEAD`) to GCS, where every host fetches them."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  archive = os.path.join(tempfile.gettempdir(), 'qwenjax-source.tar.gz')
  check(runner, ['git', '-C', root, 'archive', '--format=tar.gz', f'--output={archive}', 'HEAD'])
  check(runner, ['gcloud', 'storage', 'cp', archive, source_uri(workdir)])


def stopped(code: int) -> int:
  """Says that the job stopped on a signal and resumes; returns its status."""
  print(f'# training stopped by {STOPPED[code]} after saving a checkpoint (exit {code}); the same train or run '
        'command resumes it from --workdir', flush=True)
  return code


def run(tpu: Slice, runner: Runner, install: str, train: str, max_restarts: int, keep_slice: bool) -> int:
  """Create, install, train; on preemption recreate and relaunch (the job resumes); delete at the end. Returns 0,
  or the job's 130 / 143 when it was stopped on a signal (it saved a checkpoint and resumes: no failure).

  A failure on a slice that was not preempted stops the loop and keeps the slice, to read its logs.
  """
  create(tpu, runner)
  status = 0
  for attempt in range(max_restarts + 1):
    check(runner, tpu.ssh(install))
    code = runner.run(tpu.ssh(train))
    if code == 0:
      print('# dry run: the training command is taken to succeed' if runner.dry_run else '# training finished',
            flush=True)
      break
    state = runner.output(tpu.state(), dry_run_answer=_READY[0])
    if state not in _GONE and code in STOPPED:  # `stop`, or Ctrl-C: the slice is up and the job saved
      status = stopped(code)
      break
    if state not in _GONE:
      raise RuntimeError(f'training failed (exit {code}) on a slice that is still {state}, so not preempted. '
                       'The slice is kept: read `python tpu/pod.py logs ...`, then `python tpu/pod.py delete ...`.')
    runner.run(tpu.delete())
    if attempt == max_restarts:
      raise RuntimeError(f'{tpu.name} was preempted {attempt + 1} times; giving up (--max_restarts)')
    print(f'# {tpu.name} is {state}: recreating it (restart {attempt + 1} of at most {max_restarts})', flush=True)
    create(tpu, runner)
  if not keep_slice:
    check(runner, tpu.delete())
  return status


def main(argv: Sequence[str]) -> int:
  if len(argv) != 1 or argv[0] not in COMMANDS:
    raise cli.UsageError(f'give one command: {" | ".join(COMMANDS)} (got {list(argv)})')
  command = argv[0]
  missing = [f'--{name}' for name in ('name', 'zone', 'accelerator') if not getattr(flags.FLAGS, name)]
  if command in ('install', 'train', 'run') and not flags.FLAGS.workdir:
    missing.append('--workdir')
  if missing:
    raise cli.UsageError(f'`{command}` needs {", ".join(missing)}')
  generation = flags.FLAGS.accelerator.rsplit('-', 1)[0]
  if generation not in RUNTIME_VERSIONS or not flags.FLAGS.accelerator.rsplit('-', 1)[-1].isdigit():
    raise cli.UsageError(f'--accelerator={flags.FLAGS.accelerator}: expected GENERATION-SIZE with GENERATION one of '
                         f'{sorted(RUNTIME_VERSIONS)} (e.g. v5p-64, v5litepod-16, v6e-32, v4-32)')
  if flags.FLAGS.workdir and not flags.FLAGS.workdir.startswith('gs://'):
    raise cli.UsageError(f'--workdir={flags.FLAGS.workdir}: every host must read and write it, so it must be on GCS '
                         '(gs://BUCKET/PATH)')
  if flags.FLAGS.num_slices > 1 and not flags.FLAGS.queued:
    raise cli.UsageError('--num_slices > 1 needs a queued resource: drop --noqueued')
  tpu = Slice(flags.FLAGS.name, flags.FLAGS.zone, flags.FLAGS.accelerator, flags.FLAGS.runtime_version or RUNTIME_VERSIONS[generation],
              spot=flags.FLAGS.spot, queued=flags.FLAGS.queued, num_slices=flags.FLAGS.num_slices, project=flags.FLAGS.project)
  runner = Runner(flags.FLAGS.dry_run, flags.FLAGS.poll_seconds)
  multihost = tpu.hosts > 1 or tpu.num_slices > 1
  overrides = mesh_overrides(flags.FLAGS.mesh, tpu) + [f'--config.{item}' for item in flags.FLAGS.set]
  train = train_command(flags.FLAGS.config, flags.FLAGS.workdir, overrides, multihost) if flags.FLAGS.workdir else ''
  print(f'# {tpu.name}: {tpu.num_slices} x {tpu.accelerator} ({tpu.chips} chips, {tpu.hosts} hosts a slice), '
        f'{"spot" if tpu.spot else "on-demand"}, runtime {tpu.runtime_version}', flush=True)

  if command == 'create':
    create(tpu, runner)
  elif command == 'install':
    upload(flags.FLAGS.workdir, runner)
    check(runner, tpu.ssh(install_command(flags.FLAGS.workdir)))
  elif command == 'train':
    code = runner.run(tpu.ssh(train))
    if code in STOPPED:
      return stopped(code)
    if code:
      raise RuntimeError(f'command failed (exit {code}): {shlex.join(tpu.ssh(train))}')
  elif command == 'logs':
    check(runner, tpu.ssh(f'tail -n 200 -F {LOG}', worker=flags.FLAGS.worker))
  elif command == 'stop':
    # "[q]wenjax" matches the job but not this command's own shell, whose text holds "[q]wenjax".
    check(runner, tpu.ssh('pkill -TERM -f "[q]wenjax.train" || true'))
  elif command == 'delete':
    check(runner, tpu.delete())
  else:
    upload(flags.FLAGS.workdir, runner)
    return run(tpu, runner, install_command(flags.FLAGS.workdir), train, flags.FLAGS.max_restarts, flags.FLAGS.keep_slice)
  return 0


if __name__ == '__main__':
  cli.run(main, _define_flags, args=' | '.join(COMMANDS))
