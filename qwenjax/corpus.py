"""Corpora tokenized once into token shards that every run, and every point of a sweep, reads by step.

`qwenjax.data` prepares a run's corpora with `prepare` (the command `python -m qwenjax.prepare` does it ahead of
time) and reads their documents' tokens through `Corpus`. A prepared corpus is a directory
`data.prepared_dir/<key>`, where the key hashes the source files (absolute paths, sizes, modification times),
`text_key` and the tokenizer's fingerprint: an unchanged corpus is found again by later runs, a touched file or
another tokenizer gives a new key. It holds

  shard-00000.tokens.npy   uint32 ids of up to `DOCS_PER_SHARD` documents, each followed by the EOS id
  shard-00000.offsets.npy  int64 [documents + 1]: where each document starts in the shard's tokens
  shard-00000.json         counts (documents kept, skipped as not text, empty), and where the skipped ones are
  meta.json                written last, once every shard is there: what the corpus is made of

Documents go to shards in file order, so the corpus does not depend on how many processes made it: on a pod
each process tokenizes the shards `process_index::process_count` (the directory must be on a filesystem they
share), process 0 writes `meta.json` once all are done. Tokenizing uses every core through the tokenizer's own
batch encoding (sentencepiece and Hugging Face tokenizers both encode a batch on several threads).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Sequence

from absl import logging
import numpy as np

from qwenjax import documents
from qwenjax import files as files_lib

DOCS_PER_SHARD = 512
_VERSION = 1


def default_dir() -> str:
  """Where prepared corpora go when `data.prepared_dir` is empty: `$QWENJAX_CACHE` or ~/.cache/qwenjax."""
  root = os.environ.get('QWENJAX_CACHE') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'qwenjax')
  return os.path.join(root, 'prepared')


def corpus_key(identity: Sequence[tuple[str, int, int]], text_key: str, tokenizer_fingerprint: str,
               exclude: Sequence[int] = ()) -> str:
  key = {'files': [list(f) for f in identity], 'text_key': text_key,
         'tokenizer': tokenizer_fingerprint, 'docs_per_shard': DOCS_PER_SHARD, 'version': _VERSION}
  if exclude:  # only then: corpora prepared before `exclude` existed keep their keys
    key['exclude'] = sorted(int(i) for i in exclude)
  return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]


def _save_npy(path: str, array: np.ndarray) -> None:
  def write(tmp):
    with open(tmp, 'wb') as f:
      np.save(f, array)
  files_lib.write(path, write)


def _save_json(path: str, value: Any) -> None:
  files_lib.write_json(path, value)


def _tokenize_shard(source: documents.DocumentSource, tokenizer, shard: int, directory: str,
                    exclude: frozenset[int] = frozenset()) -> dict[str, Any]:
  """Tokenizes documents [shard * DOCS_PER_SHARD, ...) but `exclude` into the shard's files; returns its counts."""
  lo, hi = shard * DOCS_PER_SHARD, min((shard + 1) * DOCS_PER_SHARD, len(source))
  texts, skipped, empty, excluded = [], [], 0, 0
  for i in range(lo, hi):
    if i in exclude:
      excluded += 1
      continue
    try:
      text = source[i]
    except documents.BadDocument as e:
      skipped.append(str(e))
      continue
    if text:
      texts.append(text)
    else:
      empty += 1
  ids = tokenizer.encode_batch(texts) if texts else []
  eos = int(tokenizer.eos_id)
  lengths = np.asarray([len(x) + 1 for x in ids], np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  tokens = np.empty(int(offsets[-1]), np.uint32)
  for start, x in zip(offsets[:-1], ids):
    tokens[start:start + len(x)] = x
    tokens[start + len(x)] = eos
  prefix = os.path.join(directory, f'shard-{shard:05d}')
  _save_npy(f'{prefix}.tokens.npy', tokens)
  _save_npy(f'{prefix}.offsets.npy', offsets)
  info = {'documents': len(ids), 'tokens': int(offsets[-1]), 'bytes': sum(len(t.encode()) for t in texts),
          'skipped': len(skipped), 'skipped_where': skipped[:20], 'empty': empty, 'excluded': excluded}
  _save_json(f'{prefix}.json', info)
  return info


def prepare(files: Sequence[str], text_key: str, tokenizer, root: str, *, what: str = 'data.train_files',
            process_index: int = 0, process_count: int = 1, exclude: Sequence[int] = ()) -> 'Corpus':
  """The prepared corpus of `files` under `root`, tokenizing it first unless an unchanged one is there. The
  documents `exclude` (indices in file order) are left out (`data.decontaminate`)."""
  identity = documents.file_identity(files)  # without reading the files: a prepared corpus needs no more
  exclude = frozenset(exclude)
  directory = os.path.join(os.path.expanduser(root), corpus_key(identity, text_key, tokenizer.fingerprint, exclude))
  if os.path.exists(os.path.join(directory, 'meta.json')):
    corpus = Corpus(directory)
    logging.info('data: %s already tokenized in %s: %s', what, directory, describe(corpus.meta))
    return corpus
  source = documents.DocumentSource(files, text_key)
  os.makedirs(directory, exist_ok=True)
  shards = -(-len(source) // DOCS_PER_SHARD)
  start = time.time()
  mine = [s for s in range(shards) if s % process_count == process_index]
  logging.info('data: tokenizing the %d documents of %s (%d file(s)) into %s', len(source), what, len(files),
               directory)
  for shard in mine:
    if not os.path.exists(os.path.join(directory, f'shard-{shard:05d}.json')):  # done by an interrupted run
      _tokenize_shard(source, tokenizer, shard, directory, exclude)
  if process_count > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'qwenjax prepared {directory} shards')
  if process_index == 0:
    infos = []
    for shard in range(shards):
      with open(os.path.join(directory, f'shard-{shard:05d}.json')) as f:
        infos.append(json.load(f))
    meta = {'files': [list(f) for f in identity], 'text_key': text_key,
            'tokenizer': tokenizer.fingerprint, 'eos_id': int(tokenizer.eos_id), 'shards': len(infos),
            'documents': sum(i['documents'] for i in infos), 'tokens': sum(i['tokens'] for i in infos),
            'bytes': sum(i['bytes'] for i in infos), 'skipped': sum(i['skipped'] for i in infos),
            'skipped_where': [w for i in infos for w in i['skipped_where']][:20],
            'empty': sum(i.get('empty', 0) for i in infos), 'excluded': sum(i.get('excluded', 0) for i in infos),
            'seconds': round(time.time() - start, 2)}
    _check(meta, what)
    _save_json(os.path.join(directory, 'meta.json'), meta)
    logging.info('data: %s: %s; tokenized in %.1f s', what, describe(meta), meta['seconds'])
  if process_count > 1:
    multihost_utils.sync_global_devices(f'qwenjax prepared {directory}')
  return Corpus(directory)


def describe(meta: dict[str, Any]) -> str:
  """What a prepared corpus holds, its counts adding up: '1,712 documents of the 1,743 read (4 not UTF-8 text,
  27 empty), 2,345,678 tokens'."""
  read = meta['documents'] + meta['skipped'] + meta.get('empty', 0) + meta.get('excluded', 0)
  dropped = [f'{n:,} {why}' for n, why in ((meta['skipped'], 'not UTF-8 text'), (meta.get('empty', 0), 'empty'),
                                           (meta.get('excluded', 0), 'left out as found in training')) if n]
  of = f' of the {read:,} read ({", ".join(dropped)})' if dropped else ''
  return f'{meta["documents"]:,} documents{of}, {meta["tokens"]:,} tokens'


def _check(meta: dict[str, Any], what: str) -> None:
  if meta['skipped']:
    logging.warning('data: %s: skipped %d document(s) that are not UTF-8 text, e.g. %s', what, meta['skipped'],
                    '; '.join(meta['skipped_where'][:3]))
  if not meta['documents']:
    reason = (f'all {meta["skipped"]} document(s) are not UTF-8 text (e.g. {meta["skipped_where"][0]})'
              if meta['skipped'] else 'every document is empty')
    raise ValueError(f'{what}: no text to train on: {reason}. Point {what} at .jsonl/.txt files with text.')


class Corpus:
  """A prepared corpus: documents of token ids (each ending in EOS), read from memory-mapped shards."""

  def __init__(self, directory: str):
    self.directory = directory
    with open(os.path.join(directory, 'meta.json')) as f:
      self.meta = json.load(f)
    self._tokens, doc_lengths = [], []
    for shard in range(self.meta['shards']):
      prefix = os.path.join(directory, f'shard-{shard:05d}')
      try:
        with open(f'{prefix}.json') as f:
          info = json.load(f)
        tokens, offsets = np.load(f'{prefix}.tokens.npy', mmap_mode='r'), np.load(f'{prefix}.offsets.npy')
        problem = None
        if len(offsets) != info['documents'] + 1 or offsets[0] != 0 or np.any(np.diff(offsets) < 1):
          problem = f'{prefix}.offsets.npy does not hold {info["documents"]} documents'
        elif offsets[-1] != len(tokens) or len(tokens) != info['tokens']:
          problem = f'{prefix}.tokens.npy holds {len(tokens)} tokens, not {info["tokens"]}'
      except (OSError, ValueError, KeyError) as e:
        problem = f'shard {shard}: {type(e).__name__}: {e}'
      if problem:
        raise ValueError(f'the prepared corpus {directory} is damaged ({problem}): delete that directory and the '
                         'next run tokenizes the corpus again')
      self._tokens.append(tokens)
      doc_lengths.append(np.diff(offsets))
    self.lengths = np.concatenate(doc_lengths) if doc_lengths else np.zeros(0, np.int64)
    # Document d lives in shard _doc_shard[d] at token offset _doc_start[d].
    self._doc_shard = np.repeat(np.arange(len(doc_lengths)), [len(x) for x in doc_lengths])
    self._doc_start = np.concatenate([np.concatenate([[0], np.cumsum(x)[:-1]]) for x in doc_lengths
                                      if len(x)] or [np.zeros(0, np.int64)]).astype(np.int64)

  @property
  def fingerprint(self) -> str:
    return os.path.basename(self.directory)

  def __len__(self) -> int:
    return len(self.lengths)

  def tokens(self, doc: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Token ids [start, stop) of document `doc` (EOS included at its end)."""
    base = self._doc_start[doc]
    stop = self.lengths[doc] if stop is None else stop
    return self._tokens[self._doc_shard[doc]][base + start:base + stop]
