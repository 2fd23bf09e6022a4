"""A trained run end to end: params-only restore, export to a Hugging Face directory that transformers loads with
our logits, and evaluation from the workdir equal to transformers' on the export."""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

import hf_utils
from qwenjax import checkpoint
from qwenjax import config as config_lib
from qwenjax import evaluate
from qwenjax import export
from qwenjax import model as model_lib
from qwenjax import params as params_lib
from qwenjax import sharding
from qwenjax import tokenizer as tokenizer_lib
from qwenjax import train
from qwenjax import train_step
from qwenjax.model_config import ModelConfig
from train_utils import subprocess_xla_flags

TINY = os.path.join(os.path.dirname(__file__), '..', 'configs', 'tiny.py')
WORDS = ('the quick brown fox jumps over the lazy dog training language models in jax is fun def forward self '
         'return x 1234567890 你好 世界').split()


def _documents(n, seed):
  rng = np.random.default_rng(seed)
  return [' '.join(rng.choice(WORDS, rng.integers(5, 40))) for _ in range(n)]


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A 3-step run of a tiny model on a few documents, with a Qwen2-style (Hugging Face) tokenizer; checkpoints
  at steps 2 and 3."""
  root = tmp_path_factory.mktemp('export')
  with open(root / 'train.jsonl', 'w') as f:
    f.writelines(json.dumps({'text': t}) + '\n' for t in _documents(64, 0))
  config = config_lib.load(TINY)
  config.model.update(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=16, max_window_layers=1)
  config.data.update(train_files=str(root / 'train.jsonl'), seq_len=32, shuffle_window=0,
                     tokenizer=hf_utils.save_tiny_qwen2_tokenizer(str(root / 'tokenizer')))
  if 'prepared_dir' in config.data:
    config.data.prepared_dir = str(root / 'prepared')
  config.train.update(batch_size=8, lr=3e-3, warmup_steps=1, steps=3, log_every=1, eval_every=0,
                      checkpoint_every=2)
  workdir = str(root / 'run')
  train.train_and_evaluate(config, workdir)
  return workdir


def _ours(workdir, input_ids, step=None):
  config, params, _ = checkpoint.restore_params(workdir, step)
  model_config = ModelConfig.from_dict(config.model)
  return np.asarray(model_lib.Qwen2(model_config).apply({'params': params}, np.asarray(input_ids)))


@pytest.mark.slow
def test_restore_params_reads_only_the_parameters(run):
  config, params, step = checkpoint.restore_params(run)
  assert step == 3 and config.train.steps == 3 and config.model.hidden_size == 64
  model_config = ModelConfig.from_dict(config.model)
  expected = sharding.strip_boxes(params_lib.abstract_params(model_config))
  assert jax.tree.structure(params) == jax.tree.structure(expected)  # the parameters, no optimizer state
  assert all(x.shape == e.shape and x.dtype == e.dtype for x, e in zip(jax.tree.leaves(params),
                                                                        jax.tree.leaves(expected)))
  assert {x.sharding for x in jax.tree.leaves(params)} == {jax.sharding.SingleDeviceSharding(jax.devices()[0])}

  # Sharded over the 8 devices, an earlier step: other values, placed as asked.
  mesh = sharding.make_mesh(config_lib.MeshConfig())
  rules = sharding.logical_axis_rules(config_lib.DEFAULT_RULES, mesh, model_config)
  shardings = train_step.param_shardings(model_config, mesh, rules)
  _, sharded, step = checkpoint.restore_params(run, 2, shardings)
  assert step == 2
  assert sharded['embed_tokens'].sharding == shardings['embed_tokens']
  assert len(sharded['embed_tokens'].sharding.device_set) == 8
  assert not np.allclose(np.asarray(sharded['embed_tokens']), np.asarray(params['embed_tokens']))


def test_restore_params_errors_name_the_problem(run, tmp_path):
  with pytest.raises(ValueError, match=r'no checkpoint of step 7 .* its steps are \[2, 3\]'):
    checkpoint.restore_params(run, 7)
  with pytest.raises(FileNotFoundError, match='no config.json'):
    checkpoint.restore_params(str(tmp_path))
  shutil.copy(os.path.join(run, 'config.json'), tmp_path / 'config.json')
  with pytest.raises(FileNotFoundError, match='no checkpoint in'):
    checkpoint.restore_params(str(tmp_path))
  config, params, _ = checkpoint.restore_params(run)
  scanned = ModelConfig.from_dict({**config.model.to_dict(), 'scan_layers': True})
  mesh = sharding.make_mesh(config_lib.MeshConfig())
  rules = sharding.logical_axis_rules(config_lib.DEFAULT_RULES, mesh, scanned)
  with pytest.raises(checkpoint.ShapeMismatchError, match='model.scan_layers=False'):
    checkpoint.restore_params(run, shardings=train_step.param_shardings(scanned, mesh, rules))
  del params


@pytest.mark.slow
def test_export_loads_in_transformers_with_our_logits(run, tmp_path):
  out = str(tmp_path / 'hf')
  summary = export.export(run, out)
  assert summary['step'] == 3 and summary['dtype'] == 'float32' and summary['note'] is None
  assert {'config.json', 'model.safetensors', 'generation_config.json', 'tokenizer.json',
          'tokenizer_config.json'} <= set(os.listdir(out))
  umask = os.umask(0)
  os.umask(umask)
  for name in ('config.json', 'model.safetensors'):  # safetensors alone would leave 0600
    assert os.stat(os.path.join(out, name)).st_mode & 0o777 == 0o666 & ~umask, name

  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation='eager').eval()
  assert type(hf_model).__name__ == 'Qwen2ForCausalLM'
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  ours_tokenizer = tokenizer_lib.load(os.path.join(run, 'tokenizer'))
  texts = _documents(2, 1)
  ids = [hf_tokenizer(t, add_special_tokens=False)['input_ids'] for t in texts]
  assert ids == [ours_tokenizer.encode(t) for t in texts]
  length = min(len(i) for i in ids)
  input_ids = [i[:length] for i in ids]
  want = hf_utils.hf_logits(hf_model, input_ids)
  assert hf_utils.relative_error(_ours(run, input_ids), want) < 1e-5
  generation = json.load(open(os.path.join(out, 'generation_config.json')))
  assert generation['eos_token_id'] == ours_tokenizer.eos_id == hf_tokenizer.convert_tokens_to_ids('<|endoftext|>')

  # bfloat16, from an earlier step: transformers computes with the bf16 weights; compare with ours on them.
  out16 = str(tmp_path / 'hf16')
  assert export.export(run, out16, step=2, dtype='bfloat16')['dtype'] == 'bfloat16'
  hf16 = transformers.AutoModelForCausalLM.from_pretrained(out16, attn_implementation='eager',
                                                           dtype=torch.float32).eval()
  config, params, _ = checkpoint.restore_params(run, 2)
  rounded = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), params)
  ours16 = model_lib.Qwen2(ModelConfig.from_dict(config.model)).apply({'params': rounded},
                                                                      np.asarray(input_ids))
  assert hf_utils.relative_error(ours16, hf_utils.hf_logits(hf16, input_ids)) < 1e-5
  assert json.load(open(os.path.join(out16, 'config.json')))['torch_dtype'] == 'bfloat16'

  with pytest.raises(ValueError, match='is not empty'):
    export.export(run, out)
  (tmp_path / 'file').write_text('mine')
  with pytest.raises(ValueError, match='is a file'):
    export.export(run, str(tmp_path / 'file'))
  assert (tmp_path / 'file').read_text() == 'mine'
  with pytest.raises(ValueError, match='choose one of'):
    export.export(run, str(tmp_path / 'x'), dtype='float16')


def test_sentencepiece_run_exports_its_model_file_and_says_so(run, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(run, workdir)
  shutil.rmtree(os.path.join(workdir, 'tokenizer'))
  trained = tokenizer_lib.train(_documents(200, 2), os.path.join(workdir, 'tokenizer'), vocab_size=300)
  out = str(tmp_path / 'hf')
  summary = export.export(workdir, out)
  assert summary['note'] == export.SENTENCEPIECE_NOTE
  assert 'tokenizer.model' in os.listdir(out) and 'tokenizer.json' not in os.listdir(out)
  assert tokenizer_lib.load(out).encode('the lazy dog') == trained.encode('the lazy dog')
  assert json.load(open(os.path.join(out, 'generation_config.json')))['eos_token_id'] == trained.eos_id


def test_a_tokenizer_that_autotokenizer_reads_differently_is_named(run, tmp_path):
  """For model_type qwen2 transformers builds Qwen2Tokenizer, which rebuilds Qwen2's pre-tokenizer: a
  tokenizer.json that splits text otherwise (here GPT-2 style, with a prefix space) gets other ids, and the
  export says how to load the file as it is."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  shutil.copytree(run, workdir)
  shutil.rmtree(os.path.join(workdir, 'tokenizer'))
  os.makedirs(os.path.join(workdir, 'tokenizer'))
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=True)
  bpe.decoder = tokenizers.decoders.ByteLevel()
  bpe.train_from_iterator(_documents(100, 3), tokenizers.trainers.BpeTrainer(
      vocab_size=320, show_progress=False, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  bpe.add_special_tokens([tokenizers.AddedToken('<|endoftext|>', special=True, normalized=False)])
  bpe.save(os.path.join(workdir, 'tokenizer', 'tokenizer.json'))
  out = str(tmp_path / 'hf')
  note = export.export(workdir, out)['note']
  assert 'PreTrainedTokenizerFast(tokenizer_file=' in note
  as_is = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(out, 'tokenizer.json'))
  text = 'the lazy dog 你好'
  assert as_is(text, add_special_tokens=False)['input_ids'] == tokenizer_lib.load(out).encode(text)


@pytest.mark.slow
def test_evaluate_from_the_workdir_equals_transformers_on_the_export(run, tmp_path):
  out = str(tmp_path / 'hf')
  export.export(run, out)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation='eager').eval()
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  texts = ['the quick brown fox', 'def forward(self, x): return x', 'jax is fun 你好', 'lazy dog 123']
  eos = hf_tokenizer.convert_tokens_to_ids('<|endoftext|>')
  nll = 0.0
  for text in texts:  # each document short enough for one window: all of it from <|endoftext|>
    ids = hf_tokenizer(text, add_special_tokens=False)['input_ids']
    assert len(ids) <= 32
    with torch.no_grad():
      logits = hf_model(input_ids=torch.tensor([[eos] + ids[:-1]])).logits[0].double()
    nll -= float(torch.log_softmax(logits, -1)[torch.arange(len(ids)), torch.tensor(ids)].sum())
  total_bytes = sum(len(t.encode()) for t in texts)

  (tmp_path / 'eval.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts))
  ckpt = evaluate.load(workdir=run)
  assert ckpt.step == 3 and ckpt.seq_len == 32
  got = evaluate.evaluate(ckpt, files=str(tmp_path / 'eval.jsonl'))
  assert got['seq_len'] == 32 and got['bytes'] == total_bytes
  np.testing.assert_allclose(got['bits_per_byte'], nll / (math.log(2) * total_bytes), rtol=1e-5)


@pytest.mark.slow
def test_command_lines(run, tmp_path):
  """`python -m qwenjax.export`, then `python -m qwenjax.evaluate --hf` on what it wrote."""
  out = str(tmp_path / 'hf')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': subprocess_xla_flags()}
  done = subprocess.run([sys.executable, '-m', 'qwenjax.export', f'--workdir={run}', f'--out={out}', '--step=2'],
                        capture_output=True, text=True, env=env, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert json.loads(done.stdout)['step'] == 2

  (tmp_path / 'task.jsonl').write_text(json.dumps({'context': 'the quick', 'choices': ['fox', 'dog'],
                                                   'answer': 0}) + '\n')
  (tmp_path / 'text.txt').write_text('the quick brown fox')
  results = str(tmp_path / 'results.json')
  done = subprocess.run([sys.executable, '-m', 'qwenjax.evaluate', f'--hf={out}', f'--files={tmp_path}/text.txt',
                         f'--tasks={tmp_path}/task.jsonl', '--seq_len=16', f'--out={results}'],
                        capture_output=True, text=True, env=env, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  written = json.load(open(results))
  assert json.loads(done.stdout) == written
  assert written['documents'] == 1 and written['seq_len'] == 16 and written['bits_per_byte'] > 0
  assert written['tasks']['task']['examples'] == 1

  done = subprocess.run([sys.executable, '-m', 'qwenjax.export', f'--workdir={run}', f'--out={out}'],
                        capture_output=True, text=True, env=env, timeout=300, check=False)
  assert done.returncode == 1 and 'is not empty' in done.stderr
