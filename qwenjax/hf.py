"""Hugging Face checkpoints: load `transformers` Qwen2 and Qwen2-MoE directories into qwenjax and write them
back.

Only `config.json` and safetensors files are read or written (one file, or shards with
`model.safetensors.index.json`), so nothing needs torch. Tensors stay on the host as numpy arrays; bf16 tensors
stay bf16 (`ml_dtypes.bfloat16`) unless `dtype` asks otherwise.

Qwen2-MoE experts come in two layouts: the hub layout, one tensor per expert
(`mlp.experts.{j}.{gate,up,down}_proj.weight`, what the released checkpoints and transformers 5's default
`save_pretrained` write), and the fused layout transformers 5 keeps in memory and writes with
`save_pretrained(..., save_original_format=False)` (`mlp.experts.gate_up_proj` `[experts, 2 * mlp, embed]`,
`mlp.experts.down_proj` `[experts, embed, mlp]`). `from_pretrained` reads either; `save_pretrained` writes
the hub layout unless `expert_layout='fused'`.

On many hosts, `from_pretrained(path, shardings=...)` places each tensor straight into its sharding, and each
process reads only the blocks its own devices hold (safetensors `get_slice`, `jax.make_array_from_callback`):
no host ever holds the whole checkpoint. docs/multihost.md has the memory this takes.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import math
import os
import re
from typing import Any, Callable, Sequence

from flax import traverse_util
import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from qwenjax import files
from qwenjax.model_config import ROPE_TYPES, ModelConfig, RopeScaling
from qwenjax.params import abstract_params, stack_layers, unstack_layers

SUPPORTED_ARCHITECTURES = ('Qwen2ForCausalLM', 'Qwen2MoeForCausalLM')
_MODEL_TYPES = ('qwen2', 'qwen2_moe')
EXPERT_LAYOUTS = ('hub', 'fused')
_INDEX = 'model.safetensors.index.json'
_SINGLE = 'model.safetensors'
# Tensors a checkpoint may hold that the model does not use.
_IGNORED = re.compile(r'.*rotary_emb\.inv_freq$')

# ---------------------------------------------------------------------------------------------------------
# Config.

_SHARED_FIELDS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
                  'num_key_value_heads', 'head_dim', 'max_position_embeddings', 'rms_norm_eps',
                  'initializer_range', 'tie_word_embeddings', 'max_window_layers')
_MOE_FIELDS = ('num_experts', 'num_experts_per_tok', 'moe_intermediate_size', 'shared_expert_intermediate_size',
               'norm_topk_prob', 'decoder_sparse_step', 'mlp_only_layers', 'router_aux_loss_coef',
               'output_router_logits')


def config_from_hf(hf: dict[str, Any], **overrides) -> ModelConfig:
  """ModelConfig from a parsed `config.json`, accepting what transformers 4 and 5 both write."""
  if not isinstance(hf, dict):
    raise ValueError(f'config.json must hold a JSON object, not a {type(hf).__name__}')
  for key, kind in (('architectures', list), ('layer_types', list), ('mlp_only_layers', list),
                    ('rope_parameters', dict), ('rope_scaling', dict)):
    if hf.get(key) is not None and not isinstance(hf[key], (kind, tuple) if kind is list else kind):
      raise ValueError(f'{key} must be a JSON {"array" if kind is list else "object"}, got {hf[key]!r}')
  if not all(isinstance(a, str) for a in hf.get('architectures') or []):
    raise ValueError(f'architectures must be a list of names, got {hf["architectures"]!r}')
  architectures = hf.get('architectures') or []
  if hf.get('model_type') not in _MODEL_TYPES and not set(architectures) & set(SUPPORTED_ARCHITECTURES):
    raise ValueError(f'unsupported checkpoint: model_type={hf.get("model_type")!r}, architectures={architectures}; '
                     f'qwenjax.hf reads {SUPPORTED_ARCHITECTURES}')
  values = {k: hf[k] for k in _SHARED_FIELDS if hf.get(k) is not None}
  is_moe = hf.get('model_type') == 'qwen2_moe' or 'Qwen2MoeForCausalLM' in architectures
  if is_moe:
    values.update({k: hf[k] for k in _MOE_FIELDS if hf.get(k) is not None})
    values['mlp_only_layers'] = tuple(hf.get('mlp_only_layers') or ())
    if not hf.get('qkv_bias', True):
      raise ValueError('unsupported Qwen2-MoE checkpoint: qkv_bias=False (qwenjax always has q/k/v biases)')
    if not values.get('num_experts'):
      raise ValueError('Qwen2-MoE checkpoint with num_experts=0; qwenjax expects num_experts > 0')
  if hf.get('hidden_act', 'silu') != 'silu':
    raise ValueError(f'unsupported hidden_act {hf["hidden_act"]!r}: qwenjax implements SwiGLU (silu) only')
  values['rope_scaling'] = _rope_scaling(hf)
  theta = (hf.get('rope_parameters') or {}).get('rope_theta', hf.get('rope_theta'))
  values['rope_theta'] = float(theta) if theta is not None else 10_000.0  # transformers' Qwen2 default

  # Sliding window: transformers 5 stores per-layer `layer_types`; older files only use_sliding_window and
  # max_window_layers. A null or 0 window means no window.
  window = hf.get('sliding_window') or None
  use_window = bool(hf.get('use_sliding_window', False)) and window is not None
  layer_types = hf.get('layer_types')
  if is_moe and use_window and not layer_types:
    raise ValueError('Qwen2-MoE config with use_sliding_window=True but no layer_types: transformers derives an '
                     'alternating window pattern qwenjax does not implement')
  if layer_types:
    sliding = [t == 'sliding_attention' for t in layer_types]
    if any(sliding):
      first = sliding.index(True)
      if not all(sliding[first:]) or window is None:
        raise ValueError(f'unsupported layer_types {layer_types} (sliding_window={window}): qwenjax supports '
                         'full attention below max_window_layers and sliding windows from there up')
      use_window, values['max_window_layers'] = True, first
    else:
      use_window = False
  values['use_sliding_window'] = use_window
  if window is not None:
    values['sliding_window'] = window  # ModelConfig checks its type
  values.update(overrides)
  return ModelConfig(**values)


def _rope_scaling(hf: dict[str, Any]) -> RopeScaling:
  """The rotary scaling of a config.json as transformers reads it: `rope_scaling` (transformers 4, and what
  Qwen2's long-context checkpoints add) over `rope_parameters` (transformers 5); yarn's pretraining context
  defaults to max_position_embeddings."""
  entry = hf.get('rope_scaling') or {}
  if not isinstance(entry, dict) or (entry.get('rope_type', entry.get('type')) or 'default') == 'default':
    entry = hf.get('rope_parameters') or {}
  if not isinstance(entry, dict):
    raise ValueError(f'rope_parameters / rope_scaling must be a JSON object, got {entry!r}')
  rope_type = entry.get('rope_type', entry.get('type')) or 'default'
  if rope_type not in ROPE_TYPES:
    raise ValueError(f'unsupported rope type {rope_type!r} ({entry}): qwenjax implements {", ".join(ROPE_TYPES)}')
  if rope_type == 'yarn' and not entry.get('original_max_position_embeddings'):
    entry = dict(entry, original_max_position_embeddings=hf.get('max_position_embeddings'))
  return RopeScaling.from_hf(entry, hf.get('max_position_embeddings') or 0)


def config_to_hf(config: ModelConfig, torch_dtype: str) -> dict[str, Any]:
  """A `config.json` dict that transformers 4.4x and 5 both read as the same model."""
  out = {k: getattr(config, k) for k in _SHARED_FIELDS}
  layer_types = ['sliding_attention' if config.is_sliding(i) else 'full_attention'
                 for i in range(config.num_hidden_layers)]
  if config.num_experts:
    out.update({k: getattr(config, k) for k in _MOE_FIELDS}, mlp_only_layers=list(config.mlp_only_layers),
               qkv_bias=True, architectures=['Qwen2MoeForCausalLM'], model_type='qwen2_moe')
  else:
    out.update(architectures=['Qwen2ForCausalLM'], model_type='qwen2')
  out.update(
      hidden_act='silu', attention_dropout=0.0,
      rope_theta=config.rope_theta, rope_parameters=config.rope_scaling.to_hf(config.rope_theta),
      use_sliding_window=config.use_sliding_window,
      sliding_window=config.sliding_window if config.use_sliding_window else None,
      layer_types=layer_types, torch_dtype=torch_dtype, dtype=torch_dtype, use_cache=True)
  if config.rope_scaling.rope_type != 'default':  # transformers 4 reads the scaling from here
    out['rope_scaling'] = {k: v for k, v in out['rope_parameters'].items() if k != 'rope_theta'}
  return out


# ---------------------------------------------------------------------------------------------------------
# Tensor names and layouts. Each rule: (HF name, our path in an unscanned tree, layout). A path ending in an
# int j names slice j of our tensor's leading axis (one expert of a stacked tensor).

@dataclasses.dataclass(frozen=True)
class Layout:
  """How one Hugging Face tensor becomes one of ours: transposed or not (torch's Linear is [out, in], our
  kernels [in, *out]), then each axis split into a group of our axes (heads * head_dim -> heads, head_dim).

  `groups` lists our axes' sizes grouped by the (transposed) HF axis they come from, so a block of ours maps
  to a block of the HF tensor: what lets a process read only the slices its devices hold.
  """
  groups: tuple[tuple[int, ...], ...]
  transpose: bool = False

  @property
  def shape(self) -> tuple[int, ...]:
    return sum(self.groups, ())

  def to_ours(self, w: np.ndarray) -> np.ndarray:
    return (w.T if self.transpose else w).reshape(self.shape)

  def to_hf(self, k: np.ndarray) -> np.ndarray:
    flat = k.reshape(tuple(math.prod(g) for g in self.groups))
    return flat.T if self.transpose else flat

  def read_block(self, read: Callable[[tuple[slice, ...]], np.ndarray], index: tuple[slice, ...]) -> np.ndarray:
    """Our block `index` (one unit-step slice per axis of `shape`), reading only the HF rows and columns it
    covers: for each group, the range of its outer axis (times the inner axes' sizes, which are read whole
    and cut afterwards; no rule shards an inner axis such as head_dim). Returns a view of what was read."""
    hf_index, dims, cut, axis = [], [], [], 0
    for group in self.groups:
      slices = index[axis:axis + len(group)]
      axis += len(group)
      start, stop, step = slices[0].indices(group[0])
      if step != 1:
        raise ValueError(f'cannot read a strided block {index} of a Hugging Face tensor')
      inner = math.prod(group[1:])
      hf_index.append(slice(start * inner, stop * inner))
      dims.append([stop - start, *group[1:]])
      cut += [slice(None), *slices[1:]]
    if not self.transpose:
      return read(tuple(hf_index)).reshape(sum(dims, []))[tuple(cut)]
    # The HF block holds the groups in reverse order: split its axes, then put the groups back in ours.
    w = read(tuple(hf_index[::-1])).reshape(sum(dims[::-1], []))
    starts = np.cumsum([0] + [len(d) for d in dims[::-1]])
    order = [a for g in reversed(range(len(dims))) for a in range(starts[g], starts[g + 1])]
    return w.transpose(order)[tuple(cut)]


def _tensor_rules(config: ModelConfig) -> list[tuple[str, tuple[str, ...], Layout]]:
  e, h, kv, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim

  def linear(*shape):  # torch Linear weight [out, in] <-> our kernel [in, *out]
    return Layout(((shape[0],), shape[1:]), transpose=True)

  def out_linear(*shape):  # o_proj: torch [embed, heads*head_dim] <-> ours [heads, head_dim, embed]
    return Layout((shape[:-1], shape[-1:]), transpose=True)

  def same(*shape):
    return Layout(tuple((n,) for n in shape))

  rules = [('model.embed_tokens.weight', ('embed_tokens',), same(config.vocab_size, e)),
           ('model.norm.weight', ('norm', 'scale'), same(e))]
  if not config.tie_word_embeddings:
    rules.append(('lm_head.weight', ('lm_head',), linear(e, config.vocab_size)))
  for i in range(config.num_hidden_layers):
    hf, ours = f'model.layers.{i}.', (f'layers_{i}',)
    rules += [
        (hf + 'input_layernorm.weight', ours + ('input_layernorm', 'scale'), same(e)),
        (hf + 'post_attention_layernorm.weight', ours + ('post_attention_layernorm', 'scale'), same(e)),
        (hf + 'self_attn.q_proj.weight', ours + ('self_attn', 'q_proj', 'kernel'), linear(e, h, d)),
        (hf + 'self_attn.q_proj.bias', ours + ('self_attn', 'q_proj', 'bias'), Layout(((h, d),))),
        (hf + 'self_attn.k_proj.weight', ours + ('self_attn', 'k_proj', 'kernel'), linear(e, kv, d)),
        (hf + 'self_attn.k_proj.bias', ours + ('self_attn', 'k_proj', 'bias'), Layout(((kv, d),))),
        (hf + 'self_attn.v_proj.weight', ours + ('self_attn', 'v_proj', 'kernel'), linear(e, kv, d)),
        (hf + 'self_attn.v_proj.bias', ours + ('self_attn', 'v_proj', 'bias'), Layout(((kv, d),))),
        (hf + 'self_attn.o_proj.weight', ours + ('self_attn', 'o_proj', 'kernel'), out_linear(h, d, e)),
    ]
    if config.is_moe(i):
      rules += _moe_rules(config, hf + 'mlp.', ours + ('mlp',), linear)
    else:
      rules += _mlp_rules(config.intermediate_size, hf + 'mlp.', ours + ('mlp',), linear, e)
  return rules


def _mlp_rules(size, hf, ours, linear, e):
  return [(hf + 'gate_proj.weight', ours + ('gate_proj', 'kernel'), linear(e, size)),
          (hf + 'up_proj.weight', ours + ('up_proj', 'kernel'), linear(e, size)),
          (hf + 'down_proj.weight', ours + ('down_proj', 'kernel'), linear(size, e))]


def _moe_rules(config: ModelConfig, hf: str, ours: tuple[str, ...], linear) -> list:
  """A Qwen2MoeSparseMoeBlock in the hub layout: router, one tensor per expert, shared expert and its gate."""
  e, size = config.hidden_size, config.moe_intermediate_size
  rules = [(hf + 'gate.weight', ours + ('gate', 'kernel'), linear(e, config.num_experts))]
  for j in range(config.num_experts):
    rules += [(hf + f'experts.{j}.gate_proj.weight', ours + ('experts', 'gate_proj', j), linear(e, size)),
              (hf + f'experts.{j}.up_proj.weight', ours + ('experts', 'up_proj', j), linear(e, size)),
              (hf + f'experts.{j}.down_proj.weight', ours + ('experts', 'down_proj', j), linear(size, e))]
  if config.shared_expert_intermediate_size:  # else a zero-width one: _empty_shared_experts
    rules += _mlp_rules(config.shared_expert_intermediate_size, hf + 'shared_expert.', ours + ('shared_expert',),
                        linear, e)
    rules.append((hf + 'shared_expert_gate.weight', ours + ('shared_expert_gate', 'kernel'), linear(e, 1)))
  return rules


def _empty_shared_experts(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Hugging Face's Qwen2-MoE block always has a shared expert; with shared_expert_intermediate_size=0 it is
  zero wide and adds 0, which is our block without one. Its tensors (empty, and a gate that multiplies 0) are
  read past and written as zeros."""
  if not config.num_experts or config.shared_expert_intermediate_size:
    return {}
  e, shapes = config.hidden_size, {}
  for i in range(config.num_hidden_layers):
    if config.is_moe(i):
      hf = f'model.layers.{i}.mlp.'
      shapes.update({hf + 'shared_expert.gate_proj.weight': (0, e), hf + 'shared_expert.up_proj.weight': (0, e),
                     hf + 'shared_expert.down_proj.weight': (e, 0), hf + 'shared_expert_gate.weight': (1, e)})
  return shapes


def _lookup(flat: dict, path: tuple):
  """Our tensor (or its slice, for a path ending in an int) in a flat tree; None if absent."""
  if isinstance(path[-1], int):
    stacked = flat.get(path[:-1])
    return None if stacked is None else stacked[path[-1]]
  return flat.get(path)


def _stack_slices(flat: dict) -> dict:
  """Folds entries whose path ends in an int (per-expert slices) into one stacked tensor per path."""
  out, slices = {}, {}
  for path, value in flat.items():
    if isinstance(path[-1], int):
      slices.setdefault(path[:-1], {})[path[-1]] = value
    else:
      out[path] = value
  for path, parts in slices.items():
    out[path] = np.stack([parts[j] for j in range(len(parts))])
  return out


_FUSED = re.compile(r'^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$')


def _unfuse_experts(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Fused-layout expert tensors -> the hub layout's per-expert tensors; other tensors pass through."""
  out = {}
  for name, tensor in tensors.items():
    match = _FUSED.match(name)
    if not match:
      out[name] = tensor
      continue
    prefix, kind = match.groups()
    for j in range(tensor.shape[0]):
      if kind == 'down_proj':
        out[f'{prefix}.{j}.down_proj.weight'] = tensor[j]
      else:
        gate, up = np.split(tensor[j], 2, axis=0)
        out[f'{prefix}.{j}.gate_proj.weight'], out[f'{prefix}.{j}.up_proj.weight'] = gate, up
  return out


def _fuse_experts(tensors: dict[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
  """Hub-layout per-expert tensors -> transformers 5's fused `gate_up_proj` / `down_proj`."""
  out = dict(tensors)
  for i in range(config.num_hidden_layers):
    if not config.is_moe(i):
      continue
    prefix = f'model.layers.{i}.mlp.experts'
    parts = {kind: [out.pop(f'{prefix}.{j}.{kind}.weight') for j in range(config.num_experts)]
             for kind in ('gate_proj', 'up_proj', 'down_proj')}
    out[f'{prefix}.gate_up_proj'] = np.stack(
        [np.concatenate([g, u], axis=0) for g, u in zip(parts['gate_proj'], parts['up_proj'])])
    out[f'{prefix}.down_proj'] = np.stack(parts['down_proj'])
  return out


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """The tensor shapes a Hugging Face checkpoint of this config must have."""
  flat = traverse_util.flatten_dict(nn.unbox(abstract_params(dataclasses.replace(config, scan_layers=False))))

  def shape(path, to_hf):
    if isinstance(path[-1], int):
      return jax.eval_shape(lambda x: to_hf(x[path[-1]]), flat[path[:-1]]).shape
    return jax.eval_shape(to_hf, flat[path]).shape

  return {name: shape(path, layout.to_hf) for name, path, layout in _tensor_rules(config)}


# ---------------------------------------------------------------------------------------------------------
# Reading and writing.

def _member(directory: str, name: Any, named_by: str) -> str:
  """The path of the file `name` of a checkpoint directory; a ValueError when it would leave the directory (an
  absolute path, a `..`, a link to a file elsewhere): nothing outside a checkpoint is opened on its say. The links
  of a Hugging Face hub snapshot (`snapshots/<revision>/FILE` -> `../../blobs/<hash>`) stay inside its repository
  and are followed."""
  if (not isinstance(name, str) or not name.strip() or os.path.isabs(name) or '\0' in name
      or '..' in re.split(r'[\\/]', name)):
    raise ValueError(f'{named_by} names the file {name!r}, which is not in the checkpoint directory {directory}: '
                     'refused (a checkpoint names only files inside its own directory)')
  full = os.path.join(directory, name)
  root, real = os.path.realpath(directory), os.path.realpath(full)
  inside = [root]
  if os.path.basename(os.path.dirname(root)) == 'snapshots':  # the hub cache's layout
    inside.append(os.path.join(os.path.dirname(os.path.dirname(root)), 'blobs'))
  if not any(os.path.commonpath([real, allowed]) == allowed for allowed in inside):
    raise ValueError(f'{full} (named by {named_by}) is a link to {real}, outside the checkpoint directory: refused '
                     '(a checkpoint names only files inside its own directory)')
  return full


def _files(path: str) -> list[str]:
  """The safetensors files of a checkpoint directory: the shards its index names, or the single file. Each is a
  name inside the directory (`_member`)."""
  index = os.path.join(path, _INDEX)
  if os.path.exists(index):
    weight_map = files.read_json(_member(path, _INDEX, 'the checkpoint'), 'it must be the index transformers '
                                 'writes beside sharded safetensors').get('weight_map')
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f'{index} has no "weight_map" of tensor names to files')
    names = sorted({name if isinstance(name, str) else repr(name) for name in weight_map.values()})
    for name in names:
      _member(path, name, index)
    return names
  if os.path.exists(os.path.join(path, _SINGLE)):
    _member(path, _SINGLE, 'the checkpoint')
    return [_SINGLE]
  raise FileNotFoundError(f'no {_SINGLE} or {_INDEX} in {path}: is it a transformers checkpoint directory '
                          '(saved with safe_serialization=True)?')


def _unreadable(file: str, error: Exception) -> ValueError:
  """The one error for a safetensors file that safetensors cannot read (a header cut short, or claiming more
  bytes than the file has): safetensors raises a bare Exception subclass."""
  text = ' '.join(str(error).split())[:300]
  return ValueError(f'{file} is not a readable safetensors file ({type(error).__name__}: {text}): the checkpoint is '
                    'damaged or was not copied whole; download or copy it again')


def _read_tensors(path: str) -> dict[str, np.ndarray]:
  tensors = {}
  for name in _files(path):
    file = os.path.join(path, name)
    try:
      tensors.update(load_file(file))
    except Exception as e:  # pylint: disable=broad-except
      raise _unreadable(file, e) from None
  return tensors


def _read_hf_config(path: str) -> dict[str, Any]:
  config_path = os.path.join(path, 'config.json')
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'no config.json in {path}: expected a transformers checkpoint directory')
  return files.read_json(_member(path, 'config.json', 'the checkpoint'), 'it must be the config.json transformers '
                         'writes')


_LAYER = re.compile(r'^model\.layers\.(\d+)\.')
_EXPERT = re.compile(r'^model\.layers\.\d+\.mlp\.experts\.(\d+)\.')


def _check_sizes(path: str, hf_config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
  """The sizes of config.json that loading does work in proportion to (layers, experts, the embedding table),
  checked against the tensors the safetensors headers list, before anything is built from them: a config.json
  claiming 10**9 layers, or a size of the wrong type, is one error naming the file and the field."""
  where = os.path.join(path, 'config.json')
  if not isinstance(hf_config, dict):
    raise ValueError(f'{where} must hold a JSON object, not a {type(hf_config).__name__}')

  def size(name: str, low: int = 1) -> int | None:
    value = hf_config.get(name)
    if isinstance(value, float) and value.is_integer():
      value = int(value)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
      raise ValueError(f'{where}: {name} must be an integer >= {low}, got {value!r} ({type(value).__name__})')
    return value

  def differs(name: str, value: int | None, found: int, what: str) -> None:
    if value is not None and value != found:
      raise ValueError(f'{where} has {name}={value} but its safetensors files hold {what}: the config does not '
                       'belong to these weights')

  layers = {int(m.group(1)) for name in shapes if (m := _LAYER.match(name))}
  count = max(layers) + 1 if layers else 0
  differs('num_hidden_layers', size('num_hidden_layers'), count,
          f'{count} layers (model.layers.0. to model.layers.{count - 1}.)' if count else 'no layers')
  embed = shapes.get('model.embed_tokens.weight')
  vocab, hidden = size('vocab_size'), size('hidden_size')
  if embed is not None and len(embed) == 2:
    differs('vocab_size', vocab, embed[0], f'an embedding table (model.embed_tokens.weight) of {embed[0]} rows')
    differs('hidden_size', hidden, embed[1], f'an embedding table (model.embed_tokens.weight) {embed[1]} wide')
  experts = {int(m.group(1)) for name in shapes if (m := _EXPERT.match(name))}
  num_experts = size('num_experts', low=0)
  if experts or num_experts:
    differs('num_experts', num_experts, max(experts, default=-1) + 1, f'{max(experts, default=-1) + 1} experts a layer')
  for name in ('intermediate_size', 'num_attention_heads', 'num_key_value_heads', 'head_dim',
               'max_position_embeddings', 'moe_intermediate_size', 'shared_expert_intermediate_size'):
    size(name, low=0 if name == 'shared_expert_intermediate_size' else 1)


def _make_config(path: str, hf_config: dict, shapes: dict[str, tuple[int, ...]], stored_dtypes: set[str],
                 dtype: str | None, overrides: dict) -> ModelConfig:
  """The ModelConfig of a checkpoint, from its config.json checked against its tensors' shapes (`_check_sizes`)
  first; any problem is one ValueError naming config.json."""
  _check_sizes(path, hf_config, shapes)
  param_dtype = dtype or (stored_dtypes.pop() if len(stored_dtypes) == 1 else 'float32')
  try:
    return config_from_hf(hf_config, **{'param_dtype': param_dtype, 'dtype': dtype or 'float32', **overrides})
  except (ValueError, TypeError) as e:  # a value of the wrong kind or range
    raise ValueError(f'{os.path.join(path, "config.json")}: {e}') from None


def _check_finite(where: str, tensor: np.ndarray) -> None:
  """A ValueError when a tensor holds NaN or infinity (a damaged file, or weights saved from a diverged model):
  such a model would only ever produce garbage."""
  flat = tensor.reshape(-1)
  step = 1 << 24  # elements at a time: a bounded temporary
  bad = sum(int(np.count_nonzero(~np.isfinite(flat[i:i + step]))) for i in range(0, flat.size, step))
  if bad:
    raise ValueError(f'{where} holds {bad:,} NaN or infinite value(s) of {flat.size:,}: the checkpoint is damaged, or '
                     'was saved from a model that diverged; it is not loaded')


def _check_tensors(path: str, config: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
  """Named errors for tensors the config needs but the checkpoint lacks, extra tensors, and wrong shapes."""
  rules = _tensor_rules(config)
  missing = [name for name, *_ in rules if name not in shapes]
  if missing:
    raise ValueError(f'checkpoint {path} lacks {len(missing)} tensor(s) the config needs: {missing[:8]}'
                     f'{" ..." if len(missing) > 8 else ""}')
  empty = _empty_shared_experts(config)
  known = {name for name, *_ in rules} | set(empty) | ({'lm_head.weight'} if config.tie_word_embeddings else set())
  unexpected = sorted(n for n in shapes if n not in known and not _IGNORED.match(n))
  if unexpected:
    raise ValueError(f'checkpoint {path} has tensor(s) a Qwen2 model of this config does not: {unexpected[:8]}')
  for name, shape in {**hf_tensor_shapes(config), **{n: s for n, s in empty.items() if n in shapes}}.items():
    if tuple(shapes[name]) != shape:
      raise ValueError(f'tensor {name} has shape {tuple(shapes[name])} but config.json implies {shape}')


def from_pretrained(path: str, dtype: str | None = None, *, shardings: Any = None,
                    **config_overrides) -> tuple[ModelConfig, dict]:
  """Loads a Hugging Face Qwen2 checkpoint directory.

  Args:
    path: a directory with `config.json` and `model.safetensors` (or shards plus their index).
    dtype: cast parameters to this dtype and compute in it (e.g. 'bfloat16'). None keeps the stored parameter
      dtype and computes in float32.
    shardings: None, or a tree of `jax.sharding.NamedSharding` matching the params of the returned config
      (build it from `load_config(path, ...)`, e.g. with `sharding.param_shardings`). Then each process reads
      only the slices of each tensor its own devices hold, never a whole checkpoint: the way to load on many
      hosts, or anything large on one.
    **config_overrides: ModelConfig fields to set on the returned config (e.g. scan_layers=True).

  Returns:
    (config, params): params are host numpy arrays in the layout `config.scan_layers` selects, or, with
    `shardings`, `jax.Array`s placed in them.
  """
  if shardings is not None:
    return _load_sharded(path, dtype, shardings, config_overrides)
  hf_config = _read_hf_config(path)
  sources = _sources(path)  # the headers alone: no tensor is read before the config is checked against them
  shapes = {name: s.shape for name, s in sources.items()}
  config = _make_config(path, hf_config, shapes, {s.dtype for s in sources.values()}, dtype, config_overrides)
  _check_tensors(path, config, shapes)
  tensors = _unfuse_experts(_read_tensors(path))

  np_dtype = np.dtype(ml_dtypes.bfloat16) if config.param_dtype == 'bfloat16' else np.dtype(config.param_dtype)
  flat = {}
  for name, ours, layout in _tensor_rules(config):
    _check_finite(f'tensor {name} of {path}', tensors[name])
    flat[ours] = np.ascontiguousarray(layout.to_ours(tensors[name])).astype(np_dtype, copy=False)
  params = traverse_util.unflatten_dict(_stack_slices(flat))
  if config.scan_layers:
    params = stack_layers(params, config.num_hidden_layers)
  return config, params


# ---------------------------------------------------------------------------------------------------------
# Loading slice by slice.

# safetensors dtype names -> numpy's.
_SAFETENSORS_DTYPES = {'BF16': 'bfloat16', 'F16': 'float16', 'F32': 'float32', 'F64': 'float64', 'I8': 'int8',
                       'I16': 'int16', 'I32': 'int32', 'I64': 'int64', 'U8': 'uint8', 'BOOL': 'bool'}


@dataclasses.dataclass(frozen=True)
class TensorSource:
  """Where one hub-layout tensor lives: `tensor[lead][offset:offset + rows]` of a file (lead and offset pick
  one expert's gate or up projection out of a fused `gate_up_proj`)."""
  file: str
  tensor: str
  shape: tuple[int, ...]
  dtype: str
  lead: tuple[int, ...] = ()
  offset: int = 0


def _sources(path: str) -> dict[str, TensorSource]:
  """Every tensor of a checkpoint by its hub-layout name, from the files' headers only (no tensor is read)."""
  sources = {}
  for file in _files(path):
    try:
      with safe_open(os.path.join(path, file), 'numpy') as f:
        headers = [(name, tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()]
    except Exception as e:  # pylint: disable=broad-except  (safetensors raises a bare Exception subclass)
      raise _unreadable(os.path.join(path, file), e) from None
    for name, shape, dtype in headers:
      dtype = _SAFETENSORS_DTYPES.get(dtype, dtype)
      match = _FUSED.match(name)
      if not match:
        sources[name] = TensorSource(file, name, shape, dtype)
        continue
      prefix, kind = match.groups()
      for j in range(shape[0]):
        if kind == 'down_proj':
          sources[f'{prefix}.{j}.down_proj.weight'] = TensorSource(file, name, shape[1:], dtype, (j,))
        else:
          half = (shape[1] // 2, *shape[2:])
          sources[f'{prefix}.{j}.gate_proj.weight'] = TensorSource(file, name, half, dtype, (j,))
          sources[f'{prefix}.{j}.up_proj.weight'] = TensorSource(file, name, half, dtype, (j,), half[0])
  return sources


def load_config(path: str, dtype: str | None = None, **config_overrides) -> ModelConfig:
  """The config `from_pretrained(path, dtype, **config_overrides)` returns, read from `config.json` and the
  safetensors headers alone: what to build `shardings` from before loading."""
  hf_config = _read_hf_config(path)
  sources = _sources(path)
  return _make_config(path, hf_config, {name: s.shape for name, s in sources.items()},
                      {s.dtype for s in sources.values()}, dtype, config_overrides)


def read_slice(file: str, source: TensorSource, index: tuple[slice, ...]) -> np.ndarray:
  """`index` of one hub-layout tensor: only those bytes are copied out of the file.

  The file is opened (memory-mapped) for this read alone, so the pages a strided read touches are unmapped
  right after it and do not add up in the process's resident memory over a whole load.
  """
  first, *rest = index
  first = slice(first.start + source.offset, first.stop + source.offset)
  lead = tuple(slice(i, i + 1) for i in source.lead)
  with safe_open(file, 'numpy') as f:
    block = f.get_slice(source.tensor)[(*lead, first, *rest)]
  return block.reshape(block.shape[len(lead):])


def _aligned_empty(shape: Sequence[int], dtype: np.dtype, alignment: int = 64) -> np.ndarray:
  """`np.empty` whose data starts on a 64-byte boundary: jax's CPU client then adopts the buffer as the
  device array instead of copying it, so a block is never held twice (on accelerators it is copied anyway)."""
  nbytes = math.prod(shape) * np.dtype(dtype).itemsize
  buffer = np.empty(nbytes + alignment, np.uint8)
  offset = -buffer.ctypes.data % alignment
  return buffer[offset:offset + nbytes].view(dtype).reshape(shape)


def _leaves(config: ModelConfig) -> dict[tuple[str, ...], dict[tuple[int, ...], tuple[str, Layout]]]:
  """For each leaf of the params tree: its HF tensors, keyed by the leaf's stacked indices (layer when
  scanned, expert for routed experts)."""
  leaves = {}
  for name, path, layout in _tensor_rules(config):
    key = ()
    if isinstance(path[-1], int):
      path, key = path[:-1], (path[-1],)
    if config.scan_layers and path[0].startswith('layers_'):
      path, key = ('layers',) + path[1:], (int(path[0][len('layers_'):]),) + key
    leaves.setdefault(path, {})[key] = (name, layout)
  return leaves


def _load_sharded(path: str, dtype: str | None, shardings: Any,
                  config_overrides: dict) -> tuple[ModelConfig, dict]:
  hf_config = _read_hf_config(path)
  sources = _sources(path)
  shapes = {name: s.shape for name, s in sources.items()}
  config = _make_config(path, hf_config, shapes, {s.dtype for s in sources.values()}, dtype, config_overrides)
  _check_tensors(path, config, shapes)
  shapes = traverse_util.flatten_dict(nn.unbox(abstract_params(config)))
  flat_shardings = traverse_util.flatten_dict(shardings)
  if set(flat_shardings) != set(shapes):
    extra, lacking = sorted(set(flat_shardings) - set(shapes)), sorted(set(shapes) - set(flat_shardings))
    raise ValueError(f'shardings do not match the params of {path} (scan_layers={config.scan_layers}): '
                     f'no params for {["/".join(p) for p in extra[:4]]}, no shardings for '
                     f'{["/".join(p) for p in lacking[:4]]}. Build them from hf.load_config(path, ...) with '
                     'the same config overrides.')
  out_dtype = jax.numpy.dtype(config.param_dtype)
  params = {}
  for leaf, entries in _leaves(config).items():
    stack_shape = tuple(n + 1 for n in max(entries))
    layout = next(iter(entries.values()))[1]
    shape = shapes[leaf].shape
    if stack_shape + layout.shape != tuple(shape):
      raise AssertionError(f'{leaf}: rules give {stack_shape + layout.shape}, the model {shape}')

    def block(index, entries=entries, layout=layout, stack_shape=stack_shape):
      stacked = [range(*s.indices(n)) for s, n in zip(index, stack_shape)]
      rest = index[len(stack_shape):]
      own = [len(range(*s.indices(n))) for s, n in zip(rest, layout.shape)]
      out = _aligned_empty([len(r) for r in stacked] + own, out_dtype)
      for pos, key in zip(itertools.product(*map(range, map(len, stacked))), itertools.product(*stacked)):
        source = sources[entries[key][0]]
        file = os.path.join(path, source.file)
        out[pos] = layout.read_block(lambda hf_index: read_slice(file, source, hf_index), rest)
        _check_finite(f'tensor {source.tensor} of {path}', out[pos])
      return out

    params[leaf] = jax.block_until_ready(
        jax.make_array_from_callback(tuple(shape), flat_shardings[leaf], block))
    # Once copied to the devices, the host blocks stay reachable from a reference cycle until the garbage
    # collector runs (seen with jax 0.10): collected here, so that they do not pile up over the leaves.
    gc.collect(1)
  return config, traverse_util.unflatten_dict(params)


def _parse_size(size: int | str) -> int:
  if isinstance(size, int):
    return size
  match = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B)\s*', size.upper())
  if not match:
    raise ValueError(f'cannot parse max_shard_size {size!r}; use e.g. "5GB", "500MB" or a byte count')
  units = {'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'KIB': 2**10, 'MIB': 2**20, 'GIB': 2**30}
  return int(float(match[1]) * units[match[2]])


def _save_file(tensors: dict[str, np.ndarray], path: str) -> None:
  """safetensors' `save_file`, with the permissions of every other file written (0644 under the usual umask):
  safetensors leaves its files readable by their owner alone."""
  files.write(path, lambda tmp: save_file(tensors, tmp, metadata={'format': 'pt'}))
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def save_pretrained(path: str, config: ModelConfig, params: dict, max_shard_size: int | str = '5GB',
                    expert_layout: str = 'hub') -> None:
  """Writes `config.json` and safetensors files that `transformers.Qwen2ForCausalLM.from_pretrained` (or
  `Qwen2MoeForCausalLM`) loads.

  Parameters keep their dtype (fp32 or bf16). Shards larger than `max_shard_size` are split, with an index.
  MoE experts are written in `expert_layout`: 'hub' (one tensor per expert) or 'fused' (transformers 5's
  in-memory layout).
  """
  if expert_layout not in EXPERT_LAYOUTS:
    raise ValueError(f'unknown expert_layout {expert_layout!r}; choose one of {EXPERT_LAYOUTS}')
  params = jax.device_get(params)
  if 'layers' in params:
    params = unstack_layers(params)
  flat = traverse_util.flatten_dict(params)
  tensors: dict[str, np.ndarray] = {}
  for name, ours, layout in _tensor_rules(config):
    value = _lookup(flat, ours)
    if value is None:
      raise ValueError(f'params lack {"/".join(map(str, ours))} (needed for {name}); do they belong to this '
                       'config?')
    tensors[name] = np.ascontiguousarray(layout.to_hf(np.asarray(value)))
  for name, shape in hf_tensor_shapes(config).items():
    if tensors[name].shape != shape:
      raise ValueError(f'parameter for {name} has shape {tensors[name].shape}, config implies {shape}')
  dtype = tensors['model.embed_tokens.weight'].dtype
  tensors.update({name: np.zeros(shape, dtype) for name, shape in _empty_shared_experts(config).items()})
  if expert_layout == 'fused':
    tensors = _fuse_experts(tensors, config)

  dtypes = {str(t.dtype) for t in tensors.values()}
  torch_dtype = dtypes.pop() if len(dtypes) == 1 else 'float32'
  os.makedirs(path, exist_ok=True)
  files.write_json(os.path.join(path, 'config.json'), config_to_hf(config, torch_dtype), indent=2)

  limit = _parse_size(max_shard_size)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, tensor in tensors.items():
    if shards[-1] and size + tensor.nbytes > limit:
      shards.append({})
      size = 0
    shards[-1][name] = tensor
    size += tensor.nbytes
  if len(shards) == 1:
    _save_file(shards[0], os.path.join(path, _SINGLE))
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    _save_file(shard, os.path.join(path, name))
    weight_map.update(dict.fromkeys(shard, name))
  total = sum(t.nbytes for t in tensors.values())
  files.write_json(os.path.join(path, _INDEX), {'metadata': {'total_size': total}, 'weight_map': weight_map}, indent=2)
