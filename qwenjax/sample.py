r"""Sample text from a trained or imported model, printing it as it is generated.

    python -m qwenjax.sample --workdir=/tmp/qwenjax-tiny --prompt='def main('        # latest checkpoint of a run
    python -m qwenjax.sample --hf=/path/to/Qwen2-0.5B --prompt='The capital of France is' --temperature=0

`--workdir` reads the run's config.json, the parameters of its latest checkpoint (or `--step`) and the run's
tokenizer (`WORKDIR/tokenizer/`, or `WORKDIR/tokenizer.model` of older runs). `--hf` reads a Hugging Face
directory (config.json, safetensors and its tokenizer.json); both are opened by `qwenjax.pretrained`. Generation
stops at the tokenizer's stop tokens or after `--max_new_tokens`; `--temperature=0` is greedy. See
`qwenjax.generate`.
"""

from __future__ import annotations

import sys
from typing import Any

from absl import flags

from qwenjax import cli
from qwenjax import generate
from qwenjax import pretrained
from qwenjax import tokenizer as tokenizer_lib
from qwenjax.model_config import ModelConfig


def sample(model_config: ModelConfig, params: Any, tok: tokenizer_lib.Tokenizer, prompt: str, *,
           out=sys.stdout, **kwargs) -> str:
  """Writes the prompt and then its continuation to `out` as the tokens come; returns the continuation."""
  if not prompt:
    raise ValueError('the prompt is empty: pass --prompt=TEXT')
  ids = tok.encode(prompt)
  if not ids:
    raise ValueError(f'the prompt {prompt!r} encodes to no tokens')
  # Checked before the prompt is echoed, so a bad setting prints only the error.
  generate.check_prompts(model_config, [ids], kwargs.get('max_new_tokens', 0))
  generate.check_sampling(**{k: kwargs[k] for k in ('temperature', 'top_k', 'top_p') if k in kwargs},
                          vocab_limit=tok.vocab_size)
  out.write(prompt)
  out.flush()
  tokens, shown = [], ''

  def stream(new):
    nonlocal shown
    tokens.extend(t for t in new[0] if t not in tok.stop_ids)
    text = tok.decode(tokens)
    if not text.endswith('\ufffd'):  # wait for the rest of a multi-byte character
      out.write(text[len(shown):])
      out.flush()
      shown = text

  generate.generate(model_config, params, [ids], stop_token_ids=tok.stop_ids, vocab_limit=tok.vocab_size,
                    callback=stream, **kwargs)
  text = tok.decode(tokens)
  out.write(text[len(shown):] + '\n')
  out.flush()
  return text


def _define_flags() -> None:
  """The command line's flags; defined only when run as a program, so importing this module adds no global
  flags (`qwenjax.train` defines --workdir too)."""
  flags.DEFINE_string('workdir', None, 'A training run\'s directory: samples its latest checkpoint.')
  flags.DEFINE_string('hf', None, 'A Hugging Face checkpoint directory (config.json, safetensors, tokenizer).')
  flags.DEFINE_integer('step', None, 'With --workdir: the checkpoint step (default: the latest).')
  flags.DEFINE_string('prompt', None, 'The text to continue.')  # required
  flags.DEFINE_integer('max_new_tokens', 128, 'New tokens at most.')
  flags.DEFINE_float('temperature', 0.8, '0: greedy; higher: more random.')
  flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens only (0: all).')
  flags.DEFINE_float('top_p', 1.0, 'Sample among the most likely tokens whose probability reaches p.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed: the same seed gives the same text.')
  flags.DEFINE_string('dtype', '', 'Compute dtype (float32, bfloat16); default: the model\'s.')
  flags.DEFINE_string('attention_impl', '', 'Attention kernel of the prefill (default: the model\'s).')


def main(argv: list[str]) -> None:
  del argv  # cli.run: no positional arguments
  f = flags.FLAGS
  try:  # before the model loads
    generate.check_sampling(f.temperature, f.top_k, f.top_p)
  except ValueError as e:
    raise cli.UsageError(str(e)) from None
  model = pretrained.load(f.workdir, f.hf, step=f.step, on_host=True, dtype=f.dtype, attention_impl=f.attention_impl)
  # Unstack a scanned run's layers here, as generate() would, while the parameters are host views (no copy).
  model_config, params = generate.unrolled(model.model_config, model.params)
  sample(model_config, params, model.tokenizer, f.prompt, max_new_tokens=f.max_new_tokens, temperature=f.temperature,
         top_k=f.top_k, top_p=f.top_p, seed=f.seed)


if __name__ == '__main__':
  cli.run(main, _define_flags, required=('prompt',))
