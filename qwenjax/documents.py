"""Documents from files: `.jsonl`, `.txt` / `.py` and ArrayRecord, as one random-access sequence of strings.

`.jsonl`: one JSON object per line, the document under `text_key` (blank lines skipped). `.txt` and `.py`: a
whole file is one document. ArrayRecord (`*.array_record*`): each record UTF-8 text or a JSON object like a
`.jsonl` line. With no files given, the built-in corpus is the Python standard library's own `.py` files, with a
deterministic 2% of them held out for eval, so a fresh machine trains with nothing downloaded.

Bad input is never trained on silently: a malformed JSON line or a record without `text_key` is an error that
names the file and line; a document that is not UTF-8 text (a binary file, a line with invalid bytes) raises
`BadDocument`, which the tokenizer trainer and `qwenjax.prepare` count and skip with a warning naming where.

No jax here: `qwenjax.prepare` reads documents in worker processes.
"""

from __future__ import annotations

import bisect
import contextlib
import glob
import json
import os
import re
import sysconfig
import zlib
from typing import Any, Iterator, Sequence

from absl import logging
import numpy as np

# The built-in corpus: files whose path hashes to 0 modulo this are the eval split (2%).
_EVAL_MODULUS = 50
_ARRAY_RECORD = re.compile(r'\.array_?record', re.IGNORECASE)


class BadDocument(ValueError):
  """A document that is not UTF-8 text; `where` names the file and line or record."""

  def __init__(self, where: str, why: str):
    super().__init__(f'{where}: {why}')
    self.where = where


def stdlib_files() -> tuple[list[str], list[str]]:
  """(train, eval) `.py` files of the running Python's standard library, split by a hash of the path."""
  root = sysconfig.get_paths()['stdlib']
  files = []
  for directory, subdirs, names in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in ('site-packages', 'dist-packages', '__pycache__'))
    files.extend(os.path.join(directory, n) for n in sorted(names) if n.endswith('.py'))
  if not files:
    raise FileNotFoundError(f'no .py files under the standard library directory {root}; set data.train_files')
  is_eval = [zlib.crc32(os.path.relpath(f, root).encode()) % _EVAL_MODULUS == 0 for f in files]
  return ([f for f, e in zip(files, is_eval) if not e], [f for f, e in zip(files, is_eval) if e])


# Listings kept while `fixed_listing` is active, or None.
_LISTINGS: dict[Any, Any] | None = None


@contextlib.contextmanager
def fixed_listing() -> Iterator[None]:
  """Within it, each glob is expanded and each list of files stat'ed once, then reused: the runs of a sweep read
  one listing of the corpus (taken when it starts) instead of walking its directories and stat'ing its files again
  for every point (seconds per point for a corpus of tens of thousands of files)."""
  global _LISTINGS
  outer = _LISTINGS
  _LISTINGS = {} if outer is None else outer
  try:
    yield
  finally:
    _LISTINGS = outer


def _listed(key: Any, compute) -> Any:
  if _LISTINGS is None:
    return compute()
  if key not in _LISTINGS:
    _LISTINGS[key] = compute()
  return _LISTINGS[key]


def expand_files(patterns: str, what: str = 'data.train_files') -> list[str]:
  """Sorted files matching a glob or comma-separated globs, each file once (by its real path: a file reached
  through links, or through a symlink that points back up, under several names, is read once, with a warning); an
  error naming the patterns if none match."""
  globs = [p.strip() for p in str(patterns).split(',') if p.strip()]
  matches = {p: _listed(('glob', os.getcwd(), p), lambda p=p: [
      f for f in glob.glob(os.path.expanduser(p), recursive=True) if os.path.isfile(f)]) for p in globs}
  files, first, aliases = [], {}, []
  # Each file under its own name where that was matched, else the shortest of its names.
  by_preference = lambda f: (os.path.realpath(f) != os.path.abspath(f), f.count(os.sep), f)
  for path in sorted({f for found in matches.values() for f in found}, key=by_preference):
    real = os.path.realpath(path)
    if real in first:
      aliases.append(path)
    else:
      first[real] = path
      files.append(path)
  files.sort()
  if aliases:
    loops = sorted({link for link in map(_symlink_loop, aliases) if link})
    logging.warning('%s: %d matched path(s) are files already matched under another name, e.g. %s (= %s): each '
                    'file is read once.%s', what, len(aliases), aliases[0], first[os.path.realpath(aliases[0])],
                    f' {loops[0]} is a symlink loop (it points to a directory above it): remove it or narrow the glob.'
                    if loops else '')
  if files and not all(matches.values()):
    logging.warning('%s: %s match(es) no file (the other patterns do): a typo?', what,
                    ', '.join(repr(p) for p, found in matches.items() if not found))
  if not files:
    flag = what if what.startswith('--') else f'--config.{what}'  # a command's own flag, or a config value
    raise FileNotFoundError(
        f'no files match {what}={patterns!r} (from {os.getcwd()}). Give a glob or comma-separated globs of '
        f'.jsonl, .txt or ArrayRecord files, e.g. {flag}="data/*.jsonl"'
        + (', or leave it empty to train on the built-in corpus.' if what == 'data.train_files' else '.'))
  return files


def _symlink_loop(path: str) -> str | None:
  """The first directory of `path` that is a symlink to itself or a directory above it (a loop a recursive glob
  walks round until the path is too long), or None."""
  parts = os.path.abspath(path).split(os.sep)
  for i in range(2, len(parts)):
    prefix = os.sep.join(parts[:i])
    if os.path.islink(prefix):
      target, parent = os.path.realpath(prefix), os.path.realpath(os.path.dirname(prefix))
      if os.path.commonpath([target, parent]) == target:
        return prefix
  return None


def _decode(raw: bytes, where: str) -> str:
  if b'\x00' in raw:
    raise BadDocument(where, f'binary data (a NUL byte at offset {raw.index(0)}), not text')
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise BadDocument(where, f'not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at offset {e.start})') from None


def _text_of(obj: Any, key: str, where: str) -> str:
  if not isinstance(obj, dict) or key not in obj:
    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    raise KeyError(f'{where} has no {key!r} field (it has {keys}); set the text key to the field that holds '
                   'the text (--config.data.text_key in training, --text_key in qwenjax.evaluate)')
  text = obj[key]
  if not isinstance(text, str):
    raise BadDocument(where, f'its {key!r} field is {type(text).__name__}, not a string')
  try:
    text.encode('utf-8')
  except UnicodeEncodeError as e:  # JSON escapes allow half an emoji (a lone surrogate): not text
    raise BadDocument(where, f'its {key!r} field holds a lone surrogate (U+{ord(text[e.start]):04X} at '
                      f'character {e.start}), not Unicode text') from None
  return text


class _JsonlFile:
  """Random access to the non-blank lines of a .jsonl file through an index of line offsets."""

  def __init__(self, path: str, text_key: str):
    self.path, self.text_key = path, text_key
    starts, lines, offset = [], [], 0
    with open(path, 'rb') as f:
      for number, line in enumerate(f, 1):
        if line.strip():
          starts.append(offset)
          lines.append(number)
        offset += len(line)
    self._starts = np.asarray(starts + [offset], np.int64)
    self._lines = np.asarray(lines, np.int64)

  def __len__(self) -> int:
    return len(self._lines)

  def __getitem__(self, i: int) -> str:
    with open(self.path, 'rb') as f:
      f.seek(int(self._starts[i]))
      raw = f.read(int(self._starts[i + 1] - self._starts[i]))
    where = f'{self.path}:{self._lines[i]}'
    try:
      obj = json.loads(_decode(raw, where))
    except json.JSONDecodeError as e:
      raise ValueError(f'{where}: malformed JSON ({e.msg} at column {e.colno}); every line of a .jsonl file '
                       'must be one JSON object such as {"text": "..."}: fix or remove that line') from None
    return _text_of(obj, self.text_key, where)


class _WholeFile:
  """A text file as one document."""

  def __init__(self, path: str):
    self.path = path

  def __len__(self) -> int:
    return 1

  def __getitem__(self, i: int) -> str:
    with open(self.path, 'rb') as f:
      return _decode(f.read(), self.path)


class _ArrayRecordFile:
  """ArrayRecord records: UTF-8 text, or JSON objects holding the text under `text_key`."""

  def __init__(self, path: str, text_key: str):
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
    self.path, self.text_key = path, text_key
    self._source = array_record_data_source.ArrayRecordDataSource([path])

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> str:
    where = f'{self.path} (record {i})'
    text = _decode(self._source[i], where)
    if text[:1] == '{':
      try:
        return _text_of(json.loads(text), self.text_key, where)
      except json.JSONDecodeError:
        pass
    return text


class DocumentSource:
  """All documents of a list of files, as one random-access sequence of strings (a grain data source)."""

  def __init__(self, files: Sequence[str], text_key: str = 'text'):
    self.files = list(files)
    self.text_key = text_key
    self._parts = []
    for path in self.files:
      name = os.path.basename(path)
      if name.endswith('.jsonl'):
        self._parts.append(_JsonlFile(path, text_key))
      elif name.endswith(('.txt', '.py')):
        self._parts.append(_WholeFile(path))
      elif _ARRAY_RECORD.search(name):
        self._parts.append(_ArrayRecordFile(path, text_key))
      else:
        raise ValueError(f'cannot read {path}: supported files are .jsonl, .txt, .py and ArrayRecord '
                         '(*.array_record*)')
    self._ends = np.cumsum([len(p) for p in self._parts]).tolist()

  def __len__(self) -> int:
    return self._ends[-1] if self._ends else 0

  def __getitem__(self, i: int) -> str:
    if not 0 <= i < len(self):
      raise IndexError(f'document {i} out of range [0, {len(self)})')
    part = bisect.bisect_right(self._ends, i)
    start = self._ends[part - 1] if part else 0
    return self._parts[part][i - start]

  def identity(self) -> list[tuple[str, int, int]]:
    """(absolute path, size, modification time in ns) of every file: what keys a prepared corpus."""
    return file_identity(self.files)


def file_identity(paths: Sequence[str]) -> list[tuple[str, int, int]]:
  """(absolute path, size, modification time in ns) of each file, without reading it: a touched or rewritten
  file gets another identity."""
  return list(_listed(('stat', os.getcwd(), tuple(paths)), lambda: [
      (os.path.abspath(p), (stat := os.stat(p)).st_size, stat.st_mtime_ns) for p in paths]))


def sources(train_files: str, eval_files: str) -> tuple[list[str], list[str]]:
  """(train files, eval files) of the settings `data.train_files` and `data.eval_files` (globs), or the built-in
  corpus and its held-out split when `train_files` is empty."""
  if not train_files:
    train, held_out = stdlib_files()
    return train, (expand_files(eval_files, 'data.eval_files') if eval_files else held_out)
  return (expand_files(train_files, 'data.train_files'),
          expand_files(eval_files, 'data.eval_files') if eval_files else [])
