"""The IsoFLOP sweep run on one H200 (experiments/README.md has its results).

    python -m qwenjax.sweep --sweep=experiments/isoflop_h200.py --workdir=DIR
    python -m qwenjax.scaling fit DIR

Corpus: the Python sources of the installed packages (site-packages: torch, transformers, jax, ...), the
built-in corpus built the same way but larger; eval on the built-in corpus's held-out 2% of the standard library.
A 4096-piece BPE trained on it. Ladder: s layers of width 64 s (head_dim 64, MHA, MLP 3x), s = 2..12, N from 0.2M
to 85M non-embedding parameters. Per budget, the sizes with 2 <= D/N <= 300 tokens per parameter.
"""

import os
import sysconfig

import ml_collections

from qwenjax import documents


def corpus_globs() -> str:
  root = sysconfig.get_paths()['purelib']
  return os.path.join(root, '**', '*.py')


def get_config():
  sweep = ml_collections.ConfigDict()
  sweep.base = 'configs/tiny.py'
  _, held_out = documents.stdlib_files()
  sweep.overrides = ml_collections.ConfigDict(dict(
      model=dict(vocab_size=4096, use_sliding_window=False, max_position_embeddings=4096, tie_word_embeddings=True,
                 dtype='bfloat16', param_dtype='float32', attention_impl='auto'),
      data=dict(vocab_size=4096, seq_len=512, train_files=corpus_globs(), eval_files=','.join(held_out),
                shuffle_window=1024, read_threads=8, prepared_dir=''),  # '': DIR/prepared
      train=dict(batch_size=64, lr=3e-3, log_every=25, eval_steps=8, logits_dtype='bfloat16'),
  ))
  sweep.ladder = ml_collections.ConfigDict(dict(sizes=(6, 8, 9, 10, 12, 13, 14, 17), width_per_size=16, depth=0,
                                                depth_per_size=0.25, head_dim=64, q_per_kv=1, mlp_ratio=3.0))
  sweep.budgets = (1e14, 3e14, 1e15)
  sweep.tokens = ()
  sweep.tokens_per_param = (4.0, 100.0)
  sweep.axes = ml_collections.ConfigDict()
  sweep.warmup_fraction = 0.05
  sweep.max_epochs = 1.0
  return sweep
