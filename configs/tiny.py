"""A 4.2M-parameter Qwen2 that trains on two CPU cores in minutes.

Sliding window on the upper two layers, so every code path of the big models runs here too.
"""

from qwenjax.config import base_config, model_section


def get_config():
  config = base_config()
  config.model = model_section(
      vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
      rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
      use_sliding_window=True, sliding_window=64, max_window_layers=2)
  return config
