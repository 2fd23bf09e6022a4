"""Post-training data: chat conversations (SFT) and preference pairs (DPO), encoded once and packed into rows by step.

`data.format='chat'` reads `{"messages": [...]}` records, `data.format='preference'` reads `{"prompt", "chosen",
"rejected"}` records (`qwenjax.chat` encodes both with the tokenizer's chat template and names bad records with file
and line). The encoded sequences are kept in `data.prepared_dir/chat/<key>` (the key hashes the files' paths, sizes
and modification times, the format and the tokenizer with its template), so later runs skip the encoding.

**Packing.** A row holds `seq_len + 1` tokens: whole sequences, one segment each (the model attends within a
segment only, positions restart at each), never split across rows; the rest of the row is padding (segment 0,
weight 0). A conversation longer than the row is cut to its first `seq_len + 1` tokens, counted and warned about; a
DPO pair keeps both its sequences in one row (segments 2j+1 and 2j+2, `qwenjax.dpo`), cutting the longer one, or
both to half a row, when they do not fit together. The rows are planned once with best-fit decreasing (longest
first, each into the fullest row it fits), which fills rows far better than packing in file order; the plan's shape
depends only on the sequences' lengths, so every epoch has the same number of rows.

**The stream** is a pure function of the step, as for text (`qwenjax.data`): epoch e orders equal lengths by a
permutation seeded with (train.seed, e), so each epoch puts other sequences together, and shuffles its rows with
another; row r of the stream is row r mod R of epoch r // R, and the batch of step k holds rows
[k * batch_size, (k + 1) * batch_size). Resuming needs only the step.

**Weights** are 1 on the targets a run trains on: the assistant's tokens (`chat.encode`'s mask) for SFT, the
completion's tokens for DPO; `target_tokens` in the metrics counts them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from typing import Any, Mapping, Sequence

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np

from qwenjax import chat
from qwenjax import data as data_lib
from qwenjax import documents
from qwenjax import files as files_lib
from qwenjax import tokenizer as tokenizer_lib
from qwenjax.config import DataConfig, RunConfig

_VERSION = 1


# ---------------------------------------------------------------------------------------------------------
# Encoded sequences.

@dataclasses.dataclass
class Encoded:
  """The encoded records of a set of files, in file order: sequence i is `tokens[offsets[i]:offsets[i + 1]]`
  with its `mask` (True on the tokens to train on). Preference data: sequences 2p and 2p + 1 are pair p's prompt +
  chosen and prompt + rejected."""
  tokens: np.ndarray  # int32
  mask: np.ndarray  # bool
  offsets: np.ndarray  # int64 [sequences + 1]
  meta: dict[str, Any]

  @property
  def fingerprint(self) -> str:
    return self.meta['key']

  @property
  def pairs(self) -> bool:
    return self.meta['format'] == 'preference'

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  def sequence(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
    return self.tokens[lo:hi], self.mask[lo:hi]


def _records(files: Sequence[str], fmt: str, tok: tokenizer_lib.Tokenizer,
             stats: chat.ReadStats) -> tuple[list[np.ndarray], list[np.ndarray]]:
  ids, masks = [], []
  if fmt == 'chat':
    for example in chat.read_chat(files, tok, stats):
      ids.append(example.ids)
      masks.append(example.mask)
  else:
    for example in chat.read_preferences(files, tok, stats):
      for sequence, mask in example.sequences():
        ids.append(sequence)
        masks.append(mask)
  return ids, masks


def encode(files: Sequence[str], fmt: str, tok: tokenizer_lib.Tokenizer, root: str, *,
           what: str = 'data.train_files') -> Encoded:
  """The encoded records of `files` (`fmt` 'chat' or 'preference'), from `root/chat/<key>` or encoded there now.

  Bad records are skipped and named with file and line (as warnings, and in the meta's `skipped_where`); files
  with no usable record are an error. Process 0 encodes where the processes share `root`; each its own copy
  otherwise.
  """
  identity = documents.file_identity(files)
  key = hashlib.sha256(json.dumps({'files': [list(f) for f in identity], 'format': fmt, 'tokenizer': tok.fingerprint,
                                   'version': _VERSION}).encode()).hexdigest()[:20]
  directory = os.path.join(os.path.expanduser(root), 'chat', key)
  shared = data_lib.shared_by_all_processes(root)
  encoded_now = not os.path.exists(os.path.join(directory, 'meta.json'))
  if encoded_now and (jax.process_index() == 0 or not shared):
    stats = chat.ReadStats()
    ids, masks = _records(files, fmt, tok, stats)
    meta = {'key': key, 'format': fmt, 'files': [list(f) for f in identity], 'tokenizer': tok.fingerprint,
            'records': stats.records, 'kept': stats.kept, 'skipped': dict(stats.skipped),
            'skipped_where': stats.where, 'prefix_mismatches': stats.prefix_mismatches, 'sequences': len(ids)}
    if not ids:
      raise ValueError(f'{what}: no usable {fmt} record in {len(files)} file(s) ({stats.summary()}); '
                       + ('each line must be {"messages": [...]} with an assistant turn' if fmt == 'chat' else
                          'each line must be {"prompt", "chosen", "rejected"} (strings or message lists)'))
    os.makedirs(directory, exist_ok=True)
    lengths = np.array([len(x) for x in ids], np.int64)
    arrays = {'tokens': np.concatenate(ids).astype(np.int32), 'mask': np.concatenate(masks).astype(bool),
              'offsets': np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)}
    for name, array in arrays.items():
      _save_npy(os.path.join(directory, f'{name}.npy'), array)
    files_lib.write_json(os.path.join(directory, 'meta.json'), meta)  # last: marks the encoding complete
    logging.info('data: %s: %s, encoded into %s', what, _describe(meta), directory)
  if jax.process_count() > 1 and shared:
    multihost_utils.sync_global_devices(f'qwenjax chat data {key}')
  with open(os.path.join(directory, 'meta.json')) as f:
    meta = json.load(f)
  if not encoded_now:  # the warnings of the run that encoded them, again
    logging.info('data: %s: %s (encoded earlier, in %s)', what, _describe(meta), directory)
    for where in meta['skipped_where']:
      logging.warning('%s', where)
  return Encoded(np.load(os.path.join(directory, 'tokens.npy'), mmap_mode='r'),
                 np.load(os.path.join(directory, 'mask.npy'), mmap_mode='r'),
                 np.load(os.path.join(directory, 'offsets.npy')), meta)


def _describe(meta: Mapping[str, Any]) -> str:
  reasons = ', '.join(f'{n} {kind}' for kind, n in sorted(meta['skipped'].items(), key=lambda kv: -kv[1]))
  unit = 'conversations' if meta['format'] == 'chat' else 'pairs'
  return (f'{meta["kept"]:,} {unit} of {meta["records"]:,} records' + (f' (skipped: {reasons})' if reasons else '')
          + (f'; {meta["prefix_mismatches"]} completions whose prompt ids differ from the start of prompt + '
             'completion ids (as TRL, the ids after the prompt\'s length)' if meta.get('prefix_mismatches') else ''))


def _save_npy(path: str, array: np.ndarray) -> None:
  """The array written whole or not at all (`files.write`)."""
  def write(tmp):
    with open(tmp, 'wb') as f:
      np.save(f, array)
  files_lib.write(path, write)


# ---------------------------------------------------------------------------------------------------------
# The packing plan.

@dataclasses.dataclass(frozen=True)
class _Items:
  """What is packed: items (a conversation, or a pair) with the lengths they keep (cut to fit a row)."""
  sequences: np.ndarray  # int64 [items, k]: the encoded sequences of each item (k = 1, or 2 for pairs)
  kept: np.ndarray  # int64 [items, k]: how many tokens of each sequence go into the row
  trained: np.ndarray  # int64 [items]: targets trained on

  @property
  def lengths(self) -> np.ndarray:
    return self.kept.sum(axis=1)


def _items(encoded: Encoded, capacity: int, what: str) -> _Items:
  """The items of `encoded` for rows of `capacity` tokens; sequences cut to fit, counted and warned about; items
  left with no target to train on dropped, counted and warned about."""
  lengths = encoded.lengths
  k = 2 if encoded.pairs else 1
  sequences = np.arange(len(lengths)).reshape(-1, k)
  full = lengths[sequences]
  if k == 1:
    kept = np.minimum(full, capacity)
  else:  # both in one row: cut the longer one to what the shorter leaves, or both to half a row
    short, long_ = full.min(axis=1, keepdims=True), full.max(axis=1, keepdims=True)
    half = capacity // 2
    cap = np.where(full.sum(axis=1, keepdims=True) <= capacity, full,
                   np.where(short <= half, np.where(full == long_, capacity - short, full),
                            np.minimum(full, half)))
    kept = np.minimum(full, cap)
  cut = (kept < full).any(axis=1)
  trained = _trained_tokens(encoded, sequences, kept)
  trainable = (trained > 0).all(axis=1)
  unit = 'conversation' if k == 1 else 'pair'
  if cut.any():
    logging.warning('data: %s: %d of %d %ss do not fit a row of data.seq_len + 1 = %d tokens and are cut to %s '
                    '(the tokens past the cut are not trained on)', what, int(cut.sum()), len(sequences), unit,
                    capacity, 'their first tokens' if k == 1 else 'fit together (the longer sequence first, else '
                    'both to half a row)')
  if not trainable.all():
    logging.warning('data: %s: %d %ss keep no token to train on within the row and are left out', what,
                    int((~trainable).sum()), unit)
  if not trainable.any():
    raise ValueError(f'{what}: no {unit} keeps a token to train on within data.seq_len={capacity - 1}: raise '
                     'data.seq_len')
  return _Items(sequences[trainable], kept[trainable], trained[trainable].sum(axis=1))


def _trained_tokens(encoded: Encoded, sequences: np.ndarray, kept: np.ndarray) -> np.ndarray:
  """[items, k]: the masked tokens among each sequence's kept tokens, after its first (which is no target)."""
  starts = encoded.offsets[:-1]
  whole = np.add.reduceat(np.asarray(encoded.mask, np.int32), starts) - np.asarray(encoded.mask)[starts]
  trained = whole[sequences]
  for i, j in zip(*np.nonzero(kept < encoded.lengths[sequences])):  # cut sequences: count again, up to the cut
    mask = encoded.sequence(int(sequences[i, j]))[1]
    trained[i, j] = int(mask[1:kept[i, j]].sum())
  return trained


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
  """Rows of slots: slot k is the k-th longest item (`lengths` sorted in decreasing order, each <= capacity); each
  item goes into the row with the least room that still fits it, or a new row."""
  assert np.all(np.diff(lengths) <= 0) and (len(lengths) == 0 or lengths[0] <= capacity)
  # rows_with_room[r]: the open rows with exactly r tokens of room (a stack each); has_room[r]: any.
  rows_with_room: list[list[int]] = [[] for _ in range(capacity + 1)]
  has_room = np.zeros(capacity + 1, bool)
  rows: list[list[int]] = []
  for slot, length in enumerate(lengths.tolist()):
    fits = int(np.argmax(has_room[length:])) + length if has_room[length:].any() else -1
    if fits < 0:
      rows.append([slot])
      room, row = capacity - length, len(rows) - 1
    else:
      row = rows_with_room[fits].pop()
      has_room[fits] = bool(rows_with_room[fits])
      rows[row].append(slot)
      room = fits - length
    if room:
      rows_with_room[room].append(row)
      has_room[room] = True
  return [np.asarray(r, np.int64) for r in rows]


class PackedExamples:
  """Row r of the stream of packed conversations or pairs (module docstring), as `tokens`, `segment_ids`,
  `positions` and `mask` of `seq_len + 1` entries. `epochs=False`: the rows of one pass, unshuffled, then empty
  rows (for eval)."""

  def __init__(self, encoded: Encoded, seq_len: int, seed: int, epochs: bool = True, what: str = 'data.train_files'):
    self.encoded, self.seq_len, self.seed, self.epochs = encoded, seq_len, seed, epochs
    self.capacity = seq_len + 1
    self.items = _items(encoded, self.capacity, what)
    lengths = self.items.lengths
    # The plan's shape: items by decreasing length (ties in file order here; each epoch re-orders the ties).
    self._by_length = np.argsort(-lengths, kind='stable')
    self.plan = best_fit_decreasing(lengths[self._by_length], self.capacity)
    self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    self._lock = threading.Lock()
    filled, trained = int(lengths.sum()), int(self.items.trained.sum())
    self.stats = {'items': len(lengths), 'rows': len(self.plan), 'filled': filled / (len(self.plan) * self.capacity),
                  'trained': trained / max(filled, 1)}

  def describe(self) -> str:
    unit = 'conversations' if not self.encoded.pairs else 'pairs'
    return (f'{self.stats["items"]:,} {unit} packed into {self.stats["rows"]:,} rows of {self.capacity} tokens per '
            f'epoch: {100 * self.stats["filled"]:.1f}% of the positions hold tokens, '
            f'{100 * self.stats["trained"]:.1f}% of those are trained on')

  def __len__(self) -> int:
    return len(self.plan)

  def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(item of each slot, plan row of each stream row) of an epoch."""
    with self._lock:
      if epoch not in self._orders:
        if len(self._orders) > 2:
          self._orders.pop(min(self._orders))
        lengths = self.items.lengths
        if self.epochs:
          rank = np.random.default_rng([self.seed, epoch]).permutation(len(lengths))
          slots = np.lexsort((rank, -lengths))
          rows = np.random.default_rng([self.seed, epoch, 1 << 30]).permutation(len(self.plan))
        else:
          slots, rows = self._by_length, np.arange(len(self.plan))
        self._orders[epoch] = slots, rows
      return self._orders[epoch]

  def __getitem__(self, row: int) -> dict[str, np.ndarray]:
    need = self.capacity
    out = {k: np.zeros(need, np.int32) for k in ('tokens', 'segment_ids', 'positions')}
    out['mask'] = np.zeros(need, bool)
    epoch, index = divmod(int(row), len(self.plan))
    if epoch and not self.epochs:
      return out
    slots, rows = self._order(epoch)
    filled, segment = 0, 0
    for item in slots[self.plan[int(rows[index])]]:
      for sequence, keep in zip(self.items.sequences[item], self.items.kept[item]):
        tokens, mask = self.encoded.sequence(int(sequence))
        piece = slice(filled, filled + int(keep))
        segment += 1
        out['tokens'][piece] = tokens[:keep]
        out['mask'][piece] = mask[:keep]
        out['segment_ids'][piece] = segment
        out['positions'][piece] = np.arange(keep)
        filled += int(keep)
    return out


def to_model_batch(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`data.to_model_batch`, with each target weighted by the mask of its token: only masked tokens train."""
  batch = data_lib.to_model_batch(packed)
  batch['weights'] = batch['weights'] * packed['mask'][:, 1:].astype(np.float32)
  return batch


class StepBatches:
  """This process's rows of the batch of step k (as `data.StepBatches`)."""

  def __init__(self, rows: PackedExamples, batch_size: int, local_rows: Sequence[int]):
    self.rows, self.batch_size, self.local_rows = rows, batch_size, list(local_rows)

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    packed = [self.rows[step * self.batch_size + i] for i in self.local_rows]
    return to_model_batch({k: np.stack([p[k] for p in packed]) for k in packed[0]})


def train_batches(rows: PackedExamples, *, batch_size: int, local_rows: Sequence[int], start: int, steps: int,
                  read_threads: int = 2):
  """Batches of steps start, ..., steps - 1, read ahead on `read_threads` threads (grain), as `data.train_batches`."""
  ds = grain.MapDataset.range(start, max(steps, start)).map(StepBatches(rows, batch_size, local_rows))
  options = grain.ReadOptions(num_threads=max(read_threads, 1), prefetch_buffer_size=2 * max(read_threads, 1))
  return iter(ds.to_iter_dataset(options))


def eval_batches(encoded: Encoded, *, seq_len: int, batch_size: int, num_batches: int,
                 local_rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
  """The first `num_batches` batches of one pass over the eval records (packed, unshuffled), kept in memory."""
  rows = PackedExamples(encoded, seq_len, seed=0, epochs=False, what='data.eval_files')
  batch_of = StepBatches(rows, batch_size, local_rows)
  return [batch_of(k) for k in range(min(num_batches, -(-len(rows) // batch_size)))]


def stream_record(encoded: Encoded, *, seq_len: int, seed: int, batch_size: int) -> dict[str, Any]:
  """What fixes the training stream (`data.stream_record` for chat and preference data)."""
  return {'format': encoded.meta['format'], 'corpus': encoded.fingerprint, 'tokenizer': encoded.meta['tokenizer'],
          'seed': seed, 'seq_len': seq_len, 'batch_size': batch_size}


def check_settings(settings: RunConfig) -> None:
  """What chat and preference data need besides the config file: the user's records and the model's own tokenizer
  and template, never a newly trained one (config files leave both to the command line, so `config.settings`
  accepts them without)."""
  data = settings.data
  if data.format == 'text':
    return
  if not data.train_files:
    raise ValueError(f'data.format={data.format!r} trains on your own records: set data.train_files to .jsonl files '
                     'of them (docs/post_training.md)')
  if (data.tokenizer or 'train') == 'train' and not settings.init_from_hf:
    raise ValueError(f'data.format={data.format!r} needs the tokenizer (and chat template) of the model it '
                     'fine-tunes: set --config.init_from_hf=DIR (a Hugging Face checkpoint with its tokenizer) or '
                     '--config.data.tokenizer=PATH')
  if data_lib.tokenizer_source(data, init_from_hf=settings.init_from_hf)['kind'] == 'train':
    raise ValueError(f'data.format={data.format!r} needs the tokenizer (and chat template) of the model it '
                     f'fine-tunes, but init_from_hf={settings.init_from_hf!r} holds no tokenizer.json or '
                     'tokenizer.model: set --config.data.tokenizer=PATH')


def prepared(data: DataConfig, tok: tokenizer_lib.Tokenizer) -> tuple[Encoded, Encoded | None]:
  """(train, eval or None) encoded records of `data.train_files` and `data.eval_files` (`data.format`)."""
  root = data_lib.prepared_root(data)
  train_files = documents.expand_files(data.train_files, 'data.train_files')
  train = encode(train_files, data.format, tok, root, what='data.train_files')
  held_out = None
  if data.eval_files:
    held_out = encode(documents.expand_files(data.eval_files, 'data.eval_files'), data.format, tok, root,
                      what='data.eval_files')
  return train, held_out
