"""Hugging Face parity: transformers checkpoints load with the same logits, and ours load in transformers."""

import dataclasses
import json

import hf_utils
import jax
import numpy as np
import pytest
import torch
import transformers

from model_utils import random_params
from qwenjax import hf, model

PARITY_CASES = {
    # tied embeddings, GQA 4/2, sliding window (3 keys) on layers 1 and 2 of 3
    'tied_sliding_gqa': dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=2,
                             use_sliding_window=True, sliding_window=3, max_window_layers=1),
    # untied head, multi-query attention
    'untied_mqa': dict(tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=1),
}


def random_ids(shape, vocab, seed=0):
  return np.random.RandomState(seed).randint(0, vocab, shape)


@pytest.mark.slow
@pytest.mark.parametrize('case', sorted(PARITY_CASES))
@pytest.mark.parametrize('scan_layers', [False, True])
def test_load_transformers_checkpoint_gives_same_logits(tmp_path, case, scan_layers):
  torch_model = hf_utils.random_qwen2(seed=1, **PARITY_CASES[case])
  torch_model.save_pretrained(tmp_path)
  config, params = hf.from_pretrained(str(tmp_path), scan_layers=scan_layers)
  assert config.tie_word_embeddings == PARITY_CASES[case]['tie_word_embeddings']
  assert config.num_key_value_heads == PARITY_CASES[case]['num_key_value_heads']
  assert ('layers' in params) == scan_layers
  ids = random_ids((2, 11), config.vocab_size)
  expected = hf_utils.hf_logits(torch_model, ids)
  logits = model.Qwen2(config).apply({'params': params}, ids)
  assert logits.dtype == np.float32 and logits.shape == expected.shape
  assert hf_utils.relative_error(logits, expected) < 1e-4


@pytest.mark.slow
def test_sliding_window_is_read_and_matters(tmp_path):
  torch_model = hf_utils.random_qwen2(seed=2, **PARITY_CASES['tied_sliding_gqa'])
  torch_model.save_pretrained(tmp_path)
  config, params = hf.from_pretrained(str(tmp_path))
  assert (config.use_sliding_window, config.sliding_window, config.max_window_layers) == (True, 3, 1)
  assert [config.is_sliding(i) for i in range(3)] == [False, True, True]
  ids = random_ids((1, 12), config.vocab_size)
  no_window = dataclasses.replace(config, use_sliding_window=False)
  windowed = model.Qwen2(config).apply({'params': params}, ids)
  full = model.Qwen2(no_window).apply({'params': params}, ids)
  # Positions inside the first window agree; later ones must differ, or the window was never applied.
  np.testing.assert_allclose(windowed[:, :3], full[:, :3], rtol=1e-5, atol=1e-5)
  assert np.abs(windowed[:, 3:] - full[:, 3:]).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize('case', sorted(PARITY_CASES))
def test_saved_params_load_in_transformers(tmp_path, case):
  config = hf.config_from_hf({'model_type': 'qwen2', **hf_utils.tiny_hf_config(**PARITY_CASES[case])})
  # Give biases and norms non-trivial values so a dropped or mis-mapped tensor shows.
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda x: x + (0.3 * rng.standard_normal(x.shape)).astype(x.dtype), random_params(config))
  hf.save_pretrained(str(tmp_path), config, params)
  torch_model, info = transformers.Qwen2ForCausalLM.from_pretrained(
      str(tmp_path), output_loading_info=True, attn_implementation='eager')
  assert not info['missing_keys'], info
  assert not info['unexpected_keys'] and not info['mismatched_keys'], info
  ids = random_ids((2, 9), config.vocab_size, seed=4)
  expected = hf_utils.hf_logits(torch_model.eval(), ids)
  logits = jax.jit(lambda p: model.Qwen2(config).apply({'params': p}, ids))(params)
  assert hf_utils.relative_error(logits, expected) < 1e-4


@pytest.mark.slow
def test_sharded_bf16_round_trip(tmp_path):
  torch_model = hf_utils.random_qwen2(seed=5, tie_word_embeddings=False).to(torch.bfloat16)
  torch_model.save_pretrained(tmp_path / 'hf', max_shard_size='40KB')
  assert (tmp_path / 'hf' / 'model.safetensors.index.json').exists()
  config, params = hf.from_pretrained(str(tmp_path / 'hf'))
  assert config.param_dtype == 'bfloat16'
  assert all(x.dtype == np.dtype('bfloat16') for x in jax.tree.leaves(params))
  ids = random_ids((1, 10), config.vocab_size, seed=6)
  # Reference: the same bf16-rounded weights loaded fresh in fp32 (a .float() model would keep the rotary
  # inv_freq buffer rounded to bf16 by the earlier .to()).
  fp32_model = transformers.Qwen2ForCausalLM.from_pretrained(
      str(tmp_path / 'hf'), dtype=torch.float32, attn_implementation='eager')
  expected = hf_utils.hf_logits(fp32_model.eval(), ids)
  assert hf_utils.relative_error(model.Qwen2(config).apply({'params': params}, ids), expected) < 1e-4

  # Ours -> sharded files -> ours again: bit-identical, still bf16, several shards with an index.
  hf.save_pretrained(str(tmp_path / 'ours'), config, params, max_shard_size='40KB')
  index = json.loads((tmp_path / 'ours' / 'model.safetensors.index.json').read_text())
  assert len(set(index['weight_map'].values())) > 1
  config2, params2 = hf.from_pretrained(str(tmp_path / 'ours'))
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  reloaded = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / 'ours'))
  assert reloaded.dtype == torch.bfloat16


def _write_checkpoint(tmp_path, hf_config, tensors=None):
  tmp_path.mkdir(parents=True, exist_ok=True)
  (tmp_path / 'config.json').write_text(json.dumps(hf_config))
  if tensors is not None:
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file(tensors, str(tmp_path / 'model.safetensors'))


def test_hub_style_config_fields(tmp_path):
  """Hub files: top-level rope_theta, no layer_types, sliding_window null or 0 when unused."""
  base = hf_utils.tiny_hf_config(tie_word_embeddings=True)
  base.pop('rope_parameters', None)
  for window in (None, 0, 4096):
    config = hf.config_from_hf({**base, 'architectures': ['Qwen2ForCausalLM'], 'rope_theta': 12345.0,
                                'sliding_window': window, 'use_sliding_window': False})
    assert config.rope_theta == 12345.0
    assert not any(config.is_sliding(i) for i in range(config.num_hidden_layers))
  v5 = hf.config_from_hf({**base, 'model_type': 'qwen2', 'rope_parameters': {'rope_theta': 5e5,
                          'rope_type': 'default'}, 'sliding_window': 8, 'use_sliding_window': True,
                          'layer_types': ['full_attention'] * 2 + ['sliding_attention']})
  assert (v5.rope_theta, v5.use_sliding_window, v5.sliding_window, v5.max_window_layers) == (5e5, True, 8, 2)
  dense = {k: v for k, v in base.items() if k != 'rope_theta'} | {'model_type': 'qwen2'}
  assert hf.config_from_hf(dense).rope_theta == 10_000.0  # no theta at all: transformers' Qwen2 default
  # What would be silently wrong is refused: another activation, a rope scaling qwenjax does not implement.
  with pytest.raises(ValueError, match="unsupported hidden_act 'gelu'"):
    hf.config_from_hf({**dense, 'hidden_act': 'gelu'})
  for rope_type in ('dynamic', 'longrope', 'llama3'):
    with pytest.raises(ValueError, match=f"unsupported rope type '{rope_type}'"):
      hf.config_from_hf({**dense, 'rope_parameters': {'rope_type': 'default', 'rope_theta': 1e6},
                         'rope_scaling': {'type': rope_type, 'factor': 4.0}})
  # A scaling added beside transformers 5's default rope_parameters (as Qwen2's long-context model cards say) is
  # the one transformers applies.
  yarn = hf.config_from_hf({**dense, 'rope_parameters': {'rope_type': 'default', 'rope_theta': 1e6},
                            'rope_scaling': {'type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 32}})
  assert (yarn.rope_scaling.rope_type, yarn.rope_scaling.factor) == ('yarn', 4.0)


ROPE_CASES = {
    'yarn': {'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 32, 'rope_theta': 1e4},
    'yarn_betas': {'rope_type': 'yarn', 'factor': 2.5, 'original_max_position_embeddings': 24, 'beta_fast': 16.0,
                   'beta_slow': 2.0, 'attention_factor': 1.3, 'rope_theta': 1e4},
    'linear': {'rope_type': 'linear', 'factor': 3.0, 'rope_theta': 1e4},
}


@pytest.mark.slow
@pytest.mark.parametrize('case', sorted(ROPE_CASES))
def test_scaled_rope_gives_transformers_logits_beyond_the_original_context(tmp_path, case):
  """YaRN and linear scaling, read from transformers' config.json, give its logits at positions past the original
  context (96 tokens where YaRN's was 32), and survive a save and a load in transformers."""
  torch_model = hf_utils.random_qwen2(seed=11, rope_parameters=ROPE_CASES[case], max_position_embeddings=128)
  torch_model.save_pretrained(tmp_path / 'hf')
  config, params = hf.from_pretrained(str(tmp_path / 'hf'))
  assert config.rope_scaling.rope_type == ROPE_CASES[case]['rope_type']
  ids = random_ids((2, 96), config.vocab_size, seed=12)
  expected = hf_utils.hf_logits(torch_model, ids)
  logits = model.Qwen2(config).apply({'params': params}, ids)
  assert hf_utils.relative_error(logits, expected) < 1e-4
  plain = model.Qwen2(dataclasses.replace(config, rope_scaling=type(config.rope_scaling)())).apply(
      {'params': params}, ids)
  assert hf_utils.relative_error(plain, expected) > 1e-2  # the scaling matters: it was applied, not ignored
  hf.save_pretrained(str(tmp_path / 'ours'), config, params)
  reloaded = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / 'ours'), attn_implementation='eager')
  assert hf_utils.relative_error(hf_utils.hf_logits(reloaded.eval(), ids), expected) < 1e-4


def test_bad_checkpoints_give_named_errors(tmp_path):
  torch_model = hf_utils.random_qwen2(seed=7)
  torch_model.save_pretrained(tmp_path / 'good')
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  tensors = load_file(str(tmp_path / 'good' / 'model.safetensors'))
  good_config = json.loads((tmp_path / 'good' / 'config.json').read_text())

  _write_checkpoint(tmp_path / 'llama', {**good_config, 'architectures': ['LlamaForCausalLM'],
                                         'model_type': 'llama'}, tensors)
  with pytest.raises(ValueError, match='LlamaForCausalLM'):
    hf.from_pretrained(str(tmp_path / 'llama'))

  missing = {k: v for k, v in tensors.items() if k != 'model.layers.1.self_attn.k_proj.bias'}
  _write_checkpoint(tmp_path / 'missing', good_config, missing)
  with pytest.raises(ValueError, match=r'model\.layers\.1\.self_attn\.k_proj\.bias'):
    hf.from_pretrained(str(tmp_path / 'missing'))

  _write_checkpoint(tmp_path / 'shape', {**good_config, 'intermediate_size': 128}, tensors)
  with pytest.raises(ValueError, match=r'mlp\.(gate|up|down)_proj\.weight has shape'):
    hf.from_pretrained(str(tmp_path / 'shape'))

  _write_checkpoint(tmp_path / 'extra', {**good_config, 'num_hidden_layers': 2}, tensors)
  with pytest.raises(ValueError, match=r'model\.layers\.2\.'):
    hf.from_pretrained(str(tmp_path / 'extra'))

  _write_checkpoint(tmp_path / 'empty', good_config)
  with pytest.raises(FileNotFoundError, match='model.safetensors'):
    hf.from_pretrained(str(tmp_path / 'empty'))
