"""Eval documents that the training corpus already holds: their lines found verbatim among the training documents.

An eval loss should measure what a model learned, not what it memorized. An eval document with a near-copy among
the training documents (a vendored fork of a module, a generated file with many siblings) is predicted better the
more often a run reads its corpus, so in a scaling study the data-rich points gain on it more than the others,
which tilts the IsoFLOP curves towards small models. `data.decontaminate` leaves such documents out of a run's
eval set (`qwenjax.data`), as GPT-3's "clean" eval subsets left out documents sharing 13-grams with training;
experiments/eval_overlap.py reports them document by document.

A line counts when, stripped of surrounding whitespace, it has `min_chars` characters or more (short lines such as
`return None` are everywhere). An eval document's share is the fraction of its counted lines found in some
training document. One pass over the training documents, holding only the eval lines in memory.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from typing import Iterable, Iterator, Sequence

from absl import logging

from qwenjax import documents
from qwenjax import files as files_lib

MIN_CHARS = 40
_VERSION = 1


def counted_lines(text: str, min_chars: int = MIN_CHARS) -> set[str]:
  """The distinct lines of a document that count (stripped, `min_chars` long or more)."""
  return {s for s in (line.strip() for line in text.splitlines()) if len(s) >= min_chars}


@dataclasses.dataclass
class Overlap:
  """One eval document's lines found in the training documents."""
  name: str
  lines: int  # counted lines
  found: int  # of them, in some training document
  nearest: str | None  # the training document holding most of them
  nearest_lines: int  # how many it holds

  @property
  def share(self) -> float:
    return self.found / self.lines if self.lines else 0.0


def overlap(eval_docs: Sequence[tuple[str, str]], train_docs: Iterable[tuple[str, str]],
            min_chars: int = MIN_CHARS) -> list[Overlap]:
  """Per eval document (name, text): its counted lines found in `train_docs`, an iterable of (name, text)."""
  lines = [counted_lines(text, min_chars) for _, text in eval_docs]
  owners = collections.defaultdict(list)  # line -> the eval documents that have it
  for i, keys in enumerate(lines):
    for key in keys:
      owners[key].append(i)
  found = [set() for _ in eval_docs]
  nearest = [(0, None)] * len(eval_docs)
  for name, text in train_docs:
    held = collections.Counter()
    for key in counted_lines(text, min_chars) & owners.keys():
      for i in owners[key]:
        found[i].add(key)
        held[i] += 1
    for i, count in held.items():
      if count > nearest[i][0]:
        nearest[i] = (count, name)
  return [Overlap(name, len(keys), len(hits), near[1], near[0])
          for (name, _), keys, hits, near in zip(eval_docs, lines, found, nearest)]


def read_documents(files: Sequence[str], text_key: str = 'text') -> Iterator[tuple[str, str]]:
  """(name, text) of every document of the files, in corpus order; a document that is not text (which
  tokenizing skips too) reads as ''. A file's documents after the first are named file#index."""
  for path in files:
    source = documents.DocumentSource([path], text_key)
    for i in range(len(source)):
      try:
        text = source[i]
      except documents.BadDocument:
        text = ''
      yield (path if len(source) == 1 else f'{path}#{i}'), text


def shares(train_files: Sequence[str], eval_files: Sequence[str], text_key: str = 'text',
           cache_dir: str | None = None, min_chars: int = MIN_CHARS) -> list[float]:
  """Each eval document's share of lines found in the training documents, in corpus order. With `cache_dir`,
  kept there under a key of both file lists (paths, sizes, modification times), `text_key` and `min_chars`:
  later runs on unchanged files read it instead of reading the training corpus again."""
  identity = dict(train=documents.file_identity(train_files), eval=documents.file_identity(eval_files),
                  text_key=text_key, min_chars=min_chars, version=_VERSION)
  key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:20]
  path = os.path.join(os.path.expanduser(cache_dir), f'overlap-{key}.json') if cache_dir else None
  if path and os.path.exists(path):
    return files_lib.read_json(path, 'delete it, and the next run reads the training files again')['shares']
  logging.info('data: reading %d training file(s) for the lines of %d eval file(s) (data.decontaminate)',
               len(train_files), len(eval_files))
  rows = overlap(list(read_documents(eval_files, text_key)), read_documents(train_files, text_key), min_chars)
  result = [r.share for r in rows]
  if path:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files_lib.write_json(path, dict(key=key, train_files=len(train_files), eval_files=len(eval_files),
                                    text_key=text_key, min_chars=min_chars, shares=result), indent=None)
  return result

