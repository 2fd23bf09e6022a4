"""One run per workdir: a lock.

Paths go through etils `epath`, so a workdir may be a `gs://` URL as well as a local directory.

The lock, `WORKDIR/lock.json`, names its holder (host, pid, start time, command) and carries a heartbeat the
holder refreshes every minute. A second run on the workdir exits at once naming the holder. A lock is stale, and
is taken over with a warning, when its holder was a process of this host that no longer exists, or when its
heartbeat is older than `stale_after` seconds (a holder on another host that died). On a local or shared POSIX
filesystem the lock is taken atomically (O_EXCL); on object stores such as GCS, where epath has no atomic create,
two runs started within the same second could both believe they hold it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from typing import Any

from absl import logging
from etils import epath

from qwenjax import files


class WorkdirBusyError(RuntimeError):
  """Another run holds the workdir's lock."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class Lock:
  """`with Lock(workdir): ...` holds the workdir for one run."""

  def __init__(self, workdir: str, stale_after: float = 600.0, heartbeat: float = 60.0):
    self.path = epath.Path(workdir) / 'lock.json'
    self.stale_after, self.heartbeat = stale_after, heartbeat
    self._me = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time(),
                'command': ' '.join(sys.argv)[:500]}
    self._stop = threading.Event()
    self._thread = None

  def _record(self) -> str:
    return json.dumps({**self._me, 'heartbeat': time.time()})

  def _holder(self) -> dict[str, Any] | None:
    try:
      return json.loads(self.path.read_text())
    except (FileNotFoundError, ValueError):
      return None  # gone, or being written

  def _age(self) -> float | None:
    """Seconds since the lock file was last written; None if it is gone."""
    try:
      return time.time() - self.path.stat().mtime
    except FileNotFoundError:
      return None

  def _mine(self, holder: dict[str, Any] | None) -> bool:
    return bool(holder) and holder.get('pid') == self._me['pid'] and holder.get('host') == self._me['host']

  def _stale(self, holder: dict[str, Any]) -> str | None:
    if holder.get('host') == self._me['host'] and not _pid_alive(int(holder.get('pid', -1))):
      return f'its process {holder.get("pid")} on this host no longer exists'
    age = time.time() - float(holder.get('heartbeat', 0))
    if age > self.stale_after:
      return f'its heartbeat is {age:.0f} s old (stale after {self.stale_after:.0f} s)'
    return None

  def _create(self) -> bool:
    if '://' not in str(self.path):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, 'w') as f:
        f.write(self._record())
      return True
    if self.path.exists():
      return False
    self.path.write_text(self._record())
    time.sleep(0.5)  # best effort on object stores: the last writer wins, the other sees it is not the holder
    return self._mine(self._holder())

  def acquire(self) -> None:
    try:
      self._acquire()
    except OSError as e:  # a read-only or full filesystem, a directory without write permission
      if e.errno is None:
        raise
      raise OSError(e.errno, f'cannot write to the workdir {self.path.parent} ({e.strerror}): a run needs a '
                    'writable workdir for its lock, checkpoints and metrics; give another --workdir or fix its '
                    'permissions') from None

  def _acquire(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
      if self._create():
        self._thread = threading.Thread(target=self._beat, daemon=True, name='qwenjax-workdir-lock')
        self._thread.start()
        return
      holder = self._holder()
      if holder is None:
        age = self._age()
        if age is not None and age > 10:  # writing takes microseconds: a lock cut short (power loss) is stale
          logging.warning('taking over the lock %s: it is empty or not JSON and %.0f s old (a run died while '
                          'writing it)', self.path, age)
          self.path.unlink(missing_ok=True)
        else:
          time.sleep(0.2)
        continue
      reason = self._stale(holder)
      if reason is None:
        started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(holder.get('started', 0))))
        raise WorkdirBusyError(
            f'the workdir {self.path.parent} is in use by process {holder.get("pid")} on host '
            f'{holder.get("host")} (started {started}: {holder.get("command")}). One run per workdir: wait for it '
            f'to end or stop it, or use another --workdir. If that process is gone, the lock goes stale '
            f'{self.stale_after:.0f} s after its last heartbeat, or delete {self.path}.')
      logging.warning('taking over the stale lock %s: %s', self.path, reason)
      self.path.unlink(missing_ok=True)
    raise WorkdirBusyError(f'could not take the lock {self.path}: another run keeps taking it')

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat):
      if self._mine(self._holder()):
        files.write(self.path, self._record())

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
      if self._mine(self._holder()):
        self.path.unlink(missing_ok=True)

  def __enter__(self) -> 'Lock':
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
