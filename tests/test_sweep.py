"""Sweeps end to end on the CPU: planning, a 6-point IsoFLOP sweep run in two halves, the fit, and --emit."""

import json
import os
import shlex
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
    # Tied embeddings: N leaves out the one table; a 1-layer model's N is its layer alone.
    hidden, mlp = model.hidden_size, model.intermediate_size
    layer = 4 * hidden * hidden + 3 * hidden + 3 * hidden * mlp + 2 * hidden  # q,k,v,o + qkv biases, mlp, norms
    assert point.params == layer + hidden  # + the final norm
    assert point.params_total == point.params + 512 * hidden
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
