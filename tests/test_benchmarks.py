"""The GPU benchmark scripts still run: each on the tiny config on one CPU device, in a few seconds."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from train_utils import subprocess_xla_flags

ROOT = pathlib.Path(__file__).parent.parent


def _run(script, *args):
  # One device: the scripts time one accelerator. The scripts import the installed qwenjax; PYTHONPATH makes it
  # this checkout's even where another checkout is the installed one.
  env = dict(os.environ, XLA_FLAGS=subprocess_xla_flags(), JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
  done = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / script), *args], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
  return done.stdout


@pytest.mark.slow
def test_train_benchmark_times_and_profiles_a_step(tmp_path):
  out = _run('train_1b.py', '--config', str(ROOT / 'configs' / 'tiny.py'), '--variants', 'b2_m2_acts_xla_unrolled',
             '--steps', '1', '--warmup', '1', '--set', 'train.loss_chunk=64', '--set=train.logits_dtype=bfloat16',
             '--profile', '--out', str(tmp_path))
  [result] = [json.loads(line) for line in (tmp_path / 'train_1b.jsonl').read_text().splitlines()]
  assert 'error' not in result, result
  assert result['tokens_per_s'] > 0 and result['remat'] == 'activations_saveable' and not result['scan_layers']
  assert result['pipelined_tokens_per_s'] > 0
  assert result['loss_chunk'] == 64 and result['logits_dtype'] == 'bfloat16'
  assert result['overrides'] == {'train.loss_chunk': 64, 'train.logits_dtype': 'bfloat16'}
  profile = json.loads((tmp_path / 'b2_m2_acts_xla_unrolled.profile.json').read_text())
  assert profile['busy_ms_per_step'] > 0 and profile['top_kernels']
  assert (tmp_path / 'b2_m2_acts_xla_unrolled.hlo.txt').stat().st_size > 0
  assert '| b2_m2_acts_xla_unrolled | 2 x 256 | 2 | activations_saveable | xla | 64, bfloat16 |' in out


@pytest.mark.slow
def test_train_benchmark_times_what_auto_chooses(tmp_path):
  """'mauto' and 'auto': the main job's defaults, fitted to the memory given (a CPU reports none)."""
  out = _run('train_1b.py', '--config', str(ROOT / 'configs' / 'tiny.py'), '--variants', 'b2_mauto_auto_xla_unrolled',
             '--steps', '1', '--warmup', '1', '--set', 'train.device_memory_gib=100', '--out', str(tmp_path))
  [result] = [json.loads(line) for line in (tmp_path / 'train_1b.jsonl').read_text().splitlines()]
  assert 'error' not in result, result
  assert result['auto'] == ['grad_accum_steps', 'remat_policy'] and result['limit_gib'] == 100
  assert (result['micro_batch'], result['remat']) == (2, 'activations_saveable') and result['needed_gib'] > 0
  assert '| b2_mauto_auto_xla_unrolled | 2 x 256 | 2 | activations_saveable |' in out


@pytest.mark.slow
def test_train_benchmark_rejects_a_bad_variant_name(tmp_path):
  with pytest.raises(AssertionError, match='bad variant'):
    _run('train_1b.py', '--variants', 'b4_m4_dots_cudnn,b4_m3_dots_cudnn', '--out', str(tmp_path))
  assert not (tmp_path / 'train_1b.jsonl').exists()  # nothing ran


@pytest.mark.slow
def test_peer_benchmark_runs_on_cpu(tmp_path):
  _run('hf_peer_1b.py', '--config', str(ROOT / 'configs' / 'tiny.py'), '--attn', 'sdpa', '--batch', '2',
       '--micro-batch', '1', '--seq-len', '64', '--steps', '1', '--warmup', '1', '--device', 'cpu',
       '--no-compile', '--out', str(tmp_path))
  [result] = [json.loads(line) for line in (tmp_path / 'hf_peer_1b.jsonl').read_text().splitlines()]
  assert 'error' not in result, result
  assert result['tokens_per_s'] > 0 and result['batch'] == 2 and result['seq_len'] == 64
  assert result['pipelined_tokens_per_s'] > 0


@pytest.fixture(scope='module')
def saved_documents(tmp_path_factory):
  """One run of data_throughput.py on configs/tiny.py (it trains its tokenizer and tokenizes the whole built-in
  corpus, the slow part): 4 batches of 2 rows read, their document statistics, and the batches saved for the step
  benchmarks' --batches_file. Returns (its JSON line, its workdir, the saved file)."""
  workdir = tmp_path_factory.mktemp('data_throughput')
  docs = workdir / 'docs.npz'
  out = _run('data_throughput.py', '--config', str(ROOT / 'configs' / 'tiny.py'), '--batch_size', '2',
             '--batches', '4', '--workdir', str(workdir), '--block', '32', '--save', str(docs))
  return json.loads(out.strip().splitlines()[-1]), workdir, docs


@pytest.mark.slow
def test_data_throughput_benchmark_reads_batches(saved_documents):
  result, workdir, docs = saved_documents
  assert result['tokens_per_s'] > 0 and result['batch_size'] == 2 and result['batches'] == 4
  assert 0 < result['blocks_unmasked'] <= result['blocks_needed'] <= 1
  assert list(workdir.glob('prepared/tokenizers/*/tokenizer.model'))  # configs/tiny.py trains its tokenizer there
  assert result['corpus_tokens'] > 1e6 and result['tokenize_tokens_per_s_per_core'] > 0
  assert result['saved'] == str(docs)
  with np.load(docs) as saved:
    assert {k: saved[k].shape for k in saved.files} == {
        k: (8, 256) for k in ('inputs', 'targets', 'positions', 'segment_ids', 'weights')}


def test_block_shares_counts_tiles_by_document():
  sys.path.insert(0, str(ROOT / 'benchmarks'))
  import data_throughput  # pylint: disable=g-import-not-at-top
  segments = np.array([[1, 1, 1, 2, 2, 2, 2, 2]])  # tiles of 2: (1,1) (1,2) (2,2) (2,2)
  assert data_throughput.block_shares(segments, 2) == (10, 8, 4)
  assert data_throughput.block_shares(segments, 2, window=2) == (7, 7, 4)  # 2-token window: tiles q-1..q
  assert data_throughput.block_shares(np.ones((3, 8), np.int32), 4) == (9, 9, 9)  # one document


def test_median_seconds_times_calls_back_to_back(monkeypatch):
  """Each sample issues `calls` calls, waits once, and reports the time per call."""
  sys.path.insert(0, str(ROOT / 'benchmarks'))
  import timing  # pylint: disable=g-import-not-at-top
  clock, waits, calls = iter(float(t) for t in range(0, 100, 6)), [], []
  monkeypatch.setattr(timing.time, 'perf_counter', lambda: next(clock))
  monkeypatch.setattr(timing.jax, 'block_until_ready', lambda x: waits.append(x) or x)
  seconds, first = timing.median_seconds(lambda x: calls.append(x) or len(calls), 7, warmup=2, iters=3, calls=3)
  assert first == 1 and len(calls) == 2 + 3 * 3 and waits == [1, 2, 5, 8, 11]  # one wait a sample, on its last call
  assert seconds == 2.0  # each sample spans 6 clock units for 3 calls


@pytest.mark.slow
def test_attention_benchmark_times_and_profiles_on_cpu(tmp_path):
  """attention_gpu.py --bench --profile, on the XLA reference (the kernels need a GPU): a timed row with its
  per-kernel profile."""
  out = _run('attention_gpu.py', '--bench', '--seqs', '256', '--batch', '1', '--q_heads', '4', '--window', '64',
             '--only', 'XLA', '--iters', '1', '--calls', '2', '--profile', '--out', str(tmp_path))
  [row] = json.loads((tmp_path / 'bench.json').read_text())['results']
  assert row['impl'] == 'XLA masked reference' and row['fwd_ms'] > 0 and row['fwd+bwd_ms'] > 0, row
  profile = row['fwd+bwd_profile']
  assert profile['steps'] == 2 and profile['kernel_ms_per_step'] > 0 and profile['top_kernels'], profile
  assert 'profile of fwd+bwd, 256_XLA masked reference, per call' in out and '| 256 | XLA masked reference |' in out


@pytest.mark.slow
def test_loss_benchmark_times_both_ways_on_cpu(tmp_path):
  """loss_gpu.py on a small chunk, the kernels in the interpreter: both passes timed both ways, and the kernels'
  results checked against the float32 reference."""
  _run('loss_gpu.py', '--rows', '6', '--vocab', '1000', '--blocks', '256', '--iters', '1', '--calls', '1', '--out',
       str(tmp_path))
  results = json.loads((tmp_path / 'loss_gpu.json').read_text())['results']
  assert [r['pass_'] for r in results] == ['logsumexp xla', 'logsumexp pallas_b256_w4', 'softmax_grad xla',
                                           'softmax_grad pallas_b256_w4']
  assert all(r['ms'] > 0 and r['rel_err'] < 1e-2 for r in results), results


@pytest.mark.slow
def test_step_benchmarks_train_on_saved_packed_documents(saved_documents, tmp_path):
  docs = saved_documents[2]
  out = _run('train_1b.py', '--config', str(ROOT / 'configs' / 'tiny.py'), '--variants', 'b2_m1_acts_xla_unrolled',
             '--steps', '1', '--warmup', '1', '--batches_file', str(docs), '--out', str(tmp_path))
  assert 'xla, packed documents (docs.npz)' in out
  _run('hf_peer_1b.py', '--config', str(ROOT / 'configs' / 'tiny.py'), '--attn', 'sdpa', '--batch', '2',
       '--micro-batch', '1', '--steps', '1', '--warmup', '1', '--device', 'cpu', '--no-compile',
       '--batches_file', str(docs), '--out', str(tmp_path))
  [ours] = [json.loads(line) for line in (tmp_path / 'train_1b.jsonl').read_text().splitlines()]
  [peer] = [json.loads(line) for line in (tmp_path / 'hf_peer_1b.jsonl').read_text().splitlines()]
  assert ours['data'] == peer['data'] == str(docs)
  assert 'error' not in peer and np.isfinite(peer['loss']) and peer['tokens_per_s'] > 0


def test_peer_loss_keeps_packed_documents_apart():
  """The peer's loss on a packed row equals its loss on each document alone: transformers masks across
  documents from the restarting positions, and the labels drop the targets that cross a boundary."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(ROOT / 'benchmarks'))
  import hf_peer_1b  # pylint: disable=g-import-not-at-top
  config = transformers.Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)
  config._attn_implementation = 'sdpa'  # pylint: disable=protected-access
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(config)
  lengths = (7, 12, 5)
  ids = torch.randint(0, 97, (1, sum(lengths)))
  positions = torch.cat([torch.arange(n) for n in lengths])[None]
  weights = np.ones((1, sum(lengths)), np.float32)
  weights[0, np.cumsum(lengths)[:-1] - 1] = 0  # the last token of a document: its target is the next one's first
  labels = torch.from_numpy(hf_peer_1b.packed_labels(ids.numpy(), weights))
  with torch.no_grad():
    packed = hf_peer_1b.peer_loss(model, ids, positions, labels)
    total, count, start = 0.0, 0, 0
    for n in lengths:
      doc = ids[:, start:start + n]
      total += float(hf_peer_1b.peer_loss(model, doc, None, doc)) * (n - 1)
      count, start = count + n - 1, start + n
  assert abs(float(packed) - total / count) < 1e-5
  with torch.no_grad():  # without the positions the documents see each other: a different loss
    assert abs(float(hf_peer_1b.peer_loss(model, ids, None, labels)) - total / count) > 1e-3


@pytest.mark.slow
def test_lora_sft_benchmark_runs_both_sides_on_cpu(tmp_path):
  """lora_sft_gpu.py on a 2-layer model: qwenjax's LoRA step and transformers + PEFT's (eager), each in its own
  process, on the same packed SFT batches, and the table with their ratio."""
  config = tmp_path / 'small.py'
  config.write_text('from qwenjax.config import base_config, model_section\n\n\ndef get_config():\n'
                    '  config = base_config()\n'
                    '  config.model = model_section(vocab_size=256, hidden_size=64, intermediate_size=128,\n'
                    '                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)\n'
                    '  return config\n')
  out = _run('lora_sft_gpu.py', '--config', str(config), '--seq-len', '64', '--batch', '2', '--micro-batch', '1',
             '--peer-micro-batch', '2', '--rank', '4', '--steps', '1', '--warmup', '1', '--device', 'cpu',
             '--compile', 'no', '--attn', 'sdpa', '--out', str(tmp_path))
  ours, peer = [json.loads(line) for line in (tmp_path / 'lora_sft_gpu.jsonl').read_text().splitlines()]
  assert 'error' not in ours and 'error' not in peer, (ours, peer)
  assert ours['run'] == 'qwenjax' and peer['run'] == 'transformers + PEFT (sdpa, eager)'
  assert ours['batches'] == peer['batches'] and ours['adapter_params'] == peer['adapter_params']
  assert ours['tokens_per_s'] > 0 and peer['tokens_per_s'] > 0
  assert abs(ours['loss'] - peer['loss']) < 0.1 * ours['loss']  # the same model shape on the same batches
  assert 'qwenjax / transformers + PEFT (sdpa, eager), tokens_per_s:' in out


def test_lora_sft_batches_pack_conversations_and_train_the_responses():
  sys.path.insert(0, str(ROOT / 'benchmarks'))
  import lora_sft_gpu  # pylint: disable=g-import-not-at-top
  [batch] = lora_sft_gpu.sft_batches(1, 4, 256, 100)
  segments, positions, weights = batch['segment_ids'], batch['positions'], batch['weights']
  assert segments.max() > 1 and np.all(positions[segments != np.roll(segments, 1, axis=1)] == 0)
  last = segments != np.roll(segments, -1, axis=1)  # a conversation's last token: its target is the next one's
  assert not np.any(weights[:, :-1][last[:, :-1]]) and 0.3 < weights.mean() < 0.8
  np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
  assert lora_sft_gpu.fingerprint([batch]) == lora_sft_gpu.fingerprint(lora_sft_gpu.sft_batches(1, 4, 256, 100))
