r"""Tokenize a config's corpora ahead of time: `python -m qwenjax.prepare --config=configs/tiny.py
[--config.data.train_files=...]` prepares the training and eval corpora of a config (the training job does the
same on first use, `qwenjax.corpus`) and prints where they are.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from qwenjax import cli
from qwenjax import config as config_lib
from qwenjax import corpus as corpus_lib
from qwenjax import data


def _define_flags() -> None:
  """The command line's flags (defined when it runs: importing this module adds none)."""
  config_flags.DEFINE_config_file('config', None, 'Training config file, e.g. configs/tiny.py.')


def main(argv: list[str]) -> None:
  del argv  # cli.run: no positional arguments
  run = config_lib.settings(flags.FLAGS.config)
  tokenizer = data.get_tokenizer(run.data, None, model_vocab_size=run.model.vocab_size, init_from_hf=run.init_from_hf)
  train, held_out = data.prepared_corpora(run.data, tokenizer)
  for name, corpus in (('train', train), ('eval', held_out)):
    if corpus is not None:
      print(f'{name}: {corpus.directory} ({corpus_lib.describe(corpus.meta)})')


if __name__ == '__main__':
  cli.run(main, _define_flags, required=('config',))
