"""Does the best learning rate transfer across widths? Standard parametrization against μP (qwenjax/mup.py).

    python -m qwenjax.sweep --sweep=experiments/mup_lr.py --workdir=DIR
    python -m qwenjax.scaling plot DIR --x=lr --group=width --panel=mup_base_width --out=DIR/lr.png

Widths 128, 256 and 512 at 4 layers (head_dim 64, untied embeddings, as μP needs), 10M tokens each, learning rates
1e-3 to 3e-2, with train.mup_base_width 0 (standard) and 128 (μP, exact at width 128). Same corpus and settings
as experiments/isoflop_h200.py.
"""

import os

import ml_collections

from qwenjax import config


def get_config():
  sweep = config.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'isoflop_h200.py'))
  sweep.overrides.model.tie_word_embeddings = False
  sweep.ladder.sizes = (8, 16, 32)  # width 16 x size
  sweep.ladder.depth = 4
  sweep.budgets = ()
  sweep.tokens = (1e7,)
  sweep.tokens_per_param = ()
  sweep.axes = ml_collections.ConfigDict(dict(train=dict(mup_base_width=(0, 128), lr=(1e-3, 3e-3, 1e-2, 3e-2))))
  return sweep
