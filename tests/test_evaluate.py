"""Evaluation: the in-job eval step by micro-batches, and `python -m qwenjax.evaluate` (loss, bits per byte,
multiple-choice scoring) against values computed with `transformers`."""

import dataclasses
import json
import math
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_utils
from model_utils import random_params
from qwenjax import config as config_lib
from qwenjax import evaluate
from qwenjax import sharding
from qwenjax import train_step
from qwenjax.model_config import ModelConfig

MODEL = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, attention_impl='xla')


def _mesh(model, devices):
  mesh_config = config_lib.MeshConfig(data=1, fsdp=-1, tensor=1, expert=1)
  mesh = sharding.make_mesh(mesh_config, devices=devices)
  return mesh, sharding.logical_axis_rules(mesh_config.rules, mesh, model)


def _eval_batch(rows=16, seq=32, seed=0):
  rng = np.random.default_rng(seed)
  weights = (rng.random((rows, seq)) > 0.2).astype(np.float32)
  weights[-3:] = 0.0  # padding rows, as eval_batches ends a short set
  return {'inputs': rng.integers(0, 512, (rows, seq)).astype(np.int32),
          'targets': rng.integers(0, 512, (rows, seq)).astype(np.int32),
          'positions': np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy(),
          'segment_ids': np.ones((rows, seq), np.int32), 'weights': weights}


def _run_eval_step(train, params, batch):
  """The eval step as train.py runs it: jitted on an 8-device mesh, params and batch sharded."""
  mesh, rules = _mesh(MODEL, jax.devices())
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = train_step.param_shardings(MODEL, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    step = jax.jit(train_step.make_eval_step(MODEL, train), in_shardings=(shardings, batch_sharding))
    nll, count = step(jax.device_put(params, shardings), jax.device_put(batch, batch_sharding))
  return float(nll), float(count)


@pytest.mark.slow
def test_eval_step_in_micro_batches_gives_the_whole_batch_loss():
  params = random_params(MODEL)
  batch = _eval_batch()
  want_nll, want_count = _run_eval_step(config_lib.LossConfig(), params, batch)  # the whole batch, float32 logits
  assert want_count == batch['weights'].sum()

  train = config_lib.LossConfig(grad_accum_steps=4, loss_chunk=8, logits_dtype='float32')
  nll, count = _run_eval_step(train, params, batch)
  assert count == want_count
  np.testing.assert_allclose(nll, want_nll, rtol=1e-5)

  train = dataclasses.replace(train, logits_dtype='bfloat16')  # logits rounded to 8 mantissa bits: the mean
  # loss moves a little
  nll, count = _run_eval_step(train, params, batch)
  assert count == want_count and nll != want_nll
  np.testing.assert_allclose(nll / count, want_nll / want_count, rtol=1e-2)


def test_compiled_eval_step_runs_one_micro_batch_and_one_loss_chunk_at_a_time():
  train = config_lib.LossConfig(grad_accum_steps=4, loss_chunk=16, logits_dtype='bfloat16')
  mesh, rules = _mesh(MODEL, jax.devices()[:1])
  params = sharding.strip_boxes(train_step._abstract_params(MODEL))  # pylint: disable=protected-access
  batch = {k: jax.ShapeDtypeStruct((8, 96), jnp.float32 if k == 'weights' else jnp.int32)
           for k in ('inputs', 'targets', 'weights')}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = train_step.make_eval_step(MODEL, train)
    jaxpr = jax.make_jaxpr(step)(params, batch)
    hlo = jax.jit(step).lower(params, batch).compile().as_text()
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'scan']
  assert [e.params['length'] for e in scans] == [4]  # a loop over the 4 micro-batches ...
  assert (4, 2, 96) in {tuple(v.aval.shape) for v in scans[0].invars}  # ... of 2 rows each
  activations = set(re.findall(r'f32\[(\d+),96,64\]', hlo))  # [rows, seq, hidden]
  assert activations == {'2'}, activations
  # Logits: only one 16-position chunk of one micro-batch (2 x 16 rows), written in bfloat16; [64, 512] is the
  # output head.
  vocab_shapes = set(re.findall(r'(?:f32|bf16)\[[0-9,]*,512\]', hlo))
  assert 'bf16[32,512]' in vocab_shapes, vocab_shapes
  assert vocab_shapes <= {'bf16[32,512]', 'f32[32,512]', 'f32[2,16,512]', 'f32[64,512]'}, vocab_shapes


def test_eval_step_rejects_a_batch_that_does_not_split():
  train = config_lib.LossConfig(grad_accum_steps=3)
  params = sharding.strip_boxes(train_step._abstract_params(MODEL))  # pylint: disable=protected-access
  batch = {k: jax.ShapeDtypeStruct((8, 64), jnp.float32 if k == 'weights' else jnp.int32)
           for k in ('inputs', 'targets', 'weights')}
  with pytest.raises(ValueError, match='does not split into grad_accum_steps=3'):
    jax.eval_shape(train_step.make_eval_step(MODEL, train), params, batch)


# ---------------------------------------------------------------------------------------------------------
# python -m qwenjax.evaluate against transformers, on a random tiny Qwen2 and a tiny Qwen2-style tokenizer.

DOCUMENTS = [
    'The quick brown fox jumps over the lazy dog. ' * 4,  # longer than seq_len below: several windows
    '你好，世界！ emoji 😀🎉 and ✓ marks',  # multi-byte characters: bytes != characters
    'x',
    '    def forward(self, x):\n        return x\n',
]


@pytest.fixture(scope='module')
def tiny_hf(tmp_path_factory):
  """(directory, torch model, transformers tokenizer) of a random tiny Qwen2 with a Qwen2-style tokenizer."""
  directory = str(tmp_path_factory.mktemp('tiny_hf'))
  hf_utils.save_tiny_qwen2_tokenizer(directory)
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  model = hf_utils.random_qwen2(0, vocab_size=len(hf_tokenizer))
  model.save_pretrained(directory)
  return directory, model, hf_tokenizer


@pytest.fixture(scope='module')
def tiny_checkpoint(tiny_hf):
  return evaluate.load(hf=tiny_hf[0])


def _torch_loglikelihood(model, inputs, targets):
  """Summed log-probabilities of `targets` after `inputs` (the last len(targets) positions), in float64."""
  with torch.no_grad():
    logits = model(input_ids=torch.tensor([inputs])).logits[0].double()
  logprobs = torch.log_softmax(logits[len(inputs) - len(targets):], dim=-1)
  return float(sum(logprobs[i, t] for i, t in enumerate(targets)))


def harness_windows(token_list, prefix_token, max_seq_len, context_len):
  """lm-evaluation-harness's `get_rolling_token_windows` then `make_disjoint_window`, as its
  `loglikelihood_rolling` calls them: (context, continuation) pairs, every token a continuation token once."""
  pred_len = max_seq_len - context_len + 1
  first_seq_len = min(max_seq_len, len(token_list))
  windows = [([prefix_token] + token_list[:first_seq_len - 1], token_list[:first_seq_len])]
  predicted = first_seq_len
  while predicted < len(token_list):
    window_pred_len = min(len(token_list) - predicted, pred_len)
    window_end = predicted + window_pred_len
    windows.append((token_list[window_end - max_seq_len - 1:window_end - 1],
                    token_list[window_end - window_pred_len:window_end]))
    predicted += window_pred_len
  return [(a[:len(a) - (len(b) - 1)], b) for a, b in windows]


@pytest.mark.parametrize('overlap', [0, 8])
def test_bits_per_byte_equals_transformers(tmp_path, tiny_hf, tiny_checkpoint, overlap):
  _, model, hf_tokenizer = tiny_hf
  seq_len = 32
  # What lm-evaluation-harness's loglikelihood_rolling computes (context_len = overlap + 1), with transformers.
  eos = hf_tokenizer.convert_tokens_to_ids('<|endoftext|>')
  nll, tokens = 0.0, 0
  for text in DOCUMENTS:
    ids = hf_tokenizer(text, add_special_tokens=False)['input_ids']
    for context, continuation in harness_windows(ids, eos, seq_len, overlap + 1):
      nll -= _torch_loglikelihood(model, (context + continuation)[:-1], continuation)
      tokens += len(continuation)
  total_bytes = sum(len(t.encode('utf-8')) for t in DOCUMENTS)
  assert max(len(hf_tokenizer(t)['input_ids']) for t in DOCUMENTS) > seq_len  # windows are exercised

  (tmp_path / 'a.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in DOCUMENTS[:3]))
  (tmp_path / 'b.txt').write_text(DOCUMENTS[3])
  got = evaluate.evaluate(tiny_checkpoint, files=f'{tmp_path}/a.jsonl,{tmp_path}/b.txt', seq_len=seq_len,
                          overlap=overlap, batch_size=3)
  assert (got['documents'], got['tokens'], got['bytes']) == (4, tokens, total_bytes)
  np.testing.assert_allclose(got['bits_per_byte'], nll / (math.log(2) * total_bytes), rtol=1e-5)
  np.testing.assert_allclose(got['loss'], nll / tokens, rtol=1e-5)
  np.testing.assert_allclose(got['perplexity'], math.exp(nll / tokens), rtol=1e-5)


def test_document_windows_are_the_harness_rolling_windows():
  prefix, ids = 7, list(range(100, 171))
  for seq_len, overlap in ((16, 0), (16, 5), (71, 0), (70, 0), (200, 3), (10, 9), (1, 0)):
    rows = evaluate.document_rows(ids, prefix, seq_len, overlap)
    want = harness_windows(ids, prefix, seq_len, overlap + 1)
    assert [(list(r.tokens), r.scored) for r in rows] == [(c + b, len(b)) for c, b in want], (seq_len, overlap)
    assert [t for r in rows for t in r.tokens[-r.scored:]] == ids  # every token scored once
    assert all(len(r.tokens) - 1 <= seq_len for r in rows)
  last = evaluate.document_rows(ids, prefix, 16, 0)[-1]  # 71 = 4 x 16 + 7: the last window sees 9 earlier tokens
  assert (len(last.tokens) - 1, last.scored) == (16, 7)


def _planted_examples(rng, words, n):
  examples = []
  for _ in range(n):
    context = ' '.join(rng.choice(words, rng.integers(2, 5)))
    choices = [' '.join(rng.choice(words, k)) for k in rng.permutation([1, 2, 3, 4])]
    examples.append((context, choices))
  return examples


def test_multiple_choice_matches_transformers_and_finds_planted_answers(tmp_path, tiny_hf, tiny_checkpoint):
  _, model, hf_tokenizer = tiny_hf
  words = 'the quick brown fox jumps over lazy dog models 你好 emoji 😀 def return'.split()
  raw = _planted_examples(np.random.default_rng(0), words, 12)
  # The harness's scoring, with transformers: continuation = ' ' + choice, its tokens those of the whole text
  # after the context's.
  want = []
  for context, choices in raw:
    context_ids = hf_tokenizer(context, add_special_tokens=False)['input_ids']
    lls = []
    for choice in choices:
      whole = hf_tokenizer(context + ' ' + choice, add_special_tokens=False)['input_ids']
      assert len(whole) <= 33  # fits seq_len=32 below uncut
      lls.append(_torch_loglikelihood(model, whole[:-1], whole[len(context_ids):]))
    want.append(np.array(lls))
  by_sum = [int(np.argmax(ll)) for ll in want]
  by_byte = [int(np.argmax(ll / [len(c.encode()) for c in choices])) for ll, (_, choices) in zip(want, raw)]
  assert by_sum != by_byte  # the two metrics disagree somewhere, so each planted task tells them apart

  def task(name, answers):
    path = tmp_path / f'{name}.jsonl'
    path.write_text(''.join(json.dumps({'context': c, 'choices': ch, 'answer': a}) + '\n'
                            for (c, ch), a in zip(raw, answers)))
    return str(path)

  scorer = evaluate.Scorer(tiny_checkpoint, seq_len=32, batch_size=5)
  examples = evaluate.read_tasks(task('sum', by_sum))
  assert [(e.context, e.choices, e.answer) for e in examples] == [(c, tuple(ch), a) for (c, ch), a in
                                                                   zip(raw, by_sum)]
  got = evaluate.choice_loglikelihoods(scorer, examples)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)

  paths = [task('sum', by_sum), task('per_byte', by_byte)]
  results = evaluate.evaluate(tiny_checkpoint, tasks=paths, seq_len=32)
  agree = float(np.mean(np.array(by_sum) == np.array(by_byte)))
  assert results['tasks'] == {'sum': {'file': paths[0], 'acc': 1.0, 'acc_norm': agree, 'examples': 12},
                              'per_byte': {'file': paths[1], 'acc': agree, 'acc_norm': 1.0, 'examples': 12}}

  # Two files of one name (a comma-separated string, as on the command line) keep both results, by path.
  (tmp_path / 'other').mkdir()
  other = str(tmp_path / 'other' / 'sum.jsonl')
  shutil.copy(paths[1], other)  # the per-byte answers
  twice = evaluate.evaluate(tiny_checkpoint, tasks=f'{paths[0]},{other}', seq_len=32)['tasks']
  assert sorted(twice) == sorted([paths[0], other]) and twice[other]['acc_norm'] == 1.0


def test_an_all_space_context_is_the_end_of_text_token(tiny_checkpoint):
  tok = tiny_checkpoint.tokenizer
  assert evaluate._encode_pair(tok, '  ', ' fox') == ([tok.eos_id], tok.encode('   fox'))
  assert evaluate._encode_pair(tok, '', ' fox') == ([tok.eos_id], tok.encode(' fox'))


@pytest.mark.parametrize('line, message', [
    ('{"context": "a", "choices": ["b", "c"], "answer": 2}', r'"answer" must be the index \(0..1\)'),
    ('{"context": "a", "choices": ["b"], "answer": 0}', 'at least 2 non-empty strings'),
    ('{"prompt": "a", "choices": ["b", "c"], "answer": 0}', r"it has \['answer', 'choices', 'prompt'\]"),
    ('not json', 'line 1 is not JSON'),
    ('{"context": null, "choices": ["b", "c"], "answer": 0}', '"context" must be a string, got NoneType'),
])
def test_bad_task_files_get_clear_errors(tmp_path, line, message):
  path = tmp_path / 'task.jsonl'
  path.write_text(line + '\n')
  with pytest.raises(ValueError, match=message):
    evaluate.read_tasks(str(path))


def test_a_tokenizer_larger_than_the_model_is_an_error(tmp_path):
  hf_utils.save_tiny_qwen2_tokenizer(str(tmp_path))  # 353 ids
  hf_utils.random_qwen2(0, vocab_size=300).save_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match=f"the tokenizer of {tmp_path} has 353 ids but the model's vocab_size"):
    evaluate.load(hf=str(tmp_path))


def test_evaluate_needs_one_checkpoint_and_something_to_score(tiny_checkpoint):
  with pytest.raises(ValueError, match='give one of --workdir=DIR'):
    evaluate.load()
  with pytest.raises(ValueError, match='nothing to evaluate'):
    evaluate.evaluate(tiny_checkpoint)
  with pytest.raises(FileNotFoundError, match=r'no files match --files=.*e\.g\. --files="data/\*\.jsonl"\.$'):
    evaluate.evaluate(tiny_checkpoint, files='/nonexistent/*.jsonl')  # its own flag, not a training one
