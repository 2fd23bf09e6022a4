"""Groups of runs trained as one vmapped step (`qwenjax.train.train_group`, `qwenjax.group`) on 8 fake CPU devices:
the same results as each run alone, member workdirs like a run's own, resume, a diverging member, one compiled step
for every learning rate, and the GPU attention kernels folding the member axis into the batch."""

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax import checkpoint
from qwenjax import group as group_lib
from qwenjax import train
from train_utils import jax_events, losses, read_metrics, small_config, step_bytes

# (lr, warmup_steps) of the three members: learning rates and warmups are inputs of the compiled step.
MEMBERS = ((1e-3, 2), (3e-3, 1), (1e-2, 2))


def member_config(tokenizer_file, lr, warmup, **train_overrides):
  config = small_config(**dict(dict(steps=4, log_every=1, checkpoint_every=2, eval_steps=2, eval_every=0, lr=lr,
                                     warmup_steps=warmup), **train_overrides))
  config.model.update(num_hidden_layers=1, hidden_size=64, intermediate_size=128)
  config.data.tokenizer = tokenizer_file
  return config


def eval_loss(workdir):
  return [r['eval_loss'] for r in read_metrics(workdir) if 'eval_loss' in r][-1]


@pytest.fixture(scope='module')
def alone(tmp_path_factory, tokenizer_file):
  """Each member trained by itself: {lr: workdir}."""
  out = {}
  for lr, warmup in MEMBERS:
    workdir = str(tmp_path_factory.mktemp(f'alone-{lr}'))
    train.train_and_evaluate(member_config(tokenizer_file, lr, warmup), workdir)
    out[lr] = workdir
  return out


@pytest.mark.slow
def test_a_group_computes_what_each_member_computes_alone(tmp_path, tokenizer_file, alone):
  configs = [member_config(tokenizer_file, lr, warmup) for lr, warmup in MEMBERS]
  workdirs = [str(tmp_path / f'lr{lr}') for lr, _ in MEMBERS]
  outcomes = train.train_group(configs, workdirs)
  for (lr, _), workdir, outcome in zip(MEMBERS, workdirs, outcomes):
    expected = losses(read_metrics(alone[lr]))
    got = losses(read_metrics(workdir))
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in got], [expected[s] for s in got], rtol=1e-5)
    np.testing.assert_allclose(eval_loss(workdir), eval_loss(alone[lr]), rtol=1e-5)
    assert outcome['eval_loss'] == eval_loss(workdir) and outcome['group_size'] == 3
    lrs = [r['lr'] for r in read_metrics(workdir) if 'lr' in r]
    np.testing.assert_allclose(lrs, [r['lr'] for r in read_metrics(alone[lr]) if 'lr' in r], rtol=1e-6)
    # The workdir is a run's own: its config (with its own lr), its tokenizer, its unstacked checkpoints.
    with open(os.path.join(workdir, 'config.json')) as f:
      assert json.load(f)['train']['lr'] == lr
    assert os.path.isfile(os.path.join(workdir, 'tokenizer', 'source.json'))
    assert checkpoint.Checkpointer(workdir).all_steps() == [2, 4]
    _, params, step = checkpoint.restore_params(workdir)
    _, expected_params, _ = checkpoint.restore_params(alone[lr])
    assert step == 4
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected_params)):
      assert a.shape == b.shape
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_members_of_other_seeds_read_their_own_data_and_compute_what_they_compute_alone(tmp_path, tokenizer_file,
                                                                                        caplog):
  """Repeats of one point (train.seed 0, 1, 2 at two rates) as one group: each member its own initial parameters
  and data stream (the batches stacked along the member axis), and the losses it gets alone; a member's
  checkpoint records its own stream, so it resumes alone too."""
  members = ((0, 3e-3), (1, 3e-3), (2, 1e-3))
  configs = [member_config(tokenizer_file, lr, 1, seed=seed) for seed, lr in members]
  by_itself = []
  for (seed, lr), config in zip(members, configs):
    by_itself.append(str(tmp_path / f'alone-{seed}'))
    train.train_and_evaluate(config, by_itself[-1])
  workdirs = [str(tmp_path / f'seed{seed}') for seed, _ in members]
  train.train_group(configs, workdirs, stop_after=3)
  train.train_group(configs, workdirs)  # resumed from step 3: each member's stream from there
  got = [losses(read_metrics(w)) for w in workdirs]
  for workdir, expected, got_k in zip(workdirs, by_itself, got):
    expected = losses(read_metrics(expected))
    assert sorted(got_k) == [1, 2, 3, 4]
    np.testing.assert_allclose([got_k[s] for s in got_k], [expected[s] for s in got_k], rtol=1e-5)
    np.testing.assert_allclose(eval_loss(workdir), eval_loss(by_itself[workdirs.index(workdir)]), rtol=1e-5)
  assert abs(got[0][1] - got[1][1]) > 1e-4  # other seeds: other losses (else the test would show nothing)
  caplog.set_level(logging.INFO)
  train.train_and_evaluate(configs[1], workdirs[1])  # resumes alone: its checkpoint's stream is its own
  assert 'resumed from' in caplog.text and 'different data stream' not in caplog.text


@pytest.mark.slow
def test_a_stopped_group_resumes_and_a_member_resumes_alone(tmp_path, tokenizer_file, alone):
  """Stopped after step 3 (checkpoints at 2 and 3), the group resumes to the end as if never stopped; a member's
  workdir also resumes alone, like any run's."""
  configs = [member_config(tokenizer_file, lr, warmup) for lr, warmup in MEMBERS]
  workdirs = [str(tmp_path / f'lr{lr}') for lr, _ in MEMBERS]
  train.train_group(configs, workdirs, stop_after=3)
  assert all(checkpoint.Checkpointer(w).all_steps() == [2, 3] for w in workdirs)
  copy = str(tmp_path / 'member0')
  shutil.copytree(workdirs[0], copy)
  train.train_group(configs, workdirs)
  for (lr, _), workdir in zip(MEMBERS, workdirs):
    got, expected = losses(read_metrics(workdir)), losses(read_metrics(alone[lr]))
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in got], [expected[s] for s in got], rtol=1e-5)
  train.train_and_evaluate(configs[0], copy)
  got = losses(read_metrics(copy))
  np.testing.assert_allclose([got[s] for s in (4,)], [losses(read_metrics(alone[MEMBERS[0][0]]))[4]], rtol=1e-5)
  # Members at different steps cannot go on as a group.
  train.train_and_evaluate(member_config(tokenizer_file, *MEMBERS[0], steps=6), str(tmp_path / 'ahead'),
                           stop_after=1)
  with pytest.raises(group_lib.GroupError, match='different steps'):
    train.train_group([member_config(tokenizer_file, *m, steps=6) for m in MEMBERS[:2]],
                      [str(tmp_path / 'ahead'), str(tmp_path / 'behind')])


@pytest.mark.slow
def test_a_diverging_member_stops_alone(tmp_path, tokenizer_file):
  configs = [member_config(tokenizer_file, lr, 1, max_nonfinite_steps=2) for lr in (1e30, 3e-3)]
  workdirs = [str(tmp_path / 'huge'), str(tmp_path / 'good')]
  bad, good = train.train_group(configs, workdirs)
  assert isinstance(bad, checkpoint.NonFiniteError) and 'non-finite' in str(bad)
  assert 2.0 < good['eval_loss'] < 7.0
  assert checkpoint.Checkpointer(workdirs[1]).all_steps() == [2, 4]
  assert 4 not in checkpoint.Checkpointer(workdirs[0]).all_steps()
  assert not any('eval_loss' in r for r in read_metrics(workdirs[0]))


def test_only_runs_of_one_shape_and_stream_form_a_group(tmp_path, tokenizer_file):
  one = member_config(tokenizer_file, 1e-3, 2)
  for change, key in ((lambda c: c.train.update(batch_size=8), 'train.batch_size'),
                      (lambda c: c.model.update(hidden_size=128), 'model.hidden_size'),
                      (lambda c: c.train.update(steps=5), 'train.steps')):
    other = one.copy_and_resolve_references()
    change(other)
    with pytest.raises(group_lib.GroupError, match=key):
      train.train_group([one, other], [str(tmp_path / 'a'), str(tmp_path / 'b')])
  with pytest.raises(group_lib.GroupError, match='workdirs of their own'):
    train.train_group([one, one], [str(tmp_path / 'a'), str(tmp_path / 'a')])
  chat = [member_config(tokenizer_file, 1e-3, 2, seed=seed) for seed in (0, 1)]
  for c in chat:
    c.data.format = 'chat'
  with pytest.raises(group_lib.GroupError, match="only data.format='text'"):  # other seeds: a stream each
    train.train_group(chat, [str(tmp_path / 'a'), str(tmp_path / 'b')])
  assert not os.path.exists(tmp_path / 'a')


@pytest.mark.slow
def test_lora_runs_are_refused_as_a_group_before_anything_is_compiled(tmp_path, tokenizer_file):
  lora = [member_config(tokenizer_file, lr, 1, lora_rank=2) for lr in (1e-3, 3e-3)]
  with pytest.raises(group_lib.GroupError, match='no LoRA, no DPO'):  # frozen inputs: the step cannot be vmapped
    train.train_group(lora, [str(tmp_path / 'l1'), str(tmp_path / 'l2')])
  assert not os.path.exists(tmp_path / 'l1' / 'config.json')


@pytest.mark.slow
def test_points_of_one_shape_reuse_the_compiled_step_whatever_their_lr(tmp_path, tokenizer_file):
  """A second run of one shape in the same process, with another lr, warmup, length and final fraction, runs the
  train and eval steps the first one compiled and creates its state with the first one's initializer: none of
  them is traced or compiled again."""
  train.train_and_evaluate(member_config(tokenizer_file, 1e-3, 2), str(tmp_path / 'a'))
  with jax_events() as events:
    train.train_and_evaluate(member_config(tokenizer_file, 5e-3, 1, steps=3, lr_final_fraction=0.5),
                             str(tmp_path / 'b'))
  traced = {name for event, name in events if event == 'jaxpr_trace_duration'}
  assert not traced & {'train_step', 'eval_step', 'init'}, sorted(traced)
  compiled = {name for event, name in events if event == 'backend_compile_duration'}
  assert not compiled & {'jit(train_step)', 'jit(eval_step)', 'jit(init)'}, sorted(compiled)
  lrs = [r['lr'] for r in read_metrics(str(tmp_path / 'b')) if 'lr' in r]
  assert lrs[0] == 0.0 and lrs[1] == pytest.approx(5e-3, rel=1e-6)


@pytest.mark.slow
def test_a_group_fits_the_memory_of_its_vmapped_step_and_compiles_it_once(tmp_path, tokenizer_file):
  """The memory fit compiles the program the group runs (K stacked states, K members' activations), which the loop
  then runs: the train step is compiled once, not once alone and again vmapped."""
  def config(lr, warmup):
    c = member_config(tokenizer_file, lr, warmup, steps=2, eval_steps=0, checkpoint_every=0)
    c.model.intermediate_size = 96  # a shape no other test compiles in this process
    return c

  with jax_events() as events:
    train.train_group([config(lr, warmup) for lr, warmup in MEMBERS], [str(tmp_path / f'{lr}') for lr, _ in MEMBERS])
  compiled = [name for event, name in events if event == 'backend_compile_duration' and 'train_step' in str(name)]
  assert len(compiled) == 1, events
  assert step_bytes(config(1e-3, 1), members=3) > 2 * step_bytes(config(1e-3, 1))


@pytest.mark.slow
def test_gpu_attention_folds_the_member_axis_into_the_batch():
  """Vmapped, the Pallas GPU flash attention runs one kernel over members x batch rows (the Hopper kernels trace
  and lower for CUDA here without a GPU), and in the interpreter gives each member what it gives alone."""
  from qwenjax.kernels import flash_gpu  # pylint: disable=g-import-not-at-top
  members, batch, seq, heads, dim = 3, 2, 256, 4, 64
  q = jax.ShapeDtypeStruct((members, batch, seq, heads, dim), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

  def loss(q, k, v, seg):
    return flash_gpu.flash_attention(q, k, v, segment_ids=seg, backend='mosaic').astype(jnp.float32).sum()

  grouped = jax.vmap(jax.grad(loss, argnums=(0, 1, 2)), in_axes=(0, 0, 0, None))
  text = jax.jit(grouped).trace(q, q, q, seg).lower(lowering_platforms=('cuda',)).as_text()
  calls = [line for line in text.splitlines() if 'custom_call' in line and 'mosaic_gpu' in line]
  assert len(calls) == 3 and all(f'tensor<{members * batch}x{seq}x{heads}x{dim}xbf16>' in c for c in calls)

  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(key, (members, batch, 40, 2, 64)) for key in keys[:3])
  seg = jnp.cumsum(jax.random.bernoulli(keys[3], 0.1, (batch, 40)), axis=1)

  def interpreted(q, k, v, seg):
    return (flash_gpu.flash_attention(q, k, v, segment_ids=seg, sliding_window=16, interpret=True) ** 2).sum()

  value_and_grad = jax.value_and_grad(interpreted, argnums=(0, 1, 2))
  values, grads = jax.jit(jax.vmap(value_and_grad, in_axes=(0, 0, 0, None)))(q, k, v, seg)
  for m in range(members):
    value, grad = jax.jit(value_and_grad)(q[m], k[m], v[m], seg)
    np.testing.assert_allclose(values[m], value, rtol=1e-6)
    for a, b in zip(grads, grad):
      np.testing.assert_allclose(a[m], b, rtol=1e-5, atol=1e-6)
