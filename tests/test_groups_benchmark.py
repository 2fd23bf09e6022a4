"""benchmarks/groups_gpu.py on the CPU: a tiny ladder's group of two, timed back to back, as the loop issues steps
and under lax.scan, with a profile; the group's losses are each member's alone."""

import json
import os
import subprocess
import sys

import pytest

from train_utils import ROOT  # pylint: disable=g-bad-import-order

SWEEP = """import ml_collections

def get_config():
  s = ml_collections.ConfigDict()
  s.base = 'configs/tiny.py'
  s.overrides = ml_collections.ConfigDict(dict(
      model=dict(vocab_size=256, use_sliding_window=False, attention_impl='xla'),
      data=dict(vocab_size=256, seq_len=32), train=dict(batch_size=8)))
  s.ladder = ml_collections.ConfigDict(dict(sizes=(1,), width_per_size=16, depth=1, head_dim=16, q_per_kv=1,
                                            mlp_ratio=2.0))
  return s
"""


@pytest.mark.slow
def test_groups_benchmark_times_a_size_alone_and_grouped(tmp_path):
  sweep = tmp_path / 'sweep.py'
  sweep.write_text(SWEEP)
  done = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'groups_gpu.py'), f'--sweep={sweep}',
                         '--plan=1:2', '--steps_s=0.05', '--scan=2', '--profile', f'--out={tmp_path}'],
                        cwd=ROOT, capture_output=True, text=True, check=False, timeout=600)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  rows = [json.loads(line) for line in (tmp_path / 'groups_gpu.jsonl').read_text().splitlines()]
  (r,) = rows
  assert (r['size'], r['members']) == (1, 2) and 'error' not in r, r
  assert r['device_step_s'] > 0 and r['loop_step_s'] > 0 and r['scan_step_s'] > 0 and r['scan'] == 2
  assert r['gpu_busy_ms_per_step'] > 0 and r['gpu_ms_per_step_by_category'], r
  assert r['max_rel_loss_diff'] < 1e-4  # each member of the group computes what it computes alone
  assert 'size 1, K=2:' in done.stdout and '1 measurements in' in done.stdout
