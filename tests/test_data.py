"""The input pipeline: sources, tokenizer, packing, resumable iteration."""

import json
import os

import numpy as np
import pytest

from qwenjax import data


class ByteTokenizer:
  """Stand-in for sentencepiece: one id per byte (+3), EOS = 2. Makes packing checks exact."""

  def encode(self, text):
    return [b + 3 for b in text.encode()]

  def eos_id(self):
    return 2


def _docs(n, seed=0):
  rng = np.random.default_rng(seed)
  return [''.join(rng.choice(list('abcdefgh '), size=int(rng.integers(1, 60)))) for _ in range(n)]


def test_stdlib_corpus_split_is_deterministic_and_disjoint():
  train, held_out = data.stdlib_files()
  assert len(train) > 500 and 5 < len(held_out) < len(train) / 20
  assert not set(train) & set(held_out)
  assert all(f.endswith('.py') and 'site-packages' not in f for f in train + held_out)
  assert data.stdlib_files() == (train, held_out)


def test_sources_read_jsonl_txt_and_arrayrecord(tmp_path):
  with open(tmp_path / 'a.jsonl', 'w') as f:
    f.write(json.dumps({'text': 'first doc', 'id': 1}) + '\n\n' + json.dumps({'text': 'second\ndoc'}) + '\n')
  (tmp_path / 'b.txt').write_text('a whole\nfile')
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  writer = array_record_module.ArrayRecordWriter(str(tmp_path / 'c.array_record'), 'group_size:1')
  writer.write(b'plain record')
  writer.write(json.dumps({'text': 'json record'}).encode())
  writer.close()
  patterns = f'{tmp_path}/*.jsonl, {tmp_path}/*.txt, {tmp_path}/*.array_record'
  train, held_out = data.sources({'train_files': patterns, 'eval_files': '', 'text_key': 'text'})
  assert held_out is None
  assert [train[i] for i in range(len(train))] == [
      'first doc', 'second\ndoc', 'a whole\nfile', 'plain record', 'json record']
  with pytest.raises(KeyError, match="no 'body' field.*text_key"):
    data.DocumentSource([str(tmp_path / 'a.jsonl')], text_key='body')[0]


def test_no_matching_files_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no files match data.train_files=.*nothing\*.jsonl"):
    data.sources({'train_files': f'{tmp_path}/nothing*.jsonl', 'eval_files': '', 'text_key': 'text'})


def test_packing_keeps_every_token_and_masks_document_boundaries():
  docs = _docs(40)
  seq_len, rows = 16, 4
  it = iter(data.train_dataset(docs, ByteTokenizer(), seq_len=seq_len, batch_size=rows, seed=3,
                               shuffle_window=0, read_threads=1))
  batches = [next(it) for _ in range(6)]
  for b in batches:
    assert b['inputs'].shape == (rows, seq_len) and b['weights'].dtype == np.float32
    np.testing.assert_array_equal(b['inputs'][:, 1:], b['targets'][:, :-1])
    # A target counts iff it continues the input's document.
    seg_next = np.concatenate([b['segment_ids'][:, 1:], np.full((rows, 1), -1)], axis=1)
    interior = b['weights'][:, :-1] == 1
    np.testing.assert_array_equal(interior, b['segment_ids'][:, :-1] == seg_next[:, :-1])
    assert (b['segment_ids'] > 0).all()  # an endless stream has no padding
    starts = np.diff(b['segment_ids'], axis=1) != 0
    assert (b['positions'][:, 1:][starts] == 0).all()  # positions restart with each document
  # Consecutive rows are consecutive pieces of one stream: shuffled documents, each followed by EOS (2).
  stream = np.concatenate([np.concatenate([b['inputs'], b['targets'][:, -1:]], 1).ravel() for b in batches])
  pieces = bytes(int(t) - 3 if t > 2 else 10 for t in stream).decode().split('\n')[:-1]
  assert len(pieces) > 5 and all(p in docs for p in pieces)
  assert len(set(pieces)) == len(pieces)  # within an epoch no document repeats
  assert [docs.index(p) for p in pieces] != sorted(docs.index(p) for p in pieces)  # shuffled


def test_iterator_state_restores_the_exact_next_batches():
  docs = _docs(200, seed=1)
  make = lambda: iter(data.train_dataset(docs, ByteTokenizer(), seq_len=32, batch_size=4, seed=7,
                                         shuffle_window=16, read_threads=2))
  it = make()
  for _ in range(9):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(12)]  # crosses a window boundary and an epoch
  resumed = make()
  resumed.set_state(json.loads(json.dumps(state)))  # as saved in a checkpoint
  for want in expected:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_process_shards_are_disjoint():
  docs = [f'doc{i}' for i in range(30)]
  seen = []
  for index in range(3):
    it = iter(data.train_dataset(docs, ByteTokenizer(), seq_len=8, batch_size=1, seed=0,
                                 process_index=index, process_count=3, read_threads=1))
    rows = [next(it) for _ in range(12)]
    text = bytes(int(t) - 3 if t > 2 else 32 for b in rows
                 for t in np.concatenate([b['inputs'][0], b['targets'][0, -1:]])).decode()
    seen.append({w for w in text.split() if w.startswith('doc') and w[3:].isdigit()})
  assert not seen[0] & seen[1] and not seen[1] & seen[2] and not seen[0] & seen[2]


def test_eval_batches_are_fixed_and_padded():
  docs = _docs(5)
  batches = data.eval_batches(docs, ByteTokenizer(), seq_len=16, batch_size=4, num_batches=50, read_threads=1)
  assert len(batches) == 50
  # Targets that count: next tokens within one packed row of 17 and within one document (EOS included).
  doc_of = np.concatenate([np.full(len(d) + 1, i) for i, d in enumerate(docs)])
  rows = [doc_of[i:i + 17] for i in range(0, len(doc_of), 17)]
  expected = sum(int((row[1:] == row[:-1]).sum()) for row in rows)
  assert sum(b['weights'].sum() for b in batches) == expected
  assert batches[-1]['weights'].sum() == 0  # padding batches
  again = data.eval_batches(docs, ByteTokenizer(), seq_len=16, batch_size=4, num_batches=50, read_threads=1)
  np.testing.assert_array_equal(again[0]['inputs'], batches[0]['inputs'])


def test_trained_tokenizer_round_trips_and_is_checked_against_the_model(tmp_path):
  train, _ = data.stdlib_files()
  source = data.DocumentSource(train[:40])
  path = str(tmp_path / 'tok.model')
  data.train_tokenizer(source, path, vocab_size=400, max_sentences=3000)
  tokenizer = data.load_tokenizer(path, model_vocab_size=400)
  text = source[0][:500]
  assert tokenizer.decode(tokenizer.encode(text)) == text  # indentation and newlines survive
  assert tokenizer.encode('\u2603') and tokenizer.eos_id() == 2  # byte fallback, no unknowns
  with pytest.raises(ValueError, match=r'400 pieces but model.vocab_size is 300.*vocab_size=400'):
    data.load_tokenizer(path, model_vocab_size=300)
  config = {'tokenizer': 'train', 'vocab_size': 512, 'tokenizer_sentences': 100}
  with pytest.raises(ValueError, match=r'data.vocab_size=512 .* more than model.vocab_size=256'):
    data.get_tokenizer(config, str(tmp_path), source, model_vocab_size=256)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    data.get_tokenizer({'tokenizer': str(tmp_path / 'missing.model')}, str(tmp_path), source, 256)
  assert not os.path.exists(tmp_path / 'tokenizer.model')
