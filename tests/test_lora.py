"""LoRA: adapters off is the base model, only the adapters train (sharded like their kernels), a LoRA run resumes
exactly, and both exports give the trained model's logits: the merged one in transformers, the adapter directory
in PEFT on the base checkpoint."""

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
import transformers

import hf_utils
from qwenjax import checkpoint
from qwenjax import cli
from qwenjax import config as config_lib
from qwenjax import export
from qwenjax import hf
from qwenjax import lora as lora_lib
from qwenjax import loss as loss_lib
from qwenjax import model as model_lib
from qwenjax import pretrained
from qwenjax import sharding
from qwenjax import train
from qwenjax import train_step
from qwenjax.config import LoraConfig
from qwenjax.model_config import ModelConfig
from model_utils import random_params
from train_utils import ROOT, TINY, first_batches, losses, read_metrics, subprocess_xla_flags

import peft  # pylint: disable=g-import-not-at-top,wrong-import-order

DENSE = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, rope_theta=10_000.0, attention_impl='xla')
MOE = dataclasses.replace(DENSE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                          shared_expert_intermediate_size=24)
IDS = np.array([[1, 5, 9, 30, 60, 17, 3, 8, 41, 2]])


def _trained_looking(adapters, seed=0):
  """New adapters with B drawn too (new ones have B = 0, which adds nothing)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: 0.1 * rng.standard_normal(x.shape, np.float32) if p[-1].key == 'b' else x, adapters)


@functools.partial(jax.jit, static_argnums=0)
def _apply(config, variables):
  return model_lib.Qwen2(config).apply(variables, IDS)


def _logits(config, params, adapters=None, lora=None, compiled=True):
  """The model's logits of IDS: of `params` alone, or with `adapters`; compiled (one program for several calls) or
  op by op (faster for one call)."""
  variables = {'params': params} if adapters is None else {'params': params, 'lora': lora_lib.scaled(adapters, lora)}
  if not compiled:
    return np.asarray(model_lib.Qwen2(config).apply(variables, IDS))
  return np.asarray(_apply(config, variables))


# ---------------------------------------------------------------------------------------------------------
# Settings and shapes.


def test_settings_are_checked():
  settings = config_lib.settings(config_lib.load(TINY))
  assert settings.lora == LoraConfig() and not settings.lora.lora_rank  # off by default
  config = config_lib.load(TINY)
  config.train.update(lora_rank=8, lora_alpha=32, lora_targets='q, v')
  lora = config_lib.settings(config).lora
  assert (lora.lora_rank, lora.scale, lora.targets) == (8, 4.0, ('q', 'v'))
  with pytest.raises(ValueError, match='lora_rank must be >= 0'):
    LoraConfig(lora_rank=-1)
  with pytest.raises(ValueError, match=r"lora_targets='q,w'.*\('q', 'k', 'v', 'o', 'gate', 'up', 'down'\)"):
    LoraConfig(lora_rank=4, lora_targets='q,w')
  config.train.mup_base_width = 64
  config.model.tie_word_embeddings = False
  with pytest.raises(ValueError, match='lora_rank and train.mup_base_width do not go together'):
    config_lib.settings(config)


def test_adapters_have_their_kernels_axes_and_placement():
  lora = LoraConfig(lora_rank=4)
  boxed = lora_lib.abstract(MOE, lora)
  q = boxed['layers_0']['self_attn']['q_proj']
  assert (q['a'].value.shape, q['a'].names) == ((32, 4), ('embed', 'lora_rank'))
  assert (q['b'].value.shape, q['b'].names) == ((4, 4, 8), ('lora_rank', 'heads', 'head_dim'))
  o = boxed['layers_1']['self_attn']['o_proj']
  assert (o['a'].value.shape, o['a'].names) == ((4, 8, 4), ('heads', 'head_dim', 'lora_rank'))
  assert (o['b'].value.shape, o['b'].names) == ((4, 32), ('lora_rank', 'embed'))
  up = boxed['layers_0']['mlp']['experts']['up_proj']
  assert (up['a'].value.shape, up['a'].names) == ((4, 32, 4), ('expert', 'embed', 'lora_rank'))
  assert (up['b'].value.shape, up['b'].names) == ((4, 4, 16), ('expert', 'lora_rank', 'mlp'))
  shared = boxed['layers_0']['mlp']['shared_expert']['down_proj']
  assert (shared['a'].value.shape, shared['b'].value.shape) == ((24, 4), (4, 32))
  assert 'gate' not in boxed['layers_0']['mlp'] and 'shared_expert_gate' not in boxed['layers_0']['mlp']  # routers
  assert {x.dtype for x in jax.tree.leaves(lora_lib.shapes(MOE, lora))} == {jnp.dtype(jnp.float32)}

  scanned = lora_lib.shapes(dataclasses.replace(DENSE, scan_layers=True),
                            LoraConfig(lora_rank=2, lora_targets="v,down"))
  assert jax.tree.map(lambda x: x.shape, scanned) == {'layers': {
      'self_attn': {'v_proj': {'a': (2, 32, 2), 'b': (2, 2, 2, 8)}},
      'mlp': {'down_proj': {'a': (2, 48, 2), 'b': (2, 2, 32)}}}}

  # Placed as their kernels: embed over fsdp, heads and mlp over tensor, experts over expert; the rank nowhere.
  mesh = sharding.make_mesh(config_lib.MeshConfig(fsdp=2, tensor=2, expert=2))
  rules = sharding.logical_axis_rules(config_lib.DEFAULT_RULES, mesh, MOE)
  placed = sharding.param_shardings(boxed, mesh, rules)
  assert tuple(placed['layers_0']['self_attn']['q_proj']['a'].spec) == ('fsdp', None)
  assert tuple(placed['layers_0']['self_attn']['q_proj']['b'].spec) == (None, 'tensor', None)
  assert tuple(placed['layers_0']['mlp']['experts']['up_proj']['a'].spec) == ('expert', 'fsdp', None)
  assert tuple(placed['layers_0']['mlp']['experts']['up_proj']['b'].spec) == ('expert', None, 'tensor')


@pytest.mark.parametrize('config', [DENSE, pytest.param(dataclasses.replace(MOE, scan_layers=True),
                                                         marks=pytest.mark.slow)], ids=['dense', 'moe_scanned'])
@pytest.mark.slow
def test_adapters_off_is_the_base_and_new_adapters_change_nothing(config):
  params = random_params(config)
  lora = LoraConfig(lora_rank=4, lora_alpha=8.0)
  adapters = jax.jit(functools.partial(lora_lib.init, config, lora))(jax.random.key(1))
  flat = jax.tree_util.tree_flatten_with_path(adapters)[0]
  for path, x in flat:  # PEFT's init: B zeros, A kaiming-uniform bounded by 1 / sqrt(fan_in)
    name = jax.tree_util.keystr(path)
    if path[-1].key == 'b':
      assert not np.any(np.asarray(x)), name
    else:
      fan_in = np.prod(x.shape[-3:-1]) if 'o_proj' in name else x.shape[-2]  # o_proj: heads x head_dim
      assert 0.5 / np.sqrt(fan_in) < np.abs(np.asarray(x)).max() <= 1 / np.sqrt(fan_in), name

  base = _logits(config, params)
  np.testing.assert_array_equal(_logits(config, params, adapters, lora), base)  # the first step sees the base

  trained = _trained_looking(adapters)
  adapted = _logits(config, params, trained, lora)
  assert np.abs(adapted - base).max() > 0.05 * np.abs(base).max()
  merged = lora_lib.merge(jax.device_get(params), jax.device_get(trained), lora)  # numpy, as export merges
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(merged))
  assert hf_utils.relative_error(_logits(config, merged), adapted) < 1e-5
  on_device = jax.jit(functools.partial(lora_lib.merge, lora=lora))(params, trained)  # as pretrained.load merges
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), merged, jax.device_get(on_device))


# ---------------------------------------------------------------------------------------------------------
# The train step.


class _Steps:
  """LoRA train steps of `config` on a mesh: a random base, new adapters, one fixed batch of random tokens."""

  def __init__(self, mesh_config, lora, config=DENSE, batch=8, seq=16):
    optimizer = config_lib.OptimizerConfig(lr=1e-2, warmup_steps=0)
    loss = config_lib.LossConfig(z_loss=0.0)
    self.mesh = sharding.make_mesh(mesh_config)
    self.rules = sharding.logical_axis_rules(config_lib.DEFAULT_RULES, self.mesh, config)
    tx = train_step.make_optimizer(optimizer)
    self.shardings = train_step.state_shardings(config, tx, self.mesh, self.rules, lora)
    base_shardings = train_step.param_shardings(config, self.mesh, self.rules)
    self.state = train_step.create_state(config, tx, self.shardings, rng=jax.random.key(1), lora=lora)
    self.base = train_step.random_params(config, base_shardings, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq + 1), dtype=np.int32)
    batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
    self.batch = {k: jax.device_put(v, batch_sharding) for k, v in (
        ('inputs', tokens[:, :-1]), ('targets', tokens[:, 1:]), ('weights', np.ones((batch, seq), np.float32)))}
    replicated = sharding.replicated(self.mesh)
    self.horizon = jax.device_put(train_step.schedule_horizon(optimizer), replicated)
    self.step = jax.jit(train_step.make_train_step(config, optimizer, loss, lora),
                        in_shardings=(self.shardings, batch_sharding, replicated, base_shardings),
                        out_shardings=(self.shardings, None), donate_argnums=(0,))
    self.eval_step = jax.jit(train_step.make_eval_step(config, loss, lora))

  def run(self, steps: int) -> list[float]:
    out = []
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      for _ in range(steps):
        self.state, metrics = self.step(self.state, self.batch, self.horizon, self.base)
        out.append(float(metrics['loss']))
    return out

  def evaluate(self):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.eval_step(self.state.params, self.batch, self.base)


@pytest.mark.slow
def test_lora_steps_train_only_the_adapters_sharded_like_their_kernels():
  lora = LoraConfig(lora_rank=4, lora_alpha=8.0)
  results = {}
  for name, mesh_config in (('fsdp_tensor', config_lib.MeshConfig(fsdp=4, tensor=2)),
                            ('data', config_lib.MeshConfig(data=8, fsdp=1))):
    steps = _Steps(mesh_config, lora)
    before = jax.device_get(steps.base)
    # The first step's loss is the base model's.
    batch = jax.device_get(steps.batch)
    logits = model_lib.Qwen2(DENSE).apply({'params': before}, batch['inputs'])
    nll, _ = loss_lib.full_logits_cross_entropy(logits, batch['targets'], batch['weights'])
    results[name] = steps.run(5)
    np.testing.assert_allclose(results[name][0], float(nll) / batch['weights'].sum(), rtol=1e-5)
    assert results[name][-1] < results[name][0] - 0.05, results[name]
    # Only adapters in the state, optimizer moments included; the base is bit for bit what it was.
    params = steps.state.params
    assert jax.tree.structure(params) == jax.tree.structure(lora_lib.shapes(DENSE, lora))
    moments = [x for x in jax.tree.leaves(steps.state.opt_state) if x.ndim]
    assert sorted(x.shape for x in moments) == sorted(2 * [x.shape for x in jax.tree.leaves(params)])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(steps.base), before)
    assert jax.tree.map(lambda x: x.sharding, params) == steps.shardings.params
    if name == 'fsdp_tensor':
      a, b = params['layers_0']['self_attn']['q_proj']['a'], params['layers_0']['self_attn']['q_proj']['b']
      assert tuple(a.sharding.spec) == ('fsdp', None) and tuple(b.sharding.spec) == (None, 'tensor', None)
    nll, count = steps.evaluate()
    assert float(count) == 8 * 16 and np.isfinite(float(nll))
  np.testing.assert_allclose(results['fsdp_tensor'], results['data'], rtol=2e-5)


@pytest.mark.slow
def test_moe_lora_steps_on_an_expert_mesh():
  steps = _Steps(config_lib.MeshConfig(fsdp=2, tensor=2, expert=2), LoraConfig(lora_rank=2),
                 dataclasses.replace(MOE, scan_layers=True))
  before = jax.device_get(steps.base)
  got = steps.run(3)
  assert got[-1] < got[0], got
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(steps.base), before)
  b = steps.state.params['layers']['mlp']['experts']['gate_proj']['b']
  assert tuple(b.sharding.spec) == (None, 'expert', None, 'tensor') and np.any(np.asarray(b))


# ---------------------------------------------------------------------------------------------------------
# PEFT reads our adapters.


def _peft_logits(base_dir, adapter_dir, moe):
  cls = transformers.Qwen2MoeForCausalLM if moe else transformers.Qwen2ForCausalLM
  base = cls.from_pretrained(base_dir, attn_implementation='eager').eval()
  model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
  return hf_utils.hf_logits(model, IDS)


@pytest.mark.parametrize('moe,targets,scan', [
    (False, 'q,k,v,o,gate,up,down', True), pytest.param(True, 'q,k,v,o,gate,up,down', False, marks=pytest.mark.slow),
    pytest.param(True, 'o,up,down', False, marks=pytest.mark.slow)], ids=['dense_scanned', 'moe', 'moe_some_targets'])
@pytest.mark.slow
@pytest.mark.filterwarnings('ignore:The following (rank|alpha)_pattern keys did not match')  # PEFT checks modules only
def test_peft_loads_the_adapters_onto_the_base_with_the_merged_logits(tmp_path, moe, targets, scan):
  if moe:
    torch_model = hf_utils.random_qwen2_moe({**hf_utils.TINY, 'num_experts': 4, 'num_experts_per_tok': 2,
                                             'moe_intermediate_size': 16, 'shared_expert_intermediate_size': 24})
  else:
    torch_model = hf_utils.random_qwen2()
  torch_model.save_pretrained(str(tmp_path / 'base'))
  config, params = hf.from_pretrained(str(tmp_path / 'base'), scan_layers=scan)
  lora = LoraConfig(lora_rank=4, lora_alpha=12.0, lora_targets=targets)
  adapters = _trained_looking(lora_lib.init(config, lora, jax.random.key(1)))
  os.makedirs(tmp_path / 'adapter')
  with open(tmp_path / 'adapter' / 'adapter_config.json', 'w') as f:
    json.dump(lora_lib.peft_config(lora, config, str(tmp_path / 'base')), f)
  save_file(lora_lib.peft_tensors(adapters), str(tmp_path / 'adapter' / 'adapter_model.safetensors'))

  hf.save_pretrained(str(tmp_path / 'merged'), config, lora_lib.merge(params, jax.device_get(adapters), lora))
  merged = hf_utils.hf_logits(type(torch_model).from_pretrained(str(tmp_path / 'merged'),
                                                                attn_implementation='eager').eval(), IDS)
  ours = _logits(config, params, adapters, lora, compiled=False)
  assert hf_utils.relative_error(ours, merged) < 1e-5
  theirs = _peft_logits(str(tmp_path / 'base'), str(tmp_path / 'adapter'), moe)
  assert np.abs(theirs - merged).max() < 1e-4, np.abs(theirs - merged).max()
  assert np.abs(theirs - hf_utils.hf_logits(torch_model, IDS)).max() > 0.05  # the adapters do something


# ---------------------------------------------------------------------------------------------------------
# The training job.

WORDS = 'the quick brown fox jumps over the lazy dog training language models in jax is fun 你好 世界'.split()


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory):
  """A Hugging Face base (random tiny Qwen2 with a Qwen2-style tokenizer) and a 6-step LoRA run on it,
  checkpoints at 2, 4, 6; returns (config, workdir, base directory, its losses)."""
  root = tmp_path_factory.mktemp('lora')
  hf_utils.random_qwen2(vocab_size=384).save_pretrained(str(root / 'base'))
  hf_utils.save_tiny_qwen2_tokenizer(str(root / 'base'))
  rng = np.random.default_rng(0)
  with open(root / 'train.jsonl', 'w') as f:
    f.writelines(json.dumps({'text': ' '.join(rng.choice(WORDS, rng.integers(5, 40)))}) + '\n' for _ in range(64))
  config = config_lib.load(TINY)
  config.model.update(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rope_theta=10_000.0, tie_word_embeddings=False, use_sliding_window=False)
  config.init_from_hf = str(root / 'base')
  config.data.update(train_files=str(root / 'train.jsonl'), seq_len=32, shuffle_window=0)
  config.train.update(batch_size=8, lr=1e-2, warmup_steps=1, steps=6, log_every=1, eval_every=0,
                      checkpoint_every=2, lora_rank=4, lora_alpha=8.0, lora_targets='q,v,o,gate,up,down', z_loss=0.0)
  workdir = str(root / 'run')
  train.train_and_evaluate(config, workdir)
  return config, workdir, str(root / 'base'), losses(read_metrics(workdir))


@pytest.mark.slow
def test_a_lora_run_starts_at_the_base_learns_and_resumes_exactly(lora_run, tmp_path):
  config, workdir, base_dir, expected = lora_run
  # The first step's loss is the base checkpoint's on the first batch; then it falls.
  model_config = ModelConfig.from_dict(config.model)
  _, base = hf.from_pretrained(base_dir)
  batch = first_batches(config, os.path.join(base_dir, 'tokenizer.json'), 1)[0]
  logits = model_lib.Qwen2(model_config).apply({'params': base}, batch['inputs'], batch['positions'],
                                               batch['segment_ids'])
  nll, _ = loss_lib.full_logits_cross_entropy(logits, batch['targets'], batch['weights'])
  np.testing.assert_allclose(expected[1], float(nll) / batch['weights'].sum(), rtol=1e-5)
  assert expected[6] < expected[1] - 0.2, expected

  # Checkpoints hold the adapters and their optimizer state, nothing of the base.
  lora = config_lib.settings(config).lora
  _, saved, step = checkpoint.restore_params(workdir)
  assert step == 6
  assert jax.tree.map(np.shape, saved) == jax.tree.map(lambda x: x.shape, lora_lib.shapes(model_config, lora))
  saved_state = checkpoint.Checkpointer(workdir)._manager.item_metadata(6)['state']  # pylint: disable=protected-access
  names = {jax.tree_util.keystr(p): m.shape for p, m in jax.tree_util.tree_flatten_with_path(saved_state)[0]}
  assert sum(int(np.prod(shape)) for shape in names.values()) < 3 * lora_lib.count(model_config, lora) + 100
  assert not [n for n in names if 'embed_tokens' in n or 'kernel' in n or 'norm' in n]  # nothing of the base

  # Stopped after step 3 and resumed: the same losses as straight through.
  again = config.copy_and_resolve_references()
  train.train_and_evaluate(again, str(tmp_path / 'run'), stop_after=3)
  train.train_and_evaluate(again, str(tmp_path / 'run'))
  got = losses(read_metrics(str(tmp_path / 'run')))
  assert sorted(got) == list(range(1, 7))
  np.testing.assert_allclose([got[s] for s in range(4, 7)], [expected[s] for s in range(4, 7)], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_lora_run_exports_merged_for_transformers_and_as_a_peft_adapter(lora_run, tmp_path):
  config, workdir, base_dir, _ = lora_run
  model_config = ModelConfig.from_dict(config.model)
  lora = config_lib.settings(config).lora
  _, adapters, _ = checkpoint.restore_params(workdir)
  _, base = hf.from_pretrained(base_dir)
  ids = np.array([[3, 17, 99, 250, 8, 41, 7, 300]])
  variables = {'params': base, 'lora': lora_lib.scaled(adapters, lora)}
  ours = np.asarray(model_lib.Qwen2(model_config).apply(variables, ids))
  # pretrained.load (sample, evaluate) opens the run as its merged model.
  opened = pretrained.load(workdir, on_host=True)
  assert hf_utils.relative_error(model_lib.Qwen2(opened.model_config).apply({'params': opened.params}, ids),
                                 ours) < 1e-5

  summary = export.export(workdir, str(tmp_path / 'merged'))
  assert summary['step'] == 6 and 'model.safetensors' in summary['files']
  merged_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'merged'),
                                                                   attn_implementation='eager').eval()
  merged = hf_utils.hf_logits(merged_model, ids)
  assert hf_utils.relative_error(ours, merged) < 1e-5

  out = str(tmp_path / 'adapter')
  summary = export.export(workdir, out, adapter=True)
  assert summary['base_model'] == base_dir and summary['r'] == 4
  assert {'adapter_config.json', 'adapter_model.safetensors', 'tokenizer.json'} <= set(os.listdir(out))
  written = json.load(open(os.path.join(out, 'adapter_config.json')))
  assert (written['r'], written['lora_alpha'], written['base_model_name_or_path']) == (4, 8.0, base_dir)
  assert written['target_modules'] == ['down_proj', 'gate_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']
  base_model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation='eager').eval()
  peft_model = peft.PeftModel.from_pretrained(base_model, out).eval()
  assert np.abs(hf_utils.hf_logits(peft_model, ids) - merged).max() < 1e-4
  with peft_model.disable_adapter():  # and PEFT's adapters off is the base checkpoint
    assert np.abs(hf_utils.hf_logits(peft_model, ids) - merged).max() > 1e-3

  # The command line, and a run without adapters.
  env = dict(os.environ, XLA_FLAGS=subprocess_xla_flags(),
             PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))
  command = [sys.executable, '-m', 'qwenjax.export', f'--workdir={workdir}', f'--out={tmp_path / "cli"}', '--adapter',
             '--step=4']
  done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert json.loads(done.stdout)['step'] == 4 and os.path.exists(tmp_path / 'cli' / 'adapter_model.safetensors')
  full = str(tmp_path / 'full')
  shutil.copytree(workdir, full)
  saved = json.load(open(os.path.join(full, 'config.json')))
  saved['train']['lora_rank'] = 0
  json.dump(saved, open(os.path.join(full, 'config.json'), 'w'))
  with pytest.raises(cli.UsageError, match='is not a LoRA run'):
    export.export(full, str(tmp_path / 'x'), adapter=True)
  with pytest.raises(cli.UsageError, match='--dtype applies to the whole model'):
    export.export(workdir, str(tmp_path / 'y'), adapter=True, dtype='bfloat16')
