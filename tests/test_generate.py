"""Generation with a KV cache: parity with transformers' greedy `generate`, the cache against a full forward,
the sliding-window ring, sampling, stop tokens, errors, sharded decoding and the `qwenjax.sample` CLI."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_utils

from qwenjax import generate, hf, kv_cache, model, sharding, tokenizer
from qwenjax import params as params_lib
from qwenjax.config import MeshConfig
from qwenjax.kernels import decode_gpu
from qwenjax.model_config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_LENGTHS = (3, 9, 14)
NEW_TOKENS = 24

TINY_MOE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rope_theta=10_000.0, rms_norm_eps=1e-6,
                num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                mlp_only_layers=[1], tie_word_embeddings=False)


def random_qwen2_moe(seed=0):
  return hf_utils.random_qwen2_moe(TINY_MOE, seed)


def prompts(vocab, lengths=PROMPT_LENGTHS, seed=0):
  rng = np.random.RandomState(seed)
  return [rng.randint(0, vocab, n).tolist() for n in lengths]


def hf_greedy(torch_model, prompt, new_tokens):
  """transformers' greedy continuation of one prompt (no padding, no early stop)."""
  with torch.no_grad():
    out = torch_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               eos_token_id=None, pad_token_id=0)
  return out[0, len(prompt):].tolist()


# dense: 3 layers, GQA 4/2, a 6-token window on layers 1 and 2 (shorter than every prompt + continuation)
DENSE = dict(use_sliding_window=True, sliding_window=6, max_window_layers=1, tie_word_embeddings=True)


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['dense_sliding', 'moe'])
def test_greedy_matches_transformers_generate(tmp_path, kind):
  torch_model = hf_utils.random_qwen2(seed=3, **DENSE) if kind == 'dense_sliding' else random_qwen2_moe(seed=4)
  torch_model.save_pretrained(tmp_path)
  config, params = hf.from_pretrained(str(tmp_path))
  assert kind == 'moe' or [config.is_sliding(i) for i in range(3)] == [False, True, True]
  batch = prompts(config.vocab_size)
  ours = generate.generate(config, params, batch, max_new_tokens=NEW_TOKENS)
  expected = [hf_greedy(torch_model, p, NEW_TOKENS) for p in batch]
  assert [len(r) for r in ours] == [NEW_TOKENS] * len(batch)
  assert ours == expected


def tiny_config(**overrides):
  base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rope_theta=10_000.0, attention_impl='xla')
  return ModelConfig(**{**base, **overrides})


@pytest.mark.parametrize('scan_layers,decode_impl,yarn', [(False, 'xla', False), (True, 'xla', False),
                                                         (False, 'pallas', False), (False, 'pallas', True)])
@pytest.mark.slow
def test_cached_decoding_gives_full_forward_logits_at_every_step(scan_layers, decode_impl, yarn, monkeypatch):
  """Prefill of right-padded rows, then one token at a time: each step's logits equal a full forward pass's.

  'pallas' runs the decode kernel (`kernels.decode_gpu`) in the Pallas interpreter on unrolled layers: a ring of 16
  slots that wraps and a 40-slot cache (not a whole number of the kernel's blocks). (Scanned layers take the XLA
  path whatever `decode_impl` says: `model._decoder_layers`.) `yarn`: YaRN rotary scaling over an original context
  of 8, whose factor on cos and sin the kernel takes with them.
  """
  window, slots = (16, 40) if decode_impl == 'pallas' else (4, 32)
  kernel_calls = []  # traced kernel calls
  kernel = decode_gpu.decode_attention
  monkeypatch.setattr(decode_gpu, 'decode_attention', lambda *a, **k: kernel_calls.append(1) or kernel(*a, **k))
  config = tiny_config(scan_layers=scan_layers, use_sliding_window=True, sliding_window=window, max_window_layers=1,
                       num_hidden_layers=3, decode_impl=decode_impl, attention_interpret=decode_impl == 'pallas',
                       head_dim=32,  # the kernel's smallest head_dim
                       rope_scaling={'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 8}
                       if yarn else {})
  params = params_lib.init_params(config, jax.random.key(0))
  ids = np.random.RandomState(1).randint(0, config.vocab_size, (2, slots - 8))
  full = jax.jit(lambda p, x: model.Qwen2(config).apply({'params': p}, x))(params, ids)
  lengths = np.array([3, 7])

  @jax.jit
  def prefill(p, x, lengths):
    cache = kv_cache.init_cache(config, 2, slots)
    return model.Qwen2(config).apply({'params': p}, x, cache=cache, lengths=lengths)

  @jax.jit
  def step(p, token, position, cache):
    return model.Qwen2(config).apply({'params': p}, token[:, None], position[:, None], cache=cache)

  padded = np.where(np.arange(8) < lengths[:, None], ids[:, :8], 0)
  logits, cache = prefill(params, padded, lengths)
  np.testing.assert_allclose(logits[:, 0], full[[0, 1], lengths - 1], rtol=1e-5, atol=1e-5)
  position = lengths
  while position.max() < ids.shape[1]:
    logits, cache = step(params, ids[[0, 1], position], position, cache)
    np.testing.assert_allclose(logits[:, 0], full[[0, 1], position], rtol=1e-5, atol=1e-5)
    position = position + 1
  assert len(kernel_calls) == (3 if decode_impl == 'pallas' and not scan_layers else 0)
  if scan_layers:  # one stack: every layer gets the full length, the window is applied by masking
    assert cache['layers'].key.shape[:2] == (3, 2) and cache['layers'].slots == slots
  else:  # unrolled: the window layer's ring holds exactly `sliding_window` entries
    assert cache['layers_2'].slots == window and cache['layers_0'].slots == slots
    ring = np.asarray(cache['layers_2'].positions)  # the last `window` positions of each row
    assert [sorted(r) for r in ring] == [list(range(e - window, e)) for e in position]


@pytest.mark.slow
def test_ring_buffer_never_grows_past_the_window():
  config = tiny_config(use_sliding_window=True, sliding_window=5, max_window_layers=1, num_hidden_layers=3)
  params = params_lib.init_params(config, jax.random.key(2))
  batch = prompts(config.vocab_size, (2, 11))
  generate.TRACES.clear()
  seen = []
  out = generate.generate(config, params, batch, max_new_tokens=40, callback=seen.append)
  assert [len(r) for r in out] == [40, 40] and len(seen) == 40
  assert [sum(len(s[i]) for s in seen) for i in range(2)] == [40, 40]  # streaming gave every token once
  assert [[t for s in seen for t in s[i]] for i in range(2)] == out
  request = generate.make_request(config, batch, 40)
  knobs = (jnp.float32(1e-6), jnp.int32(0), jnp.float32(1.0), jnp.int32(97))  # what generate passes when greedy
  static = dict(config=config, sampling=generate.Sampling(), rules=(), mesh=None)  # as generate passes them
  state = generate.prefill(params, request.input_ids, request.lengths, request.active, request.stop_ids,
                           jax.random.key(0), *knobs, cache_len=request.cache_len, **static)
  state = generate.decode(params, state, 40, request.stop_ids, jax.random.key(0), *knobs, **static)
  assert np.asarray(state['out'])[:, :40].tolist() == out
  for i in range(3):
    layer = state['cache'][f'layers_{i}']
    assert layer.slots == layer.key.shape[2] == (5 if i else request.cache_len)
  ring = np.asarray(state['cache']['layers_1'].positions)  # the last 5 positions of each row, each once
  ends = np.asarray(state['position'])
  assert [sorted(r) for r in ring] == [list(range(e - 5, e)) for e in ends]
  # One trace of each for the whole run, streaming (a decode call per token) and the explicit calls included.
  assert generate.TRACES == {'prefill': 1, 'decode': 1}


@pytest.mark.slow
def test_idle_rows_added_for_decoding_change_no_token(monkeypatch):
  """`pad_rows` (how a single row decodes on a GPU, `decode_rows`): the real rows' tokens are unchanged and the
  idle rows are done from the start, on one device and through `generate` on a tensor-parallel mesh."""
  assert generate.decode_rows(1, 'gpu') == 2 and generate.decode_rows(1, 'cpu') == 1
  assert generate.decode_rows(3, 'gpu') == 3
  config = tiny_config(use_sliding_window=True, sliding_window=5, max_window_layers=1, num_hidden_layers=2)
  params = params_lib.init_params(config, jax.random.key(4))
  request = generate.make_request(config, prompts(config.vocab_size, (7,)), 12)
  knobs = (jnp.float32(1e-6), jnp.int32(0), jnp.float32(1.0), jnp.int32(97))
  static = dict(config=config, sampling=generate.Sampling())
  prefill = lambda: generate.prefill(params, request.input_ids, request.lengths, request.active, request.stop_ids,
                                     jax.random.key(0), *knobs, cache_len=request.cache_len, **static)
  decode = lambda state: generate.decode(params, state, 12, request.stop_ids, jax.random.key(0), *knobs, **static)
  alone = decode(prefill())
  padded = generate.pad_rows(prefill(), 3)
  assert padded['out'].shape[0] == 3 and padded['cache']['layers_1'].key.shape[0] == 3
  assert np.asarray(padded['done']).tolist() == [False, True, True]
  assert (np.asarray(padded['cache']['layers_1'].positions)[1:] == -1).all()
  padded = decode(padded)
  assert int(padded['step']) == int(alone['step']) == 12
  np.testing.assert_array_equal(np.asarray(padded['out'])[:1], np.asarray(alone['out']))
  assert generate.pad_rows(alone, 1) is alone
  # generate() as it runs on a GPU (an idle row for a single prompt), with heads split over tensor=4.
  expected = generate.generate(config, params, prompts(config.vocab_size, (7,)), max_new_tokens=12)
  assert expected == [np.asarray(alone['out'])[0, :12].tolist()]
  config = dataclasses.replace(config, num_key_value_heads=4)
  params = params_lib.init_params(config, jax.random.key(4))
  expected = generate.generate(config, params, prompts(config.vocab_size, (7,)), max_new_tokens=12)
  monkeypatch.setattr(generate, 'decode_rows', lambda batch, platform: 2 if batch == 1 else batch)
  padded_rows = []
  pad_rows = generate.pad_rows
  monkeypatch.setattr(generate, 'pad_rows', lambda state, rows: padded_rows.append(rows) or pad_rows(state, rows))
  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=4, expert=1))
  assert generate.generate(config, params, prompts(config.vocab_size, (7,)), max_new_tokens=12,
                           mesh=mesh) == expected
  assert padded_rows == [2]


@pytest.mark.slow
def test_compiles_once_per_bucket():
  config = tiny_config()
  params = params_lib.init_params(config, jax.random.key(3))
  generate.TRACES.clear()
  first = generate.generate(config, params, prompts(config.vocab_size, (5, 9)), max_new_tokens=20)
  generate.generate(config, params, prompts(config.vocab_size, (10, 16), seed=1), max_new_tokens=7)  # same buckets
  assert generate.TRACES == {'prefill': 1, 'decode': 1}
  generate.generate(config, params, prompts(config.vocab_size, (17, 3), seed=2), max_new_tokens=20)  # new bucket
  assert generate.TRACES == {'prefill': 2, 'decode': 1}  # decode's shapes come from the cache: same bucket here
  assert [len(r) for r in first] == [20, 20]


@pytest.mark.slow
def test_sampling_is_reproducible_from_its_seed():
  config = tiny_config()
  params = params_lib.init_params(config, jax.random.key(4))
  batch = prompts(config.vocab_size, (4, 6))
  kwargs = dict(max_new_tokens=16, temperature=1.5, top_k=20, top_p=0.9)
  a = generate.generate(config, params, batch, seed=7, **kwargs)
  b = generate.generate(config, params, batch, seed=7, **kwargs)
  c = generate.generate(config, params, batch, seed=8, **kwargs)
  assert a == b and a != c
  assert generate.generate(config, params, batch, seed=7 + 2**40, **kwargs) != a  # not only the low 32 bits
  assert len({t for row in a for t in row}) > 8  # really sampled: a random tiny model's greedy text repeats


@pytest.mark.slow
def test_top_k_and_top_p_keep_the_likely_tokens():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.key(0)
  draw = lambda k, p: np.asarray(generate.sample_tokens(
      logits, keys, 1.0, k, p, generate.Sampling.of(1.0, k, p)))
  assert set(draw(2, 1.0)) == {0, 1}
  assert set(draw(0, 0.7)) == {0, 1}  # 0.5 + 0.3 reaches 0.7
  assert set(draw(0, 0.4)) == {0}  # the most likely token always stays
  assert set(draw(0, 1.0)) == {0, 1, 2, 3}
  # Both: top-p over the top-k survivors, renormalized (0.5 / 0.8 = 0.625 reaches 0.6 alone), as transformers'
  # warpers do in generate's order.
  assert set(draw(2, 0.6)) == {0}
  import transformers  # pylint: disable=g-import-not-at-top
  scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
  warped = transformers.TopPLogitsWarper(0.6)(None, transformers.TopKLogitsWarper(2)(None, scores))
  assert set(torch.nonzero(torch.isfinite(warped[0])).flatten().tolist()) == {0}


@pytest.mark.slow
def test_decoding_is_dropless_whatever_the_runs_expert_capacity():
  """A run trained with expert capacity decodes dropless (as Hugging Face's Qwen2-MoE does): its rows'
  tokens do not depend on the batch they share."""
  config = tiny_config(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48)
  params = params_lib.init_params(config, jax.random.key(6))
  batch = prompts(config.vocab_size, (5, 9, 3))
  capped = dataclasses.replace(config, moe_capacity_factor=0.25)
  ids = np.array([batch[1]])
  assert not np.allclose(model.Qwen2(capped).apply({'params': params}, ids),  # capacity drops tokens here
                         model.Qwen2(config).apply({'params': params}, ids))
  dropless = generate.generate(config, params, batch, max_new_tokens=6)
  assert generate.generate(capped, params, batch, max_new_tokens=6) == dropless
  assert generate.generate(capped, params, batch[1:2], max_new_tokens=6) == dropless[1:2]


@pytest.mark.slow
def test_stop_tokens_end_a_row_inclusively():
  config = tiny_config()
  params = params_lib.init_params(config, jax.random.key(5))
  batch = prompts(config.vocab_size, (4, 6, 8))
  free = generate.generate(config, params, batch, max_new_tokens=16)
  stop = free[1][5]  # row 1's sixth token
  out = generate.generate(config, params, batch, max_new_tokens=16, stop_token_ids=[stop, 96])
  for row, ref in zip(out, free):
    ends = [i + 1 for i, t in enumerate(ref) if t in (stop, 96)]
    assert row == ref[:ends[0] if ends else len(ref)]
  assert out[1][-1] == stop and len(out[1]) <= 6
  limited = generate.generate(config, params, batch, max_new_tokens=16, vocab_limit=20)  # a padded table
  assert max(t for row in limited for t in row) < 20 and max(t for row in free for t in row) >= 20


def test_bad_prompts_get_clear_errors():
  config = tiny_config(max_position_embeddings=32)
  params = None  # the checks come before the parameters are touched
  with pytest.raises(ValueError, match='prompt 1 is empty'):
    generate.generate(config, params, [[1, 2], []], max_new_tokens=4)
  with pytest.raises(ValueError, match='longer than the model.s max_position_embeddings'):
    generate.generate(config, params, [[1] * 33], max_new_tokens=4)
  with pytest.raises(ValueError, match='plus max_new_tokens'):
    generate.generate(config, params, [[1] * 30], max_new_tokens=4)
  with pytest.raises(ValueError, match='outside'):
    generate.generate(config, params, [[1, 97]], max_new_tokens=4)
  with pytest.raises(ValueError, match='non-empty list'):
    generate.generate(config, params, [], max_new_tokens=4)
  with pytest.raises(ValueError, match='flat list of ids'):
    generate.generate(config, params, [1, 2, 3], max_new_tokens=4)
  with pytest.raises(ValueError, match='max_new_tokens must be an int'):
    generate.generate(config, params, [[1, 2]], max_new_tokens=4.0)
  with pytest.raises(ValueError, match='temperature=nan'):
    generate.generate(config, params, [[1, 2]], max_new_tokens=4, temperature=float('nan'))
  with pytest.raises(ValueError, match='vocab_limit must be'):
    generate.generate(config, params, [[1, 2]], max_new_tokens=4, vocab_limit=0)


@pytest.mark.slow
def test_tensor_parallel_decode_on_a_mesh_matches_one_device():
  """Layer 0 dense, layer 1 MoE, batch split over data=2 (3 rows padded to 4), heads and MLP over tensor=4."""
  config = tiny_config(num_key_value_heads=4, vocab_size=96, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, shared_expert_intermediate_size=48, mlp_only_layers=(0,))
  params = params_lib.init_params(config, jax.random.key(7))
  batch = prompts(config.vocab_size, (5, 8, 3))
  single = generate.generate(config, params, batch, max_new_tokens=16)
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=1, tensor=4, expert=1))
  sharded = generate.generate(config, params, batch, max_new_tokens=16, mesh=mesh)
  assert sharded == single
  placed = generate.place_params(config, params, mesh, sharding.logical_axis_rules(sharding.DEFAULT_RULES, mesh,
                                                                                   config))
  q = placed['layers_0']['self_attn']['q_proj']['kernel']
  assert q.sharding.spec[1] == 'tensor' and q.addressable_shards[0].data.shape[1] == 1  # 4 heads over 4


def _run_sample(*args):
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'qwenjax.sample', *args], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=300, check=False)


@pytest.mark.slow
def test_sample_cli_on_a_hf_directory(tmp_path):
  torch_model = hf_utils.random_qwen2(seed=8, vocab_size=353)  # the tiny tokenizer's size
  torch_model.save_pretrained(tmp_path)
  hf_utils.save_tiny_qwen2_tokenizer(str(tmp_path))
  done = _run_sample(f'--hf={tmp_path}', '--prompt=The quick brown fox', '--max_new_tokens=12',
                     '--temperature=0')
  assert done.returncode == 0, done.stderr[-3000:]
  tok = tokenizer.load(str(tmp_path))
  ids = tok.encode('The quick brown fox')
  expected = hf_greedy(torch_model, ids, 12)
  stop = [i for i, t in enumerate(expected) if t in tok.stop_ids]
  expected = expected[:stop[0]] if stop else expected
  assert done.stdout == 'The quick brown fox' + tok.decode(expected) + '\n'
  bad = _run_sample(f'--hf={tmp_path}', '--prompt=', '--max_new_tokens=8')  # a usage error
  assert bad.returncode == 2 and bad.stderr.startswith('error: --prompt is required'), bad.stderr
  long = _run_sample(f'--hf={tmp_path}', '--prompt=' + 'fox ' * 200, '--max_new_tokens=8')  # found at run time
  assert long.returncode == 1 and 'max_position_embeddings' in long.stderr


@pytest.mark.slow
def test_sample_cli_on_a_training_workdir(tmp_path):
  """Two steps of the training job (its tokenizer trained into WORKDIR/tokenizer/), then sample the workdir."""
  import shutil  # pylint: disable=import-outside-toplevel
  from qwenjax import checkpoint, train  # pylint: disable=import-outside-toplevel
  import train_utils  # pylint: disable=import-outside-toplevel
  missing = _run_sample(f'--workdir={tmp_path}', '--prompt=hi')
  assert missing.returncode == 1 and 'config.json' in missing.stderr
  workdir = tmp_path / 'run'
  config = train_utils.small_config(steps=2, checkpoint_every=2, log_every=1, eval_steps=0)
  text = tmp_path / 'train.txt'  # a small corpus and the tiny Qwen2-style tokenizer (353 ids; 384 embeddings)
  text.write_text('\n\n'.join(f'def main({i}):\n    return the quick brown fox {i * 7}' for i in range(400)))
  config.data.update(train_files=str(text), tokenizer=hf_utils.save_tiny_qwen2_tokenizer(str(tmp_path / 'tok')))
  config.model.vocab_size = 384
  train.train_and_evaluate(config, str(workdir))
  assert (workdir / 'tokenizer').is_dir()
  done = _run_sample(f'--workdir={workdir}', '--prompt=def main(', '--max_new_tokens=10', '--temperature=0')
  assert done.returncode == 0, done.stderr[-3000:]
  run_config, params, step = checkpoint.restore_params(str(workdir))
  assert step == 2
  tok = tokenizer.load(str(workdir / 'tokenizer'))
  model_config = ModelConfig.from_dict(run_config.model)
  expected = generate.generate(model_config, params, [tok.encode('def main(')], max_new_tokens=10,
                               stop_token_ids=tok.stop_ids, vocab_limit=tok.vocab_size)[0]
  expected = [t for t in expected if t not in tok.stop_ids]
  assert tok.vocab_size < model_config.vocab_size  # the CLI masked the ids past the tokenizer
  assert done.stdout == 'def main(' + tok.decode(expected) + '\n'
  (tmp_path / 'empty').mkdir()
  shutil.copy(workdir / 'config.json', tmp_path / 'empty' / 'config.json')
  no_checkpoint = _run_sample(f'--workdir={tmp_path / "empty"}', '--prompt=hi')
  assert no_checkpoint.returncode == 1 and 'no checkpoint' in no_checkpoint.stderr


@pytest.mark.slow
def test_decode_benchmark_runs_tiny_on_cpu(tmp_path, capsys):
  """Both parts of benchmarks/generate_gpu.py in this process (`--part all` runs the peer's in a subprocess)."""
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import generate_gpu  # pylint: disable=import-outside-toplevel
  args = ['--config', os.path.join(ROOT, 'configs', 'tiny.py'), '--prompt_len', '8', '--new_tokens', '4',
          '--batches', '2', '--iters', '1', '--device', 'cpu', '--no-peer_compile', '--peer_ways', 'loop',
          '--copy_mib', '8', '--out', str(tmp_path)]
  generate.TRACES.clear()
  generate_gpu.main(args + ['--part', 'peer'])
  generate_gpu.main(args + ['--part', 'ours'])
  rows = [json.loads(line) for line in (tmp_path / 'generate_gpu.jsonl').read_text().splitlines()]
  by_what = {(r['what'], r.get('way')): r for r in rows}
  assert set(by_what) == {('peer', 'loop'), ('copy_bandwidth', None), ('read_bandwidth', None), ('ours', None)}, rows
  assert by_what[('read_bandwidth', None)]['bytes_per_s'] > 0
  ours, peer = by_what[('ours', None)], by_what[('peer', 'loop')]
  assert 'error' not in ours and 'error' not in peer, rows
  assert ours['decode_tokens_per_s'] > 0 and peer['decode_tokens_per_s'] > 0 and ours['prefill_tokens_per_s'] > 0
  assert 0 < ours['fraction_of_bound'] and ours['traces'] == {'prefill': 1, 'decode': 1}
  out = capsys.readouterr().out
  assert '| ours (auto) | 2 |' in out and '| peer (loop) | 2 |' in out and 'read bandwidth' in out


@pytest.mark.slow
def test_scanned_models_decode_with_unrolled_layers():
  """`generate` decodes a scanned model with its layers unrolled (`generate.unrolled`): the same tokens as the
  unrolled model."""
  config = tiny_config(scan_layers=True, use_sliding_window=True, sliding_window=4, max_window_layers=1,
                       num_hidden_layers=3)
  params = params_lib.init_params(config, jax.random.key(5))
  flat_config, flat_params = generate.unrolled(config, params)
  assert not flat_config.scan_layers and 'layers' not in flat_params and 'layers_2' in flat_params
  assert generate.unrolled(flat_config, flat_params)[1] is flat_params
  batch = prompts(config.vocab_size, (4, 9))
  expected = generate.generate(flat_config, flat_params, batch, max_new_tokens=10)
  assert generate.generate(config, params, batch, max_new_tokens=10) == expected
