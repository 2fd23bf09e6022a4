"""The training job's data: any script with default settings, Qwen's own tokenizer with init_from_hf, the
workdir's tokenizer kept, and batches that do not depend on the mesh or on stopping and resuming."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from qwenjax import config as config_lib
from qwenjax import data
from qwenjax import hf
from qwenjax import sharding
from qwenjax import tokenizer as tokenizer_lib
from qwenjax import train
from qwenjax.model_config import ModelConfig
from hf_utils import save_tiny_qwen2_tokenizer
from model_utils import random_params
from train_utils import first_batches, losses, read_metrics, small_config

pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


def multilingual_text(rng, cjk=(0x4E00, 0x9FFF), emoji=(0x1F600, 0x1F64F)):
  words = ['the', 'model', 'trains', 'on', 'text', 'in', 'many', 'languages', 'and', 'scripts', 'data', 'of']
  parts = []
  for _ in range(int(rng.integers(20, 60))):
    kind = rng.random()
    if kind < 0.6:
      parts.append(' '.join(rng.choice(words, size=int(rng.integers(2, 8)))))
    elif kind < 0.9:
      parts.append(''.join(chr(int(c)) for c in rng.integers(*cjk, size=int(rng.integers(2, 12)))))
    else:
      parts.append(chr(int(rng.integers(*emoji))))
  return ' '.join(parts) + '.\n'


@pytest.fixture(scope='module')
def corpus_file(tmp_path_factory):
  """300 short documents of mixed English, Chinese and emoji, as .jsonl."""
  path = tmp_path_factory.mktemp('corpus') / 'docs.jsonl'
  rng = np.random.default_rng(5)
  path.write_text(''.join(json.dumps({'text': multilingual_text(rng)}, ensure_ascii=False) + '\n' for _ in range(300)))
  return str(path)


@pytest.mark.slow
def test_tiny_config_trains_on_mixed_scripts_with_default_settings(tmp_path):
  rng = np.random.default_rng(0)
  with open(tmp_path / 'train.jsonl', 'w') as f:
    for _ in range(1500):
      f.write(json.dumps({'text': multilingual_text(rng)}, ensure_ascii=False) + '\n')
  config = small_config(steps=30, log_every=10, warmup_steps=10)  # steps 1-10 about 7.6, 21-30 about 4.3
  config.model.vocab_size = 4096
  config.data.update(train_files=str(tmp_path / 'train.jsonl'), vocab_size=4096, tokenizer='train',
                     tokenizer_sentences=200_000)  # the defaults of configs/tiny.py
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  records = [r for r in read_metrics(workdir) if 'loss' in r]
  assert records[0]['loss'] > records[-1]['loss'] + 1.0, [r['loss'] for r in records]
  # Text the tokenizer never saw, with characters it never saw (CJK extension A, other emoji), round-trips.
  tokenizer = tokenizer_lib.load(os.path.join(workdir, 'tokenizer'))
  unseen = multilingual_text(np.random.default_rng(1), cjk=(0x3400, 0x4DBF), emoji=(0x1F680, 0x1F6C5))
  unseen += '\ttabs,  spaces\r\nand ünïcödé'
  assert tokenizer.decode(tokenizer.encode(unseen)) == unseen
  with open(os.path.join(workdir, 'tokenizer', 'source.json')) as f:
    assert json.load(f)['kind'] == 'train'


@pytest.mark.slow
def test_the_workdirs_tokenizer_is_reused_only_while_it_matches(tmp_path, tokenizer_file, corpus_file):
  config = small_config(steps=1, log_every=1)
  config.model.update(num_hidden_layers=1)
  config.train.eval_steps = 0
  config.data.update(train_files=corpus_file, vocab_size=400, tokenizer='train', seq_len=32)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  config.train.steps = 2
  train.train_and_evaluate(config, workdir)  # same settings: resumes with the workdir's tokenizer
  config.data.vocab_size = 500
  with pytest.raises(ValueError, match=r"workdir's tokenizer .* data.vocab_size was 400, now 500.*new --workdir"):
    train.train_and_evaluate(config, workdir)
  config.data.update(vocab_size=400, tokenizer=tokenizer_file)
  with pytest.raises(ValueError, match=r'it was the BPE trained for data.vocab_size=400 pieces on .* this run asks '
                                       r'for the tokenizer of'):
    train.train_and_evaluate(config, workdir)
  # Another seed resumes with the workdir's tokenizer (the seed only picked the sentences it learned from).
  config.data.tokenizer, config.train.seed, config.train.steps = 'train', 1, 3
  train.train_and_evaluate(config, workdir)


@pytest.mark.slow
def test_fixing_a_too_large_tokenizer_works_on_the_same_workdir(tmp_path, corpus_file):
  """The error's advice (a smaller data.vocab_size) works on the same workdir: nothing was kept from the
  failed start. A corpus rewritten in place trains a new tokenizer, not the cached one of the old text."""
  corpus = tmp_path / 'docs.jsonl'
  shutil.copy(corpus_file, corpus)
  config = small_config(steps=1, log_every=1)
  config.model.update(num_hidden_layers=1, vocab_size=384)
  config.train.eval_steps = 0
  config.data.update(train_files=str(corpus), vocab_size=400, tokenizer='train', seq_len=32)
  workdir = str(tmp_path / 'run')
  with pytest.raises(ValueError, match='set --config.data.vocab_size to at most 384'):
    train.train_and_evaluate(config, workdir)
  config.data.vocab_size = 384
  train.train_and_evaluate(config, workdir)
  before = tokenizer_lib.load(os.path.join(workdir, 'tokenizer')).fingerprint
  rng = np.random.default_rng(9)  # other text, same path
  corpus.write_text(''.join(json.dumps({'text': multilingual_text(rng)}, ensure_ascii=False) + '\n'
                            for _ in range(300)))
  train.train_and_evaluate(config, str(tmp_path / 'run2'))
  assert tokenizer_lib.load(os.path.join(tmp_path, 'run2', 'tokenizer')).fingerprint != before


@pytest.mark.slow
def test_init_from_hf_trains_with_the_checkpoints_own_tokenizer(tmp_path, caplog, corpus_file):
  checkpoint_dir = save_tiny_qwen2_tokenizer(str(tmp_path / 'qwen'))
  hf_tokenizer = tokenizer_lib.load(checkpoint_dir)
  config = small_config(steps=2, log_every=1)
  config.model.update(vocab_size=384, num_hidden_layers=1)
  config.data.update(seq_len=32, tokenizer='train', train_files=corpus_file, eval_files=corpus_file)
  config.train.update(eval_steps=2, z_loss=0.0)
  model_config = ModelConfig.from_dict(config.model)
  params = random_params(model_config, seed=1)
  hf.save_pretrained(checkpoint_dir, model_config, params)
  config.init_from_hf = checkpoint_dir
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  kept = tokenizer_lib.load(os.path.join(workdir, 'tokenizer'))
  assert kept.fingerprint == hf_tokenizer.fingerprint and kept.eos_id == hf_tokenizer.encode('<|endoftext|>')[0]
  # The prepared corpus holds the checkpoint tokenizer's ids of each document (ids equal transformers',
  # tests/test_tokenizer.py), each ended by its <|endoftext|>; the first batch reads from it.
  corpus, _ = data.prepared_corpora(config_lib.settings(config).data, kept)
  with open(corpus_file) as f:
    documents = [json.loads(line)['text'] for line in f]
  assert corpus.meta['eos_id'] == kept.eos_id and len(corpus) == len(documents)
  for d in (0, 17, len(documents) - 1):
    ids = corpus.tokens(d)
    assert ids[-1] == kept.eos_id and hf_tokenizer.decode(ids[:-1].tolist()) == documents[d]
  batch = first_batches(config, checkpoint_dir, 1)[0]
  assert 0 <= batch['inputs'].min() and batch['inputs'].max() < hf_tokenizer.vocab_size

  # A checkpoint without a tokenizer: a trained one, with a warning; a tokenizer larger than the model: an error.
  bare = str(tmp_path / 'bare')
  hf.save_pretrained(bare, model_config, params)
  config.init_from_hf = bare
  config.data.vocab_size = 384
  train.train_and_evaluate(config, str(tmp_path / 'other'))
  assert 'holds no tokenizer.json or tokenizer.model, so a new tokenizer is trained' in caplog.text
  config.data.tokenizer = checkpoint_dir
  config.model.vocab_size = 300
  with pytest.raises(ValueError, match=r"has 353 ids but the model's vocab_size \(embedding rows\) is 300"):
    train.train_and_evaluate(config, str(tmp_path / 'small'))


def global_batches(config, tokenizer_file, devices, mesh_shape, steps=3):
  """The first global batches as the job assembles them on a mesh of `devices`, read back to the host."""
  config = config.copy_and_resolve_references()
  config.mesh.update(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2])
  run = config_lib.settings(config)
  mesh = sharding.make_mesh(run.mesh, devices)
  batch_sharding = sharding.batch_sharding(mesh, sharding.logical_axis_rules(run.mesh.rules, mesh, run.model))
  batch = int(config.train.batch_size)
  rows = train.local_rows(batch_sharding, batch)
  corpus, _ = data.prepared_corpora(run.data, tokenizer_lib.load(tokenizer_file))
  reader = data.train_batches(corpus, seq_len=int(config.data.seq_len), batch_size=batch,
                              seed=int(config.train.seed), shuffle_window=int(config.data.shuffle_window),
                              local_rows=rows, start=0, steps=steps)
  return [{k: np.asarray(v) for k, v in train._global_batch(b, batch_sharding, rows, batch).items()}  # pylint: disable=protected-access
          for b in reader]


@pytest.mark.slow
def test_batches_do_not_depend_on_the_mesh_or_a_restart(tmp_path, tokenizer_file):
  config = small_config(steps=4, log_every=1, checkpoint_every=2, warmup_steps=2)
  config.model.update(num_hidden_layers=1)
  config.data.update(tokenizer=tokenizer_file, seq_len=32)
  config.train.update(eval_steps=0)
  reference = global_batches(config, tokenizer_file, jax.devices(), (8, 1, 1))
  for devices, shape in ((jax.devices(), (2, 2, 2)), (jax.devices()[:4], (2, 2, 1)), (jax.devices()[:4], (1, 4, 1))):
    for want, got in zip(reference, global_batches(config, tokenizer_file, devices, shape)):
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=f'{key} on mesh {shape}')

  # Stopped after step 2 on a (8, 1, 1) mesh, resumed on (2, 2, 2): the same losses as a run that never stopped.
  straight = str(tmp_path / 'straight')
  config.mesh.update(data=8, fsdp=1, tensor=1)
  train.train_and_evaluate(config, straight)
  resumed = str(tmp_path / 'resumed')
  train.train_and_evaluate(config, resumed, stop_after=2)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  train.train_and_evaluate(config, resumed)
  want, got = losses(read_metrics(straight)), losses(read_metrics(resumed))
  assert sorted(got) == [1, 2, 3, 4]
  np.testing.assert_allclose([got[3], got[4]], [want[3], want[4]], rtol=0, atol=2e-5)
