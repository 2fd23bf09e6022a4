"""Chat data: conversations as token ids plus the mask of what a chat model learns to write.

    from qwenjax import chat, tokenizer
    tok = tokenizer.load('/path/to/Qwen2-0.5B-Instruct')
    ids, mask = chat.encode(tok, [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}])
    prompt = chat.encode(tok, messages, add_generation_prompt=True)[0]   # sample until chat.end_of_turn_id(tok)
    for example in chat.read_chat(['sft.jsonl'], tok): ...               # SFT: example.ids, example.mask
    for example in chat.read_preferences(['dpo.jsonl'], tok): ...        # DPO: prompt ids + chosen / rejected ids

**Templates.** A Hugging Face tokenizer renders with its own chat template: `chat_template.jinja` among its files
(as transformers >= 4.50 saves it), else `tokenizer_config.json`'s `chat_template` (a string, or a list of named
templates: `default`, or `tool_use` when tools are given). Rendering is transformers' `apply_chat_template`,
reimplemented here so that no transformers is needed at run time: the same sandboxed Jinja environment
(trim_blocks, lstrip_blocks, `loopcontrols`, its `tojson`, `raise_exception`, `strftime_now`, `namespace`), the same
variables (`messages`, `tools`, `add_generation_prompt` and the `*_token` strings of tokenizer_config.json), and
the text tokenized as one string without added special tokens, so `ids` equal
`AutoTokenizer.from_pretrained(dir).apply_chat_template(messages)['input_ids']`. A Hugging Face tokenizer without a
template is an error that names the file and the fix: guessing a format for a pretrained model would train it on
markers it never saw.

**The mask** is True on what the model writes after the generation prompt in each assistant turn: the content, what
the template writes between the turn's header and the content (Qwen3's `<think>` block) and after it up to the special
token that closes the turn (Qwen2.5's `<tool_call>` blocks), and that token (Qwen: `<|im_end|>`); False on system,
user and tool turns, role headers and the newline after the end of turn. No format is hard-coded: the conversation is
rendered again with a placeholder for each assistant content, the template text around the placeholders is matched
to the real rendering (exactly, or by a diff where the template writes differently around the real content, e.g.
moves a `<think>` block out of it), the header is the text that `add_generation_prompt` adds, and a token (with its
character offsets from `tokenizers`) is masked when it overlaps a masked span. A template with `{% generation %}`
blocks (transformers' `return_assistant_tokens_mask`, TRL's training templates) decides itself: the mask is then
the tokens overlapping those blocks, as in transformers.

**Tokenizers trained by `qwenjax.tokenizer.train`** (sentencepiece, no template, no chat markers in the vocabulary)
get a built-in ChatML format, so that a job can fine-tune the models it pretrained:
`<|im_start|>{role}\\n{content}</s>\\n` per message and `<|im_start|>assistant\\n` as the generation prompt. The
header, the content and the newline are encoded one by one (the header is the same ids wherever it stands), and the
turn ends with the tokenizer's end-of-sequence id `</s>`, a single id that text never produces: it is the
end-of-turn token of `end_of_turn_id` and already one of the tokenizer's `stop_ids`, so sampling stops there.

**Records** (`.jsonl`, one JSON object per line, TRL's dataset formats): SFT reads `{"messages": [...]}` or
`{"prompt": [...], "completion": [...]}` (message lists); DPO reads `{"prompt", "chosen", "rejected"}` as strings
(TRL's standard format: no template, EOS appended to each completion), as message lists (conversational: chosen and
rejected hold the assistant's reply), or without `prompt` (TRL's implicit prompt: chosen and rejected are whole
conversations, or texts, and their shared beginning is the prompt). Optional `tools` and `chat_template_kwargs`
go to the template. A DPO completion is encoded as TRL does: `prompt_ids` are the prompt with the generation
prompt, the completion ids the rest of the prompt-plus-completion ids, and every completion token counts in the
log-probability. Bad records (invalid JSON, no assistant turn, a message that is not `{"role": str, "content":
str}`, a missing `chosen`, a conversation the template refuses with `raise_exception`) are skipped, counted in
`ReadStats` and named with file and line in a warning.
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import datetime
import difflib
import functools
import json
import re
import threading
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from absl import logging
import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import numpy as np
import tokenizers

if TYPE_CHECKING:
  from qwenjax.tokenizer import Tokenizer

HF_FILE = 'tokenizer.json'
CONFIG_FILE = 'tokenizer_config.json'
TEMPLATE_FILE = 'chat_template.jinja'
TEMPLATE_DIR = 'additional_chat_templates'
# The built-in format of tokenizers without a template (see the module docstring).
CHATML_START = '<|im_start|>'

# Qwen2Tokenizer's defaults for the keys a tokenizer_config.json leaves out (transformers passes them as well).
_QWEN2_DEFAULT_TOKENS = {'unk_token': '<|endoftext|>', 'eos_token': '<|endoftext|>', 'pad_token': '<|endoftext|>'}
_GENERATION_TAG = re.compile(r'\{%-?\s*generation\s*-?%\}')
_REASONING_FIELDS = ('reasoning_content', 'thinking', 'reasoning')
# Bad records named one by one per file; the rest are counted in the file's summary warning.
_WARNINGS_PER_FILE = 20


class ChatError(ValueError):
  """A conversation or record that cannot be encoded; `kind` is its category in `ReadStats.skipped`."""

  def __init__(self, kind: str, detail: str):
    super().__init__(f'{kind}: {detail}')
    self.kind = kind
    self.detail = detail


# ---------------------------------------------------------------------------------------------------------
# Encoding.

def encode(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False,
           tools: Sequence[dict[str, Any]] | None = None,
           template_kwargs: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32, mask bool) of a conversation, rendered with the tokenizer's chat template.

  `mask` is True on what each assistant turn writes: its content and the end-of-turn token closing it (module
  docstring).
  With `add_generation_prompt`, the ids end with the header of a new assistant turn: a prompt to sample from,
  until `end_of_turn_id(tokenizer)`. `tools` (JSON schemas) and `template_kwargs` (e.g. Qwen3's
  `enable_thinking`) go to the template as in `apply_chat_template`. A conversation the template refuses or that
  is not a list of `{"role": str, "content": str}` messages raises ChatError; a Hugging Face tokenizer without a
  template raises ValueError.
  """
  return _format(tokenizer).encode(_messages(messages), add_generation_prompt, tools, template_kwargs or {})


def render(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False,
           tools: Sequence[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None) -> str:
  """The text that `encode` tokenizes (the built-in ChatML format: the text its ids decode to), for reading."""
  fmt = _format(tokenizer)
  messages = _messages(messages)
  if fmt.builtin:
    fmt.encode(messages, add_generation_prompt, tools, template_kwargs or {})  # its checks
    text = ''.join(f'{CHATML_START}{m["role"]}\n{m["content"]}</s>\n' for m in messages)
    return text + (f'{CHATML_START}assistant\n' if add_generation_prompt else '')
  return fmt.render(messages, add_generation_prompt, tools, template_kwargs or {})[0]


def end_of_turn_id(tokenizer: Tokenizer) -> int:
  """The token that closes an assistant turn (Qwen: `<|im_end|>`): where sampling a chat reply stops.

  Found by rendering a two-message conversation with the template: the first special token after the assistant's
  content. The built-in ChatML format ends turns with the tokenizer's `eos_id`.
  """
  return _format(tokenizer).end_of_turn_id()


def stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
  """What ends a sampled chat reply: `end_of_turn_id` first, then the tokenizer's own `stop_ids`."""
  return tuple(dict.fromkeys((end_of_turn_id(tokenizer),) + tuple(tokenizer.stop_ids)))


def template_of(tokenizer: Tokenizer) -> str | None:
  """The tokenizer's default chat template (Jinja source); None for the built-in ChatML format."""
  fmt = _format(tokenizer)
  return None if fmt.builtin else fmt.template(None)


def _messages(messages: Any) -> list[dict[str, Any]]:
  """Checked copies of the messages, as transformers gives them to templates (None values dropped, reasoning
  under each of its names)."""
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ChatError('bad messages', f'expected a non-empty list of messages, got {_short(messages)}')
  out = []
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise ChatError('bad message', f'message {i} is not a JSON object: {_short(message)}')
    message = {k: v for k, v in message.items() if v is not None}
    if not isinstance(message.get('role'), str):
      raise ChatError('bad message', f'message {i} has no "role" string: {_short(message)}')
    content = message.get('content')
    if not isinstance(content, str) and not (content is None and message.get('tool_calls')):
      raise ChatError('bad message', f'message {i} ({message["role"]}): "content" must be a string, got '
                      f'{_short(content)}')
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
      message = {'thinking': reasoning, **message, 'reasoning_content': reasoning}
    out.append(message)
  return out


def _short(value: Any, limit: int = 80) -> str:
  text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
  return text if len(text) <= limit else text[:limit - 3] + '...'


class _Format:
  """What a tokenizer needs for chat: its templates, compiled, and a `tokenizers` copy that gives offsets."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer
    self.builtin = HF_FILE not in tokenizer.files
    self._end_of_turn: int | None = None
    if self.builtin:
      return
    self.hf = tokenizers.Tokenizer.from_str(tokenizer.files[HF_FILE].decode('utf-8'))
    self.hf.no_truncation()
    self.hf.no_padding()
    self.special_ids = frozenset(i for i, t in self.hf.get_added_tokens_decoder().items() if t.special)
    config = json.loads(tokenizer.files[CONFIG_FILE]) if CONFIG_FILE in tokenizer.files else {}
    self.templates = _templates(tokenizer.files, config)
    self.variables = _token_variables(config)
    eos = self.variables.get('eos_token')
    self.eos_text = eos if isinstance(eos, str) and eos else self.hf.id_to_token(tokenizer.eos_id)

  def template(self, tools: Any) -> str:
    """The template transformers picks (`get_chat_template`): the one, else `tool_use` with tools, else `default`."""
    if not self.templates:
      raise ValueError(
          f'the tokenizer has no chat template: its {CONFIG_FILE} has no "chat_template" and there is no '
          f'{TEMPLATE_FILE} beside its {HF_FILE}. Use the tokenizer of an instruct checkpoint (e.g. Qwen2-0.5B-'
          f'Instruct, whose {CONFIG_FILE} holds Qwen\'s template), or add "chat_template": "<Jinja template>" to '
          f'{CONFIG_FILE} (or write {TEMPLATE_FILE}) beside the {HF_FILE}.')
    if len(self.templates) == 1 and 'default' in self.templates:
      return self.templates['default']
    if tools and 'tool_use' in self.templates:
      return self.templates['tool_use']
    if 'default' in self.templates:
      return self.templates['default']
    raise ValueError(f'the tokenizer has several chat templates ({", ".join(sorted(self.templates))}) and none is '
                     'named "default"; name one of them "default" in its tokenizer_config.json.')

  def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool, tools: Any,
             kwargs: dict[str, Any]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of its `{% generation %}` blocks."""
    compiled = _compile(self.template(tools))
    blocks, spans = [], []
    token = _TRACKING.set((blocks, spans))
    try:
      for block in compiled.generate(messages=messages, tools=tools, documents=None,
                                     add_generation_prompt=add_generation_prompt, **{**self.variables, **kwargs}):
        blocks.append(block)
    except jinja2.TemplateError as e:  # raise_exception() included
      raise ChatError('refused by the template', str(e)) from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
      raise ChatError('refused by the template', f'rendering failed: {type(e).__name__}: {e}') from None
    finally:
      _TRACKING.reset(token)
    return ''.join(blocks), spans

  def encode(self, messages: list[dict[str, Any]], add_generation_prompt: bool, tools: Any,
             kwargs: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    if self.builtin:
      return self._encode_builtin(messages, add_generation_prompt, tools, kwargs)
    text, generation_spans = self.render(messages, add_generation_prompt, tools, kwargs)
    ids, offsets = self._tokens(text)
    if _GENERATION_TAG.search(self.template(tools)):
      spans = generation_spans
    else:
      spans = [(start, end if close is None else int(offsets[close, 1])) for start, end, close in
               self._assistant_spans(messages, text, ids, offsets, add_generation_prompt, tools, kwargs)]
    mask = np.zeros(len(ids), bool)
    for start, end in spans:  # every token that overlaps a span, as transformers' assistant mask
      mask |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
    return ids, mask

  def _assistant_spans(self, messages: list[dict[str, Any]], text: str, ids: np.ndarray, offsets: np.ndarray,
                       add_generation_prompt: bool, tools: Any,
                       kwargs: dict[str, Any]) -> list[tuple[int, int, int | None]]:
    """(start, end, index of the end-of-turn token or None) of what each assistant message writes in `text`."""
    assistant = [i for i, m in enumerate(messages) if m['role'] == 'assistant']
    if not assistant:
      return []
    contents = self._contents(assistant, messages, text, add_generation_prompt, tools, kwargs)
    prompt = self._generation_prompt(messages[:assistant[0]], tools, kwargs)
    special = np.isin(ids, list(self.special_ids))
    out, done = [], 0
    for start, end, limit in contents:
      # What the template writes between the turn's header (the generation prompt) and the content, e.g. Qwen3's
      # <think> block, is the assistant's too; an empty content may sit before the newline that ends the header.
      header = text.rfind(prompt, done, start + len(prompt) - 1) if prompt else -1
      if header >= 0 and not special[(offsets[:, 0] >= header + len(prompt)) & (offsets[:, 0] < start)].any():
        start = header + len(prompt)
        end = max(end, start)
      # The first special token in the template text after the content ends the turn.
      following = np.nonzero((offsets[:, 0] >= end) & (offsets[:, 0] < limit) & special)[0]
      close = int(following[0]) if len(following) else None
      out.append((start, end, close))
      done = int(offsets[close, 1]) if close is not None else end
    return out

  def _generation_prompt(self, messages: list[dict[str, Any]], tools: Any, kwargs: dict[str, Any]) -> str:
    """What add_generation_prompt adds after `messages` (a user message if none): the header of a reply."""
    messages = messages or [{'role': 'user', 'content': 'Hi'}]
    try:
      without, with_prompt = (self.render(messages, flag, tools, kwargs)[0] for flag in (False, True))
    except ChatError:
      return ''
    return with_prompt[len(without):] if with_prompt.startswith(without) else ''

  def _contents(self, assistant: list[int], messages: list[dict[str, Any]], text: str, add_generation_prompt: bool,
                tools: Any, kwargs: dict[str, Any]) -> list[tuple[int, int, int]]:
    """(start, end, where the template text after it ends) of each of the `assistant` messages' content in `text`
    (an assistant message with tool calls and no content gets one too, empty).

    The messages are rendered again with placeholders for those contents; the template text around the
    placeholders is matched to `text` exactly, or where the template writes it differently for the real content
    (Qwen3's <think> blocks, Qwen2.5's test of an empty content), by a diff of the two renderings.
    """
    code = 0xF0000  # private-use characters that no template rewrites and text does not hold
    while any(chr(c) in text for c in range(code, code + len(assistant) + 1)):
      code += len(assistant) + 1
    placeholders = {i: chr(code) + chr(code + 1 + n) + chr(code) for n, i in enumerate(assistant)}
    marked = [dict(m, content=placeholders[i]) if i in placeholders else m for i, m in enumerate(messages)]
    layout = self.render(marked, add_generation_prompt, tools, kwargs)[0]
    found = []  # (start, end) of each placeholder in the layout
    for i, placeholder in placeholders.items():
      count = layout.count(placeholder)
      if count > 1:
        raise _lost(f'it writes message {i} {count} times')
      if count:
        found.append((layout.index(placeholder), layout.index(placeholder) + len(placeholder), i))
    found.sort()
    if not found:
      return []
    pieces = [layout[:found[0][0]]] + [layout[end:following[0]] for (_, end, _), following in
                                       zip(found, found[1:] + [(len(layout),)])]
    contents, position = [], len(pieces[0])
    if text.startswith(pieces[0]):
      for k, (_, _, i) in enumerate(found):
        content, after = messages[i].get('content', ''), pieces[k + 1]
        end = position + len(content)
        last = k + 1 == len(found)
        if not (text.startswith(content, position) and text.startswith(after, end)) or (last and end + len(
            after) != len(text)):
          break
        contents.append((position, end, end + len(after)))
        position = end + len(after)
      else:
        return contents
    # The diff: each placeholder maps to the text between the matched template text around it.
    matcher = difflib.SequenceMatcher(None, layout, text, autojunk=False)
    blocks = [b for b in matcher.get_matching_blocks() if b.size]
    contents = []
    for k, (start, end, _) in enumerate(found):
      before = [b.b + min(b.size, start - b.a) for b in blocks if b.a < start]
      after = [b.b + max(0, end - b.a) for b in blocks if b.a + b.size > end]
      following = found[k + 1][0] if k + 1 < len(found) else len(layout)
      limit = [b.b + min(b.size, following - b.a) for b in blocks if b.a < following]
      content_start = before[-1] if before else 0
      content_end = after[0] if after else len(text)
      if content_end < content_start:
        raise _lost(f'the diff of a rendering with placeholders crosses content {k}')
      contents.append((content_start, content_end, max(content_end, limit[-1] if limit else len(text))))
    return contents

  def end_of_turn_id(self) -> int:
    if self._end_of_turn is not None:
      return self._end_of_turn
    if self.builtin:
      self._end_of_turn = int(self.tokenizer.eos_id)
      return self._end_of_turn
    probes = ([{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}],
              [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
               {'role': 'assistant', 'content': 'Hello'}])
    errors = []
    for probe in probes:
      try:
        text = self.render(probe, False, None, {})[0]
        ids, offsets = self._tokens(text)
        spans = self._assistant_spans(probe, text, ids, offsets, False, None, {})
      except ChatError as e:
        errors.append(str(e))
        continue
      if spans and spans[-1][2] is not None:
        self._end_of_turn = int(ids[spans[-1][2]])
        return self._end_of_turn
      errors.append(f'no special token follows the assistant\'s content in {text!r}')
    raise ValueError('cannot find the token that ends an assistant turn in the chat template: ' + '; '.join(errors))

  def _tokens(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """The ids of rendered text, as transformers encodes it (no special tokens added), and their character spans."""
    encoding = self.hf.encode(text, add_special_tokens=False)
    return np.asarray(encoding.ids, np.int32), np.asarray(encoding.offsets, np.int64).reshape(-1, 2)

  def _encode_builtin(self, messages: list[dict[str, Any]], add_generation_prompt: bool, tools: Any,
                      kwargs: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    if tools or kwargs:
      raise ValueError('the built-in ChatML format of tokenizers without a chat template takes no tools and no '
                       'template arguments')
    tok = self.tokenizer
    newline = tok.encode('\n')
    ids, mask = [], []
    for i, message in enumerate(messages):
      if not isinstance(message.get('content'), str) or set(message) - {'role', 'content'}:
        raise ChatError('refused by the template', f'message {i}: the built-in ChatML format writes only "role" and '
                        f'a "content" string (this message has {", ".join(sorted(message))})')
      header = tok.encode(f'{CHATML_START}{message["role"]}\n')
      body = tok.encode(message['content']) + [tok.eos_id]
      ids += header + body + newline
      mask += [False] * len(header) + [message['role'] == 'assistant'] * len(body) + [False] * len(newline)
    if add_generation_prompt:
      header = tok.encode(f'{CHATML_START}assistant\n')
      ids += header
      mask += [False] * len(header)
    return np.asarray(ids, np.int32), np.asarray(mask, bool)

  def encode_text(self, text: str) -> list[int]:
    """Plain text as transformers' `tokenizer(text)` encodes it (with the tokenizer.json's own special tokens)."""
    if self.builtin:
      return list(self.tokenizer.encode(text))
    return self.hf.encode(text, add_special_tokens=True).ids


def _lost(why: str) -> ChatError:
  return ChatError('refused by the template', f'cannot find where the template writes the assistant messages ({why});'
                   ' mark what the assistant writes with {% generation %} ... {% endgeneration %} in the template')


def _templates(files: dict[str, bytes], config: dict[str, Any]) -> dict[str, str]:
  """name -> Jinja source, as transformers loads them: template files first, else tokenizer_config.json's."""
  templates = {}
  if TEMPLATE_FILE in files:
    templates['default'] = files[TEMPLATE_FILE].decode('utf-8')
  for name, data in files.items():
    if name.startswith(TEMPLATE_DIR + '/') and name.endswith('.jinja'):
      templates[name[len(TEMPLATE_DIR) + 1:-len('.jinja')]] = data.decode('utf-8')
  if templates:
    return templates
  template = config.get('chat_template')
  if isinstance(template, str):
    return {'default': template}
  if isinstance(template, list):
    return {t['name']: t['template'] for t in template if isinstance(t, dict) and 'name' in t and 'template' in t}
  return {}


def _token_variables(config: dict[str, Any]) -> dict[str, str]:
  """tokenizer_config.json's special tokens as strings (transformers' `special_tokens_map`), e.g. `eos_token`."""
  out = {}
  if config.get('tokenizer_class') in ('Qwen2Tokenizer', 'Qwen2TokenizerFast'):
    out.update({k: v for k, v in _QWEN2_DEFAULT_TOKENS.items() if k not in config})
  for key, value in config.items():
    if isinstance(value, dict) and isinstance(value.get('content'), str):  # a serialized AddedToken
      value = value['content']
    if key.endswith('_token') and isinstance(value, str):
      out[key] = value
  return out


_FORMATS: collections.OrderedDict[str, _Format] = collections.OrderedDict()
_FORMATS_LOCK = threading.Lock()


def _format(tokenizer: Tokenizer) -> _Format:
  """The tokenizer's _Format, built once per tokenizer (by fingerprint: the bytes of its files)."""
  with _FORMATS_LOCK:
    fmt = _FORMATS.get(tokenizer.fingerprint)
    if fmt is not None:
      _FORMATS.move_to_end(tokenizer.fingerprint)
      return fmt
  fmt = _Format(tokenizer)
  with _FORMATS_LOCK:
    _FORMATS[tokenizer.fingerprint] = fmt
    while len(_FORMATS) > 8:
      _FORMATS.popitem(last=False)
  return fmt


# ---------------------------------------------------------------------------------------------------------
# The Jinja environment of transformers' chat templates (transformers.utils.chat_template_utils).

# (blocks rendered so far, generation spans) of the rendering in progress in this thread or task.
_TRACKING: contextvars.ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = contextvars.ContextVar(
    'qwenjax_chat_generation', default=None)


class _Generation(jinja2.ext.Extension):
  """`{% generation %} ... {% endgeneration %}`: what the assistant writes, recorded as a span of the output."""
  tags = {'generation'}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(('name:endgeneration',), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method('_track'), [], [], body).set_lineno(lineno)

  def _track(self, caller):
    text = caller()
    tracking = _TRACKING.get()
    if tracking is not None:
      blocks, spans = tracking
      start = sum(len(b) for b in blocks)  # the blocks before this one are already out (generate() streams)
      spans.append((start, start + len(text)))
    return text


class _TemplateDict:
  """`dict(...)` for templates, without the attributes of the dict type."""

  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
  """`namespace(...)` that refuses underscore names (no way to CPython internals)."""

  def __init__(*args, **kwargs):  # pylint: disable=no-method-argument
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith('_'):
      raise jinja2.exceptions.SecurityError(f'chat templates cannot set underscore attributes ({name!r})')


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):  # pylint: disable=redefined-builtin
  return datetime.datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                     extensions=[_Generation, jinja2.ext.loopcontrols])
  env.filters['tojson'] = _tojson
  env.globals['raise_exception'] = _raise_exception
  env.globals['strftime_now'] = _strftime_now
  env.globals['dict'] = _TemplateDict()
  env.globals['namespace'] = _Namespace
  try:
    return env.from_string(source)
  except jinja2.TemplateSyntaxError as e:
    raise ValueError(f'the tokenizer\'s chat template is not valid Jinja (line {e.lineno}): {e.message}') from e


# ---------------------------------------------------------------------------------------------------------
# Records.

@dataclasses.dataclass(frozen=True)
class ChatRecord:
  """An SFT conversation as read: its messages (and the tools and template arguments it gives the template)."""
  messages: list[dict[str, Any]]
  tools: list[dict[str, Any]] | None = None
  template_kwargs: dict[str, Any] | None = None
  source: str = ''


@dataclasses.dataclass(frozen=True)
class PreferenceRecord:
  """A DPO pair with its prompt made explicit: three strings (TRL's standard format) or three message lists."""
  prompt: str | list[dict[str, Any]]
  chosen: str | list[dict[str, Any]]
  rejected: str | list[dict[str, Any]]
  tools: list[dict[str, Any]] | None = None
  template_kwargs: dict[str, Any] | None = None
  source: str = ''

  @property
  def conversational(self) -> bool:
    return isinstance(self.chosen, list)


@dataclasses.dataclass(frozen=True)
class ChatExample:
  """An encoded SFT conversation: `mask` marks the tokens to train on; `source` is 'file:line'."""
  ids: np.ndarray
  mask: np.ndarray
  source: str = ''


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
  """An encoded DPO pair, as TRL's DPOTrainer tokenizes it: each completion continues `prompt_ids`."""
  prompt_ids: np.ndarray
  chosen_ids: np.ndarray
  rejected_ids: np.ndarray
  source: str = ''

  def sequences(self) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((ids, completion mask) of prompt + chosen, the same of prompt + rejected): the log-probability of a
    completion is the sum over the tokens where the mask is True."""
    out = []
    for completion in (self.chosen_ids, self.rejected_ids):
      ids = np.concatenate([self.prompt_ids, completion]).astype(np.int32)
      mask = np.concatenate([np.zeros(len(self.prompt_ids), bool), np.ones(len(completion), bool)])
      out.append((ids, mask))
    return out[0], out[1]


@dataclasses.dataclass
class ReadStats:
  """Counts of one or more `read_chat` / `read_preferences` passes; `skipped` maps a ChatError kind to a count."""
  records: int = 0
  kept: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  prefix_mismatches: int = 0  # DPO completions whose prompt + completion ids do not start with the prompt ids
  where: list = dataclasses.field(default_factory=list)  # the warnings naming the first skipped records

  def summary(self) -> str:
    reasons = ', '.join(f'{n} {kind}' for kind, n in self.skipped.most_common())
    return f'{self.kept} of {self.records} records kept' + (f'; skipped: {reasons}' if reasons else '')


def parse_chat_record(record: Any) -> ChatRecord:
  """A `.jsonl` SFT record: `{"messages": [...]}` or `{"prompt": [...], "completion": [...]}`; ChatError if bad."""
  if not isinstance(record, dict):
    raise ChatError('not a chat record', f'expected a JSON object, got {_short(record)}')
  if 'messages' in record:
    messages = record['messages']
  elif 'prompt' in record and 'completion' in record:
    prompt, completion = record['prompt'], record['completion']
    if not isinstance(prompt, list) or not isinstance(completion, list):
      raise ChatError('not a chat record', '"prompt" and "completion" must be message lists for chat data '
                      '(plain text belongs in data.format=text)')
    messages = prompt + completion
  else:
    raise ChatError('not a chat record', f'no "messages" (keys: {", ".join(sorted(record)) or "none"})')
  messages = _checked_messages(messages, 'messages')
  if not any(m['role'] == 'assistant' for m in messages):
    raise ChatError('no assistant turn', 'the conversation has no assistant message to train on')
  tools, kwargs = _template_inputs(record)
  return ChatRecord(messages, tools, kwargs)


def parse_preference_record(record: Any) -> PreferenceRecord:
  """A `.jsonl` DPO record in one of TRL's preference formats (module docstring), with the prompt made explicit."""
  if not isinstance(record, dict):
    raise ChatError('not a preference record', f'expected a JSON object, got {_short(record)}')
  for key in ('chosen', 'rejected'):
    if key not in record:
      raise ChatError(f'missing {key}', f'no "{key}" (keys: {", ".join(sorted(record)) or "none"})')
  chosen, rejected = record['chosen'], record['rejected']
  conversational = isinstance(chosen, list)
  fields = {'chosen': chosen, 'rejected': rejected, **({'prompt': record['prompt']} if 'prompt' in record else {})}
  for key, value in fields.items():
    if not isinstance(value, list if conversational else str):
      raise ChatError('bad preference', f'"{key}" is {_short(value)}: give "prompt", "chosen" and "rejected" all '
                      'as strings or all as message lists')
  if conversational:
    chosen, rejected = _checked_messages(chosen, 'chosen'), _checked_messages(rejected, 'rejected')
  if 'prompt' in record:
    prompt = _checked_messages(record['prompt'], 'prompt') if conversational else record['prompt']
  else:  # TRL's implicit prompt: the shared beginning (trl.extract_prompt)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
      shared += 1
    if shared == len(chosen) or shared == len(rejected):
      raise ChatError('bad preference', 'without "prompt", chosen and rejected must differ after a shared beginning '
                      '(one of them is the beginning of the other)')
    if not conversational and shared and chosen[shared - 1] == ' ':  # the completion keeps its leading space
      shared -= 1
    prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
  if conversational:
    if not prompt:
      raise ChatError('bad preference', 'the prompt has no message')
    for key, messages in (('chosen', chosen), ('rejected', rejected)):
      if not any(m['role'] == 'assistant' for m in messages):
        raise ChatError('no assistant turn', f'"{key}" has no assistant message')
  tools, kwargs = _template_inputs(record)
  return PreferenceRecord(prompt, chosen, rejected, tools, kwargs)


def _checked_messages(messages: Any, key: str) -> list[dict[str, Any]]:
  try:
    _messages(messages)
  except ChatError as e:
    raise ChatError(e.kind, f'"{key}": {e.detail}') from None
  return list(messages)


def _template_inputs(record: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, dict[str, Any] | None]:
  """A record's `tools` (a list, or a JSON string of one, as TRL accepts) and `chat_template_kwargs`."""
  tools = record.get('tools')
  if isinstance(tools, str):
    try:
      tools = json.loads(tools)
    except ValueError as e:
      raise ChatError('bad tools', f'"tools" is a string but not JSON: {e}') from None
  if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
    raise ChatError('bad tools', f'"tools" must be a list of JSON schemas, got {_short(tools)}')
  kwargs = record.get('chat_template_kwargs')
  if kwargs is not None and not isinstance(kwargs, dict):
    raise ChatError('bad chat_template_kwargs', f'expected a JSON object, got {_short(kwargs)}')
  return tools or None, kwargs or None


def encode_chat(tokenizer: Tokenizer, record: ChatRecord) -> ChatExample:
  """An SFT record as ids and the mask to train on."""
  ids, mask = encode(tokenizer, record.messages, tools=record.tools, template_kwargs=record.template_kwargs)
  if not mask.any():
    raise ChatError('no assistant turn', 'the template writes none of the assistant messages')
  return ChatExample(ids, mask, record.source)


def encode_preference(tokenizer: Tokenizer, record: PreferenceRecord,
                      stats: ReadStats | None = None) -> PreferenceExample:
  """A DPO record as TRL's DPOTrainer tokenizes it.

  Message lists: `prompt_ids` is the prompt with the generation prompt, each completion the ids of prompt +
  completion after `len(prompt_ids)`. Strings: no template; the tokenizer's eos token is appended to each
  completion (unless it ends with it) and the text is encoded with the tokenizer.json's own special tokens, as
  `tokenizer(text)` does. When the prompt's ids are not the start of prompt + completion ids, TRL warns and
  slices anyway; so does this, counting it in `stats.prefix_mismatches`.
  """
  fmt = _format(tokenizer)
  if record.conversational:
    kw = dict(tools=record.tools, template_kwargs=record.template_kwargs)
    prompt = encode(tokenizer, record.prompt, add_generation_prompt=True, **kw)[0]
    full = [encode(tokenizer, record.prompt + c, **kw)[0] for c in (record.chosen, record.rejected)]
  else:
    prompt = np.asarray(fmt.encode_text(record.prompt), np.int32)
    full = []
    for completion in (record.chosen, record.rejected):
      if fmt.builtin:  # </s> is a control piece that text does not encode to
        full.append(np.asarray(fmt.encode_text(record.prompt + completion) + [tokenizer.eos_id], np.int32))
      else:
        text = record.prompt + completion
        full.append(np.asarray(fmt.encode_text(text if text.endswith(fmt.eos_text) else text + fmt.eos_text),
                               np.int32))
  for ids in full:
    if len(ids) <= len(prompt):
      raise ChatError('empty completion', 'a completion adds no token to the prompt')
    if stats is not None and not np.array_equal(ids[:len(prompt)], prompt):
      stats.prefix_mismatches += 1
  return PreferenceExample(prompt, full[0][len(prompt):], full[1][len(prompt):], record.source)


def read_chat(paths: str | Iterable[str], tokenizer: Tokenizer, stats: ReadStats | None = None
              ) -> Iterator[ChatExample]:
  """The encoded SFT conversations of `.jsonl` files, in order; bad records skipped, counted and warned about."""

  def one(record, source):
    return encode_chat(tokenizer, dataclasses.replace(parse_chat_record(record), source=source))

  yield from _read(paths, one, stats)


def read_preferences(paths: str | Iterable[str], tokenizer: Tokenizer, stats: ReadStats | None = None
                     ) -> Iterator[PreferenceExample]:
  """The encoded DPO pairs of `.jsonl` files, in order; bad records skipped, counted and warned about."""
  stats = stats if stats is not None else ReadStats()

  def one(record, source):
    before = stats.prefix_mismatches
    example = encode_preference(tokenizer, dataclasses.replace(parse_preference_record(record), source=source), stats)
    if stats.prefix_mismatches > before and stats.prefix_mismatches <= _WARNINGS_PER_FILE:
      logging.warning('%s: the prompt\'s ids are not the start of the prompt + completion ids (the tokenizer merges '
                      'across the boundary); the completion is the ids after the prompt\'s length, as in TRL', source)
    return example

  yield from _read(paths, one, stats)


def _read(paths: str | Iterable[str], convert, stats: ReadStats | None) -> Iterator[Any]:
  """convert(record, 'file:line') of each record of each file; ChatErrors skipped, counted in `stats`, named."""
  stats = stats if stats is not None else ReadStats()
  for path in [paths] if isinstance(paths, str) else list(paths):
    records, skipped = 0, collections.Counter()
    with open(path, 'rb') as f:
      for line_number, line in enumerate(f, 1):
        if not line.strip():
          continue
        records += 1
        stats.records += 1
        source = f'{path}:{line_number}'
        try:
          try:
            record = json.loads(line.decode('utf-8'))
          except UnicodeDecodeError as e:
            raise ChatError('invalid JSON', f'not UTF-8 text ({e.reason} at byte {e.start})') from None
          except ValueError as e:
            raise ChatError('invalid JSON', str(e)) from None
          example = convert(record, source)
        except ChatError as e:
          skipped[e.kind] += 1
          stats.skipped[e.kind] += 1
          if len(stats.where) < _WARNINGS_PER_FILE:
            stats.where.append(f'{source}: skipped, {e}')
          if sum(skipped.values()) <= _WARNINGS_PER_FILE:
            logging.warning('%s: skipped, %s', source, e)
          continue
        stats.kept += 1
        yield example
    if skipped:
      count = sum(skipped.values())
      reasons = ', '.join(f'{n} {kind}' for kind, n in skipped.most_common())
      logging.warning('%s: skipped %d of %d records (%s)%s', path, count, records, reasons,
                      f'; the first {_WARNINGS_PER_FILE} are named above' if count > _WARNINGS_PER_FILE else '')
