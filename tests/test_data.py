"""The input pipeline: documents, bad input, prepared corpora, and the packed rows of each step."""

import dataclasses
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from qwenjax import config as config_lib
from qwenjax import corpus as corpus_lib
from qwenjax import data
from qwenjax import documents

from train_utils import small_config  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ByteTokenizer:
  """Stand-in for a real tokenizer: one id per byte (+3), EOS = 2. Makes packing checks exact."""

  eos_id = 2
  vocab_size = 259
  fingerprint = 'bytes-v1'

  def __init__(self):
    self.calls = 0

  def encode_batch(self, texts):
    self.calls += 1
    return [[b + 3 for b in t.encode()] for t in texts]


def _docs(n, seed=0):
  rng = np.random.default_rng(seed)
  return [''.join(rng.choice(list('abcdefgh '), size=int(rng.integers(1, 60)))) for _ in range(n)]


def _corpus(tmp_path, docs, name='docs.jsonl', tokenizer=None):
  path = tmp_path / name
  path.write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
  return corpus_lib.prepare([str(path)], 'text', tokenizer or ByteTokenizer(), str(tmp_path / 'prepared'))


def _text(tokens):
  return bytes(int(t) - 3 if t > 2 else 10 for t in tokens).decode()


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
  train_files, eval_files = documents.sources(patterns, '')
  assert eval_files == []
  train = documents.DocumentSource(train_files)
  assert [train[i] for i in range(len(train))] == [
      'first doc', 'second\ndoc', 'a whole\nfile', 'plain record', 'json record']
  with pytest.raises(KeyError, match=r"a.jsonl:3 has no 'body' field.*text_key"):
    documents.DocumentSource([str(tmp_path / 'a.jsonl')], text_key='body')[1]


def test_no_matching_files_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no files match data.train_files=.*nothing\*.jsonl"):
    documents.sources(f'{tmp_path}/nothing*.jsonl', '')


def test_bad_input_names_the_file_and_line(tmp_path):
  lines = [json.dumps({'text': f'document {i}'}) for i in range(5)]
  lines[3] = '{"text": "cut short'
  (tmp_path / 'bad.jsonl').write_text('\n'.join(lines) + '\n')
  with pytest.raises(ValueError, match=r'bad.jsonl:4: malformed JSON .*fix or remove that line'):
    corpus_lib.prepare([str(tmp_path / 'bad.jsonl')], 'text', ByteTokenizer(), str(tmp_path / 'p'))

  # Binary files and lines with invalid UTF-8 are skipped and counted, never trained on.
  (tmp_path / 'good.txt').write_text('plain text')
  (tmp_path / 'image.txt').write_bytes(b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR')
  with open(tmp_path / 'mixed.jsonl', 'wb') as f:
    f.write(json.dumps({'text': 'fine'}).encode() + b'\n' + b'{"text": "caf\xe9"}\n')
  files = [str(tmp_path / n) for n in ('good.txt', 'image.txt', 'mixed.jsonl')]
  corpus = corpus_lib.prepare(files, 'text', ByteTokenizer(), str(tmp_path / 'p'))
  assert corpus.meta['documents'] == 2 and corpus.meta['skipped'] == 2
  assert any('image.txt: binary data' in w for w in corpus.meta['skipped_where'])
  assert any('mixed.jsonl:2: not UTF-8 text' in w for w in corpus.meta['skipped_where'])
  assert sorted(_text(corpus.tokens(d)) for d in range(2)) == ['fine\n', 'plain text\n']

  (tmp_path / 'empty.txt').write_text('')
  with pytest.raises(ValueError, match=r'data.train_files: no text to train on: every document is empty'):
    corpus_lib.prepare([str(tmp_path / 'empty.txt')], 'text', ByteTokenizer(), str(tmp_path / 'p'))
  with pytest.raises(ValueError, match=r'no text to train on: all 1 document\(s\) are not UTF-8 text'):
    corpus_lib.prepare([str(tmp_path / 'image.txt')], 'text', ByteTokenizer(), str(tmp_path / 'p'))


def test_prepared_corpus_is_reused_until_a_file_changes(tmp_path):
  tokenizer = ByteTokenizer()
  docs = _docs(1200)  # three shards
  corpus = _corpus(tmp_path, docs, tokenizer=tokenizer)
  assert tokenizer.calls == 3 and corpus.meta['shards'] == 3 and len(corpus) == 1200
  assert [_text(corpus.tokens(d)) for d in (0, 700, 1199)] == [docs[0] + '\n', docs[700] + '\n', docs[1199] + '\n']
  again = corpus_lib.prepare([str(tmp_path / 'docs.jsonl')], 'text', tokenizer, str(tmp_path / 'prepared'))
  assert tokenizer.calls == 3 and again.directory == corpus.directory  # not tokenized again
  stat = os.stat(tmp_path / 'docs.jsonl')
  os.utime(tmp_path / 'docs.jsonl', ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched
  rebuilt = corpus_lib.prepare([str(tmp_path / 'docs.jsonl')], 'text', tokenizer, str(tmp_path / 'prepared'))
  assert tokenizer.calls == 6 and rebuilt.directory != corpus.directory

  # A damaged shard (cut short, or replaced by another array) is an error naming the directory and the fix.
  tokens = os.path.join(corpus.directory, 'shard-00001.tokens.npy')
  np.save(tokens, np.load(tokens)[:10])
  with pytest.raises(ValueError, match=r'prepared corpus .* is damaged \(.*holds 10 tokens.*delete that directory'):
    corpus_lib.Corpus(corpus.directory)
  with open(tokens, 'r+b') as f:
    f.truncate(200)
  with pytest.raises(ValueError, match='is damaged'):
    corpus_lib.Corpus(corpus.directory)


def test_documents_left_out_are_counted_and_warned_about_once(tmp_path, caplog):
  """A corpus's counts add up (documents kept, not text, empty), and documents that are not text are warned about
  once, although training the tokenizer reads them too."""
  caplog.set_level(logging.INFO)
  for i in range(3):
    (tmp_path / f'text{i}.txt').write_text(' '.join(_docs(200)[i * 50:(i + 1) * 50]))
  (tmp_path / 'image.txt').write_bytes(b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR')
  (tmp_path / 'empty.txt').write_text('')
  settings = config_lib.DataConfig(train_files=str(tmp_path / '*.txt'), vocab_size=300,
                                   prepared_dir=str(tmp_path / 'prepared'))
  tokenizer = data.get_tokenizer(settings, None, model_vocab_size=512)  # a BPE trained on the files
  train, _ = data.prepared_corpora(settings, tokenizer)
  assert (train.meta['documents'], train.meta['skipped'], train.meta['empty']) == (3, 1, 1)
  assert '3 documents of the 5 read (1 not UTF-8 text, 1 empty)' in caplog.text
  assert caplog.text.count('image.txt: binary data') == 1, caplog.text


def test_the_trained_tokenizer_follows_data_tokenizer_seed_not_train_seed(tmp_path):
  """Runs of other train.seeds (a sweep's repeats) share one tokenizer, so their losses count the same pieces:
  data.tokenizer_seed alone picks the lines a BPE learns from. A workdir keeps the tokenizer it started with."""
  rng = np.random.default_rng(0)
  words = [''.join(rng.choice(list('abcdefghijklmnop'), size=int(rng.integers(2, 9)))) for _ in range(400)]
  (tmp_path / 'docs.jsonl').write_text(''.join(
      json.dumps({'text': ' '.join(rng.choice(words, size=12))}) + '\n' for _ in range(300)))
  first = config_lib.DataConfig(train_files=str(tmp_path / 'docs.jsonl'), vocab_size=300, tokenizer_sentences=20,
                                prepared_dir=str(tmp_path / 'prepared'))
  runs = [config_lib.settings(small_config(seed=seed)) for seed in (0, 1)]
  assert data.tokenizer_source(runs[0].data) == data.tokenizer_source(runs[1].data)  # train.seed plays no part
  tokenizer = data.get_tokenizer(first, None, model_vocab_size=512)
  assert data.get_tokenizer(first, None, model_vocab_size=512).fingerprint == tokenizer.fingerprint
  other = dataclasses.replace(first, tokenizer_seed=1)
  assert data.tokenizer_source(other)['seed'] == 1
  assert data.get_tokenizer(other, None, model_vocab_size=512).fingerprint != tokenizer.fingerprint  # other lines
  data.keep_tokenizer(str(tmp_path / 'run'), tokenizer, first)
  assert data.get_tokenizer(other, str(tmp_path / 'run'), model_vocab_size=512).fingerprint == tokenizer.fingerprint


@pytest.mark.slow
def test_the_prepare_command_prints_the_corpora(tmp_path):
  (tmp_path / 'a.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n' for d in _docs(40)))
  done = subprocess.run(
      [sys.executable, '-m', 'qwenjax.prepare', f'--config={ROOT}/configs/tiny.py',
       f'--config.data.train_files={tmp_path}/a.jsonl', '--config.data.eval_files=',
       f'--config.data.prepared_dir={tmp_path}/prepared', '--config.data.vocab_size=300'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert done.returncode == 0, done.stderr[-3000:]
  assert f'train: {tmp_path}/prepared/' in done.stdout and '40 documents' in done.stdout


def test_rows_pack_every_token_once_with_document_boundaries(tmp_path):
  docs = _docs(60)
  corpus = _corpus(tmp_path, docs)
  seq_len, batch = 16, 4
  batches = [data.StepBatches(data.PackedRows(corpus, seq_len, seed=3), batch, range(batch))(k) for k in range(8)]
  for b in batches:
    assert b['inputs'].shape == (batch, seq_len) and b['weights'].dtype == np.float32
    np.testing.assert_array_equal(b['inputs'][:, 1:], b['targets'][:, :-1])
    assert (b['segment_ids'] > 0).all()  # the training stream has no padding at all
    seg_next = np.concatenate([b['segment_ids'][:, 1:], np.full((batch, 1), -1)], axis=1)
    np.testing.assert_array_equal(b['weights'][:, :-1] == 1, b['segment_ids'][:, :-1] == seg_next[:, :-1])
    starts = np.diff(b['segment_ids'], axis=1) != 0
    assert (b['positions'][:, 1:][starts] == 0).all()  # positions restart with each document
  # Rows overlap by one token: the inputs of consecutive rows, then the last target, are the stream itself,
  # documents in a shuffled order, each once per epoch, each followed by EOS.
  stream = np.concatenate([b['inputs'].ravel() for b in batches] + [batches[-1]['targets'][-1, -1:]])
  pieces = _text(stream).split('\n')[1:-1]  # the first and last pieces may be cut
  assert len(pieces) > 10 and all(p in docs for p in pieces)
  assert len(set(pieces)) == len(pieces)
  assert [docs.index(p) for p in pieces] != sorted(docs.index(p) for p in pieces)


def test_a_step_is_the_same_batch_whoever_reads_it(tmp_path):
  corpus = _corpus(tmp_path, _docs(300, seed=1))
  make = lambda rows: data.StepBatches(data.PackedRows(corpus, 32, seed=7, shuffle_window=16), 8, rows)
  whole = make(range(8))
  # Read in another order, after other steps, by a new reader (a resumed run), or split between two processes.
  later = [make(range(8))(k) for k in (40, 3, 17)]
  halves = [make(range(0, 4)), make(range(4, 8))]
  for k, got in zip((40, 3, 17), later):
    want = whole(k)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
      np.testing.assert_array_equal(np.concatenate([h(k)[key] for h in halves]), want[key])
  # Many epochs later rows still come from the corpus, in a new order.
  epoch_rows = corpus.lengths.sum() // 32
  assert not np.array_equal(whole(0)['inputs'], whole(int(epoch_rows) // 8 + 5)['inputs'])


def test_train_batches_start_at_any_step(tmp_path):
  corpus = _corpus(tmp_path, _docs(200, seed=2))
  kwargs = dict(seq_len=16, batch_size=4, seed=0, shuffle_window=8, local_rows=range(4), steps=12, read_threads=2)
  straight = list(data.train_batches(corpus, start=0, **kwargs))
  resumed = list(data.train_batches(corpus, start=5, **kwargs))
  assert len(straight) == 12 and len(resumed) == 7
  for want, got in zip(straight[5:], resumed):
    np.testing.assert_array_equal(got['inputs'], want['inputs'])


def test_eval_batches_are_fixed_and_padded(tmp_path):
  docs = _docs(5)
  corpus = _corpus(tmp_path, docs)
  batches = data.eval_batches(corpus, seq_len=16, batch_size=4, num_batches=50, local_rows=range(4))
  # Every target within one document counts once, in file order; then zero-weight padding.
  n = sum(len(d) + 1 for d in docs)
  assert len(batches) == -(-(-(-n // 16)) // 4) < 50
  assert sum(b['weights'].sum() for b in batches) == n - len(docs)
  stream = np.concatenate([b['inputs'].ravel() for b in batches])[:n - 1]
  assert _text(stream) == '\n'.join(docs)
  assert batches[-1]['weights'][-1, -1] == 0 and batches[-1]['segment_ids'][-1, -1] == 0  # padding
