"""experiments/eval_overlap.py: the lines of each eval document that its sweep's training corpus already holds."""

import json
import os
import subprocess
import sys

from train_utils import ROOT, experiment_module  # pylint: disable=g-bad-import-order

SCRIPT = os.path.join(ROOT, 'experiments', 'eval_overlap.py')
LONG = [f'value_{i} = compute_something_long(argument_{i}, another_argument)' for i in range(6)]


def test_overlap_counts_lines_found_and_the_nearest_training_document():
  module = experiment_module('eval_overlap.py')
  eval_docs = [('copied', '\n'.join(LONG[:4] + ['x = 1'])), ('fresh', f'  {LONG[5]}  \n'), ('empty', 'pass')]
  train_docs = [('a', '\n'.join(LONG[:3])), ('b', f'    {LONG[3]}\n{LONG[0]}'), ('c', 'x = 1')]
  rows = {r.name: r for r in module.overlap(eval_docs, iter(train_docs), min_chars=40)}
  # 'x = 1' is too short to count; indentation does not matter; each line counts once however often it is found.
  assert (rows['copied'].lines, rows['copied'].found, rows['copied'].share) == (4, 4, 1.0)
  assert (rows['copied'].nearest, rows['copied'].nearest_lines) == ('a', 3)
  assert (rows['fresh'].lines, rows['fresh'].found, rows['fresh'].nearest) == (1, 0, None)
  assert (rows['empty'].lines, rows['empty'].share) == (0, 0.0)
  assert module.overlap(eval_docs, iter(train_docs), min_chars=5)[0].lines == 5  # now 'x = 1' counts


def test_the_command_reads_the_sweeps_files(tmp_path):
  (tmp_path / 'train.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in (LONG[0], LONG[1])))
  (tmp_path / 'held.py').write_text('\n'.join(LONG[:2] + LONG[4:]))
  sweep = tmp_path / 'sweep.py'
  sweep.write_text('import ml_collections\n\ndef get_config():\n  s = ml_collections.ConfigDict()\n'
                   f'  s.overrides = ml_collections.ConfigDict(dict(data=dict(train_files="{tmp_path}/*.jsonl", '
                   f'eval_files="{tmp_path}/held.py")))\n  return s\n')
  done = subprocess.run([sys.executable, SCRIPT, f'--sweep={sweep}'], cwd=ROOT, capture_output=True, text=True,
                        check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f'| {tmp_path}/held.py | 4 | 50.0% | {tmp_path}/train.jsonl#0 (1) |' in done.stdout
  assert '1 eval documents, 4 counted lines: 50.0% of them in the corpus; 1 document(s) half or more' in done.stdout
  bad = subprocess.run([sys.executable, SCRIPT, f'--sweep={sweep}', '--min_chars=0'], cwd=ROOT, capture_output=True,
                       text=True, check=False)
  assert bad.returncode == 2 and bad.stderr.startswith('error: --min_chars=0')
