"""A 1.08B-parameter Qwen2 with sliding-window attention (window 4096) on layers 8-15.

1,083,033,600 parameters. Trained in bf16 with fp32 master weights at seq_len 8192.
"""

from qwenjax.config import base_config, model_section


def get_config():
  config = base_config()
  config.model = model_section(
      vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=16,
      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=32768,
      rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
      use_sliding_window=True, sliding_window=4096, max_window_layers=8,
      dtype='bfloat16', param_dtype='float32',
      # The fastest on one H100 (docs/training.md): unrolled layers, no scan-carried stacks to copy.
      scan_layers=False)
  config.data.seq_len = 8192
  # Qwen2's 151,936-row vocabulary: train with Qwen's own tokenizer, --config.data.tokenizer=DIR of any Qwen2
  # checkpoint (its tokenizer.json, 151,665 ids). The default instead trains a data.vocab_size-piece BPE on the
  # training files and warns that the other rows are never used (--config.model.vocab_size=32000 sizes the model
  # for it).
  config.data.shuffle_window = 128  # rows: ~1M tokens
  # 64 x 8192 = 524k tokens per step. train.grad_accum_steps and train.remat_policy are 'auto' (the defaults):
  # the micro-batch and remat policy that fit the device and run fastest (docs/training.md says how they are
  # chosen, docs/performance.md what they are on one GPU); on a pod slice the batch splits over data x fsdp.
  config.train.batch_size = 64
  config.train.steps = 100_000
  config.train.lr = 3e-4
  # The head's matmul writes bfloat16 logits, as Hugging Face's bf16 autocast does; the softmax still runs in
  # float32. Half the loss's memory traffic: 0.4-0.9% faster a step on an H200, 1.2 GiB less (docs/training.md).
  config.train.logits_dtype = 'bfloat16'
  config.train.warmup_steps = 2000
  config.train.log_every = 10
  config.train.eval_every = 1000
  config.train.checkpoint_every = 1000
  return config
