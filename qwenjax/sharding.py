"""The device mesh, and where every parameter and activation lives on it: decided here and nowhere else.

The model names the axes of its parameters (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `norm`,
`layers`) and of its activations (`activation_batch`, `activation_length`, ...). The rules (`DEFAULT_RULES`,
written in `qwenjax.config` as `MeshConfig.rules`' default) map those names to the axes of a mesh over all
devices:

* `data`: data parallelism, parameters replicated;
* `fsdp`: data parallelism with parameters and optimizer state sharded over it (ZeRO-3 style);
* `tensor`: tensor parallelism over attention heads, MLP width and vocabulary;
* `expert`: expert parallelism for Qwen2-MoE: routed experts split over it, tokens exchanged with all-to-all
  (`qwenjax.moe`); outside the MoE blocks it is one more data-parallel axis;
* `context`: context parallelism: each sequence split over it (`activation_length`), in the zig-zag order of
  `qwenjax.context`; attention all-gathers keys and values over it (`qwenjax.attention`), parameters are
  replicated over it.

The train step is traced under `with jax.set_mesh(mesh), nn.logical_axis_rules(rules):`, so the model's
`nn.with_logical_constraint` calls and the Pallas attention wrapper (which reads
`jax.sharding.get_abstract_mesh()` and `nn.get_logical_axis_rules()`) see the same mesh and rules.

Multi-slice (several TPU slices joined by the data-center network, DCN, or several GPU hosts): the config's
`mesh.dcn_data` is the number of slices, and the `data` axis spans them (`dcn_data` x `data` devices long);
`fsdp`, `tensor`, `expert` and `context` stay inside a slice, on the fast interconnect (ICI), sized as for one
slice. Only data parallelism, whose one gradient all-reduce per step tolerates the slower network, crosses slices.

To add a mesh axis, append it to `qwenjax.config.MESH_AXES`, give `MeshConfig` a field of its size and map
logical names to it in the rules.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from qwenjax import config as config_lib
from qwenjax.model_config import ModelConfig

MESH_AXES = config_lib.MESH_AXES
# Logical axes of a batch of token ids `[batch, seq]`.
BATCH_AXES = ('activation_batch', 'activation_length')
# ... as the step takes it in: rows split, each row whole on its devices, so that context parallelism puts the
# sequence into its zig-zag order inside the step without moving data between devices (`qwenjax.context`).
INPUT_AXES = ('activation_batch', None)
DEFAULT_RULES = config_lib.DEFAULT_RULES  # where they are written: config.MeshConfig's default

Rules = tuple[tuple[str, Any], ...]


def mesh_shape(mesh_config: config_lib.MeshConfig, num_devices: int) -> tuple[int, ...]:
  """Sizes of `MESH_AXES` over all `num_devices`: one slice's sizes with `data` times `mesh.dcn_data`."""
  ici, dcn = hybrid_mesh_shapes(mesh_config, num_devices)
  return tuple(i * d for i, d in zip(ici, dcn))


def hybrid_mesh_shapes(mesh_config: config_lib.MeshConfig, num_devices: int
                       ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(sizes within one slice, sizes across slices) of `MESH_AXES`, as `create_hybrid_device_mesh` takes them.

  The config's data/fsdp/tensor/expert/context sizes are those of one slice of `num_devices / mesh.dcn_data` devices,
  one of them possibly -1 (the rest of the slice); across slices only `data` is longer than 1.
  """
  slices = mesh_config.dcn_data  # a positive int: MeshConfig checks
  if num_devices % slices:
    raise ValueError(f'mesh.dcn_data={slices} slices do not divide the {num_devices} devices evenly. Set '
                     'mesh.dcn_data to the number of slices (TPU) or hosts (GPU) the job runs on.')
  ici = _slice_mesh_shape(mesh_config, num_devices // slices, slices)
  dcn = tuple(slices if axis == 'data' else 1 for axis in MESH_AXES)
  return ici, dcn


def _slice_mesh_shape(mesh_config: config_lib.MeshConfig, num_devices: int, slices: int) -> tuple[int, ...]:
  """Sizes of `MESH_AXES` within one slice of `num_devices`, resolving one -1 to the remaining devices (MeshConfig
  has checked that each is positive or -1, and at most one -1)."""
  sizes = list(mesh_config.sizes())
  described = ' x '.join(f'{axis}={size}' for axis, size in zip(MESH_AXES, sizes))
  devices = f'{num_devices} devices' + (f' of each of the {slices} slices (mesh.dcn_data)' if slices > 1 else '')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'mesh sizes {described}: {known} does not divide the {devices}, so -1 '
                       'cannot take the rest. Set sizes whose product divides the device count.')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f'mesh sizes {described} multiply to {math.prod(sizes)} but there are {devices}. Set '
        f'--config.mesh.data/fsdp/tensor/expert/context so that their product is {num_devices}, or set one of them '
        'to -1 (the remaining devices).')
  return tuple(sizes)


def slice_attribute(devices: Sequence[Any]) -> str:
  """What tells the slices apart: `slice_index` on TPUs, and where a runtime numbers several slices; else
  `process_index`, one slice per host (CPU devices of several processes all report slice 0)."""
  if devices[0].platform == 'tpu' or len({getattr(d, 'slice_index', 0) for d in devices}) > 1:
    return 'slice_index'
  return 'process_index'


def hybrid_device_array(mesh_config: config_lib.MeshConfig, devices: Sequence[Any]):
  """The devices as an array of `MESH_AXES`' sizes, the `data` axis running over the `mesh.dcn_data` slices."""
  ici, dcn = hybrid_mesh_shapes(mesh_config, len(devices))
  attribute = slice_attribute(devices)
  found = len({getattr(d, attribute) for d in devices})
  if found != dcn[MESH_AXES.index('data')]:
    raise ValueError(
        f'mesh.dcn_data={dcn[MESH_AXES.index("data")]} but the {len(devices)} devices are in {found} slice(s) '
        f'(told apart by {attribute}). Set mesh.dcn_data to {found}.')
  return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=attribute == 'process_index')


def make_mesh(mesh_config: config_lib.MeshConfig, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh over `MESH_AXES` with Auto axes: XLA propagates shardings from the constraints we place. Its rules
  (`mesh_config.rules`) are fitted to a model by `logical_axis_rules`.

  With `mesh.dcn_data` > 1 the devices are laid out by `mesh_utils.create_hybrid_device_mesh`: each slice is
  a contiguous block of the `data` axis.
  """
  devices = list(jax.devices() if devices is None else devices)
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if mesh_config.dcn_data > 1:
    return jax.sharding.Mesh(hybrid_device_array(mesh_config, devices), MESH_AXES, axis_types=axis_types)
  slices = len({getattr(d, 'slice_index', 0) for d in devices})
  if slices > 1:
    logging.warning('sharding: the devices are in %d slices but mesh.dcn_data=1, so fsdp/tensor/expert/context may '
                    'cross the slow network between slices; set mesh.dcn_data=%d.', slices, slices)
  return jax.make_mesh(mesh_shape(mesh_config, len(devices)), MESH_AXES, axis_types=axis_types, devices=devices)


def _axes_tuple(axes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def axes_size(mesh: jax.sharding.Mesh, axes) -> int:
  """How many devices the mesh axes `axes` (a name, a tuple of names, or None) span together."""
  return math.prod(mesh.shape[a] for a in _axes_tuple(axes))


def _logical_sizes(config: ModelConfig) -> dict[str, int]:
  """The length of each named model dimension, for checking that a mesh axis divides it."""
  sizes = {
      'vocab': config.vocab_size, 'embed': config.hidden_size, 'heads': config.num_attention_heads,
      'kv_heads': config.num_key_value_heads, 'head_dim': config.head_dim, 'mlp': config.intermediate_size,
      'norm': config.hidden_size, 'layers': config.num_hidden_layers,
  }
  if config.num_experts:  # `mlp` also names the routed and shared experts' widths: the rule must divide all
    sizes['expert'] = config.num_experts
    sizes['mlp'] = math.gcd(config.intermediate_size, config.moe_intermediate_size,
                            config.shared_expert_intermediate_size)
  for name in ('vocab', 'embed', 'heads', 'kv_heads', 'head_dim', 'mlp'):
    sizes['activation_' + name] = sizes[name]
  return sizes


def logical_axis_rules(rules: Sequence[Sequence[Any]], mesh: jax.sharding.Mesh,
                       model_config: ModelConfig | None = None) -> Rules:
  """The rules to trace under: normalized to tuples, checked against the mesh, and fitted to the model.

  A rule whose mesh axes do not divide the model dimension it shards (e.g. 2 KV heads over tensor=4) keeps
  only the leading mesh axes that do (often none: that dimension is then replicated), with a log line.
  """
  out = []
  sizes = _logical_sizes(model_config) if model_config is not None else {}
  for rule in rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f'bad logical axis rule {rule!r}: expected (logical_name, mesh_axes)')
    name, axes = rule[0], _axes_tuple(rule[1])
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
      raise ValueError(f'logical axis rule {rule!r} names mesh axes {unknown}; the mesh has {mesh.axis_names}')
    size = sizes.get(name)
    if size is not None:
      kept = axes
      while kept and size % axes_size(mesh, kept):
        kept = kept[:-1]
      if kept != axes:
        logging.info('sharding: %s (%d) does not divide over mesh axes %s (size %d); using %s', name, size,
                     axes, axes_size(mesh, axes), kept or 'no sharding')
      axes = kept
    out.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
  return tuple(out)


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
  """Drops trailing mesh axes from any dimension they do not divide, so jit accepts the sharding."""
  entries = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = _axes_tuple(entry)
    while axes and dim % axes_size(mesh, axes):
      axes = axes[:-1]
    entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*entries)


def strip_boxes(tree: Any) -> Any:
  """Unboxes `nn.LogicallyPartitioned` leaves without placing sharding constraints (works on abstract trees)."""
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def param_shardings(abstract_params: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree of boxed (`nn.LogicallyPartitioned`) abstract parameters, unboxed.

  The tree is `qwenjax.params.abstract_params(config)`: passed in, so that this module never imports the model.
  """
  specs = nn.get_partition_spec(abstract_params)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = strip_boxes(abstract_params)
  return jax.tree.map(lambda spec, x: NamedSharding(mesh, _fit_spec(spec, x.shape, mesh)), mesh_specs, shapes,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules) -> NamedSharding:
  """Token batches `[batch, seq]` as the step takes them in: batch split over the mesh axes of `activation_batch`,
  rows whole (`INPUT_AXES`)."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(INPUT_AXES, rules))


def batch_shards(mesh: jax.sharding.Mesh, rules: Rules) -> int:
  """How many ways the batch is split (data x fsdp with the default rules)."""
  return axes_size(mesh, nn.logical_to_mesh_axes(BATCH_AXES, rules)[0])


def free_axes(mesh) -> tuple[str, ...]:
  """The mesh axes a kernel must still split over with `jax.shard_map` (not manual, i.e. not already inside
  one); empty when there is no mesh or those axes span a single device."""
  if mesh.empty:
    return ()
  free = tuple(a for a in mesh.axis_names if a not in set(mesh.manual_axes))
  return free if axes_size(mesh, free) > 1 else ()


def active_mesh_axes(logical: Sequence[str], mesh) -> list[tuple[str, ...]]:
  """Per logical dimension, the mesh axes the active rules (`nn.logical_axis_rules`) split it over.

  Only axes a kernel would really split over count: not manual (already inside a shard_map), size > 1. This
  is how code that must shard_map itself (Pallas kernels, expert all-to-all) reads the placement the rules
  decided, inside a step traced under `jax.set_mesh(mesh)`.
  """
  spec = nn.logical_to_mesh_axes(tuple(logical), nn.get_logical_axis_rules())
  manual = set(mesh.manual_axes)
  return [tuple(a for a in _axes_tuple(entry) if a in mesh.axis_names and a not in manual and mesh.shape[a] > 1)
          for entry in tuple(spec) + (None,) * (len(logical) - len(spec))]


def context_axes(mesh=None) -> tuple[str, ...]:
  """The mesh axes the active rules split the sequence over (`activation_length`; manual and size-1 axes left
  out): empty without context parallelism. Read inside a step traced under `jax.set_mesh` and the rules."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty:
    return ()
  return active_mesh_axes(('activation_length',), mesh)[0]


def context_size(mesh=None) -> int:
  """How many devices each sequence is split over (1 without context parallelism)."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  axes = context_axes(mesh)
  return axes_size(mesh, axes) if axes else 1


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
