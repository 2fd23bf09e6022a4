r"""Scaling-law sweeps: `python -m qwenjax.sweep --sweep=experiments/isoflop_small.py --workdir=DIR`.

A sweep file's `get_config()` returns an ml-collections config with

* `base`: the training config every point starts from (e.g. 'configs/tiny.py'; relative to the working
  directory or to the repository).
* `overrides`: nested sections (`overrides.train.batch_size = 32`) applied to every point.
* `ladder`: model shapes from a size knob `s` in `ladder.sizes`, by these rules:
    hidden_size         = ladder.width_per_size * s
    num_hidden_layers   = ladder.depth, or when that is 0, ladder.depth_per_size * s rounded half up (default 1):
                          a constant aspect ratio hidden / layers
    num_attention_heads = hidden_size / ladder.head_dim rounded half up, at least 1 (head_dim fixed across the
                          ladder, so the GPU's flash kernel (head_dim 64 or 128) serves every size; the attention's
                          inner width heads x head_dim may differ from hidden_size by up to head_dim / 2)
    num_key_value_heads = heads / ladder.q_per_kv, at least 1
    intermediate_size   = ladder.mlp_ratio * hidden_size, rounded up to a multiple of 64
* `budgets`: IsoFLOP compute budgets C in FLOPs. Each size then trains on D = C / flops_per_token tokens
  (`qwenjax.metrics.flops_per_token`: 6 x the multiplied weights plus attention, as MFU counts them), rounded to
  whole steps. `tokens_per_param = (lo, hi)` keeps, per budget, the sizes with lo <= D / N <= hi. Or `tokens`:
  fixed token budgets D for every size (no IsoFLOP fit, but approach 3 still fits).
* `axes`: any other config values to sweep (`axes.train.lr = (1e-3, 3e-3)`): every combination is a point.
* `warmup_fraction`: the warmup as a fraction of each point's steps (0: the base's warmup_steps).
* `max_epochs`: a point that would see the training corpus more often than this is an error at planning time.

Every point is trained by `qwenjax.train.train_and_evaluate` (the code of `python -m qwenjax.train`) in
`DIR/<name>/`, evaluated once at its end. All points share the tokenizer and the tokenized corpus
(`data.prepared_dir`, by default `DIR/prepared`) and one compilation cache (`DIR/compilation_cache`). Each
finished point appends one line to `DIR/results.jsonl`: `name`, `params` (non-embedding parameters: the N of the
fits), `params_total`, `tokens` (D), `flops` (C spent: tokens x flops_per_token), `budget`, `eval_loss` (final),
`overrides` (the point's config values), and `epochs`, `mfu`, `tokens_per_sec`, `seconds`. Running the same
command again skips finished points and resumes an interrupted one from its last checkpoint.

`--emit` prints one `python -m qwenjax.train ...` command per unfinished point instead (for a cluster queue),
after preparing the shared tokenizer and corpus.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shlex
import statistics
import time
from typing import Any, Iterator, Mapping

from absl import flags
from absl import logging
from etils import epath
import jax
import ml_collections
from ml_collections import config_flags

from qwenjax import checkpoint
from qwenjax import cli
from qwenjax import config as config_lib
from qwenjax import data
from qwenjax import distributed
from qwenjax import metrics as metrics_lib
from qwenjax import scaling
from qwenjax import train
from qwenjax import workdir as workdir_lib
from qwenjax.model_config import ModelConfig
from qwenjax.params import count_params

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Point:
  """One training run of a sweep."""
  name: str
  overrides: dict[str, Any]  # dotted config key -> value, on top of the base config
  params: int  # non-embedding parameters
  params_total: int
  flops_per_token: float
  tokens: int
  budget: float | None
  size: int
  epochs: float | None = None

  @property
  def flops(self) -> float:
    return self.tokens * self.flops_per_token


def ladder_shape(size: int, ladder: Mapping[str, Any]) -> dict[str, int]:
  """The model fields of ladder size `size` (rules in the module docstring)."""
  head_dim, width = int(ladder['head_dim']), int(ladder['width_per_size']) * int(size)
  heads = max(1, math.floor(width / head_dim + 0.5))
  kv_heads = max(1, heads // int(ladder['q_per_kv']))
  if heads % kv_heads:
    raise ValueError(f'ladder size {size}: {heads} heads do not split into groups of q_per_kv={ladder["q_per_kv"]}')
  depth = int(ladder.get('depth', 0)) or max(1, math.floor(float(ladder.get('depth_per_size', 1.0)) * size + 0.5))
  return dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
              num_key_value_heads=kv_heads, head_dim=head_dim,
              intermediate_size=64 * math.ceil(float(ladder['mlp_ratio']) * width / 64))


def non_embedding_params(model_config: ModelConfig) -> int:
  """Parameters outside the embedding table and the output head (Kaplan et al.'s N)."""
  tables = 1 if model_config.tie_word_embeddings else 2
  return count_params(model_config) - tables * model_config.vocab_size * model_config.hidden_size


def flatten(section: Mapping[str, Any] | ml_collections.ConfigDict, prefix: str = '') -> dict[str, Any]:
  """Nested sections -> {'train.lr': value, ...}."""
  out = {}
  for key, value in section.items():
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted keys on a copy of `config`; an unknown key is an error naming the section's keys."""
  config = config.copy_and_resolve_references()
  for dotted, value in overrides.items():
    node, parts = config, dotted.split('.')
    for depth, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        section = '.'.join(parts[:depth]) or 'the config'
        keys = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise KeyError(f'sweep override {dotted}: {section} has no key {part!r} (its keys: {", ".join(keys)})')
      if depth < len(parts) - 1:
        node = node[part]
    node[parts[-1]] = value
  return config


def resolve_base(path: str) -> str:
  for candidate in (path, os.path.join(_REPO, path)):
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(f'sweep base config {path!r} not found (looked in {os.getcwd()} and {_REPO}); set '
                          'sweep.base to a config file such as configs/tiny.py')


def _number(value: float) -> str:
  """1e+15 -> '1e15', 3e-03 -> '0.003': short, filesystem-safe."""
  text = f'{value:.3g}'
  return text.replace('e+', 'e').replace('e0', 'e').replace('e-0', 'e-')


def _axis_values(axes: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
  flat = flatten(axes)
  for values in itertools.product(*(tuple(v) for v in flat.values())):
    yield dict(zip(flat, values))


SWEEP_KEYS = ('base', 'overrides', 'ladder', 'budgets', 'tokens', 'tokens_per_param', 'axes', 'warmup_fraction',
              'max_epochs')
LADDER_KEYS = ('sizes', 'width_per_size', 'depth', 'depth_per_size', 'head_dim', 'q_per_kv', 'mlp_ratio')
_LADDER_NEEDED = ('sizes', 'width_per_size', 'head_dim', 'q_per_kv', 'mlp_ratio')


def check_sweep(sweep: ml_collections.ConfigDict) -> None:
  """A ValueError naming a misspelt or missing key or a value out of range (see the module docstring)."""
  unknown = sorted(set(sweep) - set(SWEEP_KEYS))
  if unknown:
    raise ValueError(f'unknown sweep key(s) {unknown}: a sweep has {", ".join(SWEEP_KEYS)}')
  if 'base' not in sweep or 'ladder' not in sweep:
    raise ValueError('a sweep needs base (the training config) and ladder (the model sizes)')
  ladder = sweep.ladder
  unknown = sorted(set(ladder) - set(LADDER_KEYS))
  missing = [k for k in _LADDER_NEEDED if k not in ladder]
  if unknown or missing:
    raise ValueError(f'ladder: unknown key(s) {unknown}, missing {missing}; a ladder has {", ".join(LADDER_KEYS)}')
  for key in ('sizes', 'budgets', 'tokens'):
    values = sweep.get(key, ()) if key != 'sizes' else ladder.sizes
    if isinstance(values, (int, float)) or not all(isinstance(v, (int, float)) and v > 0 for v in values):
      raise ValueError(f'{"ladder." if key == "sizes" else ""}{key} must be a tuple of positive numbers, '
                       f'got {values!r}')
  for key in ('width_per_size', 'head_dim', 'q_per_kv', 'mlp_ratio'):
    if not float(ladder[key]) > 0:
      raise ValueError(f'ladder.{key} must be positive, got {ladder[key]!r}')
  for path, values in flatten(sweep.get('axes', {})).items():
    if isinstance(values, (str, bytes)) or not hasattr(values, '__iter__') or not len(values):
      raise ValueError(f'axes.{path} must be a tuple of the values to sweep, got {values!r}')


def plan(sweep: ml_collections.ConfigDict, workdir: str) -> list[Point]:
  """Every point of the sweep, with its config overrides, size and token budget (no training)."""
  check_sweep(sweep)
  base = config_lib.load(resolve_base(sweep.base))
  common = flatten(sweep.get('overrides', {}))
  if not common.get('data.prepared_dir') and '://' not in workdir:  # a gs:// sweep: each host's local cache
    common['data.prepared_dir'] = base.data.prepared_dir or os.path.join(workdir, 'prepared')
  common.setdefault('train.compilation_cache_dir', os.path.join(workdir, 'compilation_cache'))
  common.setdefault('train.eval_every', 0)  # the final eval alone
  common.setdefault('train.checkpoint_every', 0)  # at the end (and when stopped)
  budgets, token_budgets = tuple(sweep.get('budgets', ())), tuple(sweep.get('tokens', ()))
  if bool(budgets) == bool(token_budgets):
    raise ValueError('a sweep sets exactly one of budgets (IsoFLOP compute budgets in FLOPs) and tokens '
                     f'(token budgets); got budgets={budgets}, tokens={token_budgets}')
  ratio = tuple(sweep.get('tokens_per_param', ())) or (0.0, math.inf)
  points = []
  for axis in _axis_values(sweep.get('axes', {})):
    for size in sweep.ladder.sizes:
      overrides = dict(common)
      overrides.update({f'model.{k}': v for k, v in ladder_shape(size, sweep.ladder).items()})
      overrides.update(axis)
      config = apply_overrides(base, overrides)
      model_config = ModelConfig.from_dict(config.model)
      seq_len, batch = int(config.data.seq_len), int(config.train.batch_size)
      if seq_len < 1 or batch < 1:
        raise ValueError(f'data.seq_len ({seq_len}) and train.batch_size ({batch}) must be positive')
      per_token = metrics_lib.flops_per_token(model_config, seq_len)
      n = non_embedding_params(model_config)
      for budget in budgets or token_budgets:
        wanted = budget / per_token if budgets else budget
        steps = max(1, round(wanted / (batch * seq_len)))
        tokens = steps * batch * seq_len
        if budgets and not ratio[0] <= tokens / n <= ratio[1]:
          continue
        warmup = (max(1, round(float(sweep.warmup_fraction) * steps)) if sweep.get('warmup_fraction')
                  else min(int(config.train.warmup_steps), steps))
        name = '-'.join([f'C{_number(budget)}' if budgets else f'D{_number(budget)}', f's{size}'] +
                        [f'{k.rsplit(".", 1)[-1]}{_number(v) if isinstance(v, float) else v}' for k, v in axis.items()])
        points.append(Point(name=name, overrides=dict(overrides, **{'train.steps': steps,
                                                                      'train.warmup_steps': warmup}),
                            params=n, params_total=count_params(model_config), flops_per_token=per_token,
                            tokens=tokens, budget=float(budget) if budgets else None, size=int(size)))
  # Budget by budget, smallest first: a sweep stopped part-way has whole IsoFLOP curves.
  points.sort(key=lambda p: p.budget if p.budget is not None else 0.0)
  names = [p.name for p in points]
  if len(set(names)) != len(names):
    raise ValueError(f'two points of the sweep have the same name: {sorted(n for n in names if names.count(n) > 1)}')
  if not points:
    raise ValueError(f'the sweep has no points: no size of ladder.sizes={tuple(sweep.ladder.sizes)} has '
                     f'tokens_per_param in {ratio} at budgets {budgets}; widen the range or add sizes')
  return points


def point_config(sweep: ml_collections.ConfigDict, point: Point) -> ml_collections.ConfigDict:
  return apply_overrides(config_lib.load(resolve_base(sweep.base)), point.overrides)


def check_epochs(sweep: ml_collections.ConfigDict, points: list[Point]) -> int:
  """Prepares the shared tokenizer and corpus (once for the whole sweep), sets each point's `epochs`, and raises
  if a point would see the corpus more than `max_epochs` times. Returns the corpus's token count."""
  config = point_config(sweep, points[0])
  run = config_lib.settings(config)
  tokenizer = data.get_tokenizer(run.data, None, model_vocab_size=run.model.vocab_size, seed=run.seed,
                                 init_from_hf=run.init_from_hf)
  corpus, held_out = data.prepared_corpora(run.data, tokenizer)
  if held_out is None or int(config.train.eval_steps) < 1:
    raise ValueError('the fits need each point\'s final eval loss: set train.eval_steps > 0 and data.eval_files in '
                     f'the sweep\'s overrides (now eval_steps={config.train.eval_steps}, eval_files='
                     f'{config.data.eval_files!r}; an empty train_files uses the built-in held-out split)')
  corpus_tokens = int(corpus.meta['tokens'])
  for point in points:
    point.epochs = point.tokens / corpus_tokens
  limit = float(sweep.get('max_epochs', 1.0))
  over = [f'{p.name} ({p.epochs:.2f})' for p in points if p.epochs > limit]
  if over:
    raise ValueError(f'{len(over)} point(s) would see the {corpus_tokens:,}-token corpus more than max_epochs='
                     f'{limit} times: {", ".join(over)}. Lower their budgets, raise tokens_per_param\'s lower '
                     'bound, use a larger corpus, or raise sweep.max_epochs.')
  return corpus_tokens


def read_done(workdir: str) -> dict[str, dict[str, Any]]:
  """The finished (or diverged) points of DIR/results.jsonl by name (a later line wins)."""
  path = epath.Path(workdir) / 'results.jsonl'
  return {r['name']: r for r in scaling.read_jsonl(str(path))} if path.exists() else {}


def _append(path: epath.Path, record: dict[str, Any]) -> None:
  """Adds a line, rewriting the file whole through a temporary file (gs:// objects cannot be appended to)."""
  text = path.read_text() if path.exists() else ''
  if text and not text.endswith('\n'):
    text = text[:text.rfind('\n') + 1]  # a line cut short by a kill: dropped (read_done leaves it out too)
  tmp = path.parent / f'.{path.name}.{os.getpid()}'
  tmp.write_text(text + json.dumps(record) + '\n')
  tmp.replace(path)


def _read_metrics(point_dir: str) -> list[dict[str, Any]]:
  path = epath.Path(point_dir) / 'metrics.jsonl'
  return scaling.read_jsonl(str(path)) if path.exists() else []


def result(point: Point, point_dir: str, seconds: float) -> dict[str, Any]:
  """The results.jsonl record of a finished point, from its metrics.jsonl (the final eval at the last step)."""
  records = _read_metrics(point_dir)
  steps = point.overrides['train.steps']
  final = [r for r in records if r.get('step') == steps and 'eval_loss' in r]
  if not final:
    raise RuntimeError(f'{point.name}: trained to step {steps} but {point_dir}/metrics.jsonl has no eval_loss at '
                       'that step (no eval data, or the run was stopped between training and evaluating). Check the '
                       'data.eval_files of the sweep; to retrain the point, delete its directory.')
  mfu = [r['mfu'] for r in records if 'mfu' in r]
  speed = [r['tokens_per_sec'] for r in records if 'tokens_per_sec' in r]
  return dict(
      name=point.name, params=point.params, params_total=point.params_total, tokens=point.tokens,
      flops=point.flops, budget=point.budget, eval_loss=final[-1]['eval_loss'], overrides=point.overrides,
      size=point.size, width=point.overrides['model.hidden_size'], depth=point.overrides['model.num_hidden_layers'],
      steps=steps, flops_per_token=point.flops_per_token, epochs=point.epochs,
      mfu=statistics.median(mfu) if mfu else None, tokens_per_sec=statistics.median(speed) if speed else None,
      seconds=round(seconds, 1), device=jax.devices()[0].device_kind)


def run(sweep: ml_collections.ConfigDict, workdir: str, *, only: tuple[str, ...] = ()) -> list[dict[str, Any]]:
  """Trains every unfinished point (or those named in `only`), appending to DIR/results.jsonl; returns the
  records of all finished points. A point whose loss stops being finite is recorded as diverged (eval_loss
  null, `diverged`, `error`) and the sweep goes on; the fits leave it out."""
  workdir = workdir_lib.resolve(workdir)
  root = epath.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  points = plan(sweep, workdir)
  unknown = sorted(set(only) - {p.name for p in points})
  if unknown:
    raise ValueError(f'--only names {unknown}, which are not points of the sweep: {[p.name for p in points]}')
  corpus_tokens = check_epochs(sweep, points)
  if jax.process_index() == 0:  # several processes (a pod slice) share the sweep's directory: one writes
    (root / 'sweep.json').write_text(json.dumps(dict(sweep=sweep.to_dict(), corpus_tokens=corpus_tokens,
                                                     points=[dataclasses.asdict(p) for p in points]),
                                                indent=1, default=str))
  done = read_done(workdir)
  todo = [p for p in points if p.name not in done and (not only or p.name in only)]
  logging.info('sweep: %d points, %d finished, %d to run; corpus of %s tokens', len(points), len(done), len(todo),
               f'{corpus_tokens:,}')
  for i, point in enumerate(todo):
    logging.info('sweep: point %d/%d %s: N=%s, D=%s, %.3g FLOPs, %.2f epochs', i + 1, len(todo), point.name,
                 f'{point.params:,}', f'{point.tokens:,}', point.flops, point.epochs)
    point_dir = str(root / point.name)
    start = time.time()
    try:
      train.train_and_evaluate(point_config(sweep, point), point_dir)
    except cli.Stopped as e:  # SIGTERM / Ctrl-C: the point checkpointed (unless stopped at once) and resumes
      raise cli.Stopped(e.signum, f'sweep point {point.name}: {e}', at_once=e.at_once) from e
    except checkpoint.NonFiniteError as e:  # e.g. a learning rate too high: a result of the sweep, not a failure
      record = dict(name=point.name, params=point.params, params_total=point.params_total, tokens=point.tokens,
                    flops=point.flops, budget=point.budget, eval_loss=None, diverged=True, error=str(e),
                    overrides=point.overrides, size=point.size, seconds=round(time.time() - start, 1))
      if jax.process_index() == 0:
        _append(root / 'results.jsonl', record)
      done[point.name] = record
      logging.warning('sweep: %s diverged (recorded; the fits leave it out): %s', point.name, e)
      continue
    trained = max((r['step'] for r in _read_metrics(point_dir)), default=0)
    if trained < point.overrides['train.steps']:  # stopped by SIGTERM / Ctrl-C: checkpointed, resumes next time
      logging.warning('sweep: %s stopped at step %d of %d; run the sweep again to resume it', point.name, trained,
                      point.overrides['train.steps'])
      break
    record = result(point, point_dir, time.time() - start)
    if jax.process_index() == 0:
      _append(root / 'results.jsonl', record)
    done[point.name] = record
    logging.info('sweep: %s done: eval_loss %.4f in %.0f s%s', point.name, record['eval_loss'], record['seconds'],
                 f', MFU {100 * record["mfu"]:.1f}%' if record['mfu'] else '')
  return list(done.values())


def _flag_value(value: Any) -> str:
  return str(value) if not isinstance(value, float) else repr(value)


def emit(sweep: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """One `python -m qwenjax.train` command per unfinished point (after preparing the shared corpus)."""
  workdir = workdir_lib.resolve(workdir)
  points = plan(sweep, workdir)
  check_epochs(sweep, points)
  done = read_done(workdir)
  base = resolve_base(sweep.base)
  commands = []
  for point in points:
    if point.name in done:
      continue
    args = ['python', '-m', 'qwenjax.train', f'--config={base}', f'--workdir={epath.Path(workdir) / point.name}']
    args += [f'--config.{k}={_flag_value(v)}' for k, v in point.overrides.items()]
    commands.append(' '.join(shlex.quote(a) for a in args))
  return commands


def _define_flags() -> None:
  """The command line's flags (defined when it runs: importing this module adds none)."""
  config_flags.DEFINE_config_file('sweep', None, 'Sweep file, e.g. experiments/isoflop_small.py.', lock_config=False)
  flags.DEFINE_string('workdir', None, 'The sweep\'s directory: a workdir per point, results.jsonl, the shared '
                      'prepared corpus and compilation cache. Running again resumes.')
  flags.DEFINE_bool('emit', False, 'Print one python -m qwenjax.train command per unfinished point instead of running '
                    'them.')
  flags.DEFINE_list('only', [], 'Run only these points (names as in DIR/sweep.json).')
  distributed.define_flags()  # every point on all processes


def main(argv: list[str]) -> None:
  del argv  # cli.run: no positional arguments
  logging.get_absl_handler().addFilter(train._LibraryInfoFilter())  # pylint: disable=protected-access
  sweep, workdir = flags.FLAGS.sweep, train.check_workdir(flags.FLAGS.workdir)
  distributed.initialize_from_flags()
  if flags.FLAGS.emit:
    print('\n'.join(emit(sweep, workdir)))
    return
  cache = train.compilation_cache_dir(
      str(sweep.get('overrides', {}).get('train', {}).get('compilation_cache_dir',
                                                          os.path.join(workdir, 'compilation_cache'))), workdir)
  if cache:  # jax's process-wide setting, before anything compiles: points of one shape compile once
    jax.config.update('jax_compilation_cache_dir', cache)
  records = run(sweep, workdir, only=tuple(flags.FLAGS.only))
  print(f'{len(records)} point(s) finished; results in {os.path.join(workdir, "results.jsonl")}. Fit them with: '
        f'python -m qwenjax.scaling fit {workdir}')


if __name__ == '__main__':
  cli.run(main, _define_flags, required=('sweep', 'workdir'), expected=train.USER_ERRORS)
