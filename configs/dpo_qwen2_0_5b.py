r"""DPO of Qwen2-0.5B on preference pairs, on one GPU (docs/post_training.md).

    python -m qwenjax.train --config=configs/dpo_qwen2_0_5b.py --workdir=/tmp/dpo \
        --config.init_from_hf=/path/to/Qwen2-0.5B-Instruct --config.data.train_files='dpo/*.jsonl'

The policy and the frozen reference both start from `init_from_hf` (an instruct model, or an SFT run exported with
`python -m qwenjax.export`). Records are `{"prompt", "chosen", "rejected"}` lines (strings or message lists); a
pair's two sequences share a row, so `seq_len` must hold both. beta 0.1 and lr 1e-6, TRL's defaults.
"""

import os

from qwenjax.config import load


def get_config():
  config = load(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'qwen2_0_5b.py'))
  config.model.update(dtype='bfloat16', param_dtype='float32', remat_policy='activations_saveable')
  config.data.update(format='preference', seq_len=2048)
  config.train.update(
      objective='dpo', dpo_beta=0.1,
      steps=1000, batch_size=32, grad_accum_steps=2,
      lr=1e-6, warmup_steps=50, lr_final_fraction=0.0, weight_decay=0.0,
      logits_dtype='bfloat16', log_every=10, eval_every=200, eval_steps=10, checkpoint_every=500)
  return config
