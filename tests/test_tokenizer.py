"""qwenjax.tokenizer: training on any script, Hugging Face tokenizers with transformers' ids, loading errors."""

import io
import json
import os
import pickle
import random
import unicodedata

import pytest
import sentencepiece as spm
import tokenizers
import transformers

import hf_utils
from qwenjax import tokenizer

_WORDS = ('the of and to in is that for it as was with be by on not this are or from at which but have an they '
          'model training data language token').split()

# Characters the training corpus never holds: CJK Extension A, Hangul, Devanagari, Arabic, other emoji.
UNSEEN = ('\u3400\u3401\u4db5 한국어 텍스트 हिन्दी العربية \U0001F9FF\U0001FA90 mixed\twith\t\ttabs,  several   '
          'spaces,\r\nwindows lines\r\n and  a trailing space ')


def random_unicode(count: int, seed: int = 0) -> list[str]:
  """Strings of code points from all planes (ASCII controls included; no surrogates, no U+2581)."""
  rng = random.Random(seed)
  draw = lambda: rng.choice([rng.randrange(0x80), rng.randrange(0x80, 0xD800), rng.randrange(0xE000, 0x110000)])
  return [''.join(chr(c) for c in (draw() for _ in range(rng.randint(0, 30))) if c != 0x2581)
          for _ in range(count)]


def mixed_corpus(docs: int, seed: int = 0) -> list[str]:
  """English, Chinese drawn from the whole CJK block (thousands of rare characters) and emoji."""
  rng = random.Random(seed)
  out = []
  for _ in range(docs):
    parts = []
    for _ in range(rng.randint(2, 8)):
      kind = rng.random()
      if kind < 0.45:
        parts.append(' '.join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) + '.')
      elif kind < 0.85:  # 500 common characters, and 1 in 5 drawn from all 20,992 of U+4E00..U+9FFF
        parts.append(''.join(chr(0x4E00 + (rng.randrange(0x5200) if rng.random() < 0.2 else
                                           int(rng.paretovariate(1.0) * 7) % 500))
                             for _ in range(rng.randint(5, 40))))
      else:
        parts.append(' '.join(chr(rng.randint(0x1F600, 0x1F64F)) * rng.randint(1, 3) for _ in range(3)))
    out.append('\n'.join(parts))
  return out


@pytest.fixture(scope='module')
def corpus():
  return mixed_corpus(3000)


def test_the_corpus_breaks_sentencepiece_defaults(corpus):
  """The generated corpus is the failing case of issue 15: more rare characters than a 4096 vocabulary."""
  lines = [line for doc in corpus for line in doc.split('\n')]
  assert len(set(''.join(lines))) > 4096
  with pytest.raises(RuntimeError, match='Vocabulary size is smaller than required_chars'):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=io.BytesIO(), vocab_size=4096, model_type='bpe',
        byte_fallback=True, character_coverage=0.9995, minloglevel=2)


@pytest.mark.parametrize('vocab_size', [512, 4096])
def test_train_on_mixed_scripts(corpus, tmp_path, vocab_size):
  tok = tokenizer.train(corpus, str(tmp_path), vocab_size=vocab_size)
  assert isinstance(tok, tokenizer.SentencePieceTokenizer)
  assert tok.vocab_size == vocab_size
  assert tok.eos_id == 2 and tok.stop_ids == (2,)
  assert os.listdir(tmp_path) == ['tokenizer.model']
  for text in (UNSEEN, corpus[0], '\n\n  indented\n\tx', '', ' ', '\x00', *random_unicode(200)):
    assert tok.decode(tok.encode(text)) == text, ascii(text)
  # A character never seen is its UTF-8 bytes; frequent English words are merged into few pieces.
  assert len(tok.encode('\u3400')) == 3
  assert len(tok.encode('the model and the data')) <= 10
  assert tok.encode_batch([UNSEEN, 'the data', '']) == [tok.encode(UNSEEN), tok.encode('the data'), []]
  loaded = tokenizer.load(str(tmp_path))
  assert loaded.fingerprint == tok.fingerprint
  assert loaded.encode(UNSEEN) == tok.encode(UNSEEN)


def test_train_is_seeded_and_reads_what_it_needs(corpus, tmp_path):
  a = tokenizer.train(corpus, str(tmp_path / 'a'), vocab_size=400, max_lines=2000, seed=1)
  b = tokenizer.train(corpus, str(tmp_path / 'b'), vocab_size=400, max_lines=2000, seed=1)
  c = tokenizer.train(corpus, str(tmp_path / 'c'), vocab_size=400, max_lines=2000, seed=2)
  assert a.fingerprint == b.fingerprint != c.fingerprint
  # Any other iterable is read in its own order, only as far as max_lines.
  pulled = []
  def stream(docs):
    for doc in docs:
      pulled.append(doc)
      yield doc
  gen = tokenizer.train(stream(corpus), str(tmp_path / 'd'), vocab_size=400, max_lines=2000)
  assert 0 < len(pulled) < len(corpus) // 2
  head = tokenizer.train(iter(corpus[:len(pulled)]), str(tmp_path / 'e'), vocab_size=400, max_lines=2000)
  assert gen.fingerprint == head.fingerprint
  assert gen.decode(gen.encode(UNSEEN)) == UNSEEN


def test_train_errors(corpus, tmp_path):
  minimum = tokenizer.MIN_TRAIN_VOCAB_SIZE
  with pytest.raises(ValueError, match=f'use vocab_size >= {minimum}'):
    tokenizer.train(corpus, str(tmp_path), vocab_size=minimum - 1)
  tok = tokenizer.train(corpus, str(tmp_path), vocab_size=minimum)
  assert tok.decode(tok.encode(UNSEEN)) == UNSEEN
  # Text too little for vocab_size: a tokenizer of the pieces it yields, not an error.
  small = tokenizer.train(['just a few words here'], str(tmp_path / 'small'), vocab_size=4096)
  assert minimum <= small.vocab_size < 4096 and small.decode(small.encode(UNSEEN)) == UNSEEN
  with pytest.raises(ValueError, match='no text'):
    tokenizer.train(['', '  \n\n'], str(tmp_path / 'empty'), vocab_size=512)
  with pytest.raises(TypeError, match='not one string'):
    tokenizer.train('one document', str(tmp_path / 'str'), vocab_size=512)


def test_pickle_and_save(corpus, tmp_path):
  tok = tokenizer.train(corpus[:500], str(tmp_path / 'a'), vocab_size=512)
  copy = pickle.loads(pickle.dumps(tok))
  assert copy.encode(UNSEEN) == tok.encode(UNSEEN) and copy.fingerprint == tok.fingerprint
  tok.save(str(tmp_path / 'b'))
  assert tokenizer.load(str(tmp_path / 'b' / 'tokenizer.model')).fingerprint == tok.fingerprint
  hf_utils.save_tiny_qwen2_tokenizer(str(tmp_path / 'hf'))
  with pytest.raises(ValueError, match='holds tokenizer.json'):
    tok.save(str(tmp_path / 'hf'))
  with pytest.raises(ValueError, match='holds a tokenizer.json'):
    tokenizer.train(corpus[:500], str(tmp_path / 'hf'), vocab_size=512)
  with pytest.raises(ValueError, match='cannot decode id 512'):
    tok.decode([5, 512])


TEXTS = ('The quick brown fox jumps over the lazy dog.', '我们在训练一个新的语言模型，你好世界！',
         'emoji 😀🎉🚀 and 🧿 unseen', '<|im_start|>user\nhi there<|im_end|>\n<|endoftext|>next doc',
         '  def f(x):\n\treturn 1234567  # tabs\r\n', 'e\u0301 and é, Ａ full-width')


def test_hf_matches_transformers(tmp_path):
  directory = hf_utils.save_tiny_qwen2_tokenizer(str(tmp_path / 'qwen'))
  tok = tokenizer.load(directory)
  reference = transformers.AutoTokenizer.from_pretrained(directory)
  assert isinstance(tok, tokenizer.HuggingFaceTokenizer)
  assert tok.vocab_size == len(reference) == 353
  assert tok.eos_id == reference.convert_tokens_to_ids('<|endoftext|>') == 350
  assert tok.stop_ids == (350,)
  for text in TEXTS + tuple(random_unicode(200, seed=1)):
    assert tok.encode(text) == reference(text, add_special_tokens=False)['input_ids'], ascii(text)
  assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
  assert tok.encode('<|endoftext|>') == [350]
  for text in TEXTS + tuple(random_unicode(200)):  # byte-level BPE gives the text back, after NFC
    assert tok.decode(tok.encode(text)) == unicodedata.normalize('NFC', text), ascii(text)
  assert tokenizer.load(os.path.join(directory, 'tokenizer.json')).fingerprint == tok.fingerprint


def test_hf_instruct_eos_and_stop_ids(tmp_path):
  """An instruct checkpoint's eos_token ends a turn; documents are still separated by <|endoftext|>."""
  directory = hf_utils.save_tiny_qwen2_tokenizer(str(tmp_path / 'qwen'))
  for name, key, value in (('tokenizer_config.json', 'eos_token', '<|im_end|>'),
                           ('generation_config.json', 'eos_token_id', [352, 350])):
    path = os.path.join(directory, name)
    with open(path) as f:
      config = json.load(f)
    config[key] = value
    with open(path, 'w') as f:
      json.dump(config, f)
  tok = tokenizer.load(directory)
  assert tok.eos_id == 350 and tok.stop_ids == (350, 352)


def test_hf_save_load_and_fingerprint(tmp_path):
  directory = hf_utils.save_tiny_qwen2_tokenizer(str(tmp_path / 'qwen'))
  tok = tokenizer.load(directory)
  tok.save(str(tmp_path / 'copy'))
  assert sorted(os.listdir(tmp_path / 'copy')) == ['generation_config.json', 'tokenizer.json',
                                                   'tokenizer_config.json']
  copy = tokenizer.load(str(tmp_path / 'copy'))
  assert copy.fingerprint == tok.fingerprint
  assert [copy.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
  assert (copy.eos_id, copy.stop_ids, copy.vocab_size) == (tok.eos_id, tok.stop_ids, tok.vocab_size)
  assert pickle.loads(pickle.dumps(tok)).encode(TEXTS[1]) == tok.encode(TEXTS[1])

  backend = tokenizers.Tokenizer.from_file(os.path.join(directory, 'tokenizer.json'))
  backend.add_tokens(['zzz'])
  backend.save(os.path.join(directory, 'tokenizer.json'))
  changed = tokenizer.load(directory)
  assert changed.fingerprint != tok.fingerprint and changed.vocab_size == tok.vocab_size + 1
  bare = tokenizer.HuggingFaceTokenizer({'tokenizer.json': tok.files['tokenizer.json']})
  with pytest.raises(ValueError, match='already holds tokenizer_config.json'):  # load() would read it too
    bare.save(str(tmp_path / 'copy'))


def test_hf_adds_no_special_tokens_and_never_truncates(tmp_path):
  directory = hf_utils.save_tiny_qwen2_tokenizer(str(tmp_path / 'qwen'))
  backend = tokenizers.Tokenizer.from_file(os.path.join(directory, 'tokenizer.json'))
  backend.post_processor = tokenizers.processors.TemplateProcessing(
      single='$A <|endoftext|>', special_tokens=[('<|endoftext|>', 350)])
  backend.enable_truncation(max_length=4)
  backend.save(os.path.join(directory, 'tokenizer.json'))
  assert backend.encode(TEXTS[0]).ids[-1] == 350 and len(backend.encode(TEXTS[0]).ids) == 4
  tok = tokenizer.load(directory)
  ids = tok.encode(TEXTS[0])
  assert len(ids) > 4 and 350 not in ids
  assert tok.decode(ids) == TEXTS[0]


def test_hf_without_end_of_text(tmp_path):
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
  tok.train_from_iterator(['some text'], tokenizers.trainers.BpeTrainer(vocab_size=300, show_progress=False))
  path = str(tmp_path / 'tokenizer.json')
  tok.save(path)
  with pytest.raises(ValueError, match='no end-of-text token.*"eos_token"'):
    tokenizer.load(path)
  tok.add_special_tokens(['</s>'])
  tok.save(path)
  with open(tmp_path / 'tokenizer_config.json', 'w') as f:
    json.dump({'eos_token': {'content': '</s>'}}, f)
  assert tokenizer.load(str(tmp_path)).eos_id == tok.token_to_id('</s>')


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    tokenizer.load(str(tmp_path / 'missing'))
  (tmp_path / 'ckpt').mkdir()
  (tmp_path / 'ckpt' / 'config.json').write_text('{}')
  with pytest.raises(FileNotFoundError, match=r'holds no tokenizer.json and no tokenizer.model .*config.json'):
    tokenizer.load(str(tmp_path / 'ckpt'))
  (tmp_path / 'ckpt' / 'vocab.json').write_text('{}')
  (tmp_path / 'ckpt' / 'merges.txt').write_text('')
  with pytest.raises(FileNotFoundError, match='save_pretrained'):
    tokenizer.load(str(tmp_path / 'ckpt'))
  (tmp_path / 'bad.model').write_bytes(b'not a model')
  with pytest.raises(ValueError, match='not a sentencepiece model'):
    tokenizer.load(str(tmp_path / 'bad.model'))
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / 'tokenizer.json').write_text('{"model": 1}')
  with pytest.raises(ValueError, match='not a Hugging Face tokenizer'):
    tokenizer.load(str(tmp_path / 'bad'))
  with pytest.raises(ValueError, match='not a Hugging Face tokenizer'):
    tokenizer.load(str(tmp_path / 'ckpt' / 'config.json'))
