r"""How fast a GPU study ran, against issue 35's speed goals, from what its pieces committed:

    python experiments/study_speed.py --dir=experiments/results/isoflop_gpu

Reads DIR/results.jsonl (each point's FLOPs, `flops_actual`, its MFU and size) and DIR/pieces.jsonl (one line per
piece `gpu_piece.sh` ran: its seconds on the device, from before the corpus step to the end; a machine's start-up
is not in it) and prints:
* the pieces' device time against the study's FLOPs at 40% MFU of the GPU's peak (the goal: within 1.5x), and the
  MFU over all pieces;
* each point of 10M parameters or more with its MFU (the goal: 30% or more). A point's `mfu` is over its own
  training steps; run beside other workers (`WORKERS`), it shared the GPU, which lowers it.
The peak is the sweep's `estimate.peak_flops` (sweep.json): dense bf16 of the GPU the estimate was set for.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from absl import flags

from qwenjax import cli
from qwenjax import scaling

GOALS = dict(mfu=0.4, within=1.5, point_mfu=0.3, point_params=10e6)  # issue 35, "Small models at speed"


def speed(results: Sequence[dict[str, Any]], pieces: Sequence[dict[str, Any]], peak_flops: float) -> dict[str, Any]:
  """The study's speed against the goals: device seconds, FLOPs, the MFU over all pieces, how many times the
  seconds that its FLOPs take at GOALS['mfu'] the pieces took (`ratio`, the goal: GOALS['within'] or less), and the
  points of GOALS['point_params'] parameters or more with their MFU."""
  seconds = sum(float(p['seconds']) for p in pieces)
  flops = sum(float(r['flops_actual']) for r in results)
  at_goal = flops / (GOALS['mfu'] * peak_flops)
  large = sorted(({'name': r['name'], 'params': r['params'], 'mfu': r.get('mfu')} for r in results
                  if r['params'] >= GOALS['point_params']), key=lambda r: (r['params'], r['name']))
  return dict(points=len(results), pieces=len(pieces), seconds=seconds, flops=flops,
              mfu=flops / (seconds * peak_flops) if seconds else None, ratio=seconds / at_goal if at_goal else None,
              ratio_passed=bool(at_goal) and seconds <= GOALS['within'] * at_goal, large=large,
              large_passed=[r['name'] for r in large if (r['mfu'] or 0.0) >= GOALS['point_mfu']])


def report(s: dict[str, Any], peak_flops: float) -> str:
  lines = [f'{s["points"]} points in {s["pieces"]} pieces: {s["flops"]:.3g} FLOPs in {s["seconds"]:.0f} s of the '
           f'device, {100 * (s["mfu"] or 0):.1f}% MFU over the pieces (peak {peak_flops:.3g} FLOP/s)',
           f'device time / (FLOPs at {100 * GOALS["mfu"]:.0f}% MFU) = {s["ratio"] or 0:.2f} (goal: '
           f'{GOALS["within"]} or less): {"pass" if s["ratio_passed"] else "FAIL"}',
           f'points of {GOALS["point_params"] / 1e6:.0f}M parameters or more at {100 * GOALS["point_mfu"]:.0f}% MFU '
           f'or more: {len(s["large_passed"])} of {len(s["large"])}']
  lines += [f'  {r["name"]:<22} {r["params"] / 1e6:6.1f}M  {100 * (r["mfu"] or 0):5.1f}%' for r in s['large']]
  return '\n'.join(lines)


def _define_flags() -> None:
  flags.DEFINE_string('dir', None, 'a study\'s results directory (results.jsonl, pieces.jsonl, sweep.json)')


def main(argv: list[str]) -> None:
  del argv
  directory = flags.FLAGS.dir
  for name in ('results.jsonl', 'pieces.jsonl', 'sweep.json'):
    if not os.path.exists(os.path.join(directory, name)):
      raise cli.UsageError(f'--dir={directory} has no {name}: give a study\'s results directory, whose pieces ran '
                           'with experiments/gpu_piece.sh')
  with open(os.path.join(directory, 'sweep.json'), encoding='utf-8') as f:
    peak = float(json.load(f)['sweep']['estimate']['peak_flops'])
  pieces = scaling.read_jsonl(os.path.join(directory, 'pieces.jsonl'), {'seconds': (int, float)})
  s = speed(scaling.read_results(directory), pieces, peak)
  print(report(s, peak))


if __name__ == '__main__':
  cli.run(main, _define_flags, required=('dir',))
