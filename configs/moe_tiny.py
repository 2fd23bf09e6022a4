"""A 5.8M-parameter Qwen2-MoE (8 experts, top-2, and a shared expert) that trains on two CPU cores.

configs/tiny.py with every MLP a sparse MoE block (so `scan_layers` works) and full attention; the
load-balancing loss is on (`output_router_logits=True`) and a small router z-loss too, so the training job
logs both. Data and training settings are tiny's.
"""

import os

from qwenjax import config as config_lib


def get_config():
  config = config_lib.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tiny.py'))
  config.model.update(
      use_sliding_window=False,
      num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, shared_expert_intermediate_size=256,
      norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=(),
      router_aux_loss_coef=0.01, output_router_logits=True, router_z_loss_coef=1e-3)
  return config
