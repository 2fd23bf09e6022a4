"""The model on its own: packing, precision, scan/remat equivalence, parameter counts, axis names."""

import dataclasses
import functools
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax import attention
from qwenjax import config as config_lib
from qwenjax import model
from qwenjax import params as params_lib
from qwenjax.model_config import ModelConfig

ROOT = pathlib.Path(__file__).parent.parent
CONFIGS = ROOT / 'configs'

# Layers 0-1 full attention, 2-3 a 5-key window; GQA 4/2.
SMALL = ModelConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, rope_theta=10_000.0,
                    use_sliding_window=True, sliding_window=5, max_window_layers=2)


@pytest.fixture(scope='module')
def params():
  return params_lib.init_params(SMALL, jax.random.key(0))


def logits_of(config, params, ids, positions=None, segment_ids=None):
  return np.asarray(_jitted_logits(config, params, ids, positions, segment_ids))


@functools.partial(jax.jit, static_argnums=0)  # one program, not hundreds of ops dispatched one by one
def _jitted_logits(config, params, ids, positions, segment_ids):
  return model.Qwen2(config).apply({'params': params}, ids, positions=positions, segment_ids=segment_ids)


def _grad_of_mean_square_logits(config, params, ids):
  return jax.grad(lambda p: jnp.mean(model.Qwen2(config).apply({'params': p}, ids) ** 2))(params)


_grads = jax.jit(_grad_of_mean_square_logits, static_argnums=0)


@pytest.fixture(scope='module')
def plain_model(params):
  """Ids, and the plain (unscanned, no remat) model's logits and gradients on them."""
  ids = np.random.RandomState(2).randint(0, SMALL.vocab_size, (2, 12))
  return ids, logits_of(SMALL, params, ids), _grads(SMALL, params, ids)


@pytest.mark.slow
def test_packed_documents_equal_documents_alone(params):
  lengths = (7, 4, 9)
  docs = [np.random.RandomState(i).randint(0, SMALL.vocab_size, n) for i, n in enumerate(lengths)]
  ids = np.concatenate(docs)[None]
  segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
  positions = np.concatenate([np.arange(n) for n in lengths])[None]
  packed = logits_of(SMALL, params, ids, positions=positions, segment_ids=segment_ids)
  start = 0
  for doc in docs:
    alone = logits_of(SMALL, params, doc[None])
    np.testing.assert_allclose(packed[0, start:start + len(doc)], alone[0], rtol=2e-5, atol=2e-5)
    start += len(doc)
  # Without segment ids the later documents see the earlier ones: the check above is not vacuous.
  unmasked = logits_of(SMALL, params, ids, positions=positions)
  assert np.abs(unmasked[0, lengths[0]:] - packed[0, lengths[0]:]).max() > 1e-3


@pytest.mark.slow
def test_bf16_forward_close_to_fp32(params):
  ids = np.random.RandomState(1).randint(0, SMALL.vocab_size, (2, 16))
  fp32 = logits_of(SMALL, params, ids)
  bf16_config = dataclasses.replace(SMALL, dtype='bfloat16', param_dtype='bfloat16')
  bf16_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  bf16 = logits_of(bf16_config, bf16_params, ids)
  assert bf16.dtype == np.float32
  error = np.abs(bf16 - fp32).max() / np.abs(fp32).max()
  assert 0 < error < 3e-2, error  # bf16 did run in bf16, and stayed close


@pytest.mark.parametrize('scan_layers,remat_policy', [
    (True, 'none'), (False, 'full'), (True, 'dots_with_no_batch_dims_saveable'),
    (True, 'dots_and_attention_saveable'), (False, 'activations_saveable'), (True, 'attention_saveable')])
@pytest.mark.slow
def test_scan_and_remat_match_plain_model(params, plain_model, scan_layers, remat_policy):
  config = dataclasses.replace(SMALL, scan_layers=scan_layers, remat_policy=remat_policy)
  variant_params = params_lib.stack_layers(params, SMALL.num_hidden_layers) if scan_layers else params
  ids, expected_logits, expected_grads = plain_model
  np.testing.assert_allclose(logits_of(config, variant_params, ids), expected_logits, rtol=1e-5, atol=1e-5)
  grads = _grads(config, variant_params, ids)
  if scan_layers:
    grads = params_lib.unstack_layers(grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, expected_grads)


@pytest.mark.parametrize('policy', ['dots_with_no_batch_dims_saveable', 'dots_and_attention_saveable',
                                    'activations_saveable', 'attention_saveable'])
@pytest.mark.slow
def test_remat_policies_save_what_they_promise(policy, capsys):
  """Our policies keep the attention kernel's output and logsumexp (no second attention forward in the backward
  pass); 'activations_saveable' keeps every named activation and no matmul output besides; 'attention_saveable'
  keeps attention's inputs and outputs alone (the layer's input aside): norms, projections and MLP recomputed."""
  config = dataclasses.replace(SMALL, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                               dtype='bfloat16', attention_impl='pallas_gpu', attention_interpret=True,
                               remat_policy=policy)
  params = params_lib.init_params(config, jax.random.key(0))
  ids = jnp.zeros((1, 32), jnp.int32)
  loss = lambda p: model.Qwen2(config).apply({'params': p}, ids, return_hidden=True).astype(jnp.float32).sum()
  jax.ad_checkpoint.print_saved_residuals(loss, params)
  saved = capsys.readouterr().out
  keeps_attention = "named 'attention_out'" in saved and "named 'attention_lse'" in saved
  assert keeps_attention == (policy != 'dots_with_no_batch_dims_saveable'), saved
  if policy == 'activations_saveable':
    assert all(f"named '{name}'" in saved for name in model.ACTIVATION_NAMES), saved
    assert 'output of dot_general' not in saved, saved
  elif policy == 'attention_saveable':
    named = set(re.findall(r"named '(\w+)'", saved))
    assert named == {'query', 'key', 'value', 'attention_out', 'attention_lse'}, saved
    assert 'output of dot_general' not in saved, saved
  else:
    assert 'output of dot_general' in saved, saved


def test_cudnn_forward_primitives_exist():
  """forward_saveable recognizes cuDNN's attention forward by primitive name: the names must be jax's."""
  # pylint: disable=protected-access,g-import-not-at-top
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  names = {cudnn._dot_product_attention_fwd_p.name, cudnn._dot_product_attention_fwd_p_wrapper.name}
  assert names == set(attention._CUDNN_FORWARD_PRIMITIVES)
  assert attention.forward_saveable(cudnn._dot_product_attention_fwd_p_wrapper)


def test_stack_unstack_round_trip(params):
  stacked = params_lib.stack_layers(params, SMALL.num_hidden_layers)
  assert stacked['layers']['mlp']['up_proj']['kernel'].shape == (4, 64, 128)
  jax.tree.map(np.testing.assert_array_equal, params_lib.unstack_layers(stacked), params)
  scanned_init = params_lib.init_params(dataclasses.replace(SMALL, scan_layers=True), jax.random.key(0))
  assert jax.tree.structure(scanned_init) == jax.tree.structure(stacked)


def test_unrolled_init_is_one_program_per_layer_kind(params):
  """Unrolled layers are drawn as one scanned stack: the init program does not grow with the depth (one set of
  random-number kernels, not one per layer: on a GPU those took 44 s to compile for configs/1b.py), and every
  layer still gets its own draw of the right shapes and scale."""
  def key_derivations(layers):  # flax folds each parameter's name into the key: one small kernel each on a GPU
    config = dataclasses.replace(SMALL, num_hidden_layers=layers, use_sliding_window=False)
    program = jax.make_jaxpr(lambda key: params_lib.init_params(config, key))(jax.random.key(0))
    return str(program).count('random_fold_in')
  assert key_derivations(16) == key_derivations(2)  # drawn layer by layer: 195 against 27
  abstract = nn.unbox(params_lib.abstract_params(SMALL))
  assert jax.tree.structure(params) == jax.tree.structure(abstract)
  jax.tree.map(lambda x, a: (x.shape, x.dtype) == (a.shape, a.dtype) or pytest.fail(f'{x.shape} {a.shape}'),
               params, abstract)
  kernels = [np.asarray(params[f'layers_{i}']['mlp']['up_proj']['kernel']) for i in range(4)]
  assert all(not np.allclose(kernels[i], kernels[j]) for i in range(4) for j in range(i))
  assert abs(np.std(np.stack(kernels)) - SMALL.initializer_range) < 0.1 * SMALL.initializer_range


def load_config(name):
  return config_lib.load(str(CONFIGS / f'{name}.py'))


@pytest.mark.parametrize('name,count', [
    ('1b', 1_083_033_600), ('qwen2_0_5b', 494_032_768), ('qwen2_1_5b', 1_543_714_304),
    ('qwen2_7b', 7_615_616_512), ('qwen2_72b', 72_706_203_648)])
@pytest.mark.slow
def test_parameter_counts(name, count):
  assert params_lib.count_params(ModelConfig.from_dict(load_config(name).model)) == count


def test_1b_shape():
  config = ModelConfig.from_dict(load_config('1b').model)
  assert [config.is_sliding(i) for i in range(16)] == [False] * 8 + [True] * 8
  assert (config.hidden_size, config.num_key_value_heads, config.head_dim) == (2048, 4, 128)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_every_parameter_has_logical_axis_names(scan_layers):
  boxed = params_lib.abstract_params(dataclasses.replace(SMALL, scan_layers=scan_layers))
  with_paths = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  leaves = [leaf for _, leaf in with_paths]
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for path, leaf in with_paths:
    assert len(leaf.names) == leaf.value.ndim
    assert (leaf.names[0] == 'layers') == (path[0].key == 'layers')
  names = {name for leaf in leaves for name in leaf.names}
  assert {'vocab', 'embed', 'heads', 'kv_heads', 'head_dim', 'mlp', 'norm'} <= names


def test_config_errors():
  with pytest.raises(ValueError, match="unknown model config key.*'hiden_size'"):
    ModelConfig.from_dict({'hiden_size': 8})
  with pytest.raises(ValueError, match='remat_policy'):
    ModelConfig(remat_policy='sometimes')
  with pytest.raises(ValueError, match='multiple of num_key_value_heads'):
    ModelConfig(num_attention_heads=6, num_key_value_heads=4)


def test_model_config_is_a_leaf_and_the_model_knows_no_devices():
  """Configs read `model_config` without loading jax, flax or any other qwenjax module; `model.py` picks no
  kernel by platform or mesh (a decode step's dispatch is `kv_cache`'s)."""
  code = ('import sys, qwenjax.model_config; '
          'print(sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "flax", "qwenjax")))')
  loaded = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
  assert loaded.strip() == "['qwenjax', 'qwenjax.model_config']"
  source = (ROOT / 'qwenjax' / 'model.py').read_text()
  for name in ('target_platform', 'get_abstract_mesh', 'free_axes', 'decode_gpu'):
    assert name not in source, name
