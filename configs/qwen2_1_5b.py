"""Qwen2-1.5B (Qwen/Qwen2-1.5B): 1,543,714,304 parameters."""

from qwenjax.config import base_config, model_section


def get_config():
  config = base_config()
  config.model = model_section(
      vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
      num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072,
      rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
      use_sliding_window=False, sliding_window=131072, max_window_layers=28)
  return config
