"""A 5.8M-parameter Qwen2-MoE (8 experts, top-2, and a shared expert) that trains on two CPU cores.

Every layer is a sparse MoE block, so `scan_layers` works; the load-balancing loss is on
(`output_router_logits=True`) and a small router z-loss too, so the training job logs both.
"""

from qwenjax.config import base_config, model_section


def get_config():
  config = base_config()
  config.model = model_section(
      vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
      rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
      num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, shared_expert_intermediate_size=256,
      norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=(),
      router_aux_loss_coef=0.01, output_router_logits=True, router_z_loss_coef=1e-3)
  # The same training set-up as configs/tiny.py.
  config.data.seq_len = 256
  config.data.vocab_size = 4096
  config.data.tokenizer_sentences = 100_000
  config.train.steps = 600
  config.train.batch_size = 8
  config.train.lr = 2e-3
  config.train.warmup_steps = 30
  config.train.log_every = 10
  config.train.eval_every = 100
  config.train.eval_steps = 8
  config.train.checkpoint_every = 200
  return config
