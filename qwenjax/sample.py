r"""Sample text from a trained or imported model, printing it as it is generated.

    python -m qwenjax.sample --workdir=/tmp/qwenjax-tiny --prompt='def main('        # latest checkpoint of a run
    python -m qwenjax.sample --hf=/path/to/Qwen2-0.5B --prompt='The capital of France is' --temperature=0

`--workdir` reads the run's config.json, the parameters of its latest checkpoint (or `--step`) and the run's
tokenizer (`WORKDIR/tokenizer/`, or `WORKDIR/tokenizer.model` of older runs). `--hf` reads a Hugging Face
directory (config.json, safetensors and its tokenizer.json). Generation stops at the tokenizer's stop tokens
or after `--max_new_tokens`; `--temperature=0` is greedy. See `qwenjax.generate`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from absl import app
from absl import flags

from qwenjax import checkpoint
from qwenjax import generate
from qwenjax import tokenizer as tokenizer_lib
from qwenjax import workdir as workdir_lib
from qwenjax.model_config import ModelConfig

def load(workdir: str | None, hf: str | None, step: int | None = None,
         **overrides) -> tuple[ModelConfig, Any, tokenizer_lib.Tokenizer]:
  """(model config, parameters, tokenizer) of a training run's checkpoint or a Hugging Face directory."""
  if bool(workdir) == bool(hf):
    raise ValueError('give exactly one of --workdir (a training run) and --hf (a Hugging Face checkpoint '
                     'directory)')
  overrides = {k: v for k, v in overrides.items() if v}
  if workdir:
    workdir = workdir_lib.resolve(workdir)
    config, params, _ = checkpoint.restore_params(workdir, step)
    model_config = ModelConfig.from_dict({**config.model.to_dict(), **overrides})
    # Unstack a scanned run's layers here, as generate() would, so the stacked copy is freed before decoding.
    model_config, params = generate.unrolled(model_config, params)
    return model_config, params, workdir_lib.load_tokenizer(workdir, config)
  from qwenjax import hf as hf_lib  # pylint: disable=g-import-not-at-top  (safetensors only when needed)
  path = os.path.abspath(os.path.expanduser(hf))
  if not os.path.isdir(path):
    raise FileNotFoundError(f'--hf={hf}: no such directory (give a Hugging Face checkpoint directory)')
  model_config, params = hf_lib.from_pretrained(path)
  return dataclasses.replace(model_config, **overrides), params, tokenizer_lib.load(path)


def sample(model_config: ModelConfig, params: Any, tok: tokenizer_lib.Tokenizer, prompt: str, *,
           out=sys.stdout, **kwargs) -> str:
  """Writes the prompt and then its continuation to `out` as the tokens come; returns the continuation."""
  if not prompt:
    raise ValueError('the prompt is empty: pass --prompt=TEXT')
  ids = tok.encode(prompt)
  if not ids:
    raise ValueError(f'the prompt {prompt!r} encodes to no tokens')
  if max(ids) >= model_config.vocab_size:
    raise ValueError(f'the tokenizer gives id {max(ids)} but the model has only {model_config.vocab_size} '
                     'embeddings: the tokenizer does not belong to this model')
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
  flags.DEFINE_string('prompt', None, 'The text to continue.')
  flags.DEFINE_integer('max_new_tokens', 128, 'New tokens at most.')
  flags.DEFINE_float('temperature', 0.8, '0: greedy; higher: more random.')
  flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens only (0: all).')
  flags.DEFINE_float('top_p', 1.0, 'Sample among the most likely tokens whose probability reaches p.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed: the same seed gives the same text.')
  flags.DEFINE_string('dtype', '', 'Compute dtype (float32, bfloat16); default: the model\'s.')
  flags.DEFINE_string('attention_impl', '', 'Attention kernel of the prefill (default: the model\'s).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  f = flags.FLAGS
  try:
    model_config, params, tok = load(f.workdir, f.hf, f.step, dtype=f.dtype, attention_impl=f.attention_impl)
    sample(model_config, params, tok, f.prompt or '', max_new_tokens=f.max_new_tokens, temperature=f.temperature,
           top_k=f.top_k, top_p=f.top_p, seed=f.seed)
  except (ValueError, FileNotFoundError) as e:
    sys.stderr.write(f'\nerror: {e}\n')
    sys.exit(2)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
