"""What a training run's workdir holds besides its checkpoints: the run's config and its tokenizer.

Sampling, evaluation and export read a run through these and `checkpoint.restore_params`.
"""

from __future__ import annotations

import json
import os

from etils import epath
import ml_collections

from qwenjax import tokenizer as tokenizer_lib


def resolve(workdir: str) -> str:
  """An absolute local path, or a URL (gs://...) as given."""
  return str(workdir) if '://' in str(workdir) else os.path.abspath(os.path.expanduser(str(workdir)))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's full config, from WORKDIR/config.json (a local path or a gs:// URL)."""
  path = epath.Path(resolve(workdir)) / 'config.json'
  if not path.exists():
    raise FileNotFoundError(f'no config.json in {workdir}: give the --workdir of a training run (the directory '
                            'python -m qwenjax.train wrote its checkpoints/ and config.json to)')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_tokenizer(workdir: str, config: ml_collections.ConfigDict | None = None) -> tokenizer_lib.Tokenizer:
  """The tokenizer the run trained with: WORKDIR/tokenizer/ (read through epath, so a gs:// workdir works too),
  else WORKDIR/tokenizer.model (runs before the tokenizer directory), else the path `data.tokenizer` names."""
  workdir = resolve(workdir)
  kept = epath.Path(workdir) / 'tokenizer'
  if kept.is_dir():
    return tokenizer_lib.from_files({p.name: p.read_bytes() for p in kept.iterdir()
                                     if p.is_file() and p.name != 'source.json'})
  if os.path.isfile(os.path.join(workdir, 'tokenizer.model')):
    return tokenizer_lib.load(os.path.join(workdir, 'tokenizer.model'))
  config = config if config is not None else read_config(workdir)
  named = str(config.get('data', {}).get('tokenizer', '') or '')
  if named and named != 'train' and os.path.exists(named):
    return tokenizer_lib.load(named)
  raise FileNotFoundError(f'no tokenizer in {workdir} (tokenizer/ or tokenizer.model) and none named by its '
                          f'config (data.tokenizer={named!r}): is it the workdir of a training run?')
