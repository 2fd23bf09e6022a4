"""The project's own files, written whole or not at all, in strict JSON, and read back without trusting them.

Every file a command writes (fit.json and plots, results.jsonl, sweep.json, lr.json, config.json, metrics.jsonl
rewrites, tokenizer copies, prepared corpora, exports, `evaluate --out`) goes through `write`: to a temporary file
beside it, then renamed over it. A failure at any point (an exception, a full disk, a kill) leaves the previous
version whole and no temporary file behind (a kill -9 may leave a hidden `.tmp-*` one, never a half file under the
real name). Paths may be local or URLs (gs://...), through etils `epath`. Append-only streams (metrics.jsonl during a
run, TensorBoard event files) and the lock's exclusive create are the exceptions: a failure there loses at most the
line being written, which every reader leaves out.

JSON is strict (`dumps`): NaN and infinities, which `json.dumps` writes as the bare words other readers refuse,
are written as null. Readers take both (`json.loads` reads the bare words).

A JSON Lines file of records (metrics.jsonl, results.jsonl) is read by `read_records`: a line that is valid JSON but
not a record of the kind expected (`42`, `[1, 2]`, `{"step": null}`) is left out with a warning naming it, so a
hand-edited file never stops a run. A leaf module: the standard library, etils and absl only.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import secrets
from typing import Any, Callable, Mapping

from absl import logging
from etils import epath


def _is_url(path: Any) -> bool:
  return '://' in str(path)


def write(path: Any, data: bytes | str | Callable[[str], None]) -> None:
  """Writes `path` whole, or leaves what was there: `data` (bytes or text) or a function that writes a given local
  path (e.g. `lambda tmp: fig.savefig(tmp, format='png')`), to a temporary file in the same directory that is then
  renamed over `path`. The temporary file is removed on any failure."""
  path = epath.Path(path)
  tmp = path.parent / f'.tmp-{os.getpid()}-{secrets.token_hex(4)}-{path.name}'
  try:
    if callable(data):
      if _is_url(path):  # the function writes a local file, copied up as one object
        import tempfile  # pylint: disable=g-import-not-at-top
        with tempfile.TemporaryDirectory(prefix='qwenjax-') as local:
          staged = os.path.join(local, path.name)
          data(staged)
          tmp.write_bytes(epath.Path(staged).read_bytes())
      else:
        data(str(tmp))
        _sync(str(tmp))
    elif _is_url(path):
      tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    else:
      with open(tmp, 'wb') as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
  except BaseException:
    try:
      tmp.unlink(missing_ok=True)
    except OSError:
      pass  # the storage itself failed: nothing more to do
    raise


def _sync(local: str) -> None:
  """Flushes a file written by someone else's code to the disk, so the rename never exposes an empty file after a
  power loss."""
  fd = os.open(local, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def finite(value: Any) -> Any:
  """`value` with every NaN or infinite float (numpy's too) replaced by None, through dicts, lists and tuples (numpy's
  numbers as Python's)."""
  if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):  # numpy's floats too
    return float(value) if math.isfinite(value) else None
  if isinstance(value, numbers.Integral) and not isinstance(value, int):  # numpy's ints
    return int(value)
  if isinstance(value, Mapping):
    return {k: finite(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [finite(v) for v in value]
  return value


def dumps(value: Any, **kwargs: Any) -> str:
  """`json.dumps` that writes strict JSON: NaN and infinities as null (`finite`)."""
  return json.dumps(finite(value), allow_nan=False, **kwargs)


def write_json(path: Any, value: Any, *, indent: int | None = 1, **kwargs: Any) -> None:
  """`value` as strict JSON (`dumps`), written whole (`write`), ending in a newline."""
  write(path, dumps(value, indent=indent, **kwargs) + '\n')


def read_json(path: Any, fix: str = '') -> dict[str, Any]:
  """The JSON object in the file `path` (local or gs://); a ValueError naming the file when it is not JSON or not an
  object. `fix` says what to do about it."""
  text = epath.Path(path).read_text()
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON ({e}){": " + fix if fix else ""}') from None
  if not isinstance(value, dict):
    raise ValueError(f'{path} holds a JSON {type(value).__name__}, not an object{": " + fix if fix else ""}')
  return value


def record(line: str, where: str, required: Mapping[str, type | tuple[type, ...]]) -> dict[str, Any] | None:
  """The record on one line of a JSON Lines file: a JSON object whose `required` keys hold values of those types
  (bools are not numbers). None, with a warning naming `where`, for valid JSON that is not such a record. Raises
  json.JSONDecodeError for a line that is not JSON (the caller knows whether a cut-short line is expected)."""
  value = json.loads(line)
  problem = None
  if not isinstance(value, dict):
    problem = f'a JSON {type(value).__name__}, not an object'
  else:
    for key, kind in required.items():
      if key not in value:
        problem = f'an object without "{key}"'
      elif isinstance(value[key], bool) or not isinstance(value[key], kind):
        problem = f'"{key}" is {json.dumps(value[key])}'
      if problem:
        break
  if problem:
    logging.warning('%s is not a record (%s): left out. Remove or fix that line.', where, problem)
    return None
  return value


def read_records(path: Any, required: Mapping[str, type | tuple[type, ...]]) -> list[dict[str, Any]]:
  """The records of a JSON Lines file that runs append to (local or gs://). A line that is valid JSON but not a
  record (`record`) is left out with a warning; a last line cut short (a run killed while writing it) is left out
  with a warning; a malformed line before the last is an error naming it."""
  text = epath.Path(path).read_text()
  lines = [(n, line) for n, line in enumerate(text.splitlines(keepends=True), 1) if line.strip()]
  records = []
  for i, (number, line) in enumerate(lines):
    try:
      value = record(line, f'{path} line {number}', required)
    except json.JSONDecodeError as e:
      if i < len(lines) - 1 or line.endswith('\n'):
        raise ValueError(f'{path} line {number} is not JSON ({e}): fix or remove that line') from e
      logging.warning('%s: its last line is cut short (a run killed while writing it?): left out', path)
      continue
    if value is not None:
      records.append(value)
  return records
