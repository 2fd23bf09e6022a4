"""Qwen2-0.5B (Qwen/Qwen2-0.5B): 494,032,768 parameters."""

from qwenjax.config import base_config, model_section


def get_config():
  config = base_config()
  config.model = model_section(
      vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=131072,
      rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
      use_sliding_window=False, sliding_window=131072, max_window_layers=24)
  return config
