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
DIR in their paths, and sweep.json and lr.json are copied back. Each worker trains one group of points
(`qwenjax.sweep.groups`) at a time; when it ends, its points are merged into DIR and it starts the longest group
not yet trained (`pick`, by the plan's estimate). While the lr stage is unfinished only its groups start (the others
need its choice); then the rest, in the same command if time is left.

`--seconds`: stop the workers (SIGTERM: each checkpoints its point) this long after the start; run the command again
to go on. With it, a worker starts only a group whose estimate (the sweep's `estimate`, times how much longer the
groups finished so far took, SLOWDOWN at least: sharing the GPU slows each) fits in the time left: a fresh machine
keeps no checkpoint of a point cut short, and a worker idles rather than start what cannot finish. Flags `--sweep.*`
go to every worker as given. Ctrl-C or SIGTERM stops the workers the same way.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import statistics
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
SLOWDOWN = 1.25  # a point among others on one GPU takes at least this much longer than its estimate (`slowdown`)
_choice_logged = False  # whether the lr stage's warnings were logged by this command


def slowdown(ratios: list[float]) -> float:
  """How much longer than its estimate a unit takes here: the median of this command's finished units (their
  seconds over their estimates), SLOWDOWN at least. Three workers on one H100 took 1.5-2x (the GPU study's
  pieces 5-8): a fixed guess starts units that the deadline then cuts."""
  return max(SLOWDOWN, statistics.median(ratios)) if ratios else SLOWDOWN


def pick(seconds: list[float], left: float | None, started: bool, slow: float = SLOWDOWN) -> int | None:
  """The unit (index) a free worker starts with `left` seconds to go (None: no deadline): the longest whose
  estimate, times `slow` (`slowdown`), fits. A unit cut at the deadline resumes only on the machine that holds its
  checkpoint, so on a fresh machine its work would be lost. When none fits: the shortest, so that a unit longer
  than any piece still runs, unless this command has started one already (then none)."""
  order = sorted(range(len(seconds)), key=lambda u: (-seconds[u], u))
  fits = [u for u in order if left is None or seconds[u] * slow <= left]
  if fits:
    return fits[0]
  return order[-1] if order and not started else None


def ready(sweep, workdir: str, busy: set[str]) -> tuple[list[list[sweep_lib.Point]], list[float]]:
  """The groups (`qwenjax.sweep.groups`) a free worker may start, in run order, with their estimated seconds: the
  lr stage's unfinished groups while the stage is unfinished (the other points need its choice), else every other
  unfinished group; none with a point in `busy` (names a worker is training)."""
  global _choice_logged
  points = sweep_lib.plan(sweep, workdir)
  done = sweep_lib.read_done(workdir)
  if any(p.stage == 'lr' and p.name not in done for p in points):
    wanted = [p for p in points if p.stage == 'lr' and p.name not in done]
  else:
    verbosity = logging.get_verbosity()
    if _choice_logged:  # the lr stage's warnings, once a command
      logging.set_verbosity(logging.ERROR)
    try:
      points, _ = sweep_lib._after_lr_stage(sweep, workdir, points, done)  # pylint: disable=protected-access
    finally:
      logging.set_verbosity(verbosity)
    _choice_logged = True
    wanted = [p for p in points if p.name not in done]
  group_size = int(sweep.get('group_size', 0))
  timing = dict(zip((p.name for p in wanted), (s for _, s in sweep_lib.schedule(wanted, sweep.get('estimate'), 0.0,
                                                                                 group_size))))
  units = [u for u in sweep_lib.groups(wanted, group_size) if not busy & {p.name for p in u}]
  return units, [sum(timing[p.name] for p in unit) for unit in units]


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


def run_workers(argv_sweep: list[str], sweep, root: pathlib.Path, workers: int,
                deadline: float | None) -> list[str]:
  """Keeps `workers` processes busy, each `python -m qwenjax.sweep --only=<one group>`: whenever one ends, its points
  are merged into DIR and the worker starts the group `pick` chooses among those `ready`, its estimates scaled by
  how much longer the groups finished so far took (`slowdown`). At `deadline` (or on a signal to this process) stops
  them with SIGTERM. Returns the workers that failed, described."""
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  if _PLATFORMS is not None:
    env['JAX_PLATFORMS'] = _PLATFORMS
  env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', f'{0.9 / workers:.2f}')
  running: dict[int, tuple[subprocess.Popen, pathlib.Path, list[str]]] = {}
  began: dict[int, tuple[float, float]] = {}  # worker -> (its group's start, its estimate)
  failed, started, stopped, ratios = [], False, None, []
  try:
    while True:
      for i, (proc, home, names) in list(running.items()):
        if proc.poll() is None:
          continue
        del running[i]
        t0, estimate = began.pop(i)
        if proc.returncode == 0 and estimate > 0:
          ratios.append((time.time() - t0) / estimate)
        added = merge(root, [home])
        logging.info('sweep_workers: worker %d ended (exit %d); finished: %s', i, proc.returncode,
                     ', '.join(added) or '-')
        if proc.returncode == 128 + signal.SIGTERM:
          stopped = stopped or time.time()  # stopped by us, or by someone else: start nothing more
        elif proc.returncode != 0:
          failed.append(f'worker {i} (exit {proc.returncode}; log {home / "sweep.log"})')
      for i in range(workers):
        if failed or stopped or i in running:
          continue
        busy = {name for _, _, names in running.values() for name in names}
        units, seconds = ready(sweep, str(root), busy)
        slow = slowdown(ratios)
        u = pick(seconds, None if deadline is None else deadline - time.time(), started, slow)
        if u is None:
          break
        names = [p.name for p in units[u]]
        home = prepare_worker(root, i, names)
        log = open(home / 'sweep.log', 'ab')  # pylint: disable=consider-using-with
        command = [sys.executable, '-m', 'qwenjax.sweep', *argv_sweep, f'--workdir={home}', f'--only={",".join(names)}']
        logging.info('sweep_workers: worker %d trains %s (%.0f s by the estimate, x%.2f here; log: %s)', i,
                     ', '.join(names), seconds[u], slow, home / 'sweep.log')
        began[i] = (time.time(), seconds[u])
        running[i] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), home, names)
        log.close()
        started = True
      if not running:
        return failed
      if deadline is not None and time.time() > deadline and stopped is None:
        logging.info('sweep_workers: time is up; stopping the workers (each checkpoints its point)')
        stopped = time.time()
        _stop([proc for proc, _, _ in running.values()])
      if stopped is not None and time.time() > stopped + STOP_GRACE_S:
        for i, (proc, _, _) in running.items():
          if proc.poll() is None:
            logging.warning('sweep_workers: worker %d did not stop in %d s; killing it', i, STOP_GRACE_S)
            proc.kill()
      time.sleep(1.0)
  except cli.Stopped as e:  # Ctrl-C or SIGTERM to this command: the workers save and stop too
    _stop([proc for proc, _, _ in running.values()])
    for proc, _, _ in running.values():
      _wait(proc)
    merge(root, [home for _, home, _ in running.values()])
    raise e


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
  failed = run_workers(argv_sweep, sweep, root, flags.FLAGS.workers, deadline)
  if failed:
    raise RuntimeError(f'{", ".join(failed)} failed; the points they finished are in {root / "results.jsonl"}')
  units, seconds = ready(sweep, str(root), set())
  if units:
    logging.info('sweep_workers: left for the next piece (estimated seconds): %s',
                 ', '.join(f'{u[0].name} ({s:.0f} s)' for u, s in zip(units, seconds)))
  finished, planned = len(sweep_lib.read_done(str(root))), len(sweep_lib.plan(sweep, str(root)))
  print(f'{finished} of {planned} point(s) finished; results in {root / "results.jsonl"}', flush=True)
  return None


if __name__ == '__main__':
  cli.run(main, _define_flags, required=('sweep', 'workdir'), expected=(sweep_lib.CodeVersionError,))
