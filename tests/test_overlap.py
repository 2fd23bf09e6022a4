"""qwenjax.overlap and data.decontaminate: eval documents the training corpus already holds, and leaving them out."""

import dataclasses
import json
import logging

import pytest

from qwenjax import config as config_lib
from qwenjax import data
from qwenjax import overlap

LONG = [f'value_{i} = compute_something_long(argument_{i}, another_argument)' for i in range(12)]


class ByteTokenizer:
  eos_id = 2
  vocab_size = 259
  fingerprint = 'bytes-v1'

  def encode_batch(self, texts):
    return [[b + 3 for b in t.encode()] for t in texts]


def test_overlap_counts_lines_found_and_the_nearest_training_document():
  eval_docs = [('copied', '\n'.join(LONG[:4] + ['x = 1'])), ('fresh', f'  {LONG[5]}  \n'), ('empty', 'pass')]
  train_docs = [('a', '\n'.join(LONG[:3])), ('b', f'    {LONG[3]}\n{LONG[0]}'), ('c', 'x = 1')]
  rows = {r.name: r for r in overlap.overlap(eval_docs, iter(train_docs), min_chars=40)}
  # 'x = 1' is too short to count; indentation does not matter; each line counts once however often it is found.
  assert (rows['copied'].lines, rows['copied'].found, rows['copied'].share) == (4, 4, 1.0)
  assert (rows['copied'].nearest, rows['copied'].nearest_lines) == ('a', 3)
  assert (rows['fresh'].lines, rows['fresh'].found, rows['fresh'].nearest) == (1, 0, None)
  assert (rows['empty'].lines, rows['empty'].share) == (0, 0.0)
  assert overlap.overlap(eval_docs, iter(train_docs), min_chars=5)[0].lines == 5  # now 'x = 1' counts


def _files(tmp_path):
  """Training documents holding all of eval document 0's lines and a quarter of document 2's."""
  train = tmp_path / 'train.jsonl'
  train.write_text(''.join(json.dumps({'text': t}) + '\n' for t in
                           ('\n'.join(LONG[:3]), LONG[8], 'unrelated text ' * 5)))
  held = tmp_path / 'held.jsonl'
  held.write_text(''.join(json.dumps({'text': t}) + '\n' for t in
                          ('\n'.join(LONG[:3]), '\n'.join(LONG[4:7]), '\n'.join(LONG[8:12]))))
  return train, held


def test_shares_are_cached_until_a_file_changes(tmp_path):
  train, held = _files(tmp_path)
  cache = str(tmp_path / 'cache')
  assert overlap.shares([str(train)], [str(held)], cache_dir=cache) == [1.0, 0.0, 0.25]
  cached = list((tmp_path / 'cache').glob('overlap-*.json'))
  assert len(cached) == 1
  record = json.loads(cached[0].read_text())
  record['shares'] = [0.5, 0.5, 0.5]  # a cached result is read, not recomputed ...
  cached[0].write_text(json.dumps(record))
  assert overlap.shares([str(train)], [str(held)], cache_dir=cache) == [0.5, 0.5, 0.5]
  train.write_text(json.dumps({'text': LONG[4]}) + '\n')  # ... until the training files change
  assert overlap.shares([str(train)], [str(held)], cache_dir=cache) == [0.0, 1 / 3, 0.0]


def test_decontaminate_leaves_out_eval_documents_found_in_training(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  train, held = _files(tmp_path)
  settings = config_lib.DataConfig(train_files=str(train), eval_files=str(held), prepared_dir=str(tmp_path / 'p'))
  _, every = data.prepared_corpora(settings, ByteTokenizer())
  assert len(every) == 3 and every.meta['excluded'] == 0
  clean = dataclasses.replace(settings, decontaminate=0.2)
  _, kept = data.prepared_corpora(clean, ByteTokenizer())
  assert len(kept) == 1 and kept.meta['excluded'] == 2 and kept.directory != every.directory
  assert bytes(int(t) - 3 for t in kept.tokens(0)[:-1]).decode() == '\n'.join(LONG[4:7])
  assert 'data.decontaminate=0.2 leaves out 2 of 3 eval document(s)' in caplog.text
  assert '1 documents of the 3 read (2 left out as found in training)' in caplog.text
  # A share above the threshold keeps the document: 0.3 leaves out only the full copy.
  _, most = data.prepared_corpora(dataclasses.replace(settings, decontaminate=0.3), ByteTokenizer())
  assert len(most) == 2
  with pytest.raises(ValueError, match=r'data.decontaminate=0.1 leaves out every one of the 3 eval documents?'):
    train.write_text(''.join(json.dumps({'text': t}) + '\n' for t in LONG))
    data.prepared_corpora(dataclasses.replace(settings, decontaminate=0.1), ByteTokenizer())


def test_decontaminate_is_a_share():
  with pytest.raises(ValueError, match=r'data.decontaminate=1.5 is a share of lines: give one in \(0, 1\]'):
    config_lib.DataConfig(decontaminate=1.5)
  with pytest.raises(ValueError, match=r'data.decontaminate=-0.1 must be >= 0'):
    config_lib.DataConfig(decontaminate=-0.1)

