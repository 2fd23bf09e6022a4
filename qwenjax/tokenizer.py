"""Tokenizers: one interface over sentencepiece models and Hugging Face `tokenizer.json` files, and BPE training.

Training, sampling and evaluation all go through `load` (or `train`), so a run uses the same ids everywhere:

    from qwenjax import tokenizer
    tok = tokenizer.load('/path/to/Qwen2-0.5B')       # a checkpoint directory: its tokenizer.json
    tok = tokenizer.load('workdir/tokenizer')          # a directory holding tokenizer.model or tokenizer.json
    tok = tokenizer.train(documents, 'workdir/tokenizer', vocab_size=4096)   # a new BPE, written there
    ids = tok.encode('some text')                      # no BOS/EOS added; documents end with tok.eos_id
    text = tok.decode(ids)
    tok.save('other/dir')                              # load('other/dir') gives the same tokenizer back

`load(path)` takes a sentencepiece `.model` file, a `tokenizer.json` file, or a directory holding either. A
directory holding both (Llama-style checkpoints) uses `tokenizer.json`, as `transformers.AutoTokenizer` does;
pass the `.model` file itself to use sentencepiece.

Hugging Face tokenizers go through the `tokenizers` package (the Rust library transformers uses), with the
tokenizer.json's truncation and padding turned off and no special tokens added, so the ids equal
`AutoTokenizer.from_pretrained(dir)(text, add_special_tokens=False)['input_ids']` (for Qwen2 checkpoints, whose
tokenizer.json holds the NFC normalizer and Qwen2 split pattern that transformers' `Qwen2Tokenizer` rebuilds).
Their `eos_id`, the document separator, is the end-of-text token: `<|endoftext|>` (or `<|end_of_text|>`) when
the vocabulary has one, else `tokenizer_config.json`'s `eos_token`, else `generation_config.json`'s first
`eos_token_id`. The vocabulary is searched first because an instruct checkpoint's `eos_token` ends a chat turn
(Qwen2-Instruct: `<|im_end|>`), while its pretraining documents were separated by `<|endoftext|>`. `stop_ids`
(what ends generation) adds `generation_config.json`'s `eos_token_id`s and `tokenizer_config.json`'s
`eos_token`.

`train` writes a sentencepiece BPE (`tokenizer.model`) that never fails on a script: the 256 byte pieces make
every character encodable, identity normalization makes `decode(encode(text)) == text` exactly (except U+2581
'▁', sentencepiece's own space marker, which decodes as a space), and rare characters are left to the bytes so
that corpora with thousands of them (Chinese, Japanese) fit any vocabulary (see `train`).

A tokenizer is built from the bytes of its files (`files`): `save` writes those bytes back, `fingerprint`
hashes them (to key caches of tokenized data), and pickling sends them, so worker processes rebuild the same
tokenizer. Hugging Face's `encode_batch` uses the `tokenizers` thread pool, which that package turns off in
processes forked after it ran (set TOKENIZERS_PARALLELISM=true to keep it, if the fork is safe).
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import re
from typing import Any, Iterable, Iterator, Sequence

from absl import logging
import numpy as np
import sentencepiece as spm
import tokenizers

from qwenjax import files as files_lib  # `files` is a Tokenizer's own attribute

SENTENCEPIECE_FILE = 'tokenizer.model'
HF_FILE = 'tokenizer.json'
HF_CONFIG_FILES = ('tokenizer_config.json', 'generation_config.json', 'chat_template.jinja')
_END_OF_TEXT = ('<|endoftext|>', '<|end_of_text|>')
# Text every tokenizer must encode: letters, digits, punctuation, accents, CJK, an emoji, a word of no vocabulary.
_PROBE = 'Probe: qwenjax 12 café 中文 😀 zqxv'

# A trained model's fixed pieces: <unk>, <s>, </s>, '\n' and the 256 bytes.
_FIXED_PIECES = 4 + 256
# The smallest vocabulary `train` accepts: the fixed pieces plus room for 16 characters and 16 merges.
_MIN_LEARNED_PIECES = 32
MIN_TRAIN_VOCAB_SIZE = _FIXED_PIECES + _MIN_LEARNED_PIECES
# Characters that cover this fraction of the sampled text become pieces (sentencepiece's default for CJK),
# as long as they fit in half of the learned pieces; the rest of the characters are encoded as bytes.
_CHARACTER_COVERAGE = 0.9995
# sentencepiece skips longer sentences (its max_sentence_length, in bytes); lines are cut into pieces of
# _MAX_LINE_CHARS characters (4 bytes at most each) so that none is skipped.
_MAX_SENTENCE_BYTES = 16384
_MAX_LINE_CHARS = _MAX_SENTENCE_BYTES // 4


class Tokenizer:
  """Text <-> ids. Subclasses set `vocab_size`, `eos_id` and `stop_ids` and implement the three codecs.

  Attributes:
    files: file name -> bytes: what `save` writes and `fingerprint` hashes.
    vocab_size: number of ids (max id + 1, added and special tokens included): what must fit
      `model.vocab_size`.
    eos_id: the document separator.
    stop_ids: ids that end generation (`eos_id` first).
    fingerprint: 16 hex digits of a SHA-256 of `files` (names and bytes).
  """
  vocab_size: int
  eos_id: int
  stop_ids: tuple[int, ...]
  _other_files_read: tuple[str, ...] = ()  # files in a directory that load() would read instead or as well

  def __init__(self, files: dict[str, bytes]):
    self.files = dict(files)
    digest = hashlib.sha256()
    for name in sorted(self.files):
      data = self.files[name]
      digest.update(f'{name}\0{len(data)}\0'.encode())
      digest.update(data)
    self.fingerprint = digest.hexdigest()[:16]

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    raise NotImplementedError

  def decode(self, ids: Sequence[int]) -> str:
    raise NotImplementedError

  def save(self, directory: str) -> None:
    """Writes `files` into `directory` (each atomically), so that `load(directory)` reads this tokenizer."""
    os.makedirs(directory, exist_ok=True)
    for name in self._other_files_read:
      if name not in self.files and os.path.exists(os.path.join(directory, name)):
        raise ValueError(f'cannot save the tokenizer into {directory}: it already holds {name}, which is not '
                         f'one of this tokenizer\'s files ({", ".join(sorted(self.files))}) and would change '
                         'what load() reads there. Save into an empty directory or remove that file.')
    for name, data in self.files.items():
      files_lib.write(os.path.join(directory, name), data)

  def _check_ids(self, ids: Sequence[int]) -> list[int]:
    ids = [int(i) for i in ids]
    if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
      bad = next(i for i in ids if not 0 <= i < self.vocab_size)
      raise ValueError(f'cannot decode id {bad}: the tokenizer has ids 0..{self.vocab_size - 1}. A model whose '
                       'embedding table is larger than the tokenizer must not sample ids >= '
                       f'{self.vocab_size} (mask those logits).')
    return ids

  def __reduce__(self):
    return type(self), (self.files,)

  def __repr__(self) -> str:
    return (f'{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id}, '
            f'fingerprint={self.fingerprint!r})')


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model (`tokenizer.model`); its `</s>` separates documents."""
  _other_files_read = (HF_FILE,)

  def __init__(self, files: dict[str, bytes]):
    super().__init__(files)
    try:
      self._processor = spm.SentencePieceProcessor(model_proto=self.files[SENTENCEPIECE_FILE])
    except (RuntimeError, OSError) as e:
      raise ValueError(f'{SENTENCEPIECE_FILE} is not a sentencepiece model that sentencepiece '
                       f'{spm.__version__} can read: {e}') from e
    self.vocab_size = self._processor.get_piece_size()
    self.eos_id = self._processor.eos_id()
    if self.eos_id < 0:
      raise ValueError('the sentencepiece model has no end-of-sequence piece (</s>), which separates '
                       'documents; train one with qwenjax.tokenizer.train or with eos_id >= 0')
    self.stop_ids = (self.eos_id,)
    self._threads = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1

  def encode(self, text: str) -> list[int]:
    return self._processor.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._processor.encode(list(texts), num_threads=self._threads)

  def decode(self, ids: Sequence[int]) -> str:
    return self._processor.decode(self._check_ids(ids))


class HuggingFaceTokenizer(Tokenizer):
  """A `tokenizer.json`, with the `tokenizer_config.json` and `generation_config.json` beside it if any."""
  _other_files_read = HF_CONFIG_FILES

  def __init__(self, files: dict[str, bytes]):
    super().__init__(files)
    try:
      self._tokenizer = tokenizers.Tokenizer.from_str(self.files[HF_FILE].decode('utf-8'))
    except Exception as e:  # tokenizers raises its own Exception subclass; bad UTF-8 a UnicodeDecodeError
      raise ValueError(f'{HF_FILE} is not a Hugging Face tokenizer that tokenizers {tokenizers.__version__} '
                       f'can read: {e}') from e
    self._tokenizer.no_truncation()
    self._tokenizer.no_padding()
    vocab = self._tokenizer.get_vocab(with_added_tokens=True)
    if not vocab:
      raise ValueError(f'{HF_FILE} has an empty vocabulary')
    try:  # a tokenizer that fails on some text fails here, once, not in the middle of a run
      self._tokenizer.encode(_PROBE, add_special_tokens=False)
    except Exception as e:  # pylint: disable=broad-except  (tokenizers raises a bare Exception)
      raise ValueError(f'{HF_FILE} cannot encode text ({e}): a WordLevel or WordPiece tokenizer needs its unknown '
                       'token (model.unk_token) in its vocabulary') from None
    self.vocab_size = max(vocab.values()) + 1
    tokenizer_config = self._json('tokenizer_config.json')
    generation_config = self._json('generation_config.json')

    config_eos = tokenizer_config.get('eos_token')
    if isinstance(config_eos, dict):  # an AddedToken, as older transformers wrote it
      config_eos = config_eos.get('content')
    config_eos_id = vocab.get(config_eos) if isinstance(config_eos, str) else None
    generation_eos = generation_config.get('eos_token_id')
    generation_eos = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])

    end_of_text = [vocab[t] for t in _END_OF_TEXT if t in vocab]
    candidates = end_of_text + [i for i in (config_eos_id,) if i is not None] + generation_eos
    if not candidates:
      raise ValueError(
          f'the tokenizer has no end-of-text token to separate documents: no {" or ".join(_END_OF_TEXT)} in its '
          'vocabulary, no eos_token in tokenizer_config.json, no eos_token_id in generation_config.json. Add '
          '"eos_token": "<the token>" to tokenizer_config.json beside tokenizer.json.')
    self.eos_id = int(candidates[0])
    stops = [self.eos_id] + generation_eos + ([config_eos_id] if config_eos_id is not None else [])
    self.stop_ids = tuple(dict.fromkeys(int(i) for i in stops))

  def _json(self, name: str) -> dict[str, Any]:
    if name not in self.files:
      return {}
    try:
      return json.loads(self.files[name])
    except ValueError as e:
      raise ValueError(f'{name} beside the tokenizer.json is not valid JSON: {e}') from e

  def encode(self, text: str) -> list[int]:
    try:
      return self._tokenizer.encode(text, add_special_tokens=False).ids
    except Exception as e:  # pylint: disable=broad-except  (tokenizers raises a bare Exception)
      raise ValueError(f'the tokenizer ({HF_FILE}) cannot encode {text[:40]!r}: {e}') from None

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    # encode_batch_fast (newer tokenizers releases) skips the offsets that encode_batch computes.
    encode = getattr(self._tokenizer, 'encode_batch_fast', self._tokenizer.encode_batch)
    try:
      return [e.ids for e in encode(list(texts), add_special_tokens=False)]
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'the tokenizer ({HF_FILE}) cannot encode the text: {e}') from None

  def decode(self, ids: Sequence[int]) -> str:
    return self._tokenizer.decode(self._check_ids(ids), skip_special_tokens=False)


def load(path: str) -> Tokenizer:
  """The tokenizer at `path`: a sentencepiece `.model` file, a `tokenizer.json`, or a directory holding either.

  A directory holding both uses tokenizer.json (as transformers does). A tokenizer.json reads the
  tokenizer_config.json and generation_config.json beside it, when there, for its end-of-text and stop ids.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'tokenizer {path!r} does not exist: give a sentencepiece .model file, a Hugging Face '
                            'tokenizer.json, or a directory holding either (e.g. a Qwen2 checkpoint directory)')
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, HF_FILE)):
      path = os.path.join(path, HF_FILE)
    elif os.path.isfile(os.path.join(path, SENTENCEPIECE_FILE)):
      path = os.path.join(path, SENTENCEPIECE_FILE)
    else:
      names = sorted(os.listdir(path))
      hint = ''
      if 'vocab.json' in names and 'merges.txt' in names:
        hint = (' It has vocab.json and merges.txt: write the tokenizer.json with transformers, '
                'AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR).')
      raise FileNotFoundError(f'directory {path!r} holds no {HF_FILE} and no {SENTENCEPIECE_FILE} (it holds '
                              f'{", ".join(names[:20]) or "nothing"}{", ..." if len(names) > 20 else ""}).{hint}')
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise ValueError(f'cannot read tokenizer file {path!r}: {e}') from e
  if path.endswith('.json') or data.lstrip()[:1] == b'{':
    files = {HF_FILE: data}
    for name in HF_CONFIG_FILES:
      companion = os.path.join(os.path.dirname(path), name)
      if os.path.isfile(companion):
        with open(companion, 'rb') as f:
          files[name] = f.read()
    kind = HuggingFaceTokenizer
  else:
    files, kind = {SENTENCEPIECE_FILE: data}, SentencePieceTokenizer
  try:
    return kind(files)
  except ValueError as e:
    raise ValueError(f'cannot load the tokenizer {path!r}: {e}') from e


def from_files(files: dict[str, bytes]) -> Tokenizer:
  """The tokenizer whose files (`Tokenizer.files`: name -> bytes) these are, e.g. read through epath from a
  `gs://` workdir where `load`, which takes local paths, cannot read."""
  if HF_FILE in files:
    return HuggingFaceTokenizer(files)
  if SENTENCEPIECE_FILE in files:
    return SentencePieceTokenizer(files)
  raise ValueError(f'no {HF_FILE} and no {SENTENCEPIECE_FILE} among the files {sorted(files)}')


# ---------------------------------------------------------------------------------------------------------
# Training.

def train(texts: Iterable[str], directory: str, *, vocab_size: int, max_lines: int = 200_000,
          seed: int = 0) -> SentencePieceTokenizer:
  """Trains a sentencepiece BPE on lines of `texts`, writes `directory/tokenizer.model` and returns it.

  At most `max_lines` lines are read, so training takes seconds whatever the corpus size: the lines of whole
  documents until `max_lines`, the documents of a sequence (a list, `documents.DocumentSource`) in a random
  order drawn from `seed`, those of any other iterable in its own order (give them shuffled: only as many are
  read as needed).

  The pieces are the fixed ones (`<unk>`, `<s>`, `</s>`, '\\n' and the 256 bytes: no character is ever
  unknown), the characters, and merges. Characters are taken by frequency until they cover 99.95% of the
  sampled text (sentencepiece's default for CJK), but at most half of the learned pieces, so that corpora with
  thousands of rare characters fit any `vocab_size` >= MIN_TRAIN_VOCAB_SIZE; other characters are cut out of
  the training lines and encoded as their UTF-8 bytes. (sentencepiece's own `character_coverage` must be at
  least 0.98, too high for that, so the choice is made here and sentencepiece trains with coverage 1.)
  Digits are split, '\\n' is a piece, there is no dummy prefix and whitespace-only pieces are allowed
  (indentation).
  """
  if isinstance(texts, (str, bytes)):
    raise TypeError('texts must be a collection of documents (strings), not one string')
  if vocab_size < MIN_TRAIN_VOCAB_SIZE:
    raise ValueError(
        f'vocab_size={vocab_size} is too small to train a tokenizer: it holds {_FIXED_PIECES} fixed pieces '
        f'(the 256 bytes, <unk>, <s>, </s> and "\\n") and needs room for characters and merges; use '
        f'vocab_size >= {MIN_TRAIN_VOCAB_SIZE}.')
  if os.path.exists(os.path.join(directory, HF_FILE)):
    raise ValueError(f'cannot train a tokenizer into {directory}: it holds a {HF_FILE}, which load() would read '
                     f'instead of the trained {SENTENCEPIECE_FILE}; use another directory.')
  lines = _sample_lines(texts, max_lines, seed)
  if not lines:
    raise ValueError('no text to train the tokenizer on: the documents hold no non-blank line')
  sampled = len(lines)
  lines, kept, seen, coverage = _cut_rare_characters(lines, max_characters=(vocab_size - _FIXED_PIECES) // 2)
  logging.info('tokenizer: training a %d-piece BPE on %d lines; %d of their %d characters are pieces (%.3f%% '
               'of the text), the others bytes', vocab_size, sampled, kept, seen, 100 * coverage)
  model = _train_sentencepiece(lines, vocab_size)
  os.makedirs(directory, exist_ok=True)
  files_lib.write(os.path.join(directory, SENTENCEPIECE_FILE), model)
  return SentencePieceTokenizer({SENTENCEPIECE_FILE: model})


def _sample_lines(texts: Iterable[str], max_lines: int, seed: int) -> list[str]:
  """At most `max_lines` non-blank lines of whole documents; lines longer than _MAX_LINE_CHARS are cut."""

  def lines_of(doc: str) -> Iterator[str]:
    for line in doc.split('\n'):
      for start in range(0, len(line), _MAX_LINE_CHARS):
        part = line[start:start + _MAX_LINE_CHARS]
        if part.strip():
          yield part

  docs = texts
  if hasattr(texts, '__len__') and hasattr(texts, '__getitem__'):
    docs = (texts[int(i)] for i in np.random.default_rng(seed).permutation(len(texts)))
  out = []
  for doc in docs:
    for line in lines_of(doc):
      out.append(line)
      if len(out) >= max_lines:
        return out
  return out


def _cut_rare_characters(lines: list[str], max_characters: int) -> tuple[list[str], int, int, float]:
  """Lines split at the characters that will not be pieces; and (kept, seen) character counts, coverage."""
  counts = collections.Counter()
  for line in lines:
    counts.update(line)
  counts[' '] += counts.pop('\u2581', 0)  # sentencepiece writes spaces as U+2581: one character to it
  ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
  total = sum(counts.values())
  kept, covered = 0, 0
  for _, count in ranked:
    if kept >= max_characters or covered >= _CHARACTER_COVERAGE * total:
      break
    kept += 1
    covered += count
  dropped = {ord(char): '\n' for char, _ in ranked[kept:]}
  if ' ' not in {char for char, _ in ranked[:kept]}:
    dropped[ord('\u2581')] = '\n'
  if dropped:
    lines = [part for line in lines for part in line.translate(dropped).split('\n') if part.strip()]
  return lines, kept, len(ranked), covered / total


def _train_sentencepiece(lines: list[str], vocab_size: int, hard_vocab_limit: bool = True) -> bytes:
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type='bpe',
        byte_fallback=True, normalization_rule_name='identity', remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
        user_defined_symbols=['\n'], character_coverage=1.0, max_sentence_length=_MAX_SENTENCE_BYTES,
        num_threads=min(os.cpu_count() or 1, 16), minloglevel=2, hard_vocab_limit=hard_vocab_limit)
  except RuntimeError as e:
    too_high = re.search(r'Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)', str(e))
    if too_high and hard_vocab_limit:
      # Little text (a smoke test, a tiny corpus) yields fewer pieces than asked: train what it yields, which
      # fits any model whose table holds vocab_size rows, rather than an error whose advice may be impossible.
      logging.warning('the sampled text (%d lines and pieces of lines) yields at most %s pieces, fewer than '
                      'vocab_size=%d: training a %s-piece tokenizer. Give more text for more pieces.', len(lines),
                      too_high.group(1), vocab_size, too_high.group(1))
      return _train_sentencepiece(lines, vocab_size, hard_vocab_limit=False)
    raise ValueError(f'training a {vocab_size}-piece tokenizer on {len(lines)} lines failed: {e}') from e
  return model.getvalue()


def check_fits(tokenizer: Tokenizer, model_vocab_size: int, *, what: str, fix: str, warn_unused: bool = True) -> None:
  """The one check that a tokenizer belongs with an embedding table of `model_vocab_size` rows.

  An error when token ids would index past the table (`fix` says what to change); a warning when more than 5% (and
  256) of the rows would never train (`warn_unused`: off for a model already trained). `what` names the tokenizer,
  e.g. "the tokenizer of /path/to/run".
  """
  if tokenizer.vocab_size > model_vocab_size:
    raise ValueError(f'{what} has {tokenizer.vocab_size} ids but the model\'s vocab_size (embedding rows) is '
                     f'{model_vocab_size}: token ids would index past the embedding table; {fix}.')
  unused = model_vocab_size - tokenizer.vocab_size
  if warn_unused and unused > max(256, model_vocab_size // 20):
    padded = -(-tokenizer.vocab_size // 128) * 128
    logging.warning(
        '%s has %d ids but the model\'s vocab_size is %d: %d embedding rows are never used. Set '
        '--config.model.vocab_size=%d (the ids rounded up to a multiple of 128) for a model of this tokenizer, or '
        'use the tokenizer the model is sized for (e.g. --config.data.tokenizer=DIR of a Qwen2 checkpoint).',
        what, tokenizer.vocab_size, model_vocab_size, unused, padded)
