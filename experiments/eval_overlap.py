r"""How much of a sweep's eval set its training corpus already holds: lines of each eval document found verbatim
among the training documents.

    python experiments/eval_overlap.py --sweep=experiments/isoflop_gpu.py      # on the machine that trains it
    python experiments/eval_overlap.py --sweep=experiments/isoflop_small.py --min_chars=20

A study's eval loss should measure what its models learned, not what they memorized (`qwenjax.overlap` says
why; `data.decontaminate` leaves such eval documents out of a run). The corpus is the sweep's `data.train_files` on
this machine (the installed packages differ between machines), the eval set its `data.eval_files` (the built-in
corpus's held-out files when empty).

Per eval document: its counted lines (stripped, `--min_chars` characters or more), the share found in the corpus,
and the training document that holds most of them. The total weighs documents by their counted lines.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from qwenjax import cli
from qwenjax import documents
from qwenjax import overlap


def report(rows: list[overlap.Overlap]) -> str:
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
  flags.DEFINE_integer('min_chars', overlap.MIN_CHARS,
                       'a line counts when it has this many characters or more, stripped')


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
  text_key = data.get('text_key', 'text')
  rows = overlap.overlap(list(overlap.read_documents(held_out, text_key)), overlap.read_documents(train, text_key),
                         f.min_chars)
  print(report(rows))


if __name__ == '__main__':
  cli.run(main, _define_flags, required=('sweep',))
