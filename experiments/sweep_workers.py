r"""A sweep's unfinished points trained by K processes at once on one machine (one GPU):

    python experiments/sweep_workers.py --sweep=experiments/isoflop_gpu.py --workdir=DIR --workers=3 [--seconds=S]

A model of a few million parameters leaves most of a GPU idle, and a point spends about as long compiling, loading
and evaluating as training. K processes overlap all of that: each is `python -m qwenjax.sweep --only=...` with
XLA_PYTHON_CLIENT_MEM_FRACTION = 0.9 / K (the memory `'auto'` then fits the step into). Each point still trains
exactly as it would alone (its own process, its own step), so the results are those of one `qwenjax.sweep`.

Worker i runs in DIR/workers/i, a directory of its own whose point directories, prepared corpus and compilation
cache are links into DIR: a point stopped in one piece resumes from its checkpoint in whichever worker trains it
next. The workers start from copies of DIR's results.jsonl, sweep.json and lr.json (files the sweep rewrites whole,
which two processes must not share); when they end, the points they finished are added to DIR/results.jsonl with
DIR in their paths, and sweep.json and lr.json are copied back. Points are dealt whole groups at a time
(`qwenjax.sweep.groups`), longest first to the least loaded worker, by the plan's estimate. While the lr stage is
unfinished its points run first (the others need its choice); then the rest, in the same command if time is left.

`--seconds`: stop the workers (SIGTERM: each checkpoints its point) this long after the start; run the command again
to go on. With it, each phase starts only the groups whose estimated times (the sweep's `estimate`, added up as if
run one after another) fit in the time left, longest first (`within`): a fresh machine keeps no checkpoint of a
point cut short, and the command ends early rather than start what cannot finish. Flags `--sweep.*` go to every
worker as given. Ctrl-C or SIGTERM stops the workers the same way.
"""

from __future__ import annotations

import heapq
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

_PLATFORMS = os.environ.get('JAX_PLATFORMS')  # the workers' (unset: jax's choice, the GPU)
os.environ['JAX_PLATFORMS'] = 'cpu'  # this process only plans: the GPU is the workers'
# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging
from ml_collections import config_flags

from qwenjax import cli
from qwenjax import files
from qwenjax import sweep as sweep_lib
from qwenjax import workdir as workdir_lib

SHARED = ('prepared', 'compilation_cache')  # the sweep's shared directories, linked into each worker's
COPIED = ('results.jsonl', 'sweep.json', 'lr.json')  # DIR's files a worker starts from
STOP_GRACE_S = 90  # how long a stopped worker may take to checkpoint before it is killed


def deal(units: list[list[sweep_lib.Point]], seconds: list[float], workers: int) -> list[list[str]]:
  """The names each of `workers` trains: `units` (groups of points, in run order) dealt longest first to the
  least loaded worker (ties: the lowest index); each worker keeps run order."""
  load = [(0.0, i) for i in range(workers)]
  mine: list[list[int]] = [[] for _ in range(workers)]
  for u in sorted(range(len(units)), key=lambda u: (-seconds[u], u)):
    total, i = heapq.heappop(load)
    mine[i].append(u)
    heapq.heappush(load, (total + seconds[u], i))
  return [[p.name for u in sorted(us) for p in units[u]] for us in mine if us]


def within(seconds: list[float], left: float, started: bool) -> list[int]:
  """The units (indices, in run order) to start with `left` seconds to go: longest first, each while the estimated
  times of those chosen, added up as if they ran one after another, stay within `left`. A unit cut at the deadline
  resumes only on the machine that holds its checkpoint, so on a fresh machine its work would be lost; K workers
  at once should take less than the sum, so this errs on the safe side. When none fits: the shortest, so that a
  unit longer than any piece still runs, unless this command has trained something already (then none)."""
  chosen, total = [], 0.0
  for u in sorted(range(len(seconds)), key=lambda u: (-seconds[u], u)):
    if total + seconds[u] <= left:
      chosen.append(u)
      total += seconds[u]
  if not chosen and not started and seconds:
    chosen = [min(range(len(seconds)), key=lambda u: (seconds[u], u))]
  return sorted(chosen)


def next_phase(sweep, workdir: str, workers: int, left: float | None = None,
               started: bool = False) -> list[list[str]]:
  """The names each worker trains next: the lr stage's unfinished points while there are any, else every other
  unfinished point (its rate chosen); [] when the sweep is done. With `left` (seconds to the deadline), only the
  groups `within` chooses by the sweep's `estimate`."""
  points = sweep_lib.plan(sweep, workdir)
  done = sweep_lib.read_done(workdir)
  if any(p.stage == 'lr' and p.name not in done for p in points):
    wanted = [p for p in points if p.stage == 'lr' and p.name not in done]
  else:
    points, _ = sweep_lib._after_lr_stage(sweep, workdir, points, done)  # pylint: disable=protected-access
    wanted = [p for p in points if p.name not in done]
  if not wanted:
    return []
  group_size = int(sweep.get('group_size', 0))
  timing = dict(zip((p.name for p in wanted), (s for _, s in sweep_lib.schedule(wanted, sweep.get('estimate'), 0.0,
                                                                                 group_size))))
  units = sweep_lib.groups(wanted, group_size)
  seconds = [sum(timing[p.name] for p in unit) for unit in units]
  if left is not None:
    chosen = within(seconds, left, started)
    later = [f'{units[u][0].name} ({seconds[u]:.0f} s)' for u in range(len(units)) if u not in chosen]
    if later:
      logging.info('sweep_workers: %.0f s left; left for the next piece by the estimate: %s', left, ', '.join(later))
    units, seconds = [units[u] for u in chosen], [seconds[u] for u in chosen]
  return deal(units, seconds, workers)


def prepare_worker(root: pathlib.Path, index: int, names: list[str]) -> pathlib.Path:
  """DIR/workers/<index>: DIR's files copied, its shared directories and the points' directories linked."""
  home = root / 'workers' / str(index)
  home.mkdir(parents=True, exist_ok=True)
  for name in COPIED:
    (home / name).unlink(missing_ok=True)
    if (root / name).exists():
      files.write(home / name, (root / name).read_bytes())
  for name in list(SHARED) + names:
    (root / name).mkdir(exist_ok=True)
    link = home / name
    if not link.is_symlink():
      if link.exists():
        raise ValueError(f'{link} is a directory, not a link into {root}: a worker trained there outside this '
                         f'command; move what it holds to {root / name} or delete it')
      link.symlink_to(root / name, target_is_directory=True)
  return home


def _in_root(value, home: pathlib.Path, root: pathlib.Path):
  """`value` (JSON) with the worker's directory in its paths replaced by DIR's."""
  return json.loads(json.dumps(value).replace(json.dumps(str(home))[1:-1], json.dumps(str(root))[1:-1]))


def merge(root: pathlib.Path, homes: list[pathlib.Path]) -> list[str]:
  """Adds the points the workers finished to DIR/results.jsonl and copies back sweep.json and lr.json; returns
  the names added."""
  done = sweep_lib.read_done(str(root))
  added = []
  for home in homes:
    for name, record in sweep_lib.read_done(str(home)).items():
      if name not in done:
        done[name] = _in_root(record, home, root)
        added.append(name)
  for name in added:  # as the sweep adds a line (a line cut short by a kill dropped)
    sweep_lib._append(root / 'results.jsonl', done[name])  # pylint: disable=protected-access
  for name in ('sweep.json', 'lr.json'):
    for home in homes:
      if (home / name).exists():
        files.write_json(root / name, _in_root(json.loads((home / name).read_text()), home, root))
        break
  return added


def run_workers(argv_sweep: list[str], root: pathlib.Path, assignment: list[list[str]],
                deadline: float | None) -> tuple[list[pathlib.Path], list[int]]:
  """Starts one `python -m qwenjax.sweep` per list of names and waits for all; at `deadline` (or on a signal to
  this process) stops them with SIGTERM. Returns their directories and exit statuses."""
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  if _PLATFORMS is not None:
    env['JAX_PLATFORMS'] = _PLATFORMS
  env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', f'{0.9 / len(assignment):.2f}')
  homes, procs = [], []
  for i, names in enumerate(assignment):
    home = prepare_worker(root, i, names)
    log = open(home / 'sweep.log', 'ab')  # pylint: disable=consider-using-with
    command = [sys.executable, '-m', 'qwenjax.sweep', *argv_sweep, f'--workdir={home}', f'--only={",".join(names)}']
    logging.info('sweep_workers: worker %d trains %d point(s): %s (log: %s)', i, len(names), ', '.join(names),
                 home / 'sweep.log')
    procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))
    homes.append(home)
  stopped = None
  try:
    while any(p.poll() is None for p in procs):
      if deadline is not None and time.time() > deadline and stopped is None:
        logging.info('sweep_workers: time is up; stopping the workers (each checkpoints its point)')
        stopped = time.time()
        _stop(procs)
      if stopped is not None and time.time() > stopped + STOP_GRACE_S:
        for p in procs:
          if p.poll() is None:
            logging.warning('sweep_workers: worker %d did not stop in %d s; killing it', procs.index(p),
                            STOP_GRACE_S)
            p.kill()
      time.sleep(1.0)
  except cli.Stopped as e:  # Ctrl-C or SIGTERM to this command: the workers save and stop too
    _stop(procs)
    for p in procs:
      _wait(p)
    merge(root, homes)
    raise e
  return homes, [p.returncode for p in procs]


def _stop(procs: list[subprocess.Popen]) -> None:
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)


def _wait(p: subprocess.Popen) -> None:
  try:
    p.wait(timeout=STOP_GRACE_S)
  except subprocess.TimeoutExpired:
    p.kill()
    p.wait()


def _define_flags() -> None:
  config_flags.DEFINE_config_file('sweep', None, 'Sweep file, e.g. experiments/isoflop_gpu.py.', lock_config=False)
  flags.DEFINE_string('workdir', None, 'The sweep\'s directory, as for python -m qwenjax.sweep.')
  flags.DEFINE_integer('workers', 2, 'How many processes train points at once.', lower_bound=1)
  flags.DEFINE_float('seconds', 0.0, 'Stop the workers this long after the start (0: when the sweep is done).',
                     lower_bound=0.0)


def main(argv: list[str]) -> int | None:
  del argv
  start = time.time()
  sweep, root = flags.FLAGS.sweep, pathlib.Path(workdir_lib.resolve(flags.FLAGS.workdir))
  if '://' in str(root):
    raise cli.UsageError(f'--workdir={root}: the workers link into a local directory; give a local path')
  argv_sweep = [a for a in sys.argv[1:] if a.startswith('--sweep')]
  deadline = start + flags.FLAGS.seconds if flags.FLAGS.seconds else None
  root.mkdir(parents=True, exist_ok=True)
  table, _ = sweep_lib.emit_plan(sweep, str(root))  # prepares the shared tokenizer and corpus, once
  print(table, flush=True)
  if not (root / 'sweep.json').exists():  # as `qwenjax.sweep` starts a sweep: the code version its points need
    points = sweep_lib.plan(sweep, str(root))
    sweep_lib.write_record(root, sweep, points, sweep_lib.check_epochs(sweep, points), sweep_lib.code_version(), [])
  failed, started = [], False
  while not failed and (deadline is None or time.time() < deadline):
    left = None if deadline is None else deadline - time.time()
    assignment = next_phase(sweep, str(root), flags.FLAGS.workers, left, started)
    if not assignment:
      break
    homes, statuses = run_workers(argv_sweep, root, assignment, deadline)
    added = merge(root, homes)
    started = True
    logging.info('sweep_workers: %d point(s) finished: %s', len(added), ', '.join(added) or '-')
    failed = [f'worker {i} (exit {s}; log {homes[i] / "sweep.log"})' for i, s in enumerate(statuses)
              if s not in (0, 128 + signal.SIGTERM)]
    if any(s == 128 + signal.SIGTERM for s in statuses):
      break
  if failed:
    raise RuntimeError(f'{", ".join(failed)} failed; the points they finished are in {root / "results.jsonl"}')
  finished, planned = len(sweep_lib.read_done(str(root))), len(sweep_lib.plan(sweep, str(root)))
  print(f'{finished} of {planned} point(s) finished; results in {root / "results.jsonl"}', flush=True)
  return None


if __name__ == '__main__':
  cli.run(main, _define_flags, required=('sweep', 'workdir'), expected=(sweep_lib.CodeVersionError,))
