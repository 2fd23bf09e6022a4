r"""How much of a sweep's eval set its training corpus already holds: lines of each eval document found verbatim
among the training documents.

    python experiments/eval_overlap.py --sweep=experiments/isoflop_gpu.py      # on the machine that trains it
    python experiments/eval_overlap.py --sweep=experiments/isoflop_small.py --min_chars=20

A study's eval loss should measure what its models learned, not what they memorized: an eval document with a
near-copy in the corpus (a vendored fork of a standard library module, a generated file with many siblings) is
predicted better the more often a point reads the corpus, so data-rich points (more epochs) gain on it more than
others, which tilts the IsoFLOP curves towards small models. The corpus is the sweep's `data.train_files` on this
machine (the installed packages differ between machines), the eval set its `data.eval_files` (the built-in
corpus's held-out files when empty).

A line counts when, stripped of surrounding whitespace, it has `--min_chars` characters or more (short lines such
as `return None` are everywhere) and occurs in some training document. Per eval document: its counted lines, the
share found in the corpus, and the training document that holds most of them. The total weighs documents by their
counted lines. One pass over the corpus, holding only the eval lines in memory.
"""

from __future__ import annotations

import collections
import dataclasses

from absl import flags
from ml_collections import config_flags

from qwenjax import cli
from qwenjax import documents


def counted_lines(text: str, min_chars: int) -> set[str]:
  """The distinct lines of a document that count (stripped, `min_chars` long or more)."""
  return {s for s in (line.strip() for line in text.splitlines()) if len(s) >= min_chars}


@dataclasses.dataclass
class Overlap:
  """One eval document's lines found in the corpus."""
  name: str
  lines: int  # counted lines
  found: int  # of them, in some training document
  nearest: str | None  # the training document holding most of them
  nearest_lines: int  # how many it holds

  @property
  def share(self) -> float:
    return self.found / self.lines if self.lines else 0.0


def overlap(eval_docs: list[tuple[str, str]], train_docs, min_chars: int = 40) -> list[Overlap]:
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


def _documents(files: list[str]):
  """(name, text) of every document of the files, readable ones only; a file's documents after the first are
  named file#index."""
  for path in files:
    source = documents.DocumentSource([path])
    for i in range(len(source)):
      try:
        text = source[i]
      except documents.BadDocument:
        continue  # not UTF-8 text: training skips it too
      yield (path if len(source) == 1 else f'{path}#{i}'), text


def report(rows: list[Overlap]) -> str:
  total = sum(r.lines for r in rows)
  lines = ['| eval document | lines | in the corpus | nearest training document (lines of it there) |',
           '| --- | --- | --- | --- |']
  for r in sorted(rows, key=lambda r: -r.share):
    lines.append(f'| {r.name} | {r.lines} | {r.share:.1%} | '
                 + (f'{r.nearest} ({r.nearest_lines})' if r.nearest else '-') + ' |')
  share = sum(r.found for r in rows) / total if total else 0.0
  lines.append(f'{len(rows)} eval documents, {total} counted lines: {share:.1%} of them in the corpus; '
               f'{sum(r.share >= 0.5 for r in rows)} document(s) half or more')
  return '\n'.join(lines)


def _define_flags() -> None:
  config_flags.DEFINE_config_file('sweep', None, 'the sweep file whose data is read, e.g. experiments/isoflop_gpu.py',
                                  lock_config=False)
  flags.DEFINE_integer('min_chars', 40, 'a line counts when it has this many characters or more, stripped')


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  if f.min_chars < 1:
    raise cli.UsageError(f'--min_chars={f.min_chars}: give 1 or more, e.g. --min_chars=40')
  data = f.sweep.overrides.get('data', {})
  train, held_out = documents.sources(data.get('train_files', ''), data.get('eval_files', ''))
  if not held_out:
    raise cli.UsageError(f'--sweep: {f.sweep.get("base", "the sweep")} has no eval files (data.eval_files) to '
                         'compare')
  print(f'{len(held_out)} eval file(s) against {len(train)} training file(s), lines of {f.min_chars}+ characters',
        flush=True)
  rows = overlap(list(_documents(held_out)), _documents(train), f.min_chars)
  print(report(rows))


if __name__ == '__main__':
  cli.run(main, _define_flags, required=('sweep',))
