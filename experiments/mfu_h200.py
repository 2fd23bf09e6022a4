"""MFU of the IsoFLOP ladder's models of 50M+ non-embedding parameters on one H200: a few steps each.

    python -m qwenjax.sweep --sweep=experiments/mfu_h200.py --workdir=DIR

The ladder rules and training settings of experiments/isoflop_h200.py, sizes 48, 56 and 64 (hidden 768, 896,
1024; 12, 14, 16 layers; 85M, 135M, 201M non-embedding parameters), 2M tokens each (61 steps of 64 x 512).
results.jsonl's `mfu` is the median over the logged windows after the first (compiling) step.
"""

import os

from qwenjax import config


def get_config():
  sweep = config.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'isoflop_h200.py'))
  sweep.ladder.sizes = (48, 56, 64)
  sweep.budgets = ()
  sweep.tokens = (2e6,)
  sweep.tokens_per_param = ()
  sweep.overrides.train.log_every = 10
  return sweep
