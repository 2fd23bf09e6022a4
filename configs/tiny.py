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
  # Sized so that `python -m qwenjax.train --config=configs/tiny.py --workdir=DIR` shows the loss falling
  # within a few minutes on two CPU cores (see docs/training.md for measured times).
  config.data.seq_len = 256
  config.data.vocab_size = 4096
  config.data.tokenizer_sentences = 100_000
  config.data.shuffle_window = 4096  # rows: ~1M tokens, so batches mix ~100 stdlib files
  config.train.steps = 600
  config.train.batch_size = 8
  config.train.lr = 2e-3
  config.train.warmup_steps = 30
  config.train.log_every = 10
  config.train.eval_every = 100
  config.train.eval_steps = 8
  config.train.checkpoint_every = 200
  return config
