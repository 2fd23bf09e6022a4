"""Qwen2-MoE on its own: grouped-matmul backends, dispatch modes, expert-parallel meshes, configs, training."""

import dataclasses
import pathlib

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax
import pytest
import torch
import transformers

from model_utils import random_params
from qwenjax import config as config_lib
from qwenjax import model, moe
from qwenjax import params as params_lib
from qwenjax.kernels import gmm
from qwenjax.model_config import ModelConfig

CONFIGS = pathlib.Path(__file__).parent.parent / 'configs'

SMALL = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
    shared_expert_intermediate_size=24, output_router_logits=True, router_z_loss_coef=1e-3, rope_theta=10_000.0)


def load_config(name):
  return config_lib.load(str(CONFIGS / f'{name}.py'))


# ---------------------------------------------------------------------------------------------------------
# Grouped matmul backends.

def dense_grouped_matmul(lhs, rhs, group_sizes):
  """float64 numpy reference: row r times rhs[group of r]; rows past the groups are 0."""
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  start = 0
  for g, size in enumerate(np.asarray(group_sizes)):
    out[start:start + size] = lhs[start:start + size] @ rhs[g]
    start += size
  return out


@pytest.mark.parametrize('impl,dtype,tol', [('ragged_dot', jnp.float32, 1e-5), ('megablox', jnp.float32, 1e-5),
                                            ('mgpu', jnp.bfloat16, 2e-2)])
@pytest.mark.slow
def test_grouped_matmul_backends_match_dense_reference(impl, dtype, tol):
  # 150 rows (not a multiple of any tile), an empty group, and 15 padding rows past the groups.
  m, k, n = 150, 128, 128
  group_sizes = jnp.array([40, 0, 70, 25], jnp.int32)
  keys = jax.random.split(jax.random.key(0), 3)
  lhs = jax.random.normal(keys[0], (m, k), dtype)
  rhs = (0.1 * jax.random.normal(keys[1], (4, k, n))).astype(dtype)
  cotangent = jax.random.normal(keys[2], (m, n), jnp.float32)

  def loss(a, b):
    out = gmm.grouped_matmul(a, b, group_sizes, impl=impl, interpret=True)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  (_, out), (dlhs, drhs) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(lhs, rhs)
  # Reference gradients of sum(out * c): d lhs = c @ rhs[g]^T per group, d rhs[g] = lhs_g^T @ c_g.
  ref = dense_grouped_matmul(lhs.astype(jnp.float32), rhs.astype(jnp.float32), group_sizes)
  c = np.asarray(cotangent, np.float64)
  ref_dlhs = dense_grouped_matmul(c, np.swapaxes(np.asarray(rhs.astype(jnp.float32)), 1, 2), group_sizes)
  ref_drhs = np.zeros(rhs.shape)
  start = 0
  for g, size in enumerate(np.asarray(group_sizes)):
    ref_drhs[g] = np.asarray(lhs[start:start + size].astype(jnp.float32), np.float64).T @ c[start:start + size]
    start += size
  assert out.dtype == dtype and dlhs.dtype == dtype and drhs.dtype == dtype
  for got, want in ((out, ref), (dlhs, ref_dlhs), (drhs, ref_drhs)):
    got = np.asarray(got.astype(jnp.float32), np.float64)
    assert np.abs(got - want).max() <= tol * np.abs(want).max()
  assert not np.asarray(out[135:].astype(jnp.float32)).any() and not np.asarray(dlhs[135:].astype(
      jnp.float32)).any()


def test_grouped_matmul_impl_choice():
  lhs = jax.ShapeDtypeStruct((16, 64), jnp.float32)
  rhs = jax.ShapeDtypeStruct((2, 64, 96), jnp.float32)
  assert gmm.resolve_impl('auto', lhs, rhs) == 'ragged_dot'  # CPU
  with pytest.raises(ValueError, match="'mgpu' needs a Hopper GPU"):
    gmm.resolve_impl('mgpu', lhs, rhs)
  with pytest.raises(ValueError, match='bf16 or f16'):
    gmm.resolve_impl('mgpu', lhs, rhs, interpret=True)
  with pytest.raises(ValueError, match='multiples of 128'):
    gmm.resolve_impl('mgpu', jax.ShapeDtypeStruct((16, 64), jnp.bfloat16), rhs, interpret=True)
  with pytest.raises(ValueError, match="'megablox' needs a TPU"):
    gmm.resolve_impl('megablox', lhs, rhs)
  with pytest.raises(ValueError, match='unknown moe_impl'):
    dataclasses.replace(SMALL, moe_impl='cutlass')


# ---------------------------------------------------------------------------------------------------------
# Dispatch: dropless and capacity modes against a per-token numpy reference.

def reference_experts(x, ids, weights, w_gate, w_up, w_down, capacity=None):
  """Loop over tokens in order; with `capacity`, an expert ignores token copies once it has that many."""
  x, w_gate, w_up, w_down = (np.asarray(a, np.float64) for a in (x, w_gate, w_up, w_down))
  x2 = x.reshape(-1, x.shape[-1])
  ids2 = np.asarray(ids).reshape(len(x2), -1)
  weights2 = np.asarray(weights, np.float64).reshape(len(x2), -1)
  out = np.zeros_like(x2)
  taken = np.zeros(w_gate.shape[0], int)
  dropped = 0
  for t in range(len(x2)):
    for j, e in enumerate(ids2[t]):
      if capacity is not None and taken[e] >= capacity:
        dropped += 1
        continue
      taken[e] += 1
      gate, up = x2[t] @ w_gate[e], x2[t] @ w_up[e]
      out[t] += weights2[t, j] * ((gate / (1 + np.exp(-gate)) * up) @ w_down[e])
  return out.reshape(x.shape), dropped


@pytest.fixture(scope='module')
def routed():
  """Random tokens, router output and expert weights (8 experts, top-2, hidden 32, expert width 16)."""
  keys = jax.random.split(jax.random.key(1), 5)
  x = jax.random.normal(keys[0], (2, 12, 32))
  weights, ids = moe.route(jax.random.normal(keys[1], (2, 12, 8)), 2, norm_topk_prob=False)
  w_gate, w_up = (0.2 * jax.random.normal(k, (8, 32, 16)) for k in keys[2:4])
  w_down = 0.2 * jax.random.normal(keys[4], (8, 16, 32))
  return x, ids, weights, w_gate, w_up, w_down


@pytest.mark.slow
def test_dropless_and_capacity_modes(routed):
  expected, _ = reference_experts(*routed)
  dropless = moe.experts_ffn(*routed)
  np.testing.assert_allclose(dropless, expected, rtol=1e-5, atol=1e-5)
  # Capacity factor num_experts / k gives every expert room for all tokens: nothing dropped, same output.
  roomy = moe.experts_ffn(*routed, capacity_factor=4.0)
  np.testing.assert_allclose(roomy, dropless, rtol=1e-5, atol=1e-6)

  def loss(w, **kwargs):
    return jnp.sum(moe.experts_ffn(*routed[:3], *w, **kwargs) ** 2)

  grads = jax.grad(loss)(routed[3:])
  roomy_grads = jax.grad(lambda w: loss(w, capacity_factor=4.0))(routed[3:])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, roomy_grads)

  # A small capacity drops the later tokens' copies, exactly as the reference does.
  cap = moe.capacity(24, 2, 8, 0.5)
  assert cap == 3
  expected_small, dropped = reference_experts(*routed, capacity=cap)
  assert dropped > 0
  small = moe.experts_ffn(*routed, capacity_factor=0.5)
  np.testing.assert_allclose(small, expected_small, rtol=1e-5, atol=1e-5)
  assert np.abs(small - dropless).max() > 1e-2


def test_router_matches_transformers():
  logits = np.random.RandomState(0).randn(10, 8).astype(np.float32)
  for norm in (False, True):
    config = transformers.Qwen2MoeConfig(hidden_size=8, num_experts=8, num_experts_per_tok=3, norm_topk_prob=norm)
    router = transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeTopKRouter(config)
    with torch.no_grad():
      router.weight.copy_(torch.eye(8))
      _, scores, indices = router(torch.tensor(logits))
    weights, ids = moe.route(jnp.asarray(logits), 3, norm)
    np.testing.assert_array_equal(ids, indices.numpy())
    np.testing.assert_allclose(weights, scores.numpy(), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The model: scan, remat and aux-loss plumbing.

@pytest.mark.slow
def test_scan_remat_and_aux_plumbing():
  params = random_params(SMALL)
  ids = np.random.RandomState(0).randint(0, SMALL.vocab_size, (2, 10))
  # Jitted, as the train step runs the model (op by op, the MoE layer alone took seconds to dispatch).
  apply_with_aux = jax.jit(model.apply_with_aux, static_argnums=0)
  logits, aux = apply_with_aux(SMALL, params, ids)
  assert set(aux) == {'moe_aux_loss', 'moe_load_balancing_loss', 'moe_router_z_loss'}
  assert np.isclose(float(aux['moe_aux_loss']), 0.001 * float(aux['moe_load_balancing_loss'])
                    + 1e-3 * float(aux['moe_router_z_loss']))
  # A plain apply returns only the logits, the same ones.
  plain = jax.jit(lambda p: model.Qwen2(SMALL).apply({'params': p}, ids))(params)
  np.testing.assert_allclose(plain, logits, rtol=1e-5, atol=1e-5)
  # Scanned and rematerialized layers sow the same statistics.
  variants = (dict(scan_layers=True, remat_policy='full'), dict(remat_policy='dots_with_no_batch_dims_saveable'))
  for variant in variants:
    config = dataclasses.replace(SMALL, **variant)
    p = params_lib.stack_layers(params, 2) if config.scan_layers else params
    logits2, aux2 = apply_with_aux(config, p, ids)
    np.testing.assert_allclose(logits2, logits, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), aux2, aux)
  with pytest.raises(ValueError, match='mutable'):
    moe.aux_losses(SMALL, {})
  dense = dataclasses.replace(SMALL, num_experts=0)
  _, dense_aux = apply_with_aux(dense, random_params(dense), ids)
  assert dense_aux == {'moe_aux_loss': 0.0}


def test_moe_parameters_have_logical_axis_names():
  boxed = params_lib.abstract_params(dataclasses.replace(SMALL, scan_layers=True))
  leaves = jax.tree.leaves(boxed['layers']['mlp'], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) and len(x.names) == x.value.ndim for x in leaves)
  experts = boxed['layers']['mlp']['experts']
  assert experts['gate_proj'].names == ('layers', 'expert', 'embed', 'mlp')
  assert experts['down_proj'].names == ('layers', 'expert', 'mlp', 'embed')


# ---------------------------------------------------------------------------------------------------------
# Expert parallelism on the 8 CPU devices.

RULES = (('activation_batch', 'data'), ('activation_length', None), ('activation_embed', None),
         ('activation_heads', 'tensor'), ('activation_kv_heads', 'tensor'), ('activation_mlp', 'tensor'),
         ('activation_vocab', None), ('embed', None), ('heads', 'tensor'), ('kv_heads', 'tensor'),
         ('mlp', 'tensor'), ('expert', 'expert'), ('vocab', None))
TOKENS_OVER_EXPERT = (('activation_batch', ('data', 'expert')),) + RULES[1:]


@pytest.mark.slow
def test_expert_parallel_meshes_give_the_same_loss_and_grads():
  config = dataclasses.replace(SMALL, num_hidden_layers=1)
  params = random_params(config, seed=2)
  ids = np.random.RandomState(3).randint(0, config.vocab_size, (8, 6))

  def loss_fn(p, cfg):
    logits, aux = model.apply_with_aux(cfg, p, ids)
    return jnp.mean(-jax.nn.log_softmax(logits)[..., 1]) + aux['moe_aux_loss']

  expected, expected_grads = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)(params, config)  # no mesh
  # (data, tensor, expert) sizes, rules, capacity factor. Tokens are split over `expert` by the second rule set,
  # replicated over it (each device then takes a slice) by the first.
  cases = [((8, 1, 1), RULES, 0.0), ((4, 1, 2), RULES, 0.0), ((2, 1, 4), RULES, 0.0),
           ((2, 2, 2), TOKENS_OVER_EXPERT, 4.0)]
  for shape, rules, capacity_factor in cases:
    mesh = jax.make_mesh(shape, ('data', 'tensor', 'expert'), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    cfg = dataclasses.replace(config, moe_capacity_factor=capacity_factor)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      lowered = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1).lower(params, cfg)
      loss, grads = lowered.compile()(params)
    assert ('all_to_all' in lowered.as_text()) == (shape[2] > 1), shape
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, expected_grads)


# ---------------------------------------------------------------------------------------------------------
# Configs.

@pytest.mark.parametrize('name,count', [('moe_tiny', 5_780_736), ('qwen1_5_moe_a2_7b', 14_315_784_192),
                                        ('qwen2_57b_a14b', 57_408_658_944)])
def test_parameter_counts_match_transformers(name, count):
  config = ModelConfig.from_dict(load_config(name).model)
  assert params_lib.count_params(config) == count
  fields = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
            'num_key_value_heads', 'num_experts', 'num_experts_per_tok', 'moe_intermediate_size',
            'shared_expert_intermediate_size', 'decoder_sparse_step', 'tie_word_embeddings')
  hf_config = transformers.Qwen2MoeConfig(**{f: getattr(config, f) for f in fields},
                                          mlp_only_layers=list(config.mlp_only_layers))
  with torch.device('meta'):
    torch_model = transformers.Qwen2MoeForCausalLM(hf_config)
  assert sum(p.numel() for p in torch_model.parameters()) == count


def test_mlp_only_layers_from_config_file_and_command_line():
  def parse(*overrides):
    argv = ['prog', f'--config={CONFIGS / "moe_tiny.py"}', *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', flag_values=values, sys_argv=argv)
    values(argv)
    return ModelConfig.from_dict(values.config.model)

  assert parse().mlp_only_layers == ()
  config = parse('--config.model.mlp_only_layers=(0, 2)')
  assert config.mlp_only_layers == (0, 2) and hash(config)
  assert [config.is_moe(i) for i in range(4)] == [False, True, False, True]
  assert ModelConfig(num_experts=4, mlp_only_layers=[1]).mlp_only_layers == (1,)  # lists from JSON
  with pytest.raises(ValueError, match='scan_layers=True needs every layer'):
    parse('--config.model.mlp_only_layers=(1,)', '--config.model.scan_layers=True')
  with pytest.raises(ValueError, match='num_experts_per_tok'):
    ModelConfig(num_experts=4, num_experts_per_tok=5)


# ---------------------------------------------------------------------------------------------------------
# Training.

@pytest.mark.slow
def test_training_moe_tiny_lowers_loss():
  config = ModelConfig.from_dict(load_config('moe_tiny').model)
  params = random_params(config)
  tokens = np.random.RandomState(0).randint(0, config.vocab_size, (4, 33))
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  tx = optax.adam(3e-3)

  def loss_fn(p):
    logits, aux = model.apply_with_aux(config, p, inputs)
    nll = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1))
    return nll + aux['moe_aux_loss'], (nll, aux)

  @jax.jit
  def step(p, opt_state):
    (_, (nll, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, nll, aux

  opt_state = tx.init(params)
  losses = []
  for _ in range(12):
    params, opt_state, nll, aux = step(params, opt_state)
    losses.append(float(nll))
  assert losses[-1] < losses[0] - 1.0, losses
  assert all(np.isfinite(float(v)) for v in aux.values()) and float(aux['moe_aux_loss']) > 0
