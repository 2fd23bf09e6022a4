"""SFT and DPO (issue 37): losses and rewards equal TRL's on the same model and batch, packing keeps conversations
whole, runs resume exactly, the first DPO loss is ln 2, bad records are named, a DPO step's cost."""

import dataclasses
import io
import json
import math
import os

import jax
import numpy as np
import pytest

import hf_utils
import test_chat
from qwenjax import chat
from qwenjax import chat_data
from qwenjax import config as config_lib
from qwenjax import dpo
from qwenjax import hf
from qwenjax import loss as loss_lib
from qwenjax import sample
from qwenjax import sharding
from qwenjax import tokenizer as tokenizer_lib
from qwenjax import train
from qwenjax import train_step
from train_utils import losses, read_metrics

pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')

CONVERSATIONS = [
    [{'role': 'user', 'content': 'What is 2 plus 3?'}, {'role': 'assistant', 'content': '5.'}],
    [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': '你好'},
     {'role': 'assistant', 'content': '你好！'}, {'role': 'user', 'content': 'emoji?'},
     {'role': 'assistant', 'content': '😀🎉 fun'}],
    [{'role': 'user', 'content': "It's a tokenizer test"}, {'role': 'assistant', 'content': 'The quick brown fox.'}],
]
PAIRS = [
    {'prompt': [{'role': 'user', 'content': 'What is 2 plus 3?'}], 'chosen': [{'role': 'assistant', 'content': '5.'}],
     'rejected': [{'role': 'assistant', 'content': 'Six, I think.'}]},
    {'prompt': [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': '你好'}],
     'chosen': [{'role': 'assistant', 'content': '你好！'}], 'rejected': [{'role': 'assistant', 'content': 'emoji 😀'}]},
    {'prompt': [{'role': 'user', 'content': 'fox?'}], 'chosen': [{'role': 'assistant', 'content': 'The quick fox.'}],
     'rejected': [{'role': 'assistant', 'content': 'lazy dog'}]},
]


def save_chat_model(directory, seed: int) -> str:
  """A random tiny transformers Qwen2 with a Qwen2-style tokenizer whose template marks the assistant's tokens with
  {% generation %} (what TRL's assistant_only_loss needs; it renders as Qwen2-Instruct's template)."""
  hf_utils.random_qwen2(seed=seed, vocab_size=384, max_position_embeddings=256).save_pretrained(directory)
  hf_utils.save_tiny_qwen2_tokenizer(directory)
  path = os.path.join(directory, 'tokenizer_config.json')
  with open(path) as f:
    config = json.load(f)
  config['chat_template'] = test_chat.QWEN2_TAGGED
  with open(path, 'w') as f:
    json.dump(config, f)
  return str(directory)


@pytest.fixture(scope='module')
def chat_model(tmp_path_factory):
  return save_chat_model(tmp_path_factory.mktemp('policy'), seed=0)


@pytest.fixture(scope='module')
def records(tmp_path_factory):
  directory = tmp_path_factory.mktemp('records')
  paths = {'chat': directory / 'sft.jsonl', 'preference': directory / 'dpo.jsonl'}
  paths['chat'].write_text(''.join(json.dumps({'messages': m}, ensure_ascii=False) + '\n' for m in CONVERSATIONS))
  paths['preference'].write_text(''.join(json.dumps(p, ensure_ascii=False) + '\n' for p in PAIRS))
  return {k: str(v) for k, v in paths.items()}


def packed_batch(path: str, fmt: str, tok, root: str, seq_len: int = 255) -> dict:
  """Every record of `path`, packed as the training job packs them, as one batch."""
  rows = chat_data.PackedExamples(chat_data.encode([path], fmt, tok, root), seq_len, seed=0, epochs=False)
  return chat_data.StepBatches(rows, len(rows), range(len(rows)))(0)


def trl_trainer(kind: str, model, tokenizer_dir: str, rows: list, tmp_path, **kwargs):
  import datasets  # pylint: disable=import-outside-toplevel
  import trl  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  common = dict(output_dir=str(tmp_path / 'trl'), report_to=[], per_device_train_batch_size=len(rows), use_cpu=True,
                max_length=None, bf16=False)
  if kind == 'sft':
    args = trl.SFTConfig(assistant_only_loss=True, **common)
    return trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
  args = trl.DPOConfig(beta=kwargs.pop('beta'), **common)
  return trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                        **kwargs)


@pytest.mark.slow
def test_sft_loss_equals_trl(chat_model, records, tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  model = transformers.Qwen2ForCausalLM.from_pretrained(chat_model, attn_implementation='eager').eval()
  trainer = trl_trainer('sft', model, chat_model, [{'messages': m} for m in CONVERSATIONS], tmp_path)
  batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(CONVERSATIONS))])
  with torch.no_grad():
    expected = float(trainer.compute_loss(model, dict(batch)))

  tok = tokenizer_lib.load(chat_model)
  ours = packed_batch(records['chat'], 'chat', tok, str(tmp_path / 'prepared'))
  assert ours['inputs'].shape[0] == 1  # the three conversations share one row, each its own segment
  # The same tokens are trained on: TRL's labels are our weighted targets.
  labels = batch['labels'].numpy()
  trl_targets = sorted(int(t) for row in labels for t in row[1:] if t != -100)
  assert sorted(ours['targets'][ours['weights'] > 0].tolist()) == trl_targets
  config, params = hf.from_pretrained(chat_model)
  nll, count = jax.jit(train_step.make_eval_step(config))(params, ours)
  assert int(count) == len(trl_targets)
  assert abs(float(nll) / float(count) - expected) < 1e-4, (float(nll) / float(count), expected)


@pytest.mark.slow
def test_dpo_loss_and_rewards_equal_trl(chat_model, records, tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  reference_dir = save_chat_model(tmp_path / 'reference', seed=1)  # a reference unlike the policy: rewards != 0
  load = lambda d: transformers.Qwen2ForCausalLM.from_pretrained(d, attn_implementation='eager').eval()
  policy = load(chat_model)
  trainer = trl_trainer('dpo', policy, chat_model, PAIRS, tmp_path, beta=0.3, ref_model=load(reference_dir))
  batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
  with torch.no_grad():
    expected_loss = float(trainer.compute_loss(policy, dict(batch)))
  expected = {k: v[-1] for k, v in trainer._metrics['train' if policy.training else 'eval'].items()}  # pylint: disable=protected-access

  tok = tokenizer_lib.load(chat_model)
  ours = packed_batch(records['preference'], 'preference', tok, str(tmp_path / 'prepared'))
  config, params = hf.from_pretrained(chat_model)
  _, reference = hf.from_pretrained(reference_dir)
  loss = dataclasses.replace(config_lib.LossConfig(), objective='dpo', dpo_beta=0.3)
  sums = jax.jit(train_step.make_eval_step(config, loss))(params, ours, reference)
  got = {k: float(v) for k, v in dpo.metrics(sums).items()}
  assert got['pairs'] == len(PAIRS)
  assert abs(got['loss'] - expected_loss) < 1e-4, (got['loss'], expected_loss)
  for name in ('rewards/chosen', 'rewards/rejected', 'rewards/accuracies', 'rewards/margins', 'logps/chosen',
               'logps/rejected'):
    assert abs(got[name] - expected[name]) < 1e-4, (name, got[name], expected[name])
  assert 0 < got['rewards/accuracies'] < 1 or abs(got['rewards/margins']) > 1e-3  # not a trivial case
  # Micro-batches (one row each, a reference forward each) add up to the same.
  rows = ours['inputs'].shape[0]
  accumulated = jax.jit(train_step.make_eval_step(config, dataclasses.replace(loss, grad_accum_steps=rows)))(
      params, ours, reference)
  for name, value in dpo.metrics(accumulated).items():
    assert abs(float(value) - got[name]) < 1e-5, name


@pytest.mark.slow
@pytest.mark.parametrize('impl', ['xla', 'pallas'])  # pallas: the GPU kernels, in the interpreter
def test_token_log_probs_and_their_gradient_equal_the_full_softmax(impl):
  rng = np.random.default_rng(0)
  hidden = jax.numpy.asarray(rng.standard_normal((2, 12, 16)), jax.numpy.float32)
  head = jax.numpy.asarray(rng.standard_normal((16, 50)) * 0.3, jax.numpy.float32)
  targets = jax.numpy.asarray(rng.integers(0, 50, (2, 12)), jax.numpy.int32)
  g = jax.numpy.asarray(rng.standard_normal((2, 12)), jax.numpy.float32)

  def full(h, w):
    logp = jax.nn.log_softmax(h @ w, axis=-1)
    return jax.numpy.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

  chunked = lambda h, w: loss_lib.token_log_probs(h, w, targets, chunk=4, impl=impl, interpret=impl == 'pallas')
  np.testing.assert_allclose(chunked(hidden, head), full(hidden, head), atol=1e-5)
  ours = jax.grad(lambda h, w: jax.numpy.sum(chunked(h, w) * g), argnums=(0, 1))(hidden, head)
  want = jax.grad(lambda h, w: jax.numpy.sum(full(h, w) * g), argnums=(0, 1))(hidden, head)
  for a, b in zip(ours, want):
    np.testing.assert_allclose(a, b, atol=1e-5)


def synthetic(lengths, pairs=False, seed=0) -> chat_data.Encoded:
  """Encoded sequences of the given lengths: token i of sequence s is 1000 * s + i, masked from its middle on."""
  tokens = np.concatenate([1000 * s + np.arange(n) for s, n in enumerate(lengths)]).astype(np.int32)
  mask = np.concatenate([np.arange(n) >= n // 2 for n in lengths])
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  meta = {'key': f'synthetic{seed}', 'format': 'preference' if pairs else 'chat', 'tokenizer': 't'}
  return chat_data.Encoded(tokens, mask, offsets, meta)


def test_packing_keeps_sequences_whole_and_is_a_function_of_the_step(caplog):
  rng = np.random.default_rng(1)
  lengths = rng.integers(2, 40, 200).tolist() + [80]  # the last one is longer than a row: cut, counted, warned
  encoded = synthetic(lengths)
  rows = chat_data.PackedExamples(encoded, seq_len=63, seed=3)
  assert 'data.train_files: 1 of 201 conversations do not fit a row of data.seq_len + 1 = 64 tokens' in caplog.text
  assert rows.stats['filled'] > 0.9  # best-fit decreasing leaves little padding
  seen = []
  for r in range(len(rows)):
    row = rows[r]
    for segment in range(1, row['segment_ids'].max() + 1):
      where = np.flatnonzero(row['segment_ids'] == segment)
      tokens = row['tokens'][where]
      s = int(tokens[0]) // 1000
      assert where[0] + len(where) - 1 == where[-1]  # contiguous
      np.testing.assert_array_equal(tokens, 1000 * s + np.arange(len(where)))  # whole, from its start
      np.testing.assert_array_equal(row['positions'][where], np.arange(len(where)))
      assert len(where) == min(lengths[s], 64)
      seen.append(s)
  assert sorted(seen) == list(range(len(lengths)))  # every conversation once per epoch
  again = chat_data.PackedExamples(encoded, seq_len=63, seed=3)
  for r in (0, 5, len(rows) + 2):  # the same rows for the same step, whoever computes them
    for k in rows[r]:
      np.testing.assert_array_equal(rows[r][k], again[r][k])
  assert any(not np.array_equal(rows[r]['tokens'], rows[r + len(rows)]['tokens']) for r in range(len(rows)))
  # Targets are weighted by their token's mask, never across segments.
  batch = chat_data.StepBatches(rows, 4, range(4))(1)
  for b in range(4):
    packed = rows[4 + b]
    segments = packed['segment_ids']
    want = packed['mask'][1:] & (segments[1:] == segments[:-1]) & (segments[1:] > 0)
    np.testing.assert_array_equal(batch['weights'][b], want.astype(np.float32))


def test_pairs_share_a_row_as_consecutive_segments(caplog):
  lengths = [10, 12, 30, 50, 6, 6, 40, 40]  # the last pair does not fit 64 together: both cut to half a row
  rows = chat_data.PackedExamples(synthetic(lengths, pairs=True), seq_len=63, seed=0)
  assert '2 of 4 pairs do not fit' in caplog.text
  found = {}
  for r in range(len(rows)):
    row = rows[r]
    for segment in range(1, row['segment_ids'].max() + 1, 2):
      chosen = row['tokens'][row['segment_ids'] == segment]
      rejected = row['tokens'][row['segment_ids'] == segment + 1]
      pair = int(chosen[0]) // 2000
      assert int(chosen[0]) // 1000 == 2 * pair and int(rejected[0]) // 1000 == 2 * pair + 1
      found[pair] = (len(chosen), len(rejected))
  assert found == {0: (10, 12), 1: (30, 34), 2: (6, 6), 3: (32, 32)}


def test_bad_records_are_skipped_and_named_also_when_reused(chat_model, tmp_path, caplog):
  path = tmp_path / 'sft.jsonl'
  lines = [{'messages': CONVERSATIONS[0]}, {'messages': [{'role': 'user', 'content': 'no reply'}]}, 'not json',
           {'messages': [{'role': 'robot', 'content': 'x'}, {'role': 'assistant', 'content': 'y'}]}]
  path.write_text('\n'.join(x if isinstance(x, str) else json.dumps(x) for x in lines) + '\n')
  tok = tokenizer_lib.load(chat_model)
  root = str(tmp_path / 'prepared')
  for _ in range(2):  # encoded, then read back from the cache: named both times
    caplog.clear()
    encoded = chat_data.encode([str(path)], 'chat', tok, root)
    assert encoded.meta['kept'] == 2 and len(encoded.lengths) == 2
    assert f'{path}:2: skipped, no assistant turn' in caplog.text
    assert f'{path}:3: skipped, invalid JSON' in caplog.text
  pairs_path = tmp_path / 'dpo.jsonl'
  pairs_path.write_text(json.dumps(PAIRS[0]) + '\n' + json.dumps({'prompt': 'x', 'rejected': 'y'}) + '\n')
  caplog.clear()
  assert chat_data.encode([str(pairs_path)], 'preference', tok, root).meta['kept'] == 1
  assert f'{pairs_path}:2: skipped, missing chosen' in caplog.text


@pytest.mark.parametrize('change, message', [
    (dict(objective='dpo'), "set both train.objective='dpo' and data.format='preference'"),
    (dict(format='preference'), "set both train.objective='dpo' and data.format='preference'"),
    (dict(format='chat', train_files=''), 'set data.train_files'),
    (dict(format='chat', tokenizer='train'), 'needs the tokenizer (and chat template)'),
    (dict(format='dialogue'), 'unknown data.format'),
    (dict(objective='ppo'), 'unknown train.objective'),
])
def test_settings_name_what_post_training_needs(change, message):
  config = config_lib.base_config()
  config.data.update(train_files='x.jsonl', tokenizer='/some/tokenizer')
  for key, value in change.items():
    (config.train if key == 'objective' else config.data)[key] = value
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
    chat_data.check_settings(config_lib.settings(config))


def run_config(model_dir: str, fmt: str, train_file: str, init: str, **train_overrides):
  config = config_lib.base_config()
  model_config = hf.load_config(model_dir)
  config.model = config_lib.model_section(**{f.name: getattr(model_config, f.name)
                                             for f in dataclasses.fields(model_config) if f.name in config.model})
  if init == 'hf':
    config.init_from_hf = model_dir
  else:
    config.data.tokenizer = model_dir
  config.data.update(format=fmt, train_files=train_file, seq_len=127 if fmt == 'chat' else 255, shuffle_window=0)
  config.train.update(steps=4, batch_size=8, log_every=1, eval_every=0, eval_steps=0, warmup_steps=0, lr=3e-3,
                      checkpoint_every=2, objective='dpo' if fmt == 'preference' else 'cross_entropy')
  config.train.update(train_overrides)
  return config


@pytest.mark.slow
@pytest.mark.parametrize('fmt, init, lora_rank', [('chat', 'hf', 0), ('preference', 'random', 0),
                                                  ('preference', 'hf', 4)])
def test_runs_resume_exactly_and_dpo_starts_at_ln2(tmp_path, chat_model, fmt, init, lora_rank):
  """SFT and DPO runs resume exactly; DPO starts at ln 2 (the policy is its reference), with LoRA too (the
  reference is the base without adapters, which start at zero), and its rewards move once the policy trains."""
  rng = np.random.default_rng(2)
  path = tmp_path / 'records.jsonl'
  with open(path, 'w') as f:
    for i in range(24):  # each row holds two to three conversations or one pair: many rows, many steps
      a, b = rng.integers(0, 99, 2)
      question = [{'role': 'user', 'content': f'What is {a} plus {b}?'}]
      answer = lambda x: [{'role': 'assistant', 'content': f'{x}.'}]
      record = ({'messages': question + answer(a + b)} if fmt == 'chat' else
                {'prompt': question, 'chosen': answer(a + b), 'rejected': answer(a + b + 1 + i % 3)})
      f.write(json.dumps(record) + '\n')
  config = run_config(chat_model, fmt, str(path), init, lora_rank=lora_rank)
  config.data.eval_files = str(path)  # evaluated at the end, in the same format
  config.train.update(eval_every=0, eval_steps=1)
  straight = str(tmp_path / 'straight')
  train.train_and_evaluate(config, straight)
  expected = [r for r in read_metrics(straight) if 'loss' in r]
  if fmt == 'preference':
    assert abs(expected[0]['loss'] - math.log(2)) < 1e-5, expected[0]
    # The policy is its reference: rewards zero up to rounding (which is all rewards/accuracies would count).
    assert abs(expected[0]['rewards/chosen']) < 1e-5 and abs(expected[0]['rewards/margins']) < 1e-5
    assert {'rewards/chosen', 'rewards/rejected', 'logps/chosen', 'logps/rejected', 'pairs'} <= set(expected[0])
    assert abs(expected[-1]['rewards/margins']) > 1e-4, expected[-1]  # trained away from the reference
  assert all(r['target_tokens'] > 0 for r in expected) and 'trained_tokens_per_sec' in expected[-1]
  resumed = str(tmp_path / 'resumed')
  train.train_and_evaluate(config, resumed, stop_after=3)
  train.train_and_evaluate(config, resumed)
  got = losses(read_metrics(resumed))
  assert sorted(got) == [1, 2, 3, 4]
  np.testing.assert_allclose([got[s] for s in (3, 4)], [losses(expected)[s] for s in (3, 4)], rtol=0, atol=1e-6)
  evals = [[r for r in read_metrics(w) if 'eval_loss' in r][-1] for w in (straight, resumed)]
  assert evals[0]['step'] == evals[1]['step'] == 4 and abs(evals[0]['eval_loss'] - evals[1]['eval_loss']) < 1e-6
  if fmt == 'preference':
    assert {'eval_rewards/accuracies', 'eval_rewards/margins', 'eval_pairs'} <= set(evals[0])


@pytest.mark.slow
def test_dpo_step_costs_less_than_2_2_sft_steps_of_the_same_tokens(chat_model, records, tmp_path):
  """The compiled steps' FLOPs (XLA's cost analysis): policy forward and backward plus a reference forward."""
  tok = tokenizer_lib.load(chat_model)
  batch = packed_batch(records['preference'], 'preference', tok, str(tmp_path / 'prepared'), seq_len=127)
  config, params = hf.from_pretrained(chat_model)
  optimizer = config_lib.OptimizerConfig()
  tx = train_step.make_optimizer(optimizer)
  state = train_step.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params))
  horizon = train_step.schedule_horizon(optimizer)
  flops = {}
  for objective in ('cross_entropy', 'dpo'):
    loss = dataclasses.replace(config_lib.LossConfig(), objective=objective)
    step = jax.jit(train_step.make_train_step(config, optimizer, loss))
    args = (state, batch, horizon) + ((params,) if objective == 'dpo' else ())
    flops[objective] = step.lower(*args).compile().cost_analysis()['flops']
  assert 1.0 < flops['dpo'] / flops['cross_entropy'] < 2.2, flops


def test_sample_chat_renders_the_template_and_stops_at_the_end_of_turn(chat_model, monkeypatch):
  import transformers  # pylint: disable=import-outside-toplevel
  tok = tokenizer_lib.load(chat_model)
  messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': '你好'}]
  want = transformers.AutoTokenizer.from_pretrained(chat_model).apply_chat_template(
      messages, add_generation_prompt=True, tokenize=True)
  want = want['input_ids'] if isinstance(want, dict) or hasattr(want, 'keys') else want
  assert sample.chat_prompt(tok, '你好', 'Be brief.') == list(want)
  seen = {}

  def fake_generate(model_config, params, prompts, *, stop_token_ids, callback, **kwargs):
    del model_config, params, kwargs
    seen.update(prompts=prompts, stop=stop_token_ids)
    callback([[tok.encode('Hi')[0], chat.end_of_turn_id(tok)]])

  monkeypatch.setattr(sample.generate, 'generate', fake_generate)
  monkeypatch.setattr(sample.generate, 'check_prompts', lambda *a, **k: None)
  out = io.StringIO()
  reply = sample.sample(None, None, tok, '你好', out=out, chat=True, system='Be brief.')
  assert seen['prompts'] == [list(want)] and seen['stop'][0] == chat.end_of_turn_id(tok)
  assert tok.decode([chat.end_of_turn_id(tok)]) == '<|im_end|>'
  assert reply == out.getvalue().strip() == tok.decode(tok.encode('Hi')[:1])
