"""The one way to open a trained model: a training run (its workdir; the latest checkpoint or a given step) or a
Hugging Face checkpoint directory, with its model config, parameters and tokenizer, checked to belong together.

    model = pretrained.load(workdir='/tmp/qwenjax-tiny')              # parameters sharded over the local devices
    model = pretrained.load(hf='/path/to/Qwen2-0.5B', on_host=True)     # numpy arrays in host memory
    model.model_config, model.params, model.tokenizer

Sampling, evaluation and export (and every later command that reads a model) start here. A run's parameters are
read without its optimizer state (`checkpoint.restore_params`); a Hugging Face checkpoint is read slice by slice
into the devices that hold each part (`hf.from_pretrained(shardings=...)`), so neither needs one device to hold
the whole model. A LoRA run (`train.lora_rank > 0`) opens as its merged model: its base (`init_from_hf`, or the
random one of `train.seed`) with its adapters folded in (`qwenjax.lora.merge`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any

from etils import epath
import flax.linen as nn
import jax
import ml_collections

from qwenjax import checkpoint
from qwenjax import cli
from qwenjax import config as config_lib
from qwenjax import hf as hf_lib
from qwenjax import lora as lora_lib
from qwenjax import params as params_lib
from qwenjax import sharding
from qwenjax import tokenizer as tokenizer_lib
from qwenjax import train_step
from qwenjax import workdir as workdir_lib
from qwenjax.model_config import ModelConfig


@dataclasses.dataclass
class Pretrained:
  """A model ready to use and where it came from."""
  model_config: ModelConfig
  params: Any  # jax arrays placed on `mesh` by `rules`; numpy arrays with `on_host`
  tokenizer: tokenizer_lib.Tokenizer
  name: str  # the workdir or Hugging Face directory
  mesh: jax.sharding.Mesh  # with `on_host`: a mesh of the host's CPU device
  rules: sharding.Rules  # the logical axis rules, fitted to the mesh and the model
  step: int | None = None  # the checkpoint's step (a training run)
  config: ml_collections.ConfigDict | None = None  # the run's whole config (a training run)

  @property
  def seq_len(self) -> int | None:
    """The training run's data.seq_len (None for a Hugging Face checkpoint)."""
    return int(self.config.data.seq_len) if self.config is not None else None


def load(workdir: str | None = None, hf: str | None = None, *, step: int | None = None,
         mesh: jax.sharding.Mesh | None = None, rules: sharding.Rules | None = None, on_host: bool = False,
         **overrides: Any) -> Pretrained:
  """A training run's checkpoint (`workdir`, at `step` or the latest) or a Hugging Face directory (`hf`).

  Parameters are placed on `mesh` by `rules` (default: every local device on the fsdp axis, by
  `sharding.DEFAULT_RULES`), or come back as numpy arrays with `on_host` (for export, or to place them later).
  `overrides`: ModelConfig fields, e.g. `dtype` (the compute dtype; parameters keep the dtype they were saved in),
  `attention_impl` (e.g. to run a cuDNN-trained model on a CPU), `moe_capacity_factor=0.0` (dropless experts);
  None or '' keeps the saved value.

  Not exactly one of `workdir` and `hf`, or a `step` of a Hugging Face directory, is a `cli.UsageError` (a
  ValueError) before anything is read. A missing directory, a workdir without a checkpoint, and a tokenizer with ids
  past the model's embedding table are errors (FileNotFoundError, ValueError) that name the path and what to do.
  """
  if bool(workdir) == bool(hf):
    raise cli.UsageError('give one of --workdir=DIR (a training run) and --hf=DIR (a Hugging Face checkpoint '
                         'directory)' + (', not both' if workdir else ''))
  if hf and step is not None:
    raise cli.UsageError('--step picks a checkpoint of a training run (--workdir); --hf has one checkpoint')
  overrides = {k: v for k, v in overrides.items() if v is not None and v != ''}
  return _from_workdir(workdir, step, mesh, rules, on_host, overrides) if workdir else _from_hf(
      hf, mesh, rules, on_host, overrides)


def _from_workdir(workdir: str, step: int | None, mesh, rules, on_host: bool, overrides: dict) -> Pretrained:
  workdir = workdir_lib.resolve(workdir)
  if not epath.Path(workdir).is_dir():
    raise FileNotFoundError(f'--workdir={workdir}: no such directory; give the --workdir a training run wrote its '
                            'checkpoints to')
  saved = workdir_lib.saved_config(workdir)
  if saved is None or 'model' not in saved:
    if saved is not None and _is_hf(workdir):
      raise ValueError(f'{workdir} is a Hugging Face checkpoint directory, not a training run: pass --hf={workdir}')
    raise FileNotFoundError(f'no config.json of a training run in {workdir}: give the --workdir of a training run '
                            '(the directory python -m qwenjax.train wrote its checkpoints/ and config.json to)')
  config = ml_collections.ConfigDict(saved)
  where = os.path.join(workdir, 'config.json')
  try:
    model_config = ModelConfig.from_dict({**config.model.to_dict(), **overrides})
  except (ValueError, TypeError) as e:
    raise ValueError(f'{where}: model: {e}') from None
  lora = config_lib.settings(config).lora
  step, saved_params = checkpoint.saved_params(workdir, step)
  _check_fits_checkpoint(model_config, saved_params, where, f'{workdir}/checkpoints/{step}',
                         lora if lora.lora_rank else None)
  tok = workdir_lib.load_tokenizer(workdir, config)
  tokenizer_lib.check_fits(tok, model_config.vocab_size, what=f'the tokenizer of {workdir}', warn_unused=False,
                           fix='WORKDIR/tokenizer/ must be the tokenizer the run trained with: restore it from the '
                           'tokenizer the run was started with (data.tokenizer in its config.json)')
  mesh, rules, shardings = _placement(model_config, mesh, rules, on_host)
  settings = config_lib.settings(config)
  if settings.lora.lora_rank:
    params, step = _merged_lora(settings, model_config, workdir, step, mesh, rules, shardings)
  else:
    _, params, step = checkpoint.restore_params(workdir, step, shardings)
  if on_host:
    params = jax.device_get(params)
  return Pretrained(model_config, params, tok, workdir, mesh, rules, step=step, config=config)


def _merged_lora(settings: config_lib.RunConfig, model_config: ModelConfig, workdir: str, step: int | None, mesh,
                 rules, shardings) -> tuple[Any, int]:
  """(the base with the run's adapters folded in, placed in `shardings`; the checkpoint's step)."""
  lora = settings.lora
  adapter_shardings = sharding.param_shardings(lora_lib.abstract(model_config, lora), mesh, rules)
  _, adapters, step = checkpoint.restore_params(workdir, step, adapter_shardings)
  if settings.init_from_hf:
    if not os.path.isdir(settings.init_from_hf):
      raise FileNotFoundError(f'{workdir} trained LoRA adapters on the base {settings.init_from_hf}, which is not '
                              'there any more: put that Hugging Face checkpoint back to open the run')
    _, base = hf_lib.from_pretrained(settings.init_from_hf, model_config.param_dtype, shardings=shardings,
                                     scan_layers=model_config.scan_layers)
  else:
    base = train_step.random_params(model_config, shardings, jax.random.key(settings.seed))
  merge = jax.jit(functools.partial(lora_lib.merge, lora=lora), out_shardings=shardings, donate_argnums=0)
  return merge(base, adapters), step


def _from_hf(hf: str, mesh, rules, on_host: bool, overrides: dict) -> Pretrained:
  path = os.path.abspath(os.path.expanduser(hf))
  if not os.path.isdir(path):
    raise FileNotFoundError(f'--hf={hf}: no such directory; give a Hugging Face checkpoint directory (config.json, '
                            '*.safetensors and tokenizer.json)')
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    raise ValueError(f'{path} is a training run\'s workdir, not a Hugging Face checkpoint: pass --workdir={path} '
                     '(or write a Hugging Face directory from it with python -m qwenjax.export)')
  dtype = overrides.pop('dtype', None)  # hf's own `dtype` casts the parameters too: here only the compute dtype
  model_config = hf_lib.load_config(path, **overrides)
  tok = tokenizer_lib.load(path)
  tokenizer_lib.check_fits(tok, model_config.vocab_size, what=f'the tokenizer of {path}', warn_unused=False,
                           fix=f'put the checkpoint\'s own tokenizer (tokenizer.json) in {path}')
  mesh, rules, shardings = _placement(model_config, mesh, rules, on_host)
  if on_host:
    model_config, params = hf_lib.from_pretrained(path, **overrides)
  else:  # each device's blocks only, never the whole checkpoint in one place
    model_config, params = hf_lib.from_pretrained(path, shardings=shardings, **overrides)
  if dtype:
    model_config = dataclasses.replace(model_config, dtype=dtype)
  return Pretrained(model_config, params, tok, path, mesh, rules)


def _check_fits_checkpoint(model_config: ModelConfig, saved: Any, where: str, checkpoint_dir: str,
                           lora: config_lib.LoraConfig | None = None) -> None:
  """Checks a run's model config against its checkpoint's parameter shapes (`checkpoint.saved_params`; a LoRA
  run's: its adapters) before anything is built from it: first the sizes that work is proportional to (layers, the
  embedding table), then every parameter."""
  layers = [name for name in saved if re.fullmatch(r'layers_\d+', name)]
  if 'layers' in saved:  # scanned: the layers are the leading axis
    layers = range(jax.tree.leaves(saved['layers'])[0].shape[0])
  embed = getattr(saved.get('embed_tokens'), 'shape', None)
  wanted = [('num_hidden_layers', model_config.num_hidden_layers, len(layers))] if layers or not lora else []
  if embed is not None and len(embed) == 2:
    wanted += [('vocab_size', model_config.vocab_size, embed[0]), ('hidden_size', model_config.hidden_size, embed[1])]
  for name, ours, found in wanted:
    if ours != found:
      raise ValueError(f'{where} has model.{name}={ours} but the checkpoint {checkpoint_dir} holds {found}: the '
                       'config does not belong to the checkpoint')
  expected = lora_lib.abstract(model_config, lora) if lora else params_lib.abstract_params(model_config)
  checkpoint.check_shapes(saved, nn.unbox(expected), f'checkpoint {checkpoint_dir}')


def _is_hf(directory: str) -> bool:
  return any(p.name.endswith('.safetensors') for p in epath.Path(directory).iterdir())


def _placement(model_config: ModelConfig, mesh: jax.sharding.Mesh | None, rules: sharding.Rules | None,
               on_host: bool) -> tuple[jax.sharding.Mesh, sharding.Rules, Any]:
  """(mesh, rules fitted to it, the parameters' shardings): the given mesh, the host's CPU device, or every local
  device on the fsdp axis (parameters sharded, batch rows split over the devices)."""
  mesh_config = config_lib.MeshConfig()
  if on_host:
    mesh = sharding.make_mesh(mesh_config, devices=jax.local_devices(backend='cpu')[:1])
  elif mesh is None:
    mesh = sharding.make_mesh(mesh_config, devices=jax.local_devices())
  rules = sharding.logical_axis_rules(mesh_config.rules if rules is None else rules, mesh, model_config)
  return mesh, rules, train_step.param_shardings(model_config, mesh, rules)
