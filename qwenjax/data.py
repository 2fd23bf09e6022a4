"""The input pipeline: the run's tokenizer, prepared corpora, and the packed rows of every step.

Read top to bottom: documents (`qwenjax.documents`) -> the run's tokenizer (`get_tokenizer`) -> prepared corpora
(`prepared_corpora`, tokenized once by `qwenjax.corpus`) -> packed rows (`PackedRows`) -> the batches of each step
(`train_batches`, `eval_batches`). The settings are a `qwenjax.config.DataConfig`; the model's vocabulary size, the
seed and `init_from_hf` are passed on their own.

The batch of step k is a pure function of the prepared corpus, `train.seed`, `data.seq_len`, the global batch
size and k, whatever the number of processes, devices or the mesh: resuming needs only the step, and a run
resumed on another mesh or process count continues the same stream. Each process reads only the rows its
devices hold.

The stream: epoch e lists the corpus's documents in a seeded random order (a new order each epoch), each document
ending in EOS, one after another. Row r is the stream's tokens [r * seq_len, r * seq_len + seq_len + 1), so every
token is a target exactly once and nothing is padded; a document longer than a row continues in the next one.
Rows are then shuffled within windows of `data.shuffle_window` rows (seeded), so a batch mixes documents even when
they are long. Each row carries `segment_ids` (1, 2, ... per document piece) and `positions` (restarting at each
piece), and a target's weight is 0 where it starts another document.

Batches hold `[rows, seq_len]` arrays `inputs`, `targets`, `positions`, `segment_ids` and `weights`.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Any, Iterator, Mapping, Sequence

from absl import logging
from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np

from qwenjax import corpus as corpus_lib
from qwenjax import documents
from qwenjax import files as files_lib
from qwenjax import overlap
from qwenjax import tokenizer as tokenizer_lib
from qwenjax.config import DataConfig

# Re-exported: the file helpers live in `qwenjax.documents` (no jax there, for the tokenizing workers).
DocumentSource = documents.DocumentSource
expand_files = documents.expand_files
stdlib_files = documents.stdlib_files


# ---------------------------------------------------------------------------------------------------------
# The run's tokenizer.

def _holds_tokenizer(directory: str) -> bool:
  return any(os.path.isfile(os.path.join(directory, name))
             for name in (tokenizer_lib.SENTENCEPIECE_FILE, tokenizer_lib.HF_FILE))


def prepared_root(data: DataConfig) -> str:
  return os.path.expanduser(data.prepared_dir) if data.prepared_dir else corpus_lib.default_dir()


_SHARED: dict[str, bool] = {}


def shared_by_all_processes(root: str) -> bool:
  """Whether every process sees `root` as process 0 does (one filesystem: NFS, or one machine), or each host
  has its own (a TPU pod's local disks, where the default prepared_dir lives). Every process must call it, in
  the same order: process 0 writes a probe file, all report whether they see it."""
  if jax.process_count() == 1:
    return True
  if root not in _SHARED:
    token = int(multihost_utils.broadcast_one_to_all(np.array([int.from_bytes(os.urandom(4), 'little')],
                                                              np.int64))[0])
    probe = os.path.join(root, f'.shared-probe-{token}')  # this run's own: never a stale one
    if jax.process_index() == 0:
      os.makedirs(root, exist_ok=True)
      with open(probe, 'w') as f:
        f.write(str(os.getpid()))
    multihost_utils.sync_global_devices(f'qwenjax probe {token}')
    seen = multihost_utils.process_allgather(np.array([os.path.exists(probe)], np.int32))
    if jax.process_index() == 0:
      os.remove(probe)
    _SHARED[root] = bool(np.all(seen))
    if not _SHARED[root] and jax.process_index() == 0:
      logging.info('data: %s is not shared by the %d processes (each host has its own disk): each process '
                   'tokenizes the whole corpus into its own copy', root, jax.process_count())
  return _SHARED[root]


def _broadcast_files(files: dict[str, bytes] | None) -> dict[str, bytes]:
  """Process 0's {name: bytes} on every process, sent through jax's collectives (no shared disk needed)."""
  blob = np.frombuffer(json.dumps({k: v.hex() for k, v in (files or {}).items()}).encode(), np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.array([blob.size], np.int64))[0])
  padded = np.zeros(size, np.uint8)
  if jax.process_index() == 0:
    padded[:] = blob
  received = np.asarray(multihost_utils.broadcast_one_to_all(padded)).tobytes().decode()
  return {k: bytes.fromhex(v) for k, v in json.loads(received).items()}


def tokenizer_source(data: DataConfig, *, init_from_hf: str = '') -> dict[str, Any]:
  """What the run's tokenizer is to be, as recorded in WORKDIR/tokenizer/source.json.

  `data.tokenizer`: 'train' (default) trains a BPE on the training files (their lines sampled with
  `data.tokenizer_seed`, whatever the run's train.seed), except with `init_from_hf=PATH` where PATH holds a
  tokenizer: the checkpoint's own is used. Anything else is a path for `qwenjax.tokenizer.load`.
  """
  choice = data.tokenizer or 'train'
  if choice == 'train' and init_from_hf and _holds_tokenizer(init_from_hf):
    choice = init_from_hf
  if choice != 'train':
    return {'kind': 'file', 'path': os.path.abspath(os.path.expanduser(choice))}
  train_files, _ = documents.sources(data.train_files, data.eval_files)
  return {'kind': 'train', 'vocab_size': data.vocab_size, 'tokenizer_sentences': data.tokenizer_sentences,
          'seed': data.tokenizer_seed, 'train_files': data.train_files or '(built-in corpus)',
          'files': [os.path.abspath(f) for f in train_files]}


def _describe_change(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
  if saved.get('kind') != wanted.get('kind'):
    return f'it was {_describe(saved)}, this run asks for {_describe(wanted)}'
  names = {'vocab_size': 'data.vocab_size', 'tokenizer_sentences': 'data.tokenizer_sentences',
           'seed': 'data.tokenizer_seed', 'train_files': 'data.train_files',
           'files': 'the files data.train_files matches', 'path': 'data.tokenizer',
           'fingerprint': 'the contents of data.tokenizer'}
  changed = [f'{names.get(k, k)} was {saved.get(k)!r}, now {wanted.get(k)!r}' if k != 'files' else
             f'{names[k]} changed' for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
  return '; '.join(changed)


def _describe(source: Mapping[str, Any]) -> str:
  if source.get('kind') == 'train':
    return (f'the BPE trained for data.vocab_size={source["vocab_size"]} pieces on '
            f'data.train_files={source["train_files"]!r}')
  return f'the tokenizer of {source.get("path")}'


def _train_cached(source: dict[str, Any], data: DataConfig) -> str:
  """Directory of a BPE trained on the training files with these settings, trained there at first use (process 0;
  the others wait), so runs and sweep points with the same corpus and settings share one tokenizer."""
  # The files' sizes and modification times too: a corpus rewritten in place trains a new tokenizer.
  identity = documents.file_identity(source['files'])
  key = hashlib.sha256(json.dumps([source, identity], sort_keys=True).encode()).hexdigest()[:20]
  root = prepared_root(data)
  directory = os.path.join(root, 'tokenizers', key)
  shared = shared_by_all_processes(root)
  if not _holds_tokenizer(directory) and jax.process_index() == 0:
    texts = documents.DocumentSource(source['files'], data.text_key)
    logging.info('data: training a %d-piece BPE tokenizer on up to %d lines of %d file(s) -> %s',
                 source['vocab_size'], source['tokenizer_sentences'], len(source['files']), directory)
    tokenizer_lib.train(_readable_texts(texts, source['seed']), directory, vocab_size=source['vocab_size'],
                        max_lines=source['tokenizer_sentences'], seed=source['seed'])
  if jax.process_count() > 1 and shared:
    multihost_utils.sync_global_devices(f'qwenjax tokenizer {key}')
  elif jax.process_count() > 1:  # each host its own disk: process 0's tokenizer, sent to the others
    files = _broadcast_files(tokenizer_lib.load(directory).files if jax.process_index() == 0 else None)
    if jax.process_index() != 0 and not _holds_tokenizer(directory):
      tokenizer_lib.from_files(files).save(directory)
  return directory


def _readable_texts(source: documents.DocumentSource, seed: int) -> Iterator[str]:
  """Documents in a seeded random order, skipping those that are not text (quietly: tokenizing the corpus next
  warns about them once, with their count); an error naming the files when none holds text."""
  skipped, texts = [], 0
  for i in np.random.default_rng(seed).permutation(len(source)):
    try:
      text = source[int(i)]
    except documents.BadDocument as e:
      skipped.append(e.where)
      continue
    texts += bool(text.strip())
    yield text
  if not texts:
    reason = (f'all {len(skipped)} document(s) are not UTF-8 text (e.g. {skipped[0]}: binary data or invalid '
              'bytes)' if skipped and len(skipped) == len(source) else 'every document is empty')
    raise ValueError(f'data.train_files: no text to train on: {reason}. Point data.train_files at .jsonl/.txt '
                     'files with text.')


def get_tokenizer(data: DataConfig, workdir: str | None, *, model_vocab_size: int,
                  init_from_hf: str = '') -> tokenizer_lib.Tokenizer:
  """The run's tokenizer (`tokenizer_source`), checked to fit a model of `model_vocab_size` embedding rows.

  A workdir's own copy in WORKDIR/tokenizer/ (through epath: it may be a gs:// path; `keep_tokenizer` writes it) is
  reused only while it matches what the settings ask for; otherwise a clear error says what changed."""
  if (data.tokenizer or 'train') == 'train' and init_from_hf:
    if _holds_tokenizer(init_from_hf):
      logging.info('data: the tokenizer of init_from_hf=%s', init_from_hf)
    else:
      logging.warning(
          'init_from_hf=%s holds no tokenizer.json or tokenizer.model, so a new tokenizer is trained: the checkpoint '
          'was trained on another tokenizer\'s ids, which its embeddings encode. Set --config.data.tokenizer to '
          'the tokenizer it was trained with.', init_from_hf)
  wanted = tokenizer_source(data, init_from_hf=init_from_hf)
  if wanted['kind'] == 'file':
    found = tokenizer_lib.load(wanted['path'])
    wanted['fingerprint'] = found.fingerprint
  kept = epath.Path(workdir) / 'tokenizer' if workdir else None
  if kept and (kept / 'source.json').exists():
    saved = files_lib.read_json(kept / 'source.json')
    # The seed picked the sentences a trained tokenizer learned from (train.seed in workdirs written before
    # data.tokenizer_seed); the kept copy is what the run trained with, so a resumed run keeps it.
    if {k: v for k, v in saved.items() if k != 'seed'} != {k: v for k, v in wanted.items() if k != 'seed'}:
      raise ValueError(
          f'the workdir\'s tokenizer ({kept}) does not match this run: {_describe_change(saved, wanted)}. A model '
          'trained on one tokenizer\'s ids cannot continue on another\'s: run with the settings the workdir was '
          'started with, or use a new --workdir.')
    tokenizer = tokenizer_lib.from_files({p.name: p.read_bytes() for p in kept.iterdir() if p.name != 'source.json'})
    check_fits(tokenizer, model_vocab_size, wanted)
  else:
    tokenizer = found if wanted['kind'] == 'file' else tokenizer_lib.load(_train_cached(wanted, data))
    check_fits(tokenizer, model_vocab_size, wanted)
  return tokenizer


def keep_tokenizer(workdir: str, tokenizer: tokenizer_lib.Tokenizer, data: DataConfig, *,
                   init_from_hf: str = '') -> None:
  """Writes the run's tokenizer (from `get_tokenizer` with the same settings) into WORKDIR/tokenizer/, with
  source.json saying what it was made from, unless the workdir holds it already. The training job calls it once
  its train state exists, so a run that fails before adds nothing to its workdir. Every process calls it."""
  kept = epath.Path(workdir) / 'tokenizer'
  if jax.process_index() == 0 and not (kept / 'source.json').exists():
    wanted = tokenizer_source(data, init_from_hf=init_from_hf)
    if wanted['kind'] == 'file':
      wanted['fingerprint'] = tokenizer.fingerprint
    kept.mkdir(parents=True, exist_ok=True)
    for name, content in tokenizer.files.items():
      files_lib.write(kept / name, content)
    files_lib.write_json(kept / 'source.json', wanted)  # last: marks the copy complete
  if jax.process_count() > 1:  # the others read WORKDIR/tokenizer only once it is complete
    multihost_utils.sync_global_devices('qwenjax workdir tokenizer')


def check_fits(tokenizer: tokenizer_lib.Tokenizer, model_vocab_size: int, source: Mapping[str, Any]) -> None:
  """`tokenizer.check_fits` for the tokenizer a run asked for, with the fix that suits how it got it."""
  fix = (f'set --config.data.vocab_size to at most {model_vocab_size}' if source['kind'] == 'train' else
         f'use a model with --config.model.vocab_size={tokenizer.vocab_size} or more')
  tokenizer_lib.check_fits(tokenizer, model_vocab_size, what=f'the tokenizer ({_describe(source)})', fix=fix)


def prepared_corpora(data: DataConfig, tokenizer: tokenizer_lib.Tokenizer
                     ) -> tuple[corpus_lib.Corpus, corpus_lib.Corpus | None]:
  """(train, eval or None) corpora, tokenized once into `data.prepared_dir` and reused while unchanged."""
  train_files, eval_files = documents.sources(data.train_files, data.eval_files)
  if not data.train_files:
    logging.info('data: built-in corpus, %d Python standard library files for training and %d held out for eval',
                 len(train_files), len(eval_files))
  root = prepared_root(data)
  # On one filesystem the processes share the tokenizing; on separate disks each tokenizes the whole corpus.
  kwargs = (dict(process_index=jax.process_index(), process_count=jax.process_count())
            if shared_by_all_processes(root) else {})
  train = corpus_lib.prepare(train_files, data.text_key, tokenizer, root, what='data.train_files', **kwargs)
  exclude = decontaminated(data, train_files, eval_files, root) if eval_files and data.decontaminate else []
  held_out = (corpus_lib.prepare(eval_files, data.text_key, tokenizer, root, what='data.eval_files', exclude=exclude,
                                 **kwargs) if eval_files else None)
  return train, held_out


def decontaminated(data: DataConfig, train_files: Sequence[str], eval_files: Sequence[str], root: str) -> list[int]:
  """The eval documents `data.decontaminate` leaves out (`qwenjax.overlap`), logged; an error if that is all."""
  shares = overlap.shares(train_files, eval_files, data.text_key, cache_dir=root)
  out = [i for i, share in enumerate(shares) if share >= data.decontaminate]
  logging.info('data: data.decontaminate=%g leaves out %d of %d eval document(s), which have that share or more of '
               'their lines in the training documents', data.decontaminate, len(out), len(shares))
  if len(out) == len(shares):
    raise ValueError(f'data.decontaminate={data.decontaminate} leaves out every one of the {len(shares)} eval '
                     f'document(s): the training files hold {min(shares):.0%} or more of each one\'s lines. Give eval '
                     'files the training files do not contain (data.eval_files), or a larger data.decontaminate.')
  return out


# ---------------------------------------------------------------------------------------------------------
# Packed rows, by index.

class PackedRows:
  """Row r of a corpus's stream (see the module docstring), as `tokens`, `segment_ids` and `positions` of
  `seq_len + 1` entries. `epochs=False`: one pass in corpus order, then empty rows (for eval)."""

  def __init__(self, corpus: corpus_lib.Corpus, seq_len: int, seed: int, shuffle_window: int = 0,
               epochs: bool = True):
    self.corpus, self.seq_len, self.seed = corpus, seq_len, seed
    self.shuffle_window, self.epochs = shuffle_window, epochs
    self.epoch_tokens = int(corpus.lengths.sum())
    self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    self._row_perms: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()  # grain's reader threads share these caches

  def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(documents in epoch order, where each ends in the epoch's stream)."""
    with self._lock:
      if epoch not in self._orders:
        if len(self._orders) > 2:
          self._orders.pop(min(self._orders))
        docs = (np.random.default_rng([self.seed, epoch]).permutation(len(self.corpus)) if self.epochs
                else np.arange(len(self.corpus)))
        self._orders[epoch] = docs, np.cumsum(self.corpus.lengths[docs])
      return self._orders[epoch]

  def _stream_row(self, row: int) -> int:
    window = self.shuffle_window
    if window <= 1:
      return row
    block, i = divmod(row, window)
    with self._lock:
      if block not in self._row_perms:
        if len(self._row_perms) > 4:
          self._row_perms.pop(min(self._row_perms))
        self._row_perms[block] = np.random.default_rng([self.seed, 1 << 30, block]).permutation(window)
      return block * window + int(self._row_perms[block][i])

  def __getitem__(self, row: int) -> dict[str, np.ndarray]:
    need = self.seq_len + 1
    out = {k: np.zeros(need, np.int32) for k in ('tokens', 'segment_ids', 'positions')}
    position = self._stream_row(int(row)) * self.seq_len
    filled, segment = 0, 0
    while filled < need:
      epoch, offset = divmod(position, self.epoch_tokens)
      if epoch and not self.epochs:
        break
      docs, ends = self._order(epoch)
      j = int(np.searchsorted(ends, offset, side='right'))
      doc = int(docs[j])
      start = offset - (int(ends[j]) - int(self.corpus.lengths[doc]))
      take = min(need - filled, int(self.corpus.lengths[doc]) - start)
      segment += 1
      piece = slice(filled, filled + take)
      out['tokens'][piece] = self.corpus.tokens(doc, start, start + take)
      out['segment_ids'][piece] = segment
      out['positions'][piece] = np.arange(take)
      filled, position = filled + take, position + take
    return out


def to_model_batch(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Packed rows of `seq_len + 1` tokens -> model inputs and next-token targets of `seq_len` tokens."""
  tokens, segments = packed['tokens'], packed['segment_ids']
  same_doc = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
  return {
      'inputs': tokens[:, :-1],
      'targets': tokens[:, 1:],
      'positions': packed['positions'][:, :-1],
      'segment_ids': segments[:, :-1],
      'weights': same_doc.astype(np.float32),
  }


class StepBatches:
  """This process's rows of the batch of step k: global rows [k * batch_size, (k + 1) * batch_size) of the
  stream, restricted to `local_rows` (indices within the global batch)."""

  def __init__(self, rows: PackedRows, batch_size: int, local_rows: Sequence[int]):
    self.rows, self.batch_size, self.local_rows = rows, batch_size, list(local_rows)

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    packed = [self.rows[step * self.batch_size + i] for i in self.local_rows]
    return to_model_batch({k: np.stack([p[k] for p in packed]) for k in packed[0]})


def train_batches(corpus: corpus_lib.Corpus, *, seq_len: int, batch_size: int, seed: int, shuffle_window: int,
                  local_rows: Sequence[int], start: int, steps: int, read_threads: int = 2
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Batches of steps start, start + 1, ..., steps - 1, read ahead on `read_threads` threads (grain)."""
  batch_of = StepBatches(PackedRows(corpus, seq_len, seed, shuffle_window), batch_size, local_rows)
  ds = grain.MapDataset.range(start, max(steps, start)).map(batch_of)
  options = grain.ReadOptions(num_threads=max(read_threads, 1), prefetch_buffer_size=2 * max(read_threads, 1))
  return iter(ds.to_iter_dataset(options))


def eval_batches(corpus: corpus_lib.Corpus, *, seq_len: int, batch_size: int, num_batches: int,
                 local_rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
  """The first `num_batches` batches of the eval corpus in file order, read once and kept in memory; past the end
  of the corpus, rows are empty (zero weight), so every process runs the same number of eval steps."""
  batch_of = StepBatches(PackedRows(corpus, seq_len, seed=0, epochs=False), batch_size, local_rows)
  rows_needed = -(-corpus.lengths.sum() // seq_len)
  return [batch_of(k) for k in range(min(num_batches, -(-rows_needed // batch_size)))]


def stream_record(data: DataConfig, corpus: corpus_lib.Corpus, *, seed: int, batch_size: int) -> dict[str, Any]:
  """What fixes the training stream: saved with each checkpoint, compared when a run resumes."""
  return {'corpus': corpus.fingerprint, 'tokenizer': corpus.meta['tokenizer'], 'seed': seed,
          'seq_len': data.seq_len, 'batch_size': batch_size, 'shuffle_window': data.shuffle_window}


def stream_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """Human-readable differences between the stream a checkpoint was trained on and this run's."""
  names = {'corpus': 'the training corpus (data.train_files or their contents)', 'tokenizer': 'the tokenizer',
           'seed': 'train.seed', 'seq_len': 'data.seq_len', 'batch_size': 'train.batch_size',
           'shuffle_window': 'data.shuffle_window', 'format': 'data.format',
           'reference': 'DPO\'s reference model (init_from_hf or its files)'}
  return [f'{names.get(k, k)}: {saved.get(k)!r} -> {current.get(k)!r}' for k in names if saved.get(k) != current.get(k)]
