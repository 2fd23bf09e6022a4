"""FLOPs per token (the MFU numerator), the learning-rate schedule (its horizon a run-time input), and the metric
files."""

import dataclasses
import json
import os
import struct
import time

import jax
import numpy as np
import optax
import pytest
from tensorboardX.proto import event_pb2

from qwenjax import config as config_lib
from qwenjax import metrics
from qwenjax import train_step
from qwenjax.kernels import attention_contract
from qwenjax.model_config import ModelConfig


def brute_force_flops(config, seq_len):
  """Counts matmul FLOPs weight by weight and attention pairs position by position."""
  h, d, e = config.num_attention_heads, config.head_dim, config.hidden_size
  kv, m, v = config.num_key_value_heads, config.intermediate_size, config.vocab_size
  layers = config.num_hidden_layers
  per_layer = e * h * d + 2 * e * kv * d + h * d * e + 3 * e * m  # q, k, v, o, gate/up/down
  forward = 2 * (layers * per_layer + e * v)  # + the LM head; the embedding lookup is free
  for layer in range(layers):
    window = config.sliding_window if config.is_sliding(layer) else seq_len
    pairs = sum(min(i + 1, window) for i in range(seq_len))
    forward += 2 * 2 * h * d * pairs / seq_len  # scores and weighted values
  return 3 * forward  # backward = 2x forward


@pytest.mark.slow
def test_flops_per_token_counts_weights_and_the_window():
  config = config_lib.load(os.path.join(os.path.dirname(__file__), '..', 'configs', '1b.py'))
  model = ModelConfig.from_dict(config.model)
  expected = brute_force_flops(model, 8192)
  # Biases and norm scales are in the parameter count but not in the brute-force matmuls: within 0.01%.
  np.testing.assert_allclose(metrics.flops_per_token(model, 8192), expected, rtol=1e-4)
  untied = dataclasses.replace(model, tie_word_embeddings=False)  # a separate LM head, lookup still free
  np.testing.assert_allclose(metrics.flops_per_token(untied, 8192), expected, rtol=1e-4)
  no_window = dataclasses.replace(model, use_sliding_window=False)
  assert metrics.flops_per_token(no_window, 8192) > metrics.flops_per_token(model, 8192)
  assert metrics.flops_per_token(model, 1024) == metrics.flops_per_token(no_window, 1024)  # window >= seq


def test_batch_flops_count_each_documents_own_band():
  """MFU's numerator for packed rows: the weights for every position, attention over each document alone (what
  the kernels compute), with the window; one document a row is `flops_per_token` of the row."""
  model = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, use_sliding_window=True,
                      sliding_window=3, max_window_layers=1)  # layer 0 full, layer 1 windowed
  one = np.ones((2, 10), np.int32)
  np.testing.assert_allclose(metrics.batch_flops(model, one), 20 * metrics.flops_per_token(model, 10), rtol=1e-12)
  rows = np.array([[1, 1, 1, 1, 2, 2, 3, 3, 3, 3], [5] * 10])  # documents of 4, 2, 4 and 10 tokens
  assert attention_contract.document_lengths(rows).tolist() == [4, 2, 4, 10]
  weights = metrics.flops_per_token(model, 1) - 12 * 4 * 8 * 2  # 6 N: the weights' part alone
  full = lambda n: n * (n + 1) / 2
  windowed = lambda n: sum(min(i + 1, 3) for i in range(n))
  pairs = sum(full(n) + windowed(n) for n in (4, 2, 4, 10))
  np.testing.assert_allclose(metrics.batch_flops(model, rows), 20 * weights + 12 * 4 * 8 * pairs, rtol=1e-12)
  assert metrics.batch_flops(model, rows) < metrics.batch_flops(model, one)


def test_moe_flops_count_only_the_active_experts():
  config = config_lib.load(os.path.join(os.path.dirname(__file__), '..', 'configs', 'moe_tiny.py'))
  moe = ModelConfig.from_dict(config.model)
  e, i = moe.hidden_size, moe.moe_intermediate_size
  # The same model with a dense MLP of the active width: k routed experts + shared expert, plus the router.
  dense = dataclasses.replace(moe, num_experts=0, intermediate_size=moe.num_experts_per_tok * i +
                              moe.shared_expert_intermediate_size)
  router_and_gate = moe.num_hidden_layers * (e * moe.num_experts + e)
  expected = metrics.flops_per_token(dense, 256) + 6 * router_and_gate
  np.testing.assert_allclose(metrics.flops_per_token(moe, 256), expected, rtol=1e-12)


def test_learning_rate_warms_up_then_decays_to_the_floor():
  train = config_lib.OptimizerConfig(lr=1e-3, warmup_steps=10, steps=100, lr_final_fraction=0.1)
  schedule = train_step.learning_rate_schedule(train)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(100)), 1e-4, rtol=1e-5)
  values = [float(schedule(s)) for s in range(10, 101)]
  assert all(a >= b for a, b in zip(values, values[1:]))


def optax_schedule(train):
  """The schedule built by optax's constructors from Python ints, as the train step had it before its horizon
  became an input: the reference the runtime schedule must equal."""
  lr, warmup, steps = train.lr, train.warmup_steps, train.steps
  if train.lr_schedule == 'constant':
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [warmup])
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=max(steps, warmup + 1),
      end_value=lr * train.lr_final_fraction)


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['cosine', 'constant'])
def test_learning_rate_schedule_takes_its_horizon_at_run_time_with_optax_values(kind):
  base = config_lib.OptimizerConfig(lr=3e-3, lr_schedule=kind, lr_final_fraction=0.1)
  counts = np.arange(160, dtype=np.int32)
  traced = jax.jit(lambda horizon: train_step.learning_rate_schedule(base, horizon)(counts))
  for warmup, steps in [(0, 0), (0, 1), (0, 100), (1, 100), (10, 100), (7, 8), (30, 30), (50, 20), (5, 150)]:
    train = dataclasses.replace(base, warmup_steps=warmup, steps=steps)
    want = np.asarray(optax_schedule(train)(counts))
    for got in (traced(train_step.schedule_horizon(train)), train_step.learning_rate_schedule(train)(counts)):
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-9, err_msg=f'{warmup}, {steps}')
  assert traced._cache_size() == 1  # pylint: disable=protected-access  (one trace for every horizon)


def tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} as TensorBoard shows a run directory's event files: the files in name order, and
  a SessionLog START at step s (a restart) hiding what earlier events logged at steps >= s."""
  shown = {}
  for name in sorted(f for f in os.listdir(directory) if f.startswith('events.out.tfevents')):
    with open(os.path.join(directory, name), 'rb') as f:
      records = f.read()
    offset = 0
    while offset < len(records):  # TFRecords: length (8 bytes), its CRC (4), the event, its CRC (4)
      (length,) = struct.unpack('<Q', records[offset:offset + 8])
      event = event_pb2.Event.FromString(records[offset + 12:offset + 12 + length])
      offset += 16 + length
      if event.HasField('session_log') and event.session_log.status == event_pb2.SessionLog.START:
        shown = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in shown.items()}
      for value in event.summary.value:
        shown.setdefault(value.tag, []).append((event.step, value.simple_value))
  return shown


def test_a_resumed_run_shows_each_step_once_in_tensorboard_and_an_idle_one_writes_nothing(tmp_path):
  """A run killed after logging steps 1-6 but checkpointing only step 4 replays steps 5 and 6 when it resumes:
  TensorBoard shows each step once, the replayed values. A rerun with nothing to train writes no events file."""
  killed = metrics.MetricWriter(str(tmp_path))
  for step in range(1, 7):
    killed.write(step, {'loss': 10.0 - step})
  killed.close()
  time.sleep(1.1)  # event files are named by the second they are opened in
  resumed = metrics.MetricWriter(str(tmp_path), resume_step=4)
  for step in range(5, 9):
    resumed.write(step, {'loss': 100.0 + step})
  resumed.close()
  assert tensorboard_scalars(tmp_path)['loss'] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0), (5, 105.0), (6, 106.0),
                                                   (7, 107.0), (8, 108.0)]
  with open(tmp_path / 'metrics.jsonl') as f:
    assert [json.loads(line)['loss'] for line in f] == [9.0, 8.0, 7.0, 6.0, 105.0, 106.0, 107.0, 108.0]
  files = sorted(os.listdir(tmp_path))
  metrics.MetricWriter(str(tmp_path), resume_step=8).close()  # already trained to step 8: nothing to do
  assert sorted(os.listdir(tmp_path)) == files


def test_metric_writer_writes_jsonl_and_tensorboard(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(5, {'loss': np.float32(2.5), 'lr': 1e-3})
  writer.write(10, {'eval_loss': 2.25})
  writer.close()
  with open(tmp_path / 'metrics.jsonl') as f:
    lines = [json.loads(line) for line in f]
  assert lines == [{'step': 5, 'loss': 2.5, 'lr': 1e-3}, {'step': 10, 'eval_loss': 2.25}]
  events = [f for f in os.listdir(tmp_path) if f.startswith('events.out.tfevents')]
  assert events and os.path.getsize(tmp_path / events[0]) > 0
  line = metrics.progress_line(10, 100, {'loss': 2.0, 'lr': 1e-3, 'tokens_per_sec': 1234.0}, 75.0)
  assert 'step 10/100' in line and '1,234 tok/s' in line and 'ETA 1m15s' in line
  assert 'load_balancing' not in line
  moe = metrics.progress_line(10, 100, {'loss': 2.0, 'moe_aux_loss': 0.004, 'moe_load_balancing_loss': 1.25,
                                         'moe_router_z_loss': 0.5}, None)
  assert 'load_balancing 1.2500' in moe and 'router_z 0.5000' in moe


def test_a_runs_mfu_counts_what_its_batches_compute(tmp_path, tokenizer_file):
  """The logged MFU is the FLOPs of the timed steps' own batches (`metrics.batch_flops`: documents packed into a
  row attend only within themselves) over their time, not `flops_per_token` of whole rows."""
  from qwenjax import train  # pylint: disable=g-import-not-at-top
  from train_utils import config_from_overrides, first_batches, read_metrics, tiny_overrides  # pylint: disable=g-import-not-at-top
  config = config_from_overrides(dict(tiny_overrides(tokenizer_file), **{
      'data.seq_len': 512, 'train.steps': 4, 'train.log_every': 4, 'train.peak_tflops': 1e-3}))
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  [record] = [r for r in read_metrics(str(tmp_path / 'run')) if 'mfu' in r]
  model = config_lib.settings(config).model
  work = [metrics.batch_flops(model, b['segment_ids'])
          for b in first_batches(config, tokenizer_file, 4)[1:]]  # the first step (compiling) is not timed
  np.testing.assert_allclose(record['mfu'] * record['step_time'] * 1e9 * jax.device_count(), np.mean(work),
                             rtol=1e-9)
  assert min(work) < 8 * 512 * metrics.flops_per_token(model, 512)  # some row holds several documents
