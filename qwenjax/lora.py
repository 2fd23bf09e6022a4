"""LoRA (Hu et al. 2021): low-rank adapters on the projections of a frozen base model, trained as PEFT trains them
and written for PEFT.

A targeted projection with kernel W computes

    y = x @ W + (x @ A) @ B * scale,      scale = lora_alpha / lora_rank

where A is `[*input dims, rank]` and B `[rank, *output dims]` (q/k/v: A `[embed, r]`, B `[r, heads, head_dim]`;
o: A `[heads, head_dim, r]`, B `[r, embed]`; gate/up/down: A `[in, r]`, B `[r, out]`). The routed experts of an
MoE layer get one pair per expert (A `[expert, in, r]`, B `[expert, r, out]`), folded into their stacked weights
before the grouped matmuls. Initialization is PEFT's default (`init_lora_weights=True`): A kaiming-uniform with
a=sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and B zeros, so the first step's model is the base model.

The adapters are a tree of their own, shaped after the base parameters: the kernel `layers_3/self_attn/q_proj/kernel`
gets `layers_3/self_attn/q_proj/{a, b}`, the stacked experts `layers_3/mlp/experts/gate_proj` get
`layers_3/mlp/experts/gate_proj/{a, b}` (scanned layers: one `layers` subtree with a leading layer axis, as the
parameters). The model reads them as its `lora` collection (`qwenjax.model`): `scaled(adapters, lora)` is that
collection; without it the model is the base model exactly, which is what "adapters off" means everywhere. Each
A and B carries the logical axis names of its kernel's input or output dimensions plus `lora_rank` (which no rule
shards), so `qwenjax.sharding` places them as it places W.

In training (`qwenjax.train_step`) the train state's parameters, its optimizer state and so its checkpoints are
the adapters alone (float32, whatever `model.param_dtype`, as PEFT keeps adapters); the base is an argument of the
step, never differentiated, never copied, reloaded from `init_from_hf` (or drawn again from `train.seed`) when a
run resumes. `merge` folds scale * A @ B into the base kernels (what `python -m qwenjax.export` writes);
`peft_tensors` and `peft_config` are the adapters as PEFT's `adapter_model.safetensors` and `adapter_config.json`.
"""

from __future__ import annotations

import math
from typing import Any

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwenjax import params as params_lib
from qwenjax.config import LoraConfig
from qwenjax.model import LORA
from qwenjax.model_config import ModelConfig

COLLECTION = LORA
RANK_AXIS = 'lora_rank'  # the logical name of the rank dimension: no rule maps it, so it is never sharded
# Our short target names -> the projections' module names (ours and Hugging Face's).
PROJECTIONS = {'q': 'q_proj', 'k': 'k_proj', 'v': 'v_proj', 'o': 'o_proj', 'gate': 'gate_proj', 'up': 'up_proj',
               'down': 'down_proj'}
_STACK_AXES = ('layers', 'expert')  # leading kernel dimensions that each get their own adapter


def _adapter_path(path: tuple[str, ...], lora: LoraConfig) -> tuple[str, ...] | None:
  """Where the adapters of the base parameter at `path` go, or None when it is not a target."""
  names = {PROJECTIONS[t] for t in lora.targets}
  if len(path) >= 2 and path[-1] == 'kernel' and path[-2] in names:  # attention, dense MLP, shared expert
    return path[:-1]
  if len(path) >= 2 and path[-2] == 'experts' and path[-1] in names:  # the routed experts' stacked weights
    return path
  return None


def _kernel_path(adapter_path: tuple[str, ...]) -> tuple[str, ...]:
  return adapter_path if adapter_path[-2] == 'experts' else adapter_path + ('kernel',)


def _input_dims(adapter_path: tuple[str, ...]) -> int:
  """How many of a kernel's dimensions (after the stacked ones) are its input: o_proj's heads and head_dim."""
  return 2 if adapter_path[-1] == 'o_proj' else 1


def abstract(model_config: ModelConfig, lora: LoraConfig) -> dict:
  """The adapters as boxed (`nn.LogicallyPartitioned`) ShapeDtypeStructs: what `qwenjax.sharding.param_shardings`
  places and what `init` fills."""
  if not lora.lora_rank:
    raise ValueError('LoRA is off (train.lora_rank=0): there are no adapters')
  with nn.logical_axis_rules(()):
    base = traverse_util.flatten_dict(params_lib.abstract_params(model_config))
  out = {}
  for path, box in base.items():
    where = _adapter_path(path, lora)
    if where is None:
      continue
    shape, names = box.value.shape, tuple(box.names)
    stack = next(i for i, n in enumerate(names) if n not in _STACK_AXES)
    split = stack + _input_dims(where)
    r = lora.lora_rank
    out[where + ('a',)] = nn.LogicallyPartitioned(
        jax.ShapeDtypeStruct(shape[:split] + (r,), jnp.float32), names[:split] + (RANK_AXIS,))
    out[where + ('b',)] = nn.LogicallyPartitioned(
        jax.ShapeDtypeStruct(shape[:stack] + (r,) + shape[split:], jnp.float32),
        names[:stack] + (RANK_AXIS,) + names[split:])
  if not out:
    raise ValueError(f'train.lora_targets={lora.lora_targets!r} names no projection of this model')
  return traverse_util.unflatten_dict(out)


def shapes(model_config: ModelConfig, lora: LoraConfig) -> dict:
  """The adapters as plain ShapeDtypeStructs."""
  return jax.tree.map(lambda x: x.value, abstract(model_config, lora), is_leaf=lambda x: isinstance(x, nn.Partitioned))


def init(model_config: ModelConfig, lora: LoraConfig, rng: jax.Array) -> dict:
  """New float32 adapters: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's kaiming-uniform, a=sqrt(5)), B = 0.

  Jit it with `out_shardings` to create each adapter directly in its sharding."""
  flat = traverse_util.flatten_dict(shapes(model_config, lora))
  out = {}
  for i, (path, x) in enumerate(sorted(flat.items())):
    if path[-1] == 'b':
      out[path] = jnp.zeros(x.shape, x.dtype)
      continue
    fan_in = math.prod(x.shape[x.ndim - 1 - _input_dims(path[:-1]):-1])
    bound = 1.0 / math.sqrt(fan_in)
    out[path] = jax.random.uniform(jax.random.fold_in(rng, i), x.shape, x.dtype, -bound, bound)
  return traverse_util.unflatten_dict(out)


def count(model_config: ModelConfig, lora: LoraConfig) -> int:
  """The number of adapter parameters (what trains)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes(model_config, lora)))


def scaled(adapters: Any, lora: LoraConfig) -> Any:
  """The model's `lora` collection: each B times lora_alpha / lora_rank (differentiable; the model adds (x @ A) @ B)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * jnp.asarray(lora.scale, x.dtype) if path[-1].key == 'b' else x, adapters)


def _pairs(adapters: Any) -> dict[tuple[str, ...], dict[str, Any]]:
  """{adapter path: {'a': A, 'b': B}}."""
  return traverse_util.flatten_dict(adapters, is_leaf=lambda _, x: set(x) == {'a', 'b'})


def _delta(a, b, inputs: int, scale: float):
  """scale * A @ B in the shape of the kernel, per stacked layer and expert; numpy in, numpy out."""
  xp = np if isinstance(a, np.ndarray) else jnp
  stack = a.ndim - 1 - inputs
  a2 = a.reshape(a.shape[:stack] + (-1, a.shape[-1])).astype(np.float32)
  b2 = b.reshape(b.shape[:stack + 1] + (-1,)).astype(np.float32)
  delta = xp.einsum('...ir,...ro->...io', a2, b2) * np.float32(scale)
  return delta.reshape(a.shape[:-1] + b.shape[stack + 1:])


def merge(params: Any, adapters: Any, lora: LoraConfig) -> Any:
  """The base parameters with scale * A @ B added to each targeted kernel (in float32, then the kernel's dtype):
  a model without adapters that computes what base + adapters compute. numpy trees stay numpy (host memory)."""
  flat = traverse_util.flatten_dict(params)
  for path, pair in _pairs(adapters).items():
    kernel = _kernel_path(path)
    w = flat[kernel]
    delta = _delta(pair['a'], pair['b'], _input_dims(path), lora.scale)
    flat[kernel] = (w.astype(np.float32) + delta).astype(w.dtype)
  return traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------------------------------------------
# PEFT's adapter directory.


def peft_tensors(adapters: Any) -> dict[str, np.ndarray]:
  """The adapters as PEFT's `adapter_model.safetensors` names them for transformers' `Qwen2ForCausalLM` or
  `Qwen2MoeForCausalLM`: float32 `base_model.model.<module>.lora_A.weight` `[r, in]` and `lora_B.weight`
  `[out, r]` per module (torch's Linear layout).

  The routed experts are stacked parameters in transformers 5 (`mlp.experts.gate_up_proj` `[expert, 2 * mlp,
  embed]`, `mlp.experts.down_proj`), which PEFT adapts through `target_parameters`: one pair per parameter, the
  experts' ranks side by side (`lora_A` `[expert * r, in]`, row e * r + k; `lora_B` `[out, r * expert]`, column
  k * expert + e). Our gate and up adapters become one of rank 2r on the fused `gate_up_proj` (A side by side, B
  block-diagonal; `peft_config` doubles its rank and alpha). With both fused parameters adapted, PEFT nests the
  wrappers: `gate_up_proj`'s is `mlp.experts.base_layer`, `down_proj`'s `mlp.experts`.
  """
  adapters = jax.device_get(adapters)
  if 'layers' in adapters:
    adapters = params_lib.unstack_layers(adapters)
  out, experts = {}, {}
  for path, pair in _pairs(adapters).items():
    a, b = np.asarray(pair['a'], np.float32), np.asarray(pair['b'], np.float32)
    module = '.'.join(p.replace('layers_', 'layers.') if p.startswith('layers_') else p for p in path)
    if path[-2] == 'experts':
      experts.setdefault(module.rsplit('.', 2)[0], {})[path[-1]] = (a, b)  # under 'layers.{i}.mlp'
      continue
    r = a.shape[-1]
    out[f'base_model.model.model.{module}.lora_A.weight'] = np.ascontiguousarray(a.reshape(-1, r).T)
    out[f'base_model.model.model.{module}.lora_B.weight'] = np.ascontiguousarray(b.reshape(r, -1).T)
  for mlp, pairs in experts.items():
    fused = {}  # torch layout per expert: A [E, rank, in], B [E, out, rank]
    halves = [name for name in ('gate_proj', 'up_proj') if name in pairs]
    if halves:
      r, size = pairs[halves[0]][0].shape[-1], pairs[halves[0]][1].shape[-1]
      a = np.concatenate([np.swapaxes(pairs[name][0], 1, 2) for name in halves], axis=1)
      b = np.zeros((a.shape[0], 2 * size, len(halves) * r), np.float32)
      for j, name in enumerate(halves):
        i = ('gate_proj', 'up_proj').index(name)  # gate_up_proj's rows: gate's, then up's
        b[:, i * size:(i + 1) * size, j * r:(j + 1) * r] = np.swapaxes(pairs[name][1], 1, 2)
      fused['gate_up_proj'] = (a, b)
    if 'down_proj' in pairs:
      a, b = pairs['down_proj']
      fused['down_proj'] = (np.swapaxes(a, 1, 2), np.swapaxes(b, 1, 2))
    for name, (a, b) in fused.items():
      where = 'experts.base_layer' if name == 'gate_up_proj' and len(fused) == 2 else 'experts'
      prefix = f'base_model.model.model.{mlp}.{where}'
      e, r = a.shape[:2]
      out[f'{prefix}.lora_A.weight'] = np.ascontiguousarray(a.reshape(e * r, -1))
      out[f'{prefix}.lora_B.weight'] = np.ascontiguousarray(np.moveaxis(b, 0, -1).reshape(b.shape[1], r * e))
  return out


def peft_config(lora: LoraConfig, model_config: ModelConfig, base_model: str = '') -> dict[str, Any]:
  """PEFT's `adapter_config.json` for these adapters (`peft.LoraConfig` fields, as `save_pretrained` writes
  them). MoE models target the stacked experts by `target_parameters`, the fused `gate_up_proj` at rank and
  alpha times the number of its halves adapted (see `peft_tensors`)."""
  config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'base_model_name_or_path': base_model or None,
      'r': lora.lora_rank, 'lora_alpha': lora.lora_alpha, 'lora_dropout': 0.0, 'bias': 'none',
      'target_modules': sorted(PROJECTIONS[t] for t in lora.targets),  # MoE: the shared expert's, dense layers'
      'target_parameters': None, 'fan_in_fan_out': False, 'init_lora_weights': True, 'use_rslora': False,
      'use_dora': False, 'inference_mode': True, 'modules_to_save': None, 'layers_to_transform': None,
      'layers_pattern': None, 'rank_pattern': {}, 'alpha_pattern': {}, 'revision': None,
  }
  if model_config.num_experts:
    halves = sum(t in lora.targets for t in ('gate', 'up'))
    config['target_parameters'] = (['mlp.experts.gate_up_proj'] if halves else []) + (
        ['mlp.experts.down_proj'] if 'down' in lora.targets else []) or None
    if halves:
      config['rank_pattern'] = {r'.*\.gate_up_proj': lora.lora_rank * halves}
      config['alpha_pattern'] = {r'.*\.gate_up_proj': lora.lora_alpha * halves}
  return config
