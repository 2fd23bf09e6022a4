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


def random_qwen2_moe(config: dict, seed: int = 0) -> transformers.Qwen2MoeForCausalLM:
  """A random Qwen2MoeForCausalLM (eager attention) of the `Qwen2MoeConfig` fields in `config`, whose norms,
  router and shared-expert gate are all non-trivial (every parameter redrawn, as in `random_qwen2`)."""
  torch.manual_seed(seed)
  hf_config = transformers.Qwen2MoeConfig(**config)
  hf_config._attn_implementation = 'eager'  # pylint: disable=protected-access
  torch_model = transformers.Qwen2MoeForCausalLM(hf_config).eval()
  with torch.no_grad():
    for name, param in torch_model.named_parameters():
      param.copy_(1.0 + 0.2 * torch.randn_like(param) if 'norm' in name else 0.1 * torch.randn_like(param))
  return torch_model


def hf_logits(model, input_ids, position_ids=None):
  with torch.no_grad():
    ids = torch.tensor(input_ids, dtype=torch.long)
    pos = None if position_ids is None else torch.tensor(position_ids, dtype=torch.long)
    return model(input_ids=ids, position_ids=pos).logits.float().numpy()


def relative_error(a, b) -> float:
  """max |a - b| / max |b|, in float64."""
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


QWEN2_SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                       r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def save_tiny_qwen2_tokenizer(directory: str) -> str:
  """Writes a tiny Qwen2-style tokenizer (353 ids: 350 learned, 3 special) into `directory`; returns `directory`.

  A byte-level BPE trained here on a few sentences (English, Chinese, emoji) with Qwen2's pipeline (NFC, its
  split pattern, byte-level pieces), its special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` after the
  learned vocabulary as in Qwen2, and the `tokenizer_config.json` and `generation_config.json` of a Qwen2 base
  checkpoint (eos `<|endoftext|>`). A model that uses it needs vocab_size >= the tokenizer's vocab_size.
  """
  import json, os  # pylint: disable=import-outside-toplevel,multiple-imports
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers  # pylint: disable=all

  tok = tokenizers.Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT_PATTERN), behavior='isolated', invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  corpus = ['The quick brown fox jumps over the lazy dog.', 'Training language models in JAX is fun!',
            "It's a tokenizer test: 1234567890, don't worry.", '    def forward(self, x):\n        return x\n',
            '我们在训练一个语言模型。', '通义千问是一个多语言的大模型', '你好，世界！', 'emoji 😀🎉🚀 and ✓ marks']
  trainer = trainers.BpeTrainer(vocab_size=350, min_frequency=1, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus * 4, trainer=trainer)
  specials = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in specials])
  ids = {t: tok.token_to_id(t) for t in specials}
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, 'tokenizer.json'))
  config = {
      'add_prefix_space': False,
      'added_tokens_decoder': {str(i): {'content': t, 'lstrip': False, 'normalized': False, 'rstrip': False,
                                        'single_word': False, 'special': True} for t, i in ids.items()},
      'additional_special_tokens': ['<|im_start|>', '<|im_end|>'],
      'bos_token': None,
      'clean_up_tokenization_spaces': False,
      'eos_token': '<|endoftext|>',
      'errors': 'replace',
      'model_max_length': 32768,
      'pad_token': '<|endoftext|>',
      'split_special_tokens': False,
      'tokenizer_class': 'Qwen2Tokenizer',
      'unk_token': None,
  }
  generation = {'bos_token_id': ids['<|endoftext|>'], 'eos_token_id': ids['<|endoftext|>'],
                'max_new_tokens': 2048}
  for name, value in (('tokenizer_config.json', config), ('generation_config.json', generation)):
    with open(os.path.join(directory, name), 'w', encoding='utf-8') as f:
      json.dump(value, f, indent=2)
  return directory
