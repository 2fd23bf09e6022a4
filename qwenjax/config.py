"""The base training config that every file under `configs/` starts from.

A config is an `ml_collections.ConfigDict` with four sections and a few top-level keys:

* `model`: the `qwenjax.model.ModelConfig` fields (Hugging Face names).
* `data`, `train`, `mesh`: the input pipeline, the optimizer and loop, and the device mesh.
* `init_from_hf`: path of a Hugging Face checkpoint to start from ('' for random init).

Files under `configs/` call `base_config()` and override what differs, e.g. `configs/1b.py`.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from qwenjax.model import ModelConfig

# Fields whose default is None get a typed placeholder so the command line can still set them.
_OPTIONAL_TYPES = {'head_dim': int, 'sliding_window': int}


def model_section(**overrides) -> ml_collections.ConfigDict:
  """A `model` section holding every ModelConfig field, defaults first, then `overrides`."""
  values = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - set(values))
  if unknown:
    raise ValueError(f'unknown model config key(s) {unknown}; valid keys: {sorted(values)}')
  values.update(overrides)
  for name, type_ in _OPTIONAL_TYPES.items():
    if values[name] is None:
      values[name] = config_dict.placeholder(type_)
  return ml_collections.ConfigDict(values)


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = model_section()
  config.init_from_hf = ''
  return config
