r"""Supervised fine-tuning (SFT) of Qwen2-0.5B on chat data, on one GPU (docs/post_training.md).

    python -m qwenjax.train --config=configs/sft_qwen2_0_5b.py --workdir=/tmp/sft \
        --config.init_from_hf=/path/to/Qwen2-0.5B --config.data.train_files='sft/*.jsonl'

The checkpoint's directory gives the weights, the tokenizer and its chat template (Qwen2-0.5B's
tokenizer_config.json holds the ChatML template of the Instruct models). Records are `{"messages": [...]}` lines;
the loss trains on the assistant's tokens only. 32 rows of 2048 tokens a step, conversations packed whole.
"""

import os

from qwenjax.config import load


def get_config():
  config = load(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'qwen2_0_5b.py'))
  config.model.update(dtype='bfloat16', param_dtype='float32', remat_policy='activations_saveable')
  config.data.update(format='chat', seq_len=2048)
  config.train.update(
      steps=2000, batch_size=32, grad_accum_steps=2,
      lr=1e-5, warmup_steps=100, lr_final_fraction=0.0, weight_decay=0.0,
      z_loss=0.0,  # the released model never trained with one: the objective stays TRL's cross-entropy
      logits_dtype='bfloat16', log_every=10, eval_every=200, eval_steps=10, checkpoint_every=500)
  return config
