"""The input pipeline: documents from files, a sentencepiece tokenizer, packed rows of `seq_len` tokens.

Sources: `.jsonl` (one JSON object per line, the document under `text_key`), `.txt` and `.py` (a whole file is
one document), ArrayRecord (`*.array_record*`/`*.arrayrecord*`; each record UTF-8 text or a JSON object like a
`.jsonl` line). With no `train_files`, the built-in corpus is the Python standard library's own `.py` files,
with a deterministic 2% of them held out for eval, so a fresh machine trains with nothing downloaded.

The training pipeline (grain): documents -> this process's shard -> shuffle (new order each epoch) ->
tokenize + EOS -> concatenate and split into rows of `seq_len + 1` tokens with `segment_ids` and `positions`
(a document may continue on the next row; only the very last row of a finite stream is padded) -> shuffle
rows within a window -> batches. The iterator's state (`get_state`/`set_state`) is saved with each
checkpoint, so a resumed run reads exactly the batches it would have read.

Batches hold `[rows, seq_len]` arrays `inputs`, `targets`, `positions`, `segment_ids` and `weights`; a
weight is 0 where the target is padding or the first token of another document.
"""

from __future__ import annotations

import bisect
import glob
import io
import json
import os
import re
import sysconfig
import zlib
from typing import Any, Iterator, Mapping, Sequence

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import sentencepiece as spm

# The built-in corpus: files whose path hashes to 0 modulo this are the eval split (2%).
_EVAL_MODULUS = 50
_ARRAY_RECORD = re.compile(r'\.array_?record', re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------------
# Files and documents.

def stdlib_files() -> tuple[list[str], list[str]]:
  """(train, eval) `.py` files of the running Python's standard library, split by a hash of the path."""
  root = sysconfig.get_paths()['stdlib']
  files = []
  for directory, subdirs, names in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in ('site-packages', 'dist-packages', '__pycache__'))
    files.extend(os.path.join(directory, n) for n in sorted(names) if n.endswith('.py'))
  if not files:
    raise FileNotFoundError(f'no .py files under the standard library directory {root}; set data.train_files')
  is_eval = [zlib.crc32(os.path.relpath(f, root).encode()) % _EVAL_MODULUS == 0 for f in files]
  return ([f for f, e in zip(files, is_eval) if not e], [f for f, e in zip(files, is_eval) if e])


def expand_files(patterns: str, what: str = 'data.train_files') -> list[str]:
  """Sorted files matching a glob or comma-separated globs; an error naming the patterns if none match."""
  globs = [p.strip() for p in str(patterns).split(',') if p.strip()]
  files = sorted({f for p in globs for f in glob.glob(os.path.expanduser(p), recursive=True)
                  if os.path.isfile(f)})
  if not files:
    raise FileNotFoundError(
        f'no files match {what}={patterns!r} (from {os.getcwd()}). Give a glob or comma-separated globs of '
        '.jsonl, .txt or ArrayRecord files, e.g. --config.data.train_files="data/*.jsonl", or leave it empty '
        'to train on the built-in corpus.')
  return files


class _JsonlFile:
  """Random access to the non-blank lines of a .jsonl file through an index of line offsets."""

  def __init__(self, path: str, text_key: str):
    self.path, self.text_key = path, text_key
    starts, ends, offset = [], [], 0
    with open(path, 'rb') as f:
      for line in f:
        if line.strip():
          starts.append(offset)
          ends.append(offset + len(line))
        offset += len(line)
    self._starts = np.asarray(starts, np.int64)
    self._ends = np.asarray(ends, np.int64)

  def __len__(self) -> int:
    return len(self._starts)

  def __getitem__(self, i: int) -> str:
    with open(self.path, 'rb') as f:
      f.seek(int(self._starts[i]))
      line = f.read(int(self._ends[i] - self._starts[i]))
    return _text_of(json.loads(line), self.text_key, f'{self.path} (record {i})')


class _WholeFile:
  """A text file as one document."""

  def __init__(self, path: str):
    self.path = path

  def __len__(self) -> int:
    return 1

  def __getitem__(self, i: int) -> str:
    with open(self.path, encoding='utf-8', errors='replace') as f:
      return f.read()


class _ArrayRecordFile:
  """ArrayRecord records: UTF-8 text, or JSON objects holding the text under `text_key`."""

  def __init__(self, path: str, text_key: str):
    self.path, self.text_key = path, text_key
    self._source = grain.sources.ArrayRecordDataSource([path])

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> str:
    record = self._source[i]
    if record[:1] == b'{':
      try:
        return _text_of(json.loads(record), self.text_key, f'{self.path} (record {i})')
      except json.JSONDecodeError:
        pass
    return record.decode('utf-8', errors='replace')


def _text_of(obj: Any, key: str, where: str) -> str:
  if not isinstance(obj, dict) or key not in obj:
    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    raise KeyError(f'{where} has no {key!r} field (it has {keys}); set --config.data.text_key to the field '
                   'that holds the text')
  return str(obj[key])


class DocumentSource:
  """All documents of a list of files, as one random-access sequence of strings (a grain data source)."""

  def __init__(self, files: Sequence[str], text_key: str = 'text'):
    self.files = list(files)
    self._parts = []
    for path in self.files:
      name = os.path.basename(path)
      if name.endswith('.jsonl'):
        self._parts.append(_JsonlFile(path, text_key))
      elif name.endswith(('.txt', '.py')):
        self._parts.append(_WholeFile(path))
      elif _ARRAY_RECORD.search(name):
        self._parts.append(_ArrayRecordFile(path, text_key))
      else:
        raise ValueError(f'cannot read {path}: supported files are .jsonl, .txt, .py and ArrayRecord '
                         '(*.array_record*)')
    self._ends = np.cumsum([len(p) for p in self._parts]).tolist()

  def __len__(self) -> int:
    return self._ends[-1] if self._ends else 0

  def __getitem__(self, i: int) -> str:
    if not 0 <= i < len(self):
      raise IndexError(f'document {i} out of range [0, {len(self)})')
    part = bisect.bisect_right(self._ends, i)
    start = self._ends[part - 1] if part else 0
    return self._parts[part][i - start]


def sources(data: Mapping[str, Any]) -> tuple[DocumentSource, DocumentSource | None]:
  """(train, eval or None) document sources from the config's `data` section."""
  if not data['train_files']:
    train_files, eval_files = stdlib_files()
    logging.info('data: built-in corpus, %d Python standard library files for training and %d held out for '
                 'eval (%s)', len(train_files), len(eval_files), os.path.dirname(train_files[0]))
    if data['eval_files']:
      eval_files = expand_files(data['eval_files'], 'data.eval_files')
  else:
    train_files = expand_files(data['train_files'], 'data.train_files')
    eval_files = expand_files(data['eval_files'], 'data.eval_files') if data['eval_files'] else []
  train = DocumentSource(train_files, data['text_key'])
  if not len(train):
    raise ValueError(f'data.train_files={data["train_files"]!r} matched {len(train_files)} file(s) with no '
                     'documents in them')
  return train, (DocumentSource(eval_files, data['text_key']) if eval_files else None)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer.

def train_tokenizer(source: Sequence[str], path: str, vocab_size: int, max_sentences: int,
                    seed: int = 0) -> None:
  """Trains a sentencepiece BPE model with byte fallback on lines of `source` and writes it to `path`.

  Lines come from documents in a seeded random order, at most `max_sentences` of them, so training takes
  seconds whatever the corpus size. The normalization keeps text exactly (indentation, newlines), so
  decoding gives back the input.
  """
  order = np.random.default_rng(seed).permutation(len(source))

  def lines() -> Iterator[str]:
    count = 0
    for i in order:
      for line in source[int(i)].split('\n'):
        if line.strip():
          yield line
          count += 1
          if count >= max_sentences:
            return

  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size, model_type='bpe',
        byte_fallback=True, normalization_rule_name='identity', remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
        user_defined_symbols=['\n'], character_coverage=0.9995, max_sentence_length=16384,
        num_threads=min(os.cpu_count() or 1, 16), minloglevel=2)
  except RuntimeError as e:
    raise ValueError(f'training a {vocab_size}-piece tokenizer failed: {e}. Lower data.vocab_size or give more '
                     'text (data.train_files, data.tokenizer_sentences).') from e
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(model.getvalue())
  os.replace(tmp, path)


def load_tokenizer(path: str, model_vocab_size: int) -> spm.SentencePieceProcessor:
  """Loads a sentencepiece model, checking that its ids fit the model's embedding table."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'tokenizer {path!r} does not exist; set data.tokenizer to a sentencepiece .model '
                            "file, or to 'train' to train one on the training files")
  tokenizer = spm.SentencePieceProcessor(model_file=path)
  pieces = tokenizer.get_piece_size()
  if pieces > model_vocab_size:
    raise ValueError(
        f'tokenizer {path} has {pieces} pieces but model.vocab_size is {model_vocab_size}: token ids would '
        f'index past the embedding table. Use a model with vocab_size >= {pieces} '
        f'(--config.model.vocab_size={pieces}) or a smaller tokenizer (data.vocab_size).')
  if tokenizer.eos_id() < 0:
    raise ValueError(f'tokenizer {path} has no end-of-sequence piece; documents are separated by it')
  return tokenizer


def tokenizer_path(data: Mapping[str, Any], workdir: str) -> str:
  return os.path.join(workdir, 'tokenizer.model') if data['tokenizer'] == 'train' else data['tokenizer']


def get_tokenizer(data: Mapping[str, Any], workdir: str, train_source: Sequence[str], model_vocab_size: int,
                  seed: int = 0) -> spm.SentencePieceProcessor:
  """The run's tokenizer: `data.tokenizer`, or with 'train' the one in the workdir, trained at first run."""
  path = tokenizer_path(data, workdir)
  if data['tokenizer'] == 'train':
    if int(data['vocab_size']) > model_vocab_size:
      raise ValueError(
          f'data.vocab_size={data["vocab_size"]} (pieces of the tokenizer to train) is more than '
          f'model.vocab_size={model_vocab_size}: token ids would index past the embedding table. Set '
          f'--config.data.vocab_size to at most {model_vocab_size}.')
    if not os.path.exists(path):
      if jax.process_index() == 0:
        logging.info('data: training a %d-piece BPE tokenizer on up to %d lines -> %s', data['vocab_size'],
                     data['tokenizer_sentences'], path)
        train_tokenizer(train_source, path, int(data['vocab_size']), int(data['tokenizer_sentences']), seed)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices('qwenjax tokenizer trained')
  return load_tokenizer(path, model_vocab_size)


class _Tokenize(grain.transforms.Map):
  """Document text -> {'tokens': int32 ids + EOS}."""

  def __init__(self, tokenizer: spm.SentencePieceProcessor):
    self._tokenizer = tokenizer
    self._eos = tokenizer.eos_id()

  def map(self, text: str) -> dict[str, np.ndarray]:
    ids = self._tokenizer.encode(text)
    ids.append(self._eos)
    return {'tokens': np.asarray(ids, np.int32)}


# ---------------------------------------------------------------------------------------------------------
# Packed batches.

def to_model_batch(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Packed rows of `seq_len + 1` tokens -> model inputs and next-token targets of `seq_len` tokens."""
  tokens, segments = packed['tokens'], packed['tokens_segment_ids']
  same_doc = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
  return {
      'inputs': tokens[:, :-1],
      'targets': tokens[:, 1:],
      'positions': packed['tokens_positions'][:, :-1],
      'segment_ids': segments[:, :-1],
      'weights': same_doc.astype(np.float32),
  }


def _packed(ds: grain.MapDataset, tokenizer, seq_len: int, read_threads: int) -> grain.IterDataset:
  ds = ds.map(_Tokenize(tokenizer)).filter(lambda x: x['tokens'].size > 1)
  options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * max(read_threads, 1))
  it = ds.to_iter_dataset(options)
  return grain.experimental.ConcatThenSplitIterDataset(it, length_struct={'tokens': seq_len + 1})


def train_dataset(source: Sequence[str], tokenizer: spm.SentencePieceProcessor, *, seq_len: int,
                  batch_size: int, seed: int, shuffle_window: int = 0, read_threads: int = 2,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Endless batches of `batch_size` packed rows (this process's share of the global batch)."""
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if not len(ds):
    raise ValueError(f'process {process_index} of {process_count} got no training documents: the training '
                     f'files hold {len(source)} documents; use more documents than processes')
  ds = ds.shuffle(seed=seed).repeat()
  it = _packed(ds, tokenizer, seq_len, read_threads)
  if shuffle_window > 1:
    it = grain.experimental.WindowShuffleIterDataset(it, window_size=shuffle_window, seed=seed)
  return it.batch(batch_size, drop_remainder=True).map(to_model_batch)


def eval_batches(source: Sequence[str], tokenizer: spm.SentencePieceProcessor, *, seq_len: int, batch_size: int,
                 num_batches: int, read_threads: int = 2, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """The first `num_batches` batches of the eval documents, in file order, read once and kept in memory.

  Short sets end in zero-weight padding rows and batches, so every process runs `num_batches` eval steps.
  """
  ds = grain.MapDataset.source(source)[process_index::process_count]
  it = _packed(ds, tokenizer, seq_len, read_threads).batch(batch_size, drop_remainder=False)
  out = []
  for packed in it:
    rows = len(packed['tokens'])
    if rows < batch_size:  # pad the last batch with empty rows (segment 0: zero weight everywhere)
      packed = {k: np.concatenate([v, np.zeros((batch_size - rows,) + v.shape[1:], v.dtype)])
                for k, v in packed.items()}
    out.append(to_model_batch(packed))
    if len(out) == num_batches:
      break
  if not out and process_count == 1:
    return []
  empty = to_model_batch({k: np.zeros((batch_size, seq_len + 1), np.int32)
                          for k in ('tokens', 'tokens_segment_ids', 'tokens_positions')})
  return out + [empty] * (num_batches - len(out))
