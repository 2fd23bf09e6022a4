"""An IsoFLOP sweep that runs on a laptop CPU: 3 budgets x 4 sizes of configs/tiny.py on the built-in corpus.

    python -m qwenjax.sweep --sweep=experiments/isoflop_small.py --workdir=/tmp/isoflop_small
    python -m qwenjax.scaling fit /tmp/isoflop_small

Sizes s = 1..4: s layers of width 64 s (head_dim 32, 2 query heads per KV head, MLP 3x): 49k, 394k, 1.33M and
3.15M non-embedding parameters, or 115k, 525k, 1.53M and 3.41M with the tied output head (the N the fits use,
the sweep's default counting); budgets 1e12-1e13 FLOPs at 4 x 256 tokens a step: 12 points of 44 to 12,381 steps
(23,168 in all; `python -m qwenjax.sweep ... --emit` prints the plan). It shows the machinery, not a law: sizes 3
and 4 see less than one token per parameter at every budget (D / N from 0.01 to 0.65), far from the ~20 of a
compute-optimal run, so the optimum sits at the small end of the ladder or below it, and the fit's quality bar is
not expected to pass. experiments/isoflop_gpu.py is the study.
"""

import ml_collections


def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.base = 'configs/tiny.py'
  sweep.overrides = ml_collections.ConfigDict(dict(
      model=dict(vocab_size=1024, use_sliding_window=False),
      data=dict(vocab_size=1024, seq_len=256),
      train=dict(batch_size=4, lr=3e-3, log_every=50, eval_steps=8),
  ))
  sweep.ladder = ml_collections.ConfigDict(dict(sizes=(1, 2, 3, 4), width_per_size=64, depth=0, head_dim=32,
                                                q_per_kv=2, mlp_ratio=3.0))
  sweep.budgets = (1e12, 3e12, 1e13)
  sweep.tokens = ()
  sweep.tokens_per_param = ()
  sweep.axes = ml_collections.ConfigDict()
  sweep.warmup_fraction = 0.05
  sweep.max_epochs = 1.0
  return sweep
