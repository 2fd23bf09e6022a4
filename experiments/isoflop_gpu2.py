"""The GPU IsoFLOP study again, with every point's learning rate tuned and an eval set free of near-copies.

    PYTHONPATH=. python experiments/gpu_corpus.py /tmp/qwenjax_gpu_corpus     # the extra corpus, once a machine
    python -m qwenjax.sweep --sweep=experiments/isoflop_gpu2.py --workdir=DIR   # resumes; --emit: the plan
    python -m qwenjax.scaling fit DIR
    bash experiments/gpu_piece.sh isoflop_gpu2 555                              # a 600-s device call's piece

experiments/isoflop_gpu.py's first study (results/isoflop_gpu) gave a = 0.33 [-0.61, 0.51], lopsided curves and
an unbracketed top budget. Two of its faults are fixed here: the rates, whose cost was measured, and the eval
set's overlap with training, whose effect was not; and two budgets gain a size. The rest (ladder, budgets and sizes,
batches, steps, warmup, counting, beta2, corpus) is the same, so the two studies differ only in these:

* **Every point at three rates.** The first study took each point's rate from its lr stage's rule,
  lr = 187 N^-0.744 (sizes 5-11 at 20 tokens per parameter), scaled by the square root of its batch over its
  size's lr-stage batch. Retrained at 1/2-4x that rate, C1e16-s13 was 0.10 nats better at 2x and C1e16-s15 0.31
  at 4x (results/isoflop_gpu_lrcheck): the batch rule had cut their rates 2-3x, and the rule is extrapolated past
  s11. Here each point trains at 1/2, 1 and 2x the rule without the batch scaling (`lr_rule`, `lr_factors`,
  `lr_batch_exponent = 0`), the three as one vmapped group, and the fit counts it at its best rate
  (`scaling.best_rates`). The quality bar fails a point whose best is the lowest or highest of the three
  (`rates_inside`): it needs a fourth. The rule's constants are the first study's lr stage's (its lr.json), so
  that stage is not rerun.
* **Eval documents without near-copies in training.** A quarter of the first study's eval text were codec files
  whose siblings are in the training split (62-90% of their lines), and multiprocessing's resource_tracker has a
  vendored copy in site-packages (`experiments/eval_overlap.py`: 31% of the eval lines on the GPU machine). The
  data-rich points read the corpus up to 3.9 times and could learn them. `data.decontaminate = 0.2` leaves out
  every eval document with a fifth or more of its lines in the training files (8 of 17 on the GPU image).
* **A size more below two minima.** The first study's 3e16 minimum was at its smallest size (s10, 1.389 against
  1.439 at s11), and both studies' 1e16 minimum is at s8 (4.5M) with one size below it (the second's: s7 1.979,
  s8 1.964, s9 1.988; a parabola through its six sizes puts N_opt at 4.6M, through its five smallest at 3.5M).
  N_opt grows by 3^a from 1e16 to 3e16, to about s9-s10 (6.9-8.0M) for a in 0.3-0.5. So 3e16 adds s9 (6.9M,
  647M tokens, 3.4 epochs; s8 would read the corpus 5.9 times) and 1e16 adds s6 (2.2M, 661M tokens, 3.5
  epochs), planned after 1e16's other sizes ran and before any 3e16 point did.
* **A fifth budget, 3e14 (sizes 3-8, 0.68-4.5M), planned after 54 runs and before any 3e14 point ran.** The
  budgets' curves flatten as they grow (1e16's rises 0.02 nats from s8 to s7 and s9), so their parabolas' vertices
  move with small noise, and the span of budgets is what pins a down. Simulated studies of the plan
  (`experiments/design_power.py --trials=12`) under the law the first 54 runs fit (approach 3 with
  `--rate_loss=parabola`, a = 0.33: results/isoflop_gpu2/fit_54runs.json) pass a's interval of 0.2 in 25% of
  studies at 0.006 nats of noise (the first study's reruns spread 0.006; median width 0.26) and in none at 0.01
  (0.40) with four budgets; with 3e14, in 50% (0.17) and 42% (0.33). Its 18 runs take about 11 minutes; size 3
  (width 96, 2 layers) is the ladder's next step down. A 1e14 budget as well would pass in 75% and 50%, but
  `min_steps` leaves its larger sizes 1-3 rows a step, so it is left out.

96 runs in 32 groups: 9.2e17 FLOPs, about 148 minutes of one H100 at `estimate` in one process (the 42 left
after piece 5: 96 minutes). The estimate is what pieces 4 and 5 measured: 45-60 s a group before its first step
(`overhead_s` + `compile_s`), 9 ms or more a step (`step_s`), and 13-16% MFU while training the groups of 3e15;
3e16's groups then take about 11 minutes each, two pieces. Run pieces back to back on one machine. Its first
three ran `WORKERS=2` (two groups at once, each started only when its estimate fits the piece); sharing the GPU,
each group took about twice as long as alone (docs/performance.md), so the rest run one process: a group the time
limit cuts checkpoints and the next piece on that machine resumes it. One process saves its checkpoint after the
limit (up to 30 s), so a 600-second device call runs a piece of 555.
"""

import os

from qwenjax import config

HERE = os.path.dirname(os.path.abspath(__file__))
# The first study's lr stage (results/isoflop_gpu/lr.json): lr = k N^gamma over sizes 5-11 at their best rates.
LR_RULE = (186.6, -0.7441)
ADDED = {1e16: (6,), 3e16: (9,)}  # a size below the minima at these budgets (the docstring)
BELOW = (3e14, (3, 4, 5, 6, 7, 8))  # a fifth budget below the others (the docstring)


def get_config():
  sweep = config.load(os.path.join(HERE, 'isoflop_gpu.py'))
  sweep.lr_sweep = {}
  sweep.lr_batch_exponent = 0.0
  sweep.lr_rule = LR_RULE
  sweep.lr_factors = (0.5, 1.0, 2.0)
  sweep.group_size = 3
  sweep.budget_sizes = (BELOW,) + tuple((b, tuple(sorted(set(sizes) | set(ADDED.get(b, ())))))
                                        for b, sizes in sweep.budget_sizes)
  sweep.budgets = (BELOW[0],) + tuple(sweep.budgets)
  sweep.ladder.sizes = tuple(sorted(set(sweep.ladder.sizes) | set(BELOW[1])))
  sweep.overrides.data.decontaminate = 0.2
  # Measured in pieces 4-5 (one process, H100): 13-16% MFU for groups of 3e15 while training (the docstring).
  sweep.estimate.mfu = 0.15
  return sweep
