"""Qwen2-MoE parity with transformers: logits and aux loss both ways, hub and fused expert layouts."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import hf_utils
from model_utils import random_params

from qwenjax import hf, model

TINY_MOE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rope_theta=10_000.0, rms_norm_eps=1e-6,
                num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                output_router_logits=True)

CASES = {
    # layer 1 dense (mlp_only_layers), untied head, raw top-k weights
    'mlp_only_untied': dict(mlp_only_layers=[1], norm_topk_prob=False, tie_word_embeddings=False),
    # every layer MoE, tied embeddings, renormalized top-k weights
    'norm_topk_tied': dict(norm_topk_prob=True, tie_word_embeddings=True, num_experts_per_tok=3),
    # MoE on layers 1 only (decoder_sparse_step=2), untied
    'sparse_step': dict(decoder_sparse_step=2, tie_word_embeddings=False),
    # no shared expert: transformers builds a zero-wide one (empty tensors, a gate that multiplies 0)
    'no_shared_expert': dict(shared_expert_intermediate_size=0, tie_word_embeddings=False),
}


def random_qwen2_moe(seed=0, **overrides):
  """A random Qwen2MoeForCausalLM whose norms, router and shared-expert gate are all non-trivial."""
  return hf_utils.random_qwen2_moe({**TINY_MOE, **overrides}, seed)


def hf_outputs(torch_model, ids):
  with torch.no_grad():
    out = torch_model(input_ids=torch.tensor(ids), output_router_logits=True)
  return out.logits.float().numpy(), float(out.aux_loss), [x.float().numpy() for x in out.router_logits]


def random_ids(shape, seed=0):
  return np.random.RandomState(seed).randint(0, TINY_MOE['vocab_size'], shape)


def check_parity(config, params, torch_model, ids):
  expected_logits, expected_aux, router_logits = hf_outputs(torch_model, ids)
  logits, aux = jax.jit(model.apply_with_aux, static_argnums=0)(config, params, ids)
  assert logits.dtype == np.float32 and logits.shape == expected_logits.shape
  assert hf_utils.relative_error(logits, expected_logits) < 1e-4
  assert abs(float(aux['moe_load_balancing_loss']) - expected_aux) < 1e-4
  # z-loss: mean over MoE layers and tokens of logsumexp(router logits)^2, from transformers' router logits.
  lse = [np.log(np.exp(r.astype(np.float64)).sum(-1)) for r in router_logits]
  assert abs(float(aux['moe_router_z_loss']) - np.mean(np.concatenate(lse) ** 2)) < 1e-4 * np.mean(
      np.concatenate(lse) ** 2)
  assert np.isclose(float(aux['moe_aux_loss']), config.router_aux_loss_coef * expected_aux, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize('case', sorted(CASES))
def test_load_transformers_checkpoint(tmp_path, case):
  torch_model = random_qwen2_moe(seed=1, **CASES[case])
  torch_model.save_pretrained(tmp_path)
  saved = load_file(str(tmp_path / 'model.safetensors'))
  assert any('.mlp.experts.0.gate_proj.weight' in k for k in saved)  # transformers 5 saves the hub layout
  config, params = hf.from_pretrained(str(tmp_path))
  assert config.num_experts == 8 and config.mlp_only_layers == tuple(CASES[case].get('mlp_only_layers', ()))
  moe_layers = [hasattr(layer.mlp, 'experts') for layer in torch_model.model.layers]
  assert [config.is_moe(i) for i in range(3)] == moe_layers
  check_parity(config, params, torch_model, random_ids((2, 11)))


@pytest.mark.slow
def test_load_fused_layout_and_scanned(tmp_path):
  torch_model = random_qwen2_moe(seed=2, **CASES['norm_topk_tied'])
  torch_model.save_pretrained(tmp_path, save_original_format=False)
  saved = load_file(str(tmp_path / 'model.safetensors'))
  assert saved['model.layers.0.mlp.experts.gate_up_proj'].shape == (8, 64, 64)  # [experts, 2 * mlp, embed]
  config, params = hf.from_pretrained(str(tmp_path), scan_layers=True)
  assert params['layers']['mlp']['experts']['gate_proj'].shape == (3, 8, 64, 32)
  check_parity(config, params, torch_model, random_ids((2, 9), seed=1))


@pytest.mark.parametrize('case,layout', [('mlp_only_untied', 'hub'), ('norm_topk_tied', 'fused'),
                                         ('no_shared_expert', 'hub')])
@pytest.mark.slow
def test_saved_params_load_in_transformers(tmp_path, case, layout):
  config = hf.config_from_hf({'model_type': 'qwen2_moe', **transformers.Qwen2MoeConfig(
      **{**TINY_MOE, **CASES[case]}).to_dict()})
  # Non-trivial norms, router and gate values, so a dropped or mis-mapped tensor shows.
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda x: x + (0.3 * rng.standard_normal(x.shape)).astype(x.dtype), random_params(config))
  hf.save_pretrained(str(tmp_path), config, params, expert_layout=layout)
  hf_config = json.loads((tmp_path / 'config.json').read_text())
  assert hf_config['architectures'] == ['Qwen2MoeForCausalLM']
  assert hf_config['mlp_only_layers'] == CASES[case].get('mlp_only_layers', [])
  names = set(load_file(str(tmp_path / 'model.safetensors')))
  assert ('model.layers.0.mlp.experts.gate_up_proj' in names) == (layout == 'fused')
  torch_model, info = transformers.Qwen2MoeForCausalLM.from_pretrained(
      str(tmp_path), output_loading_info=True, attn_implementation='eager')
  assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys'], info
  check_parity(config, params, torch_model.eval(), random_ids((2, 9), seed=4))
  # And back: ours -> files -> ours is exact.
  config2, params2 = hf.from_pretrained(str(tmp_path))
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, jax.device_get(params))


def test_bad_moe_checkpoints_give_named_errors(tmp_path):
  base = {'model_type': 'qwen2_moe', **transformers.Qwen2MoeConfig(**TINY_MOE).to_dict()}
  with pytest.raises(ValueError, match='qkv_bias'):
    hf.config_from_hf({**base, 'qkv_bias': False})
  with pytest.raises(ValueError, match='alternating'):
    hf.config_from_hf({**base, 'use_sliding_window': True, 'sliding_window': 8, 'layer_types': None})
  config = hf.config_from_hf(base)
  with pytest.raises(ValueError, match='expert_layout'):
    hf.save_pretrained(str(tmp_path), config, {}, expert_layout='stacked')
