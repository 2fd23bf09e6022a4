"""Random tiny transformers Qwen2 models for parity tests (nothing downloaded)."""

import numpy as np
import torch
import transformers

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rope_theta=10_000.0, rms_norm_eps=1e-6)


def tiny_hf_config(**overrides) -> dict:
  """A config.json dict for a tiny model, as transformers writes it."""
  config = transformers.Qwen2Config(**{**TINY, **overrides})
  return {**config.to_dict(), 'architectures': ['Qwen2ForCausalLM']}


def random_qwen2(seed: int = 0, **overrides) -> transformers.Qwen2ForCausalLM:
  """A random Qwen2ForCausalLM (eager attention) whose biases and norm weights are non-trivial too.

  transformers initialises biases to 0 and norm weights to 1, which would hide a missing bias or a
  mis-mapped norm; every parameter is redrawn here.
  """
  torch.manual_seed(seed)
  config = transformers.Qwen2Config(**{**TINY, **overrides})
  config._attn_implementation = 'eager'  # pylint: disable=protected-access
  model = transformers.Qwen2ForCausalLM(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if 'norm' in name:
        param.copy_(1.0 + 0.2 * torch.randn_like(param))
      else:
        param.copy_(0.1 * torch.randn_like(param))
  return model


def hf_logits(model, input_ids, position_ids=None):
  with torch.no_grad():
    ids = torch.tensor(input_ids, dtype=torch.long)
    pos = None if position_ids is None else torch.tensor(position_ids, dtype=torch.long)
    return model(input_ids=ids, position_ids=pos).logits.float().numpy()


def relative_error(a, b) -> float:
  """max |a - b| / max |b|, in float64."""
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())
