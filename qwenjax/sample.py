r"""Sample text from a trained or imported model, printing it as it is generated.

    python -m qwenjax.sample --workdir=/tmp/qwenjax-tiny --prompt='def main('        # latest checkpoint of a run
    python -m qwenjax.sample --hf=/path/to/Qwen2-0.5B --prompt='The capital of France is' --temperature=0
    python -m qwenjax.sample --hf=/path/to/Qwen2-0.5B-Instruct --chat --prompt='Hi!' --system='Be brief.'

`--workdir` reads the run's config.json, the parameters of its latest checkpoint (or `--step`) and the run's
tokenizer (`WORKDIR/tokenizer/`, or `WORKDIR/tokenizer.model` of older runs). `--hf` reads a Hugging Face
directory (config.json, safetensors and its tokenizer.json); both are opened by `qwenjax.pretrained`. Generation
stops at the tokenizer's stop tokens or after `--max_new_tokens`; `--temperature=0` is greedy. See
`qwenjax.generate`.

`--chat` makes `--prompt` the user's message (after `--system`, if given), renders the conversation with the
tokenizer's chat template and its generation prompt (`qwenjax.chat.encode`), prints only the reply and stops at
the template's end of turn (`chat.stop_ids`: Qwen's `<|im_end|>`, then the tokenizer's own stop tokens).
"""

from __future__ import annotations

import sys
from typing import Any

from absl import flags

from qwenjax import chat as chat_lib
from qwenjax import cli
from qwenjax import generate
from qwenjax import pretrained
from qwenjax import tokenizer as tokenizer_lib
from qwenjax.model_config import ModelConfig


def chat_prompt(tok: tokenizer_lib.Tokenizer, prompt: str, system: str | None = None) -> list[int]:
  """The ids of a conversation of `system` (if any) and the user's `prompt`, with the assistant's generation
  prompt: what a chat model continues with its reply."""
  messages = ([{'role': 'system', 'content': system}] if system else []) + [{'role': 'user', 'content': prompt}]
  return [int(i) for i in chat_lib.encode(tok, messages, add_generation_prompt=True)[0]]


def sample(model_config: ModelConfig, params: Any, tok: tokenizer_lib.Tokenizer, prompt: str, *,
           out=sys.stdout, chat: bool = False, system: str | None = None, **kwargs) -> str:
  """Writes the prompt and then its continuation to `out` as the tokens come; returns the continuation.

  `chat`: `prompt` is the user's message (after `system`), rendered with the chat template (`chat_prompt`); only
  the reply is written, and it ends at the template's end of turn.
  """
  if not prompt:
    raise ValueError('the prompt is empty: pass --prompt=TEXT')
  if system and not chat:
    raise ValueError('--system is the system message of a chat: pass --chat too')
  ids = chat_prompt(tok, prompt, system) if chat else tok.encode(prompt)
  stop_ids = chat_lib.stop_ids(tok) if chat else tok.stop_ids
  if not ids:
    raise ValueError(f'the prompt {prompt!r} encodes to no tokens')
  # Checked before the prompt is echoed, so a bad setting prints only the error.
  generate.check_prompts(model_config, [ids], kwargs.get('max_new_tokens', 0))
  generate.check_sampling(**{k: kwargs[k] for k in ('temperature', 'top_k', 'top_p') if k in kwargs},
                          vocab_limit=tok.vocab_size)
  if not chat:
    out.write(prompt)
    out.flush()
  tokens, shown = [], ''

  def stream(new):
    nonlocal shown
    tokens.extend(t for t in new[0] if t not in stop_ids)
    text = tok.decode(tokens)
    if not text.endswith('\ufffd'):  # wait for the rest of a multi-byte character
      out.write(text[len(shown):])
      out.flush()
      shown = text

  generate.generate(model_config, params, [ids], stop_token_ids=stop_ids, vocab_limit=tok.vocab_size,
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
  flags.DEFINE_string('prompt', None, 'The text to continue (with --chat: the user\'s message).')  # required
  flags.DEFINE_bool('chat', False, 'Render --prompt with the chat template and print the reply, which ends at the '
                    'end of turn.')
  flags.DEFINE_string('system', None, 'With --chat: a system message before the prompt.')
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
    if f.system is not None and not f.chat:
      raise ValueError('--system is the system message of a chat: pass --chat too')
  except ValueError as e:
    raise cli.UsageError(str(e)) from None
  model = pretrained.load(f.workdir, f.hf, step=f.step, on_host=True, dtype=f.dtype, attention_impl=f.attention_impl)
  # Unstack a scanned run's layers here, as generate() would, while the parameters are host views (no copy).
  model_config, params = generate.unrolled(model.model_config, model.params)
  sample(model_config, params, model.tokenizer, f.prompt, chat=f.chat, system=f.system,
         max_new_tokens=f.max_new_tokens, temperature=f.temperature, top_k=f.top_k, top_p=f.top_p, seed=f.seed)


if __name__ == '__main__':
  cli.run(main, _define_flags, required=('prompt',))
