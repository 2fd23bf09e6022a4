"""Sweeps end to end on the CPU: planning (countings, warmup, batches, the lr stage), a 6-point IsoFLOP sweep run
in two halves, the fit, --emit and its table, code versions, and the check of a committed point."""

import json
import math
import os
import shlex
import shutil
import subprocess
import sysconfig

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

from qwenjax import metrics
from qwenjax import scaling
from qwenjax import sweep as sweep_lib
from qwenjax import train
from qwenjax.model_config import ModelConfig
from train_utils import ROOT, experiment_module  # pylint: disable=g-bad-import-order

STDLIB = sysconfig.get_paths()['stdlib']


def tiny_sweep(prepared_dir: str) -> ml_collections.ConfigDict:
  """2 budgets x 3 one-layer sizes (width 16, 32, 48) on a small corpus (the stdlib's email package), 8 x 32 tokens
  a step: 6 points of 6-60 steps."""
  sweep = ml_collections.ConfigDict()
  sweep.base = 'configs/tiny.py'
  sweep.overrides = ml_collections.ConfigDict(dict(
      model=dict(vocab_size=512, use_sliding_window=False),
      data=dict(vocab_size=512, seq_len=32, tokenizer_sentences=5000, prepared_dir=prepared_dir,
                train_files=os.path.join(STDLIB, 'email', '*.py'), eval_files=os.path.join(STDLIB, 'json', '*.py')),
      train=dict(batch_size=8, lr=1e-2, log_every=5, eval_steps=2),
  ))
  sweep.ladder = ml_collections.ConfigDict(dict(sizes=(1, 2, 3), width_per_size=16, depth=1, head_dim=16,
                                                q_per_kv=1, mlp_ratio=2.0))
  sweep.budgets = (6e7, 2e8)
  sweep.tokens_per_param = ()
  sweep.warmup_fraction = 0.1
  sweep.max_epochs = 1.0
  return sweep


@pytest.fixture(scope='module')
def prepared_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('prepared'))


def test_ladder_rules():
  ladder = dict(width_per_size=64, depth=0, depth_per_size=0.5, head_dim=64, q_per_kv=2, mlp_ratio=3.0)
  assert sweep_lib.ladder_shape(6, ladder) == dict(hidden_size=384, num_hidden_layers=3, num_attention_heads=6,
                                                   num_key_value_heads=3, head_dim=64, intermediate_size=1152)
  assert sweep_lib.ladder_shape(5, dict(ladder, q_per_kv=1))['num_hidden_layers'] == 3  # 2.5 rounds up
  assert sweep_lib.ladder_shape(5, dict(ladder, width_per_size=32, q_per_kv=1))['num_attention_heads'] == 3  # 2.5
  with pytest.raises(ValueError, match='do not split into groups of q_per_kv=2'):
    sweep_lib.ladder_shape(5, ladder)


def test_plan_spends_the_budget_and_counts_non_embedding_parameters(prepared_dir):
  sweep = tiny_sweep(prepared_dir)
  points = sweep_lib.plan(sweep, '/tmp/sweep')
  assert [p.name for p in points] == ['C6e7-s1', 'C6e7-s2', 'C6e7-s3', 'C2e8-s1', 'C2e8-s2', 'C2e8-s3']
  for point in points:
    config = sweep_lib.point_config(sweep, point)
    model = ModelConfig.from_dict(config.model)
    per_token = metrics.flops_per_token(model, 32)
    assert point.flops_per_token == per_token
    assert point.tokens == config.train.steps * 8 * 32
    assert abs(point.flops - point.budget) <= 8 * 32 * per_token / 2  # whole steps: within half a step
    # Porian et al.'s N (the default counting): the tied table counts once, as the output head, and C per token is
    # what MFU counts. Kaplan et al.'s N (a 1-layer model's layer and final norm) is recorded beside it.
    hidden, mlp = model.hidden_size, model.intermediate_size
    layer = 4 * hidden * hidden + 3 * hidden + 3 * hidden * mlp + 2 * hidden  # q,k,v,o + qkv biases, mlp, norms
    assert point.params_non_embedding == layer + hidden  # + the final norm
    assert point.params == point.params_with_head == layer + hidden + 512 * hidden == point.params_total
    assert point.flops_per_token == point.flops_per_token_actual
    assert point.stage == 'isoflop' and point.counting == 'porian'
    assert config.train.warmup_steps == max(1, round(0.1 * config.train.steps))
    assert config.data.prepared_dir == prepared_dir
  sweep.axes = ml_collections.ConfigDict(dict(train=dict(lr=(1e-3, 1e-2))))
  assert len(sweep_lib.plan(sweep, '/tmp/sweep')) == 12
  sweep.tokens = (1e4,)
  with pytest.raises(ValueError, match='exactly one of budgets'):
    sweep_lib.plan(sweep, '/tmp/sweep')


def test_unknown_override_names_the_section_keys(prepared_dir):
  sweep = tiny_sweep(prepared_dir)
  sweep.overrides.train.learning_rate = 1e-3
  with pytest.raises(KeyError, match="train has no key 'learning_rate'.*lr"):
    sweep_lib.plan(sweep, '/tmp/sweep')


def test_too_many_epochs_is_an_error_before_training(prepared_dir, tmp_path):
  sweep = tiny_sweep(prepared_dir)
  sweep.budgets = (1e11,)
  with pytest.raises(ValueError, match='more than max_epochs=1.0 times'):
    sweep_lib.run(sweep, str(tmp_path / 'sweep'))
  assert not os.path.exists(tmp_path / 'sweep' / 'results.jsonl')


def read_lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_sweep_runs_resumes_fits_and_emits(prepared_dir, tmp_path):
  sweep = tiny_sweep(prepared_dir)
  workdir = str(tmp_path / 'sweep')
  names = [p.name for p in sweep_lib.plan(sweep, workdir)]

  # Half the sweep, as if the job had been stopped after three points.
  first = sweep_lib.run(sweep, workdir, only=tuple(names[:3]))
  assert sorted(r['name'] for r in first) == sorted(names[:3])
  stamps = {n: os.path.getmtime(os.path.join(workdir, n, 'metrics.jsonl')) for n in names[:3]}

  records = sweep_lib.run(sweep, workdir)
  assert sorted(r['name'] for r in records) == sorted(names)
  lines = read_lines(os.path.join(workdir, 'results.jsonl'))
  assert sorted(r['name'] for r in lines) == sorted(names)  # each point once: nothing finished ran again
  assert {n: os.path.getmtime(os.path.join(workdir, n, 'metrics.jsonl')) for n in names[:3]} == stamps
  for record in lines:
    assert {'name', 'params', 'params_total', 'tokens', 'flops', 'budget', 'eval_loss', 'overrides',
            'epochs'} <= set(record)
    assert 0 < record['epochs'] < 1
    assert 2.0 < record['eval_loss'] < 7.0  # below log(512) = 6.24 plus noise: it learned something
    assert record['overrides']['model.hidden_size'] == record['width']
    assert abs(record['flops'] - record['budget']) <= 8 * 32 * record['flops_per_token'] / 2  # within half a step
  # Both points of a size saw the same corpus and tokenizer: one prepared corpus under prepared_dir.
  assert len([d for d in os.listdir(prepared_dir) if d != 'tokenizers']) == 2  # train and eval

  fitted = scaling.fit_directory(workdir, bootstrap=3)
  assert set(fitted['approach3']) >= {'E', 'A', 'B', 'alpha', 'beta', 'a', 'b', 'ci'}
  # Six noisy tiny points: approach 2 may lack a parabola minimum; then fit.json says why.
  assert 'minima' in fitted['approach2'] or 'parabola' in fitted['approach2']['error']
  assert 'frontier.png' in fitted['plots']
  assert os.path.exists(os.path.join(workdir, 'fit.json'))
  for name in fitted['plots']:
    assert os.path.getsize(os.path.join(workdir, name)) > 1000

  # --emit on the finished sweep has nothing to run; on a new directory one command per point.
  assert sweep_lib.emit(sweep, workdir) == []
  other = str(tmp_path / 'emitted')
  commands = sweep_lib.emit(sweep, other)
  assert len(commands) == 6
  args = shlex.split(commands[0])
  assert args[:3] == ['python', '-m', 'qwenjax.train']
  assert f'--workdir={os.path.join(other, names[0])}' in args
  # Its flags parse as `python -m qwenjax.train` parses them (qwenjax.train.parse_flags: no unknown key, then
  # absl's flags of the config file, values of their types) into the config of the point the sweep trained above.
  assert train.config_override_error(args[2:]) is None
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=values, lock_config=True, sys_argv=args[2:])
  flags.DEFINE_string('workdir', None, '', flag_values=values)
  values(args[2:])
  assert values.workdir == os.path.join(other, names[0])
  want = sweep_lib.point_config(sweep, sweep_lib.plan(sweep, other)[0])
  assert values.config.to_dict() == want.to_dict()
  assert values.config.model.hidden_size == 16 and values.config.train.steps == want.train.steps


@pytest.mark.slow
def test_a_diverging_point_is_recorded_and_the_sweep_goes_on(prepared_dir, tmp_path):
  """A learning rate that blows up is a result of a sweep: recorded (eval_loss null, `diverged`), not retrained
  by a rerun, left out of the fits; the other points run. A results line cut short by a kill is left out."""
  sweep = tiny_sweep(prepared_dir)
  sweep.ladder.sizes = (1,)
  sweep.budgets = (2e8,)  # 10 steps
  sweep.overrides.train.max_nonfinite_steps = 2
  sweep.axes = ml_collections.ConfigDict(dict(train=dict(lr=(1e30, 1e-2))))
  workdir = str(tmp_path / 'sweep')
  records = {r['name']: r for r in sweep_lib.run(sweep, workdir)}
  diverged = [r for r in records.values() if r.get('diverged')]
  assert len(records) == 2 and len(diverged) == 1 and diverged[0]['overrides']['train.lr'] == 1e30
  assert diverged[0]['eval_loss'] is None and 'non-finite' in diverged[0]['error']
  good = next(r for r in records.values() if not r.get('diverged'))
  assert 2.0 < good['eval_loss'] < 7.0

  with open(os.path.join(workdir, 'results.jsonl'), 'a') as f:
    f.write('{"name": "cut sho')  # a write killed halfway
  assert len(sweep_lib.run(sweep, workdir)) == 2  # nothing retrained, the cut line left out
  assert sorted(r['name'] for r in scaling.read_results(workdir)) == sorted(records)
  fitted = scaling.fit(scaling.read_results(workdir), bootstrap=0)
  assert fitted['points'] == 1 and [x['name'] for x in fitted['excluded']] == [diverged[0]['name']]
  assert 'diverged' in fitted['excluded'][0]['reason']


def test_sweep_file_mistakes_are_named_before_training(prepared_dir):
  for change, message in ((lambda s: s.update(budget=(1e8,)), r"unknown sweep key\(s\) \['budget'\]"),
                          (lambda s: s.ladder.update(depth_per_sizes=1),
                           r"ladder: unknown key\(s\) \['depth_per_sizes'\]"),
                          (lambda s: s.ladder.update(q_per_kv=0), 'ladder.q_per_kv must be positive'),
                          (lambda s: s.update(budgets=(0.0,)), 'budgets must be a tuple of positive numbers')):
    sweep = tiny_sweep(prepared_dir)
    change(sweep)
    with pytest.raises(ValueError, match=message):
      sweep_lib.plan(sweep, '/tmp/unused')
  sweep = tiny_sweep(prepared_dir)
  sweep.overrides.train.eval_steps = 0
  with pytest.raises(ValueError, match='final eval loss: set train.eval_steps > 0'):
    sweep_lib.check_epochs(sweep, sweep_lib.plan(sweep, '/tmp/unused'))


def test_kaplan_counting_leaves_the_head_and_attention_out(prepared_dir):
  """counting='kaplan' (the ablation): N without the head, C = 6 N D, so a point trains longer than under Porian et
  al.'s counting and spends more than its budget, which the record says."""
  sweep = tiny_sweep(prepared_dir)
  porian = {p.name: p for p in sweep_lib.plan(sweep, '/tmp/sweep')}
  sweep.counting = 'kaplan'
  for point in sweep_lib.plan(sweep, '/tmp/sweep'):
    assert point.params == point.params_non_embedding < point.params_with_head
    assert point.flops_per_token == 6 * point.params < point.flops_per_token_actual
    assert point.tokens >= porian[point.name].tokens and point.flops_actual > point.flops
    if point.budget == 2e8:
      assert point.tokens > porian[point.name].tokens
    assert abs(point.flops - point.budget) <= 8 * 32 * point.flops_per_token / 2
  sweep.counting = 'chinchilla'
  with pytest.raises(ValueError, match='counting must be one of'):
    sweep_lib.plan(sweep, '/tmp/sweep')


def test_warmup_in_tokens_per_parameter_capped_and_floored(prepared_dir):
  """Porian et al.'s warmup (N tokens), capped at a fraction of the run and at least a few steps; Kaplan et al.'s
  fixed warmup; one rule at a time."""
  sweep = tiny_sweep(prepared_dir)
  sweep.budgets = (2e9,)
  sweep.warmup_fraction = 0.0
  sweep.warmup_tokens_per_param = 1.0
  sweep.warmup_max_fraction = 0.1
  sweep.warmup_min_steps = 3
  for point in sweep_lib.plan(sweep, '/tmp/sweep'):
    steps, warmup = point.overrides['train.steps'], point.overrides['train.warmup_steps']
    wanted = min(round(point.params / 256), math.floor(0.1 * steps))
    assert warmup == max(wanted, 3), (point.name, steps, warmup)
  sweep.warmup_tokens_per_param = 0.0
  sweep.warmup_tokens = 2560.0  # 10 steps of 8 x 32 tokens
  sweep.warmup_max_fraction = 1.0
  assert {p.overrides['train.warmup_steps'] for p in sweep_lib.plan(sweep, '/tmp/sweep')} == {10}
  sweep.warmup_fraction = 0.1
  with pytest.raises(ValueError, match='at most one of warmup_fraction'):
    sweep_lib.plan(sweep, '/tmp/sweep')


def test_batch_per_size_and_sizes_per_budget(prepared_dir):
  sweep = tiny_sweep(prepared_dir)
  sweep.batch_sizes = ((20_000, 4), (1e12, 16))
  sweep.tokens_per_param = ()
  sweep.budget_sizes = ((6e7, (1, 2)), (2e8, (2, 3)))
  points = sweep_lib.plan(sweep, '/tmp/sweep')
  assert [p.name for p in points] == ['C6e7-s1', 'C6e7-s2', 'C2e8-s2', 'C2e8-s3']
  for point in points:
    batch = 4 if point.params_with_head < 20_000 else 16
    assert point.overrides['train.batch_size'] == batch
    assert point.tokens == point.overrides['train.steps'] * batch * 32
  sweep.tokens_per_param = (1.0, 100.0)
  with pytest.raises(ValueError, match='budget_sizes .* or tokens_per_param'):
    sweep_lib.plan(sweep, '/tmp/sweep')


def test_min_steps_lowers_the_batch_and_the_rate_follows_it(prepared_dir):
  """A point whose tokens fill fewer than min_steps steps at its batch trains at fewer rows; with an lr stage and
  lr_batch_exponent, its rate is its size's times (rows / the lr stage's rows)^exponent."""
  sweep = lr_staged_sweep(prepared_dir)
  sweep.budgets = (6e7, 2e8)
  plain = {p.name: p for p in sweep_lib.plan(sweep, '/tmp/sweep', lrs={1: 1e-2, 2: 1e-2, 3: 1e-2})}
  sweep.min_steps = 20
  sweep.lr_batch_exponent = 0.5
  points = sweep_lib.plan(sweep, '/tmp/sweep', lrs={1: 1e-2, 2: 1e-2, 3: 1e-2})
  lowered = 0
  for point in points:
    rows, steps = point.overrides.get('train.batch_size', 8), point.overrides['train.steps']
    before = plain[point.name]
    if before.overrides['train.steps'] >= 20:
      assert rows == 8 and steps == before.overrides['train.steps'], point.name
    else:  # as many rows as leave 20 steps; one row is the least
      lowered += 1
      wanted = point.budget / point.flops_per_token
      assert rows == max(1, int(wanted // (32 * 20))) < 8 and (steps >= 20 or rows == 1), point.name
      assert point.tokens == steps * rows * 32, point.name
      assert abs(point.flops - point.budget) <= 32 * rows * point.flops_per_token / 2, point.name  # the same budget
    if point.stage == 'lr':
      assert point.lr == before.lr  # the stage's own grid, whatever its rows
    else:
      reference = sweep_lib.rows_for(sweep, 8, 0.5 * point.params, 32)
      assert point.lr == pytest.approx(1e-2 * (rows / reference)**0.5, rel=5e-3), point.name
  assert lowered >= 3 and any(p.lr != 1e-2 for p in points if p.stage != 'lr')
  sweep.lr_batch_exponent = 0.0
  assert {p.lr for p in sweep_lib.plan(sweep, '/tmp/sweep', lrs={1: 1e-2, 2: 1e-2, 3: 1e-2})
          if p.stage != 'lr'} == {1e-2}
  for key, value, message in (('min_steps', -1, 'min_steps must be a whole number'),
                              ('min_steps', 2.5, 'min_steps must be a whole number'),
                              ('lr_batch_exponent', 'sqrt', 'lr_batch_exponent must be a number')):
    bad = lr_staged_sweep(prepared_dir)
    bad[key] = value
    with pytest.raises(ValueError, match=message):
      sweep_lib.plan(bad, '/tmp/sweep')
  bad = tiny_sweep(prepared_dir)
  bad.lr_batch_exponent = 0.5
  with pytest.raises(ValueError, match='it needs lr_sweep.sizes'):
    sweep_lib.plan(bad, '/tmp/sweep')


def test_best_lr_and_the_choice_across_sizes():
  lrs = (1e-3, 2e-3, 4e-3, 8e-3)
  # A parabola in log lr with its vertex at 3e-3: found between the grid's rates.
  losses = [3.0 + (math.log(lr) - math.log(3e-3))**2 for lr in lrs]
  assert sweep_lib.best_lr(lrs, losses) == (pytest.approx(3e-3, rel=1e-6), False)
  assert sweep_lib.best_lr(lrs, [4.0, 3.5, 3.2, 3.1]) == (8e-3, True)  # still falling: at the grid's edge
  assert sweep_lib.best_lr(lrs, [None, 3.5, float('nan'), 3.6]) == (2e-3, False)  # diverged points lose
  with pytest.raises(ValueError, match='every learning rate'):
    sweep_lib.best_lr(lrs, [None] * 4)
  # Two sizes whose best rates follow lr = 0.1 N^-0.5: the fit gives every size its rate, within the grid.
  stage = [sweep_lib.Point(name=f'LR-s{s}-lr{lr}', overrides={'train.lr': lr}, params=n, params_total=n,
                           flops_per_token=6.0 * n, tokens=20 * n, budget=None, size=s, stage='lr')
           for s, n in ((1, 10_000), (4, 160_000)) for lr in (1e-4, 3e-4, 1e-3, 3e-3)]
  records = {p.name: dict(eval_loss=3.0 + (math.log(p.lr) - math.log(0.1 * p.params**-0.5))**2) for p in stage}
  others = [sweep_lib.Point(name='C1-s2', overrides={'train.lr': None}, params=40_000, params_total=0,
                            flops_per_token=1.0, tokens=1, budget=1.0, size=2),
            sweep_lib.Point(name='C1-s9', overrides={'train.lr': None}, params=10**9, params_total=0,
                            flops_per_token=1.0, tokens=1, budget=1.0, size=9)]
  assert sweep_lib.choose_lrs(dict(list(records.items())[:-1]), stage + others) is None
  choice = sweep_lib.choose_lrs(records, stage + others)
  assert choice['exponent'] == pytest.approx(-0.5, abs=0.01) and not choice['warnings']
  assert choice['lr'] == {'1': 1e-3, '2': 5e-4, '4': 2.5e-4, '9': 1e-4}  # size 9 kept at the grid's low end
  records['LR-s4-lr0.0001'] = dict(eval_loss=1.0)
  assert 'at the end of the grid' in sweep_lib.choose_lrs(records, stage + others)['warnings'][0]


def lr_staged_sweep(prepared_dir):
  """tiny_sweep with a learning-rate stage: sizes 1 and 3 at three rates, half a token per parameter (24 and 103
  steps), then one budget of 3 sizes at the chosen rates."""
  sweep = tiny_sweep(prepared_dir)
  sweep.budgets = (2e8,)
  sweep.lr_sweep = ml_collections.ConfigDict(dict(sizes=(1, 3), lrs=(3e-3, 1e-2, 3e-2), tokens_per_param=0.5))
  return sweep


def test_repeats_of_a_point_with_other_seeds_form_one_group(prepared_dir):
  """`axes.train.seed`: each point's repeats differ only in their seed, a member key, so `group_size` trains them
  as one vmapped step (each member with its own data stream: tests/test_groups.py)."""
  sweep = tiny_sweep(prepared_dir)
  sweep.axes = ml_collections.ConfigDict(dict(train=dict(seed=(0, 1, 2))))
  sweep.group_size = 3
  points = sweep_lib.plan(sweep, '/tmp/sweep')
  grouped = sweep_lib.groups(points, sweep.group_size)
  assert len(points) == 18 and [len(g) for g in grouped] == [3] * 6
  for members in grouped:
    assert sorted(p.overrides['train.seed'] for p in members) == [0, 1, 2]
    assert len({(p.size, p.budget, p.overrides['train.steps']) for p in members}) == 1


def test_a_finished_point_that_the_sweep_file_now_plans_otherwise_is_an_error(prepared_dir, tmp_path):
  """A sweep file changed after some of its points ran: their results would stand for other points, so the sweep
  refuses to go on until they are moved out (or the sweep gets a new DIR)."""
  sweep = tiny_sweep(prepared_dir)
  workdir = tmp_path / 'sweep'
  workdir.mkdir()
  points = sweep_lib.plan(sweep, str(workdir))
  record = dict(name=points[0].name, eval_loss=5.0, overrides=dict(points[0].overrides, **{
      'data.prepared_dir': '/elsewhere', 'train.log_every': 1}))  # machine paths and logging are not the experiment
  (workdir / 'results.jsonl').write_text(json.dumps(record) + '\n')
  sweep_lib.check_plans(points, sweep_lib.read_done(str(workdir)))  # planned as it trained
  sweep.overrides.train.batch_size = 4
  with pytest.raises(ValueError, match=rf'{points[0].name} \(train.batch_size: 8 committed, 4 now; train.steps'):
    sweep_lib.run(sweep, str(workdir))
  assert not (workdir / points[1].name).exists()  # nothing trained


@pytest.mark.slow
def test_lr_stage_chooses_the_rates_the_isoflop_points_train_at(prepared_dir, tmp_path):
  sweep = lr_staged_sweep(prepared_dir)
  workdir = str(tmp_path / 'sweep')
  points = sweep_lib.plan(sweep, workdir)
  assert [p.stage for p in points] == ['lr'] * 6 + ['isoflop'] * 3
  assert all(p.lr is None for p in points[6:])
  with pytest.raises(ValueError, match='lr stage'):
    sweep_lib.run(sweep, workdir, only=('C2e8-s2',))
  first = sweep_lib.run(sweep, workdir, only=tuple(p.name for p in points[:3]))  # stopped part-way
  assert len(first) == 3 and not os.path.exists(os.path.join(workdir, 'lr.json'))
  table, commands = sweep_lib.emit_plan(sweep, workdir)
  assert '(lr stage)' in table and len(commands) == 3  # the other lr points; the IsoFLOP ones wait
  records = {r['name']: r for r in sweep_lib.run(sweep, workdir)}
  assert len(records) == 9
  with open(os.path.join(workdir, 'lr.json')) as f:
    choice = json.load(f)
  assert set(choice['lr']) == {'1', '2', '3'} and choice['anchors'][0]['size'] == 1
  for point in points[6:]:
    record = records[point.name]
    assert record['stage'] == 'isoflop' and record['lr'] == record['overrides']['train.lr'] == choice['lr'][
        str(point.size)]
    assert 3e-3 <= record['lr'] <= 3e-2
  fitted = scaling.fit(list(records.values()), bootstrap=0)
  assert fitted['points'] == 3 and sum('learning-rate stage' in x['reason'] for x in fitted['excluded']) == 6
  # A finished IsoFLOP point whose rate is no longer the choice (the lr stage's results changed) is an error.
  lines = read_lines(os.path.join(workdir, 'results.jsonl'))
  best = 3e-3 if choice['lr']['1'] > 3e-3 else 3e-2
  for line in lines:
    if line['name'].startswith('LR-'):
      line['eval_loss'] = 1.0 if line['lr'] == best else 9.0
  with open(os.path.join(workdir, 'results.jsonl'), 'w') as f:
    f.write(''.join(json.dumps(line) + '\n' for line in lines))
  with pytest.raises(ValueError, match='chooses other rates than some finished points'):
    sweep_lib.run(sweep, workdir)


def test_points_that_differ_only_in_lr_form_groups_with_a_shared_estimate(prepared_dir):
  """With group_size, the lr stage's points of one size train as one group (and share its time in the plan:
  its FLOPs, or its steps once); other points stay alone."""
  sweep = lr_staged_sweep(prepared_dir)
  points = sweep_lib.plan(sweep, '/tmp/sweep')
  names = lambda groups: [[p.name for p in g] for g in groups]
  assert names(sweep_lib.groups(points, 0)) == [[p.name] for p in points]
  grouped = names(sweep_lib.groups(points, 3))
  assert grouped[:2] == [[p.name for p in points[:3]], [p.name for p in points[3:6]]]
  assert grouped[2:] == [[p.name] for p in points[6:]]
  assert [len(g) for g in sweep_lib.groups(points, 2)][:4] == [2, 1, 2, 1]
  estimate = dict(mfu=0.5, peak_flops=1e12, compile_s=30.0, overhead_s=5.0, step_s=1.0)  # step-bound
  alone, together = sweep_lib.schedule(points, estimate), sweep_lib.schedule(points, estimate, group_size=3)
  steps = points[0].overrides['train.steps']
  assert [t for _, t in alone[:3]] == pytest.approx([steps + 5.0 + 30.0, steps + 5.0, steps + 5.0])
  assert [t for _, t in together[:3]] == pytest.approx([(steps + 5.0) / 3 + 30.0, (steps + 5.0) / 3,
                                                        (steps + 5.0) / 3])
  # Alone, sizes 1 and 3 reuse the step the lr stage compiled; in groups, the lr stage compiled a vmapped one.
  assert [t for _, t in together[6:]] == pytest.approx([p.overrides['train.steps'] + 5.0 + 30.0 for p in points[6:]])
  sweep.group_size = -1
  with pytest.raises(ValueError, match='group_size'):
    sweep_lib.plan(sweep, '/tmp/sweep')


@pytest.mark.slow
def test_an_lr_stage_trained_in_groups_records_what_its_points_give_alone(prepared_dir, tmp_path, monkeypatch):
  """The lr stage's points of one size, trained as one group, record what each gives alone. A sweep lists its
  corpus's files once (each glob expanded once), not once or more per point."""
  from qwenjax import documents  # pylint: disable=g-import-not-at-top
  sweep = lr_staged_sweep(prepared_dir)
  names = tuple(p.name for p in sweep_lib.plan(sweep, str(tmp_path))[:3])  # size 1 at three rates
  globs = []
  original = documents.glob.glob
  monkeypatch.setattr(documents.glob, 'glob', lambda pattern, **kw: globs.append(pattern) or original(pattern, **kw))
  alone = {r['name']: r for r in sweep_lib.run(sweep, str(tmp_path / 'alone'), only=names)}
  data = sweep.overrides.data
  assert [g for g in globs if g in (data.train_files, data.eval_files)] == [data.train_files, data.eval_files]
  sweep.group_size = 4
  grouped = {r['name']: r for r in sweep_lib.run(sweep, str(tmp_path / 'grouped'), only=names)}
  assert sorted(grouped) == sorted(alone) == sorted(names)
  for name in names:
    assert grouped[name]['group'] == list(names) and 'group' not in alone[name]
    assert grouped[name]['eval_loss'] == pytest.approx(alone[name]['eval_loss'], rel=1e-5)
    assert grouped[name]['lr'] == alone[name]['lr'] and grouped[name]['steps'] == alone[name]['steps']
  assert len(sweep_lib.run(sweep, str(tmp_path / 'grouped'), only=names)) == 3  # finished: nothing retrained


@pytest.mark.slow
def test_a_sweep_refuses_to_resume_under_other_code(prepared_dir, tmp_path, monkeypatch):
  """Each result records the code that trained it; a started sweep refuses other sources or another jax (naming
  the files), or with allow_code_change goes on and records the change."""
  sweep = tiny_sweep(prepared_dir)
  sweep.ladder.sizes = (1,)
  workdir = str(tmp_path / 'sweep')
  sweep_lib.run(sweep, workdir, only=('C6e7-s1',))
  code = sweep_lib.code_version()
  (record,) = read_lines(os.path.join(workdir, 'results.jsonl'))
  assert record['code'] == {k: code[k] for k in ('source', 'commit', 'dirty', 'jax', 'jaxlib')}
  with open(os.path.join(workdir, 'sweep.json')) as f:
    assert json.load(f)['code']['files']['qwenjax/sweep.py'] == code['files']['qwenjax/sweep.py']

  changed = dict(code, source='0' * 16, files=dict(code['files'], **{'qwenjax/train_step.py': 'edited'}))
  monkeypatch.setattr(sweep_lib, 'code_version', lambda root=None: changed)
  with pytest.raises(sweep_lib.CodeVersionError, match='qwenjax/train_step.py.*1 finished point'):
    sweep_lib.run(sweep, workdir)
  assert len(read_lines(os.path.join(workdir, 'results.jsonl'))) == 1  # nothing trained
  monkeypatch.setattr(sweep_lib, 'code_version', lambda root=None: dict(code, jax='0.0.1'))
  with pytest.raises(sweep_lib.CodeVersionError, match='jax .* -> 0.0.1'):
    sweep_lib.run(sweep, workdir)
  monkeypatch.setattr(sweep_lib, 'code_version', lambda root=None: changed)
  assert len(sweep_lib.run(sweep, workdir, allow_code_change=True)) == 2
  with open(os.path.join(workdir, 'sweep.json')) as f:
    (change,) = json.load(f)['code_history']
  assert change['after']['source'] == '0' * 16 and 'qwenjax/train_step.py' in change['differences'][0]
  fitted = scaling.fit(scaling.read_results(workdir), bootstrap=0)
  assert fitted['code_versions'] and not fitted['quality']['one_code_version']['passed']


def test_code_version_hashes_the_sources(tmp_path):
  for name, text in (('qwenjax/a.py', 'x = 1\n'), ('qwenjax/kernels/b.py', 'y = 2\n'), ('configs/c.py', '')):
    os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
    (tmp_path / name).write_text(text)
  first = sweep_lib.code_version(str(tmp_path))
  assert sorted(first['files']) == ['configs/c.py', 'qwenjax/a.py', 'qwenjax/kernels/b.py']
  assert first['commit'] is None and first['dirty'] is None  # a copy of the tree without git
  (tmp_path / 'qwenjax/kernels/b.py').write_text('y = 3\n')
  second = sweep_lib.code_version(str(tmp_path))
  assert second['source'] != first['source']
  assert sweep_lib.code_changes(first, second) == ['files qwenjax/kernels/b.py']
  repo = sweep_lib.code_version()  # this checkout: a git worktree
  assert repo['commit'] and len(repo['commit']) == 40 and isinstance(repo['dirty'], bool)
  # A copy of the tree inside another checkout (as a study's pinned code travels inside the repository) is not
  # that checkout's commit; at the checkout's top the commit is found.
  git = ['git', '-C', str(tmp_path), '-c', 'user.name=t', '-c', 'user.email=t@t']
  subprocess.run(git + ['init', '-q'], check=True)
  subprocess.run(git + ['add', '.'], check=True)
  subprocess.run(git + ['commit', '-q', '-m', 'tree'], check=True)
  for folder in ('qwenjax', 'configs'):
    shutil.copytree(tmp_path / folder, tmp_path / 'copy' / folder)
  copy = sweep_lib.code_version(str(tmp_path / 'copy'))
  assert copy['source'] == second['source'] and copy['commit'] is None and copy['dirty'] is None
  top = sweep_lib.code_version(str(tmp_path))
  assert top['source'] == second['source'] and len(top['commit']) == 40 and top['dirty'] is False


@pytest.mark.slow
def test_check_reruns_a_committed_point(prepared_dir, tmp_path):
  """A committed point rerun gives its eval loss again (within 0.02); a record that says otherwise, or was
  planned otherwise, fails the check."""
  sweep = tiny_sweep(prepared_dir)
  sweep.ladder.sizes = (1,)
  committed = str(tmp_path / 'committed')
  sweep_lib.run(sweep, committed, only=('C6e7-s1',))
  rows = sweep_lib.check(sweep, str(tmp_path / 'rerun'), committed, ['C6e7-s1'])
  assert rows[0]['ok'] and abs(rows[0]['difference']) <= 1e-3 and not rows[0]['plan_differences']
  assert 'check: 1 of 1 point(s) reproduce' in sweep_lib.check_report(rows)
  lines = read_lines(os.path.join(committed, 'results.jsonl'))
  lines[0]['eval_loss'] += 0.05
  lines[0]['overrides']['train.steps'] += 1
  with open(os.path.join(committed, 'results.jsonl'), 'w') as f:
    f.write(json.dumps(lines[0]) + '\n')
  rows = sweep_lib.check(sweep, str(tmp_path / 'rerun'), committed, ['C6e7-s1'])  # the rerun is kept: no training
  assert not rows[0]['ok'] and rows[0]['difference'] == pytest.approx(-0.05, abs=1e-3)
  assert rows[0]['plan_differences'] == [f'train.steps: {lines[0]["overrides"]["train.steps"]} committed, '
                                         f'{lines[0]["overrides"]["train.steps"] - 1} now']
  report = sweep_lib.check_report(rows)
  assert 'DIFFERS' in report and '1 do not' in report
  with pytest.raises(ValueError, match='not there'):
    sweep_lib.check(sweep, str(tmp_path / 'rerun'), committed, ['C2e8-s1'])


def test_plan_table_estimates_time_and_cuts_pieces_at_budgets(prepared_dir):
  sweep = tiny_sweep(prepared_dir)
  points = sweep_lib.plan(sweep, '/tmp/sweep')
  estimate = dict(mfu=0.5, peak_flops=1e6, compile_s=30.0, overhead_s=5.0, step_s=0.0)
  timing = sweep_lib.schedule(points, estimate)
  for p, (piece, seconds) in zip(points, timing):
    compiles = 30.0 if p.budget == 6e7 else 0.0  # one program per size, compiled at its first budget
    assert piece == 0 and seconds == pytest.approx(p.flops_actual / 5e5 + 5.0 + compiles)
  first, second = sum(t for _, t in timing[:3]), sum(t for _, t in timing[3:]) + 90.0  # a new piece compiles again
  limit = max(first, second) + 1.0
  cut = sweep_lib.schedule(points, estimate, piece_seconds=limit)
  assert [piece for piece, _ in cut] == [0, 0, 0, 1, 1, 1]  # a whole budget a piece
  assert sum(t for _, t in cut[3:]) == pytest.approx(second)
  assert [piece for piece, _ in sweep_lib.schedule(points, estimate, piece_seconds=second - 1.0)][3:] == [1, 1, 2]
  table = sweep_lib.plan_table(points, done={'C6e7-s1': dict(eval_loss=4.25)}, estimate=estimate,
                               piece_seconds=limit)
  lines = table.splitlines()
  assert lines[0].split() == ['piece', 'name', 'N', 'D', 'D/N', 'batch', 'steps', 'warmup', 'lr', 'epochs', 'C',
                              'est.', 's', 'eval', 'loss']
  assert lines[1].split()[:2] == ['1', 'C6e7-s1'] and lines[1].split()[-1] == '4.2500'
  assert lines[7].startswith('piece 1: 3 points (2 to run)') and '--only=C6e7-s1,C6e7-s2,C6e7-s3' in lines[7]
  assert lines[9].startswith('total: 6 points')


def load_sweep(name: str) -> ml_collections.ConfigDict:
  return experiment_module(name).get_config()


@pytest.mark.slow
@pytest.mark.parametrize('name', ['isoflop_gpu.py', 'isoflop_gpu_kaplan.py'])
def test_gpu_studies_meet_the_issue(name):
  """Issue 35's study: 4 budgets or more over a factor of 30 up to 3e16 FLOPs, 5 sizes or more a budget, the
  largest model over 50M non-embedding parameters, no point over 4 epochs of the corpus (the .py files' 139.1M
  tokens and the extra file's standard library, about 10M), 4096 steps or more a point, pieces of at most 8
  minutes at the file's estimate.
  The main study brackets D / N = 20 at every budget and chooses its learning rates in an lr stage; the ablation
  counts as Kaplan et al., with one learning rate and a long warmup."""
  sweep = load_sweep(name)
  points = sweep_lib.plan(sweep, '/tmp/sweep')
  isoflop = [p for p in points if p.stage == 'isoflop']
  budgets = sorted({p.budget for p in isoflop})
  assert len(budgets) >= 4 and budgets[-1] >= 3e16 and budgets[-1] / budgets[0] >= 30
  assert max(p.params_non_embedding for p in isoflop) >= 50e6
  assert max(p.tokens for p in points) <= 4 * 149e6
  assert min(p.overrides['train.steps'] for p in points) >= sweep.min_steps >= 4096  # no point starved of updates
  for budget in budgets:
    ratios = [p.tokens / p.params for p in isoflop if p.budget == budget]
    assert len(ratios) >= 5, budget
    if sweep.counting == 'porian':
      assert sum(r > 20 for r in ratios) >= 2 and sum(r < 20 for r in ratios) >= 2, (budget, ratios)
  for piece, seconds in sweep_lib.schedule(points, sweep.estimate, piece_seconds=480.0):
    assert seconds <= 480.0
  if sweep.counting == 'porian':
    assert sweep.lr_sweep.sizes and len(sweep.lr_sweep.lrs) >= 4 and sweep.overrides.train.adam_b2 == 0.99
    assert all(p.lr is None for p in isoflop) and {p.overrides['train.lr'] for p in points if p.stage == 'lr'}
    assert all(p.overrides['train.warmup_steps'] <= 0.1 * p.overrides['train.steps'] + 1 for p in isoflop)
    # Each size trains at its lr stage's batch (its tokens in min_steps steps, 256 rows at most) or fewer rows, so
    # that no point takes a rate above its size's measured best; the committed points are this plan's.
    results = os.path.join(ROOT, 'experiments', 'results', 'isoflop_gpu')
    with open(os.path.join(results, 'lr.json')) as f:
      rates = {int(size): float(lr) for size, lr in json.load(f)['lr'].items()}
    chosen = sweep_lib.plan(sweep, '/tmp/sweep', lrs=rates)
    seq_len = sweep.overrides.data.seq_len
    for p in chosen:
      lr_rows = min(256, int(sweep.lr_sweep.tokens_per_param * p.params // (seq_len * sweep.min_steps)))
      assert sweep_lib._batch_size(sweep, p.params_with_head) == lr_rows, p.name  # pylint: disable=protected-access
      assert p.overrides['train.batch_size'] <= lr_rows, p.name
      assert p.stage == 'lr' or p.lr <= rates[p.size] * (1 + 1e-9), p.name
    if name == 'isoflop_gpu.py':
      sweep_lib.check_plans(chosen, sweep_lib.read_done(results))
  else:
    assert sweep.counting == 'kaplan' and not sweep.get('lr_sweep') and sweep.warmup_tokens >= 1e7
    # Its one rate: the grid rate with the lowest mean eval loss over the main study's committed lr stage.
    with open(os.path.join(ROOT, 'experiments', 'results', 'isoflop_gpu', 'lr.json')) as f:
      anchors = json.load(f)['anchors']
    rates = anchors[0]['losses']
    best = min(rates, key=lambda r: sum(a['losses'][r] for a in anchors) / len(anchors))
    assert {p.lr for p in isoflop} == {float(best)} and sweep.overrides.train.adam_b2 == 0.95


def test_the_cpu_check_of_the_square_root_rule_pairs_its_points():
  """experiments/lr_batch_cpu.py: the pairs its docstring reads, same steps at 4x the batch and tokens, same tokens
  at 4x the batch, each over the same six rates."""
  points = sweep_lib.plan(load_sweep('lr_batch_cpu.py'), '/tmp/sweep')
  steps = {}
  for p in points:
    steps.setdefault((p.tokens, p.overrides['train.batch_size']), set()).add(p.overrides['train.steps'])
  assert len(points) == 24 and {p.lr for p in points} == {1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2}
  assert steps == {(2**19, 4): {1024}, (2**21, 16): {1024}, (2**21, 4): {4096}, (2**19, 16): {256}}


@pytest.mark.slow
@pytest.mark.parametrize('name', ['C3e16-s20', 'C1e16-s15', 'C3e15-s5'])
def test_the_lr_check_trains_a_study_point_at_half_its_rate_to_four_times_it(name):
  """experiments/isoflop_gpu_lrcheck.py: the named point of the study, planned as the study plans it (the rate from
  the committed lr stage, scaled to its batch), at 1/2, 1, 2 and 4 times that rate, as one group."""
  module = experiment_module('isoflop_gpu_lrcheck.py')
  with open(os.path.join(ROOT, 'experiments', 'results', 'isoflop_gpu', 'lr.json')) as f:
    rates = {int(size): float(lr) for size, lr in json.load(f)['lr'].items()}
  (studied,) = [p for p in sweep_lib.plan(load_sweep('isoflop_gpu.py'), '/tmp/sweep', lrs=rates) if p.name == name]
  check = module.get_config(name)
  points = sweep_lib.plan(check, '/tmp/sweep')
  got = sorted(p.lr for p in points)
  assert got == pytest.approx([studied.lr / 2, studied.lr, studied.lr * 2, studied.lr * 4], rel=5e-3)
  for p in points:
    assert {k: v for k, v in p.overrides.items() if k != 'train.lr'} == \
        {k: v for k, v in studied.overrides.items() if k != 'train.lr'}
    assert (p.tokens, p.params, p.budget) == (studied.tokens, studied.params, studied.budget)
  assert len(sweep_lib.groups(points, check.group_size)) == 1  # one vmapped step for the four
  with pytest.raises(ValueError, match='not an IsoFLOP point'):
    module.get_config('LR-s5-lr0.004')


@pytest.mark.slow
def test_the_second_studys_edges_train_the_next_rate_out_of_each_unbracketed_point(tmp_path, monkeypatch):
  """experiments/isoflop_gpu2_edges.py:F: every point of the study whose best rate so far is its grid's lowest
  (highest) and whose next rate out, half the lowest (twice the highest) tried, is F x the rule's, planned as the
  study plans it but for the rate; a round's results move the next rate out; a factor no point needs is an error
  naming the factors that are."""
  module = experiment_module('isoflop_gpu2_edges.py')
  study = {p.name: p for p in sweep_lib.plan(load_sweep('isoflop_gpu2.py'), '/tmp/sweep')}
  losses = {'C1e15-s4': (2.5, 2.6, 3.2), 'C1e16-s15': (2.2, 2.1, 2.05), 'C1e16-s8': (2.0, 1.96, 2.0)}

  def record(name, loss):
    p = study[name]
    return dict(name=name, stage=p.stage, budget=p.budget, params=p.params, tokens=p.tokens, lr=p.lr, eval_loss=loss)

  def put(directory, records):
    directory.mkdir(parents=True)
    (directory / 'results.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))

  rows = [record(f'{point}-lrx{f}', loss) for point, ls in losses.items() for f, loss in zip(('0.5', '1', '2'), ls)]
  monkeypatch.setattr(module, 'STUDY', str(tmp_path / 'study'))
  monkeypatch.setattr(module, 'ROUNDS', str(tmp_path / 'rounds'))
  put(tmp_path / 'study', rows)
  low = sweep_lib.plan(module.get_config('0.25'), '/tmp/sweep')
  assert [p.name for p in low] == ['C1e15-s4-lrx0.25']
  same = lambda p: ({k: v for k, v in p.overrides.items() if k != 'train.lr'}, p.tokens, p.params, p.budget)
  assert same(low[0]) == same(study['C1e15-s4-lrx0.5'])
  assert low[0].lr == pytest.approx(study['C1e15-s4-lrx1'].lr / 4, rel=5e-3)
  (high,) = sweep_lib.plan(module.get_config('4'), '/tmp/sweep')
  assert high.name == 'C1e16-s15-lrx4' and same(high) == same(study['C1e16-s15-lrx2'])
  with pytest.raises(ValueError, match=r'needs the rate factor 8; .* need: 0.25 \(C1e15-s4\), 4 \(C1e16-s15\)'):
    module.get_config('8')
  put(tmp_path / 'rounds' / '4', [dict(record('C1e16-s15-lrx2', 2.04), name=high.name, lr=high.lr)])
  assert [p.name for p in sweep_lib.plan(module.get_config('8'), '/tmp/sweep')] == ['C1e16-s15-lrx8']
  with pytest.raises(ValueError, match='takes the rate factor to train'):
    module.get_config('')


def test_lr_rule_and_factors_train_each_point_at_several_rates_in_one_group(prepared_dir):
  """lr_rule gives each size k N^gamma; lr_factors trains every point at each factor times that, named -lrx<f>,
  the factors of a point one group; the checks name conflicting or malformed settings."""
  sweep = tiny_sweep(prepared_dir)
  sweep.lr_rule = (2.0, -0.5)
  plain = sweep_lib.plan(sweep, '/tmp/sweep')
  for p in plain:
    assert p.lr == float(f'{2.0 * p.params ** -0.5:.3g}'), p.name
  sweep.lr_factors = (0.5, 1.0, 2.0)
  sweep.group_size = 3
  points = sweep_lib.plan(sweep, '/tmp/sweep')
  assert len(points) == 3 * len(plain)
  by_name = {p.name: p for p in points}
  for p in plain:
    rates = [by_name[f'{p.name}-lrx{f}'].lr for f in ('0.5', '1', '2')]
    assert rates == [float(f'{p.lr * f:.3g}') for f in (0.5, 1.0, 2.0)], p.name
    for f in ('0.5', '1', '2'):
      q = by_name[f'{p.name}-lrx{f}']
      assert (q.tokens, q.params, q.budget) == (p.tokens, p.params, p.budget)
  groups = sweep_lib.groups(points, sweep.group_size)
  assert len(groups) == len(plain) and all(len({p.tokens for p in g}) == 1 and len(g) == 3 for g in groups)
  no_rule = tiny_sweep(prepared_dir)
  no_rule.lr_factors = (1.0, 3.0)  # without a rule: train.lr (1e-2) times each factor
  assert sorted({p.lr for p in sweep_lib.plan(no_rule, '/tmp/sweep')}) == [1e-2, 3e-2]
  for key, value, message in (('lr_rule', (2.0,), r'lr_rule is \(k, gamma\)'),
                              ('lr_rule', (-1.0, -0.5), r'lr_rule is \(k, gamma\)'),
                              ('lr_factors', (1.0, 1.0), 'lr_factors must be distinct positive numbers'),
                              ('lr_factors', (0.0, 1.0), 'lr_factors must be distinct positive numbers')):
    bad = tiny_sweep(prepared_dir)
    bad[key] = value
    with pytest.raises(ValueError, match=message):
      sweep_lib.plan(bad, '/tmp/sweep')
  bad = lr_staged_sweep(prepared_dir)
  bad.lr_rule = (2.0, -0.5)
  with pytest.raises(ValueError, match='lr_rule and lr_sweep both choose'):
    sweep_lib.plan(bad, '/tmp/sweep')
  bad = tiny_sweep(prepared_dir)
  bad.lr_factors = (1.0, 2.0)
  bad.axes = ml_collections.ConfigDict(dict(train=dict(lr=(1e-3, 1e-2))))
  with pytest.raises(ValueError, match='axes.train.lr and lr_factors both set'):
    sweep_lib.plan(bad, '/tmp/sweep')


@pytest.mark.slow
def test_the_second_gpu_study_is_the_first_with_three_rates_a_point_and_a_clean_eval_set():
  """experiments/isoflop_gpu2.py: the first study's IsoFLOP points (same shapes, batches, steps, warmups, data), a
  size more at 1e16 and 3e16 and a budget more below them (3e14, sizes 3-8), each at 1/2, 1 and 2x the first lr
  stage's rule without the batch scaling, as one group of three that two one-process pieces of 555 seconds on one
  machine cover at the file's estimate (the first checkpoints it, the second resumes it); eval documents with a
  fifth of their lines in training left out."""
  first, second = load_sweep('isoflop_gpu.py'), load_sweep('isoflop_gpu2.py')
  with open(os.path.join(ROOT, 'experiments', 'results', 'isoflop_gpu', 'lr.json')) as f:
    stage = json.load(f)
  assert second.lr_rule == pytest.approx((stage['coefficient'], stage['exponent']), rel=1e-3)
  before = {p.name: p for p in sweep_lib.plan(first, '/tmp/sweep', lrs={int(k): v for k, v in stage['lr'].items()})
            if p.stage == 'isoflop'}
  points = sweep_lib.plan(second, '/tmp/sweep')
  added = {p.name.rsplit('-lrx', 1)[0] for p in points} - set(before)
  below = {f'C3e14-s{s}' for s in range(3, 9)}  # a budget below the others
  assert added == {'C1e16-s6', 'C3e16-s9'} | below  # and a size below the minima at 1e16 and 3e16
  assert len(points) == 3 * (len(before) + 8) and all(p.stage == 'isoflop' for p in points)
  ladder = {p.size: p for p in before.values()}
  for p in points:
    name, factor = p.name.rsplit('-lrx', 1)
    old = before.get(name)
    assert p.lr == pytest.approx(float(factor) * second.lr_rule[0] * p.params ** second.lr_rule[1], rel=1e-2)
    same = lambda o: {k: v for k, v in o.items() if k not in ('train.lr', 'data.decontaminate')}
    if old is None and p.size in ladder:  # an added size: the first study's shape of that size, within 4 epochs
      assert p.params == ladder[p.size].params and p.tokens <= 4 * 190.7e6, p.name
      continue
    if old is None:  # the ladder's next size down, 2 layers of width 96
      assert name == 'C3e14-s3' and p.overrides['model.hidden_size'] == 96 and p.params < ladder[4].params
      continue
    assert same(p.overrides) == same(old.overrides), p.name
    assert p.overrides['data.decontaminate'] == 0.2
  groups = sweep_lib.groups(points, second.group_size)
  assert len(groups) == len(before) + 8
  assert all(sorted(p.lr for p in g)[-1] > sorted(p.lr for p in g)[0] for g in groups)
  timed = sweep_lib.schedule(points, second.estimate, group_size=second.group_size)
  seconds = {p.name: t for p, (_, t) in zip(points, timed)}
  for g in groups:  # two one-process pieces of 600-second device calls (555 s each) cover it at the file's estimate
    assert sum(seconds[p.name] for p in g) <= 2 * 555.0, [p.name for p in g]
