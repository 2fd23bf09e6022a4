"""What a training run's workdir holds besides its checkpoints: the run's config and its tokenizer.

The training job writes the config record (`write_config`: config.json, and the configs of earlier steps as
config.<step>.json); sampling, evaluation and export read a run through `read_config`, `load_tokenizer` and
`checkpoint.restore_params`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
from etils import epath
import ml_collections

from qwenjax import files
from qwenjax import tokenizer as tokenizer_lib


def resolve(workdir: str) -> str:
  """An absolute local path, or a URL (gs://...) as given."""
  return str(workdir) if '://' in str(workdir) else os.path.abspath(os.path.expanduser(str(workdir)))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's full config, from WORKDIR/config.json (a local path or a gs:// URL)."""
  saved = saved_config(resolve(workdir))
  if saved is None:
    raise FileNotFoundError(f'no config.json in {workdir}: give the --workdir of a training run (the directory '
                            'python -m qwenjax.train wrote its checkpoints/ and config.json to)')
  return ml_collections.ConfigDict(saved)


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


def _flat(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    return {k: v for name, value in tree.items() for k, v in _flat(value, f'{prefix}{name}.').items()}
  return {prefix[:-1]: tree}


# Settings that change how a step fits the device's memory, not what it computes (micro-batches and remat give the
# same update): a run resumed with other values, e.g. on a device of other memory where 'auto' chooses others, is
# not a changed run. (model.remat_policy: where config.json files of earlier versions kept the policy.)
MEMORY_KEYS = ('train.grad_accum_steps', 'train.remat_policy', 'train.device_memory_gib', 'model.remat_policy')


def config_changes(old: dict[str, Any], new: ml_collections.ConfigDict, *, memory: bool = False) -> list[str]:
  """`KEY: old -> new` for every setting that differs between a saved config.json and `new`; those of
  `MEMORY_KEYS` only with `memory=True`."""
  old, new = _flat(old), _flat(json.loads(new.to_json_best_effort()))
  return [f'{k}: {old.get(k, "(unset)")!r} -> {new.get(k, "(unset)")!r}' for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k) and (memory or k not in MEMORY_KEYS)]


def saved_config(workdir: str) -> dict[str, Any] | None:
  """WORKDIR/config.json as written by `write_config`, or None."""
  path = epath.Path(workdir) / 'config.json'
  return files.read_json(path, 'restore the run\'s config.json') if path.exists() else None


def write_config(workdir: str, config: ml_collections.ConfigDict, step: int) -> None:
  """Writes WORKDIR/config.json; a different earlier one is kept as config.<step>.json (the config that trained
  the steps up to `step`). Called only once a run has restored its checkpoint or started fresh."""
  path = epath.Path(workdir) / 'config.json'
  text = files.dumps(json.loads(config.to_json_best_effort()), indent=2) + '\n'  # strict JSON
  if path.exists():
    old = saved_config(workdir)
    if old == json.loads(text):  # the same settings, whatever the order of their keys
      return
    changes = config_changes(old, config)
    if changes:
      kept, n = epath.Path(workdir) / f'config.{step}.json', 1
      while kept.exists():  # changed again at the same step: keep every version
        kept, n = epath.Path(workdir) / f'config.{step}.{n}.json', n + 1
      logging.warning('config changed since step %d (the old one is kept as %s): %s', step, kept.name,
                      '; '.join(changes))
      files.write(kept, path.read_text())  # a copy: config.json stays whole until the new one replaces it
    else:  # the same run, fitted to other memory: config.json says what this one uses
      logging.info('resumed with other memory settings (the same steps): %s',
                   '; '.join(config_changes(old, config, memory=True)))
  files.write(path, text)
