"""Qwen1.5-MoE-A2.7B (Qwen/Qwen1.5-MoE-A2.7B): 14,315,784,192 parameters.

60 routed experts (top-4) plus a shared expert in every layer.

The count matches `transformers.Qwen2MoeForCausalLM` built from the same config (tests/test_moe.py).
`output_router_logits=True` turns on the load-balancing loss for training (the hub config has it off).
"""

from qwenjax.config import base_config, model_section


def get_config():
  config = base_config()
  config.model = model_section(
      vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=8192,
      rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
      use_sliding_window=False, sliding_window=32768, max_window_layers=21,
      num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
      norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=(),
      router_aux_loss_coef=0.001, output_router_logits=True,
      dtype='bfloat16', scan_layers=True)
  config.train.remat_policy = 'dots_with_no_batch_dims_saveable'  # 'auto': the fastest that fits
  return config
