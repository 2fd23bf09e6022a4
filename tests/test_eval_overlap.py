"""experiments/eval_overlap.py: the lines of each eval document that its sweep's training corpus already holds."""

import json
import os
import subprocess
import sys

from train_utils import ROOT  # pylint: disable=g-bad-import-order

SCRIPT = os.path.join(ROOT, 'experiments', 'eval_overlap.py')
LONG = [f'value_{i} = compute_something_long(argument_{i}, another_argument)' for i in range(6)]


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
