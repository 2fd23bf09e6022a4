"""The compute-optimal IsoFLOP study on one GPU, set up as Porian et al. (2024) corrected Kaplan et al.'s (2020).

    PYTHONPATH=. python experiments/gpu_corpus.py /tmp/qwenjax_gpu_corpus     # the extra corpus, once a machine
    python -m qwenjax.sweep --sweep=experiments/isoflop_gpu.py --workdir=DIR    # resumes; see the plan with --emit
    python -m qwenjax.scaling fit DIR

experiments/isoflop_gpu_kaplan.py is the same study in Kaplan et al.'s setting (the ablation).

Budgets 1e15, 3e15, 1e16 and 3e16 FLOPs (a factor 30), 6 sizes each (24 points), on a ladder of width 32 s and
s / 2 layers (an aspect ratio of 64), heads of 64, MLP 3x, tied embeddings over a 4096-piece BPE, rows of 512
tokens. N goes from 0.95M to 55.9M parameters (head included; 0.43M to 53.3M without it: the largest model has
more than 50M non-embedding parameters). Each budget's sizes bracket the optimum expected at D / N ~ 20 (Hoffmann
et al.; Porian et al. find the same once corrected): from D / N of about 100-160 down to 1.5-2.5, two or three
sizes on each side, so that a parabola in log N has a minimum inside them whatever the true ratio between ~8 and
~60. `python -m qwenjax.sweep ... --emit` prints every point's N, D, D / N, steps, epochs and estimated time.

Setup, point by point (the corrections of Porian et al. 2024, section 3):
* Compute counted with the head: N is every parameter a token multiplies, the output head included, the input
  embedding left out (`counting='porian'`); C per token is 6 N plus attention's matmuls
  (`qwenjax.metrics.flops_per_token`), what the step computes, so each point spends its budget. At these sizes
  the head is 5-55% of N: leaving it out (Kaplan et al.'s N) is what Porian et al. found bends a towards 0.73.
* Warmup scaled to the model: N tokens (Porian et al.'s rule: a model's warmup need grows with its size, not with
  its run's length), at most 10% of the run (the large models of small budgets train on 1.5-5 tokens per
  parameter, where N tokens would be a third of the run or more) and at least 10 steps. A warmup proportional to
  each run (the old study's 5%) gives small models at large budgets thousands of warmup steps and large models at
  small budgets a few dozen; Kaplan et al.'s fixed long warmup eats the short runs.
* Learning rate per size, by a small sweep: the lr stage trains sizes 5, 7, 9 and 11 (N 1.8M-11.6M) at five
  rates from 2.5e-4 to 4e-3 (factors of 2) on 20 tokens per parameter (the expected optimum) and picks each
  size's best rate (a parabola in log lr); lr = k N^gamma fitted through those four gives every size its rate,
  within the grid (`qwenjax.sweep.choose_lrs`, written to DIR/lr.json). A point that trains at another batch than
  its size's lr stage point scales that rate by the square root of the batch ratio (`lr_batch_exponent`, Adam's
  square-root rule). A best rate at the grid's end is a warning in the log: extend `lr_sweep.lrs` and rerun
  (finished points are kept; the IsoFLOP points must then be retrained). The first attempt's stage
  (experiments/README.md) found every rate of 8e-3 and up far worse at every size, hence the grid.
  One rate for every size (the Kaplan setting) over-trains the small or under-trains the large models.
* AdamW beta2 = 0.99 for every point: these batches (5k-66k tokens) are small, and Porian et al. find the
  usual 0.95 costs loss at small batch sizes while 0.99 does not at larger ones.
* Batch by size: each size trains at the batch its learning rate is measured at, its lr stage batch (20 tokens
  per parameter in 4096 steps: 9 rows of 512 tokens for s4, 16 for s5, 35 for s7, 65 for s9, 110 for s11, 256 at
  most), or at fewer rows where a point's D would fill fewer than 4096 steps (`min_steps`), its rate then scaled
  down by the square root of the batch ratio. No point trains at a larger batch than its size's lr stage point, so
  none takes a rate above its size's measured best: data-rich points take more steps instead. The plan before
  (64-256 rows by size, rates scaled up too) gave the data-rich points of every budget rates of 1.08-2.7x their
  size's best (C3e15-s5: 8e-3 at 64 rows, 0.19 nats worse than 4e-3 in a rerun; results/isoflop_gpu/README.md).
  The first attempt (experiments/results/isoflop_gpu_v1) kept the batch by size and gave the large models of each
  budget 330-650 steps: their losses were still falling steeply at the end (3.58 for 18M parameters at 1e16,
  against 1.58 for 3.7M), so each IsoFLOP curve would have measured how few updates its large models got, not N
  and D.
* Cosine schedule to 10% of the peak at each point's last step; weight decay 0.1; bf16 compute, float32
  parameters; z-loss 1e-4; eval on the built-in corpus's held-out 2% of the standard library (72,232 tokens at
  the last study), the same tokens, all of them, for every point (64 eval batches cover them at 3 rows or more).

Corpus: the `.py` files of the installed packages (139,137,526 tokens at the last study) plus
experiments/gpu_corpus.py's file (the standard library's training split and the packages' other text files). No
point reads it more than 4 times (`max_epochs`); 3e16's smallest size (s10, 568M tokens) needs 142M tokens, more
than the `.py` files alone give. A 4096-piece BPE trained on it.

Order and pieces: the lr stage first, then the budgets, smallest first, each budget's sizes in order; a stopped
sweep resumes where it stopped. The lr stage's rates of one size train three at a time (`group_size = 3`: one
step vmapped over the three runs, each computing what it would alone; docs/scaling.md): a model of a few million
parameters alone leaves most of an H100 idle, and a group of size 11 still fits a piece of a fresh machine. One
compiled program per shape and group size: learning rates, warmups and lengths are inputs of the step.
`estimate` holds the GPU-time assumptions of the plan's table, set from the first attempt's pieces
(experiments/README.md). Run pieces back to back on one machine, several points at once (`WORKERS`,
experiments/sweep_workers.py).
"""

import os
import sysconfig

import ml_collections

from qwenjax import documents

CORPUS_DIR = '/tmp/qwenjax_gpu_corpus'  # where experiments/gpu_corpus.py writes the extra corpus


def corpus_globs() -> str:
  """The training files: site-packages' .py files and the extra corpus (experiments/gpu_corpus.py)."""
  return ','.join([os.path.join(sysconfig.get_paths()['purelib'], '**', '*.py'),
                   os.path.join(CORPUS_DIR, 'gpu_corpus.jsonl')])


def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.base = 'configs/tiny.py'
  _, held_out = documents.stdlib_files()
  sweep.overrides = ml_collections.ConfigDict(dict(
      model=dict(vocab_size=4096, use_sliding_window=False, max_position_embeddings=4096, tie_word_embeddings=True,
                 dtype='bfloat16', param_dtype='float32', attention_impl='auto'),
      data=dict(vocab_size=4096, seq_len=512, train_files=corpus_globs(), eval_files=','.join(held_out),
                shuffle_window=1024, read_threads=8, prepared_dir=''),  # '': DIR/prepared
      train=dict(batch_size=64, lr=3e-3, adam_b2=0.99, weight_decay=0.1, lr_schedule='cosine',
                 lr_final_fraction=0.1, log_every=50, eval_steps=64, logits_dtype='bfloat16'),
  ))
  sweep.ladder = ml_collections.ConfigDict(dict(sizes=(4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 20), width_per_size=32,
                                                depth=0, depth_per_size=0.5, head_dim=64, q_per_kv=1, mlp_ratio=3.0))
  sweep.counting = 'porian'
  sweep.budgets = (1e15, 3e15, 1e16, 3e16)
  sweep.tokens = ()
  sweep.tokens_per_param = ()
  sweep.budget_sizes = ((1e15, (4, 5, 6, 7, 8, 9)),
                        (3e15, (5, 6, 7, 8, 9, 11)),
                        (1e16, (7, 8, 9, 11, 13, 15)),
                        (3e16, (10, 11, 13, 15, 17, 20)))
  # Each size's lr stage batch, floor(20 N / (512 x 4096)) rows (at most 256), by N with the head (s4 0.95M ...
  # s20 55.9M); tests/test_sweep.py checks it against the plan.
  sweep.batch_sizes = ((1.3e6, 9), (2e6, 16), (3e6, 21), (4.1e6, 35), (5.5e6, 42), (7.5e6, 65), (9.5e6, 76),
                       (15e6, 110), (22e6, 172), (32e6, 255), (1e12, 256))
  sweep.min_steps = 4096
  sweep.lr_batch_exponent = 0.5
  sweep.warmup_fraction = 0.0
  sweep.warmup_tokens_per_param = 1.0
  sweep.warmup_tokens = 0.0
  sweep.warmup_max_fraction = 0.1
  sweep.warmup_min_steps = 10
  sweep.lr_sweep = ml_collections.ConfigDict(dict(sizes=(5, 7, 9, 11),
                                                  lrs=(2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3),
                                                  tokens_per_param=20.0))
  sweep.axes = ml_collections.ConfigDict()
  sweep.max_epochs = 4.0
  sweep.group_size = 3  # the lr stage's rates of one size, three at a time: one vmapped step
  sweep.estimate = ml_collections.ConfigDict(dict(mfu=0.2, peak_flops=989e12, compile_s=21.0, overhead_s=30.0,
                                                  step_s=0.008))
  return sweep
