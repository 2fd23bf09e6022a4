"""Does the best learning rate move with the batch as the square root? A CPU check of `lr_batch_exponent = 0.5`.

    python -m qwenjax.sweep --sweep=experiments/lr_batch_cpu.py --workdir=/tmp/lr_batch_cpu

One model (size 1 of experiments/isoflop_small.py's ladder: 1 layer of width 64, 115k parameters with its tied
head), two batches (4 and 16 rows of 128 tokens), two token budgets (0.5M and 2M) and six rates from 1e-3 to
3.2e-2: 24 points, the six rates of a batch and budget as one vmapped group. Read in pairs:
* same steps (1,024), 4x the batch and the tokens: 0.5M at 4 rows against 2M at 16 rows. The square-root rule
  says the best rate doubles; isoflop_gpu.py's points move this way from their size's lr stage point;
* same tokens (2M), 4x the batch: 4,096 steps at 4 rows against 1,024 at 16. Equal losses would say 16 rows are
  below the critical batch here, so that a point's loss depends on its tokens, not its steps.
A model of this size on the CPU is no proof for the GPU study's 1-56M models; it shows what the rule assumes.
"""

import ml_collections


def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.base = 'configs/tiny.py'
  sweep.overrides = ml_collections.ConfigDict(dict(
      model=dict(vocab_size=1024, use_sliding_window=False),
      data=dict(vocab_size=1024, seq_len=128),
      train=dict(batch_size=4, lr=3e-3, log_every=256, eval_steps=256, lr_schedule='cosine', lr_final_fraction=0.1),
  ))
  sweep.ladder = ml_collections.ConfigDict(dict(sizes=(1,), width_per_size=64, depth=1, head_dim=32, q_per_kv=2,
                                                mlp_ratio=3.0))
  sweep.tokens = (2**19, 2**21)
  sweep.budgets = ()
  sweep.tokens_per_param = ()
  sweep.axes = ml_collections.ConfigDict(dict(train=dict(batch_size=(4, 16),
                                                         lr=(1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2))))
  sweep.warmup_fraction = 0.05
  sweep.max_epochs = 1.0
  sweep.group_size = 6
  return sweep
