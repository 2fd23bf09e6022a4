"""Reruns points of a committed sweep and compares their eval losses (`qwenjax.sweep.check`).

    python experiments/check_committed.py SWEEP_FILE COMMITTED_DIR WORKDIR NAME[,NAME...] [TOLERANCE]

e.g. `python experiments/check_committed.py experiments/isoflop_gpu.py experiments/results/isoflop_gpu /tmp/check
C1e15-s7`: trains C1e15-s7 again in /tmp/check/C1e15-s7 as the sweep file plans it (with the committed learning
rate where an lr stage chose it), prints its eval loss beside the committed one, and exits with status 1 unless
every point is within TOLERANCE (0.02) and was planned as committed. Run it from the repository's root, with the
code the study was run with: each line says which code trained the committed point and which reran it.
"""

import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's qwenjax

from qwenjax import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv: list[str]) -> int:
  if len(argv) not in (5, 6):
    sys.stderr.write(__doc__.split('\n\n')[1] + '\n')
    return 2
  spec = importlib.util.spec_from_file_location('_checked_sweep', argv[1])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  rows = sweep.check(module.get_config(), argv[3], argv[2], argv[4].split(','),
                     tolerance=float(argv[5]) if len(argv) == 6 else 0.02)
  print(sweep.check_report(rows))
  return 0 if all(r['ok'] for r in rows) else 1


if __name__ == '__main__':
  sys.exit(main(sys.argv))
