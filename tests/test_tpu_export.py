"""The TPU code paths lowered for a TPU on this CPU: CI's only check that they compile there.

`jax.export.export(jax.jit(step), platforms=['tpu'])` lowers the whole train step (forward, backward, AdamW) for
a TPU without one, inside `kernels.lowering_platform('tpu')` so that the TPU kernels are picked. A Pallas TPU
kernel lowers to a `tpu_custom_call` holding its Mosaic module; Pallas checks its block shapes against TPU's
rules while lowering it, which the interpreter the other tests use does not. The Mosaic compiler itself
(layouts, VMEM budget) runs only on a TPU: what passes here can still fail there.
"""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox
import numpy as np
import pytest

from qwenjax import config as config_lib
from qwenjax import kernels
from qwenjax import sharding
from qwenjax import train_step
from qwenjax.kernels import gmm_tpu
from qwenjax.model_config import ModelConfig

# Layer 0 full causal, layer 1 a window shorter than the sequence: two splash masks.
DENSE = ModelConfig(
    vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, use_sliding_window=True, sliding_window=128, max_window_layers=1,
    dtype='bfloat16', attention_impl='pallas_tpu')
MOE = dataclasses.replace(
    DENSE, use_sliding_window=False, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
    shared_expert_intermediate_size=256, output_router_logits=True, moe_impl='megablox')
BATCH, SEQ = 8, 256
ONE_DEVICE = dict(data=1, fsdp=1, tensor=1, expert=1)


def export_train_step(model: ModelConfig, mesh_sizes: dict) -> jax.export.Exported:
  """The jitted train step with its state and batch shardings, exported for a TPU: as benchmarks/train_1b.py
  and the main job build it, from abstract values."""
  devices = jax.devices()[:np.prod(list(mesh_sizes.values()))]
  mesh_config = config_lib.MeshConfig(**mesh_sizes)
  train = config_lib.OptimizerConfig()
  with kernels.lowering_platform('tpu'):  # the abstract state traces the model too
    mesh = sharding.make_mesh(mesh_config, devices)
    rules = sharding.logical_axis_rules(sharding.DEFAULT_RULES, mesh, model)
    tx = train_step.make_optimizer(train)
    shardings = train_step.state_shardings(model, tx, mesh, rules)
    state = train_step.abstract_state(model, tx, shardings)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    batch = {name: jax.ShapeDtypeStruct((BATCH, SEQ), dtype, sharding=batch_sharding)
             for name, dtype in [('inputs', jnp.int32), ('targets', jnp.int32), ('weights', jnp.float32),
                                 ('positions', jnp.int32), ('segment_ids', jnp.int32)]}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      step = jax.jit(train_step.make_train_step(model, train),
                     in_shardings=(shardings, batch_sharding, sharding.replicated(mesh)),
                     out_shardings=(shardings, None))
      return jax.export.export(step, platforms=['tpu'])(state, batch, train_step.schedule_horizon(train))


def tpu_kernels(module: str) -> dict[str, list[str]]:
  """{function of the module: the `kernel_name`s of its Pallas TPU calls} for functions that make any."""
  found = {}
  for body in re.split(r'\n\s*func\.func ', module)[1:]:
    function = re.match(r'(?:\w+ )*@([\w.$-]+)', body).group(1)
    calls = re.findall(r'custom_call @tpu_custom_call.*?kernel_name = "(\w+)"', body)
    assert len(calls) == body.count('@tpu_custom_call'), function
    if calls:
      found[function] = calls
  return found


MESHES = {'one_device': ONE_DEVICE, 'mesh_2x2x2': None}


@pytest.mark.slow
@pytest.mark.parametrize('mesh', sorted(MESHES))
def test_dense_train_step_with_splash_lowers_for_tpu(mesh):
  sizes = MESHES[mesh] or dict(data=2, fsdp=2, tensor=2, expert=1)
  exported = export_train_step(DENSE, sizes)
  assert exported.platforms == ('tpu',) and exported.nr_devices == np.prod(list(sizes.values()))
  names = [name for calls in tpu_kernels(exported.mlir_module()).values() for name in calls]
  # splash's forward (saving its logsumexp for the backward) and its two backward kernels.
  for kernel in ('splash_mha_fwd_segmented_residuals', 'splash_mha_dq_segmented_no_residuals',
                 'splash_mha_dkv_segmented_no_residuals'):
    assert kernel in names, names
  if mesh != 'one_device':  # the kernels run per device inside a shard_map over the mesh
    assert 'manual_computation' in exported.mlir_module()


@pytest.mark.slow
@pytest.mark.parametrize('mesh', sorted(MESHES))
def test_moe_train_step_with_megablox_lowers_for_tpu(mesh):
  sizes = MESHES[mesh] or dict(data=2, fsdp=2, tensor=1, expert=2)  # experts split over expert=2
  exported = export_train_step(MOE, sizes)
  functions = tpu_kernels(exported.mlir_module())
  # megablox's gmm (forward, and d lhs in the backward) and tgmm (d rhs): both directions lowered.
  assert any(f.startswith('gmm') for f in functions) and any(f.startswith('tgmm') for f in functions), functions
  names = [name for calls in functions.values() for name in calls]
  assert 'splash_mha_dkv_segmented_no_residuals' in names


@pytest.mark.slow
def test_export_rejects_a_block_shape_tpu_rejects(monkeypatch):
  """The check is not vacuous: the same export fails when a kernel's block shape breaks TPU's rule (last
  dimension a multiple of 128 or whole), while the interpreter runs that very kernel.

  megablox's backward reuses the forward's tiles with k and n swapped. With a 64-wide contraction tile (legal
  while k = 64 is whole) d lhs tiles n = 96 by 64: the TPU rejects it. gmm_tpu pads k and n to 128 for that.
  """
  lhs = jax.random.normal(jax.random.key(0), (64, 64), jnp.float32)
  rhs = jax.random.normal(jax.random.key(1), (2, 64, 96), jnp.float32)
  group_sizes = jnp.array([24, 40], jnp.int32)

  def grads(matmul, interpret=False):
    return jax.grad(lambda a, b: jnp.sum(matmul(a, b, interpret) ** 2), argnums=(0, 1))

  unpadded = lambda a, b, interpret: megablox.gmm(a, b, group_sizes, a.dtype, (64, 64, 96), None, None, False,
                                                  interpret)
  ours = lambda a, b, interpret: gmm_tpu.gmm(a, b, group_sizes, interpret)
  reference = lambda a, b, _: jax.lax.ragged_dot(a, b, group_sizes)
  expected = grads(reference)(lhs, rhs)
  with jax.default_matmul_precision('highest'):
    for matmul in (unpadded, ours):  # both right in the interpreter
      for got, want in zip(jax.jit(grads(matmul, interpret=True))(lhs, rhs), expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)

  abstract = (jax.ShapeDtypeStruct(lhs.shape, lhs.dtype), jax.ShapeDtypeStruct(rhs.shape, rhs.dtype))
  with pytest.raises(ValueError, match='divisible by 8 and 128'):
    jax.export.export(jax.jit(grads(unpadded)), platforms=['tpu'])(*abstract)
  assert len(tpu_kernels(jax.export.export(jax.jit(grads(ours)), platforms=['tpu'])(*abstract).mlir_module())) >= 2

  # And through the whole train step: gmm_tpu with 64-wide tiles fails the MoE export above.
  monkeypatch.setattr(gmm_tpu, '_TILE', 64)
  with pytest.raises(ValueError, match='divisible by 8 and 128'):
    export_train_step(MOE, ONE_DEVICE)
