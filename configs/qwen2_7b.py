"""Qwen2-7B (Qwen/Qwen2-7B): 7,615,616,512 parameters."""

from qwenjax.config import base_config, model_section


def get_config():
  config = base_config()
  config.model = model_section(
      vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
      num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
      rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
      use_sliding_window=False, sliding_window=131072, max_window_layers=28,
      dtype='bfloat16', scan_layers=True)
  config.train.remat_policy = 'dots_with_no_batch_dims_saveable'  # 'auto': the fastest that fits
  return config
