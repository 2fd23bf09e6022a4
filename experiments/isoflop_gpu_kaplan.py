"""The ablation: experiments/isoflop_gpu.py in Kaplan et al.'s (2020) setting, as Porian et al. (2024) reproduce it.

    PYTHONPATH=. python experiments/gpu_corpus.py /tmp/qwenjax_gpu_corpus
    python -m qwenjax.sweep --sweep=experiments/isoflop_gpu_kaplan.py --workdir=DIR
    python -m qwenjax.scaling fit DIR

The same ladder, corpus, batches and budgets as the main study, and the eval set of its second run
(isoflop_gpu2.py: documents with near-copies in training left out); three things differ, the three Porian et al.
trace Kaplan et al.'s a ~ 0.73 to:
* the head left out of compute and size (`counting='kaplan'`): N is the non-embedding parameters without the
  head, and a budget buys D = C / (6 N) tokens, attention's matmuls left out too. A point then trains longer than
  the main study's point of the same size and budget, and spends more than its budget (up to 1.9x for the
  smallest model: `flops_actual` in its result, the GPU time in the plan);
* a long warmup, the same for every point: 50M tokens (Kaplan et al.: 3000 steps for every model), at most half
  of a run;
* one learning rate and the usual AdamW beta2 (0.95) for every size and batch: no lr stage. The rate, 2e-3, is
  the grid rate with the lowest mean eval loss over the four sizes of the main study's lr stage
  (experiments/results/isoflop_gpu/lr.json: 1.822 against 1.831 at 1e-3 and 1.884 at 4e-3), the best single
  rate a Kaplan-style study could pick from the same sweep.
Kaplan's counting buys a model more tokens than the main study's (1.1-1.9x), so the same sizes would sit further
to the data-rich side, and the smallest of 1e16 and 3e16 would read the corpus more than 4 times: each budget's
sizes are the main study's shifted one to three ladder steps up (to s22, 70.9M non-embedding parameters). It has
the second study's fifth budget, 3e14 (sizes 4-9), so that both fit the same budgets. Run from the smallest
budget up, its first four budgets (a third of its FLOPs) already give an a to set beside the main
study's for the same budgets (`qwenjax.scaling.fit` of its results at those budgets).
"""

import os

from qwenjax import config


def get_config():
  sweep = config.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'isoflop_gpu.py'))
  sweep.counting = 'kaplan'
  sweep.warmup_tokens_per_param = 0.0
  sweep.warmup_tokens = 50e6
  sweep.warmup_max_fraction = 0.5
  sweep.lr_sweep = {}
  sweep.lr_batch_exponent = 0.0  # one rate at every batch
  sweep.overrides.train.lr = 2e-3
  sweep.overrides.train.adam_b2 = 0.95
  sweep.overrides.data.decontaminate = 0.2  # the eval set of isoflop_gpu2.py, the study it is compared with
  sweep.ladder.sizes = tuple(sweep.ladder.sizes) + (22,)
  sweep.budgets = (3e14,) + tuple(sweep.budgets)  # isoflop_gpu2.py's fifth budget
  sweep.budget_sizes = ((3e14, (4, 5, 6, 7, 8, 9)),
                        (1e15, (5, 6, 7, 8, 9, 11)),
                        (3e15, (6, 7, 8, 9, 11, 13)),
                        (1e16, (8, 9, 11, 13, 15, 17)),
                        (3e16, (11, 13, 15, 17, 20, 22)))
  return sweep
