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
* `counting`: what the fits' N and the budgets' C count.
    'porian' (the default; Porian et al. 2024, and Hoffmann et al. 2022 up to the input embedding): N is every
    parameter a token multiplies, the output head included and the input embedding (a lookup) left out, tied or
    not (`params_with_head`); C per token is `qwenjax.metrics.flops_per_token`, 6 N plus attention's matmuls, the
    FLOPs MFU counts, so a point spends its budget.
    'kaplan' (Kaplan et al. 2020, for the ablation): N is the non-embedding parameters without the head
    (`params_non_embedding`) and C per token 6 N: the head's and attention's FLOPs are left out of the budget, so a
    point trains on more tokens and spends more than its budget (`flops_actual` in its result).
* `budgets`: IsoFLOP compute budgets C in FLOPs. Each size then trains on D = C / (C per token) tokens, rounded
  to whole steps. Per budget, the sizes of `ladder.sizes` with lo <= D / N <= hi for `tokens_per_param = (lo, hi)`,
  or the sizes `budget_sizes = ((budget, (size, ...)), ...)` names for it (one of the two). Or `tokens`: fixed
  token budgets D for every size (no IsoFLOP fit, but approach 3 still fits).
* warmup, in tokens: `warmup_tokens_per_param` k (k x N tokens: Porian et al.'s warmup with k = 1, long enough
  for a model's size whatever its run's length), `warmup_tokens` (one count for every point: Kaplan et al.'s
  fixed warmup), or `warmup_fraction` (of each point's steps); all 0: the base's warmup_steps. Then at most
  `warmup_max_fraction` of the run (default 1) and at least `warmup_min_steps` (default 1).
* `batch_sizes = ((N_max, batch), ...)`: a model of N parameters (`params_with_head`, whatever the counting, so
  that both countings train a model alike) trains at the batch (sequences of data.seq_len) of the first pair
  with N < N_max; empty: train.batch_size for every point.
* `min_steps`: every point takes at least this many optimizer steps: a point whose tokens would fill fewer steps
  at that batch trains at a smaller one, D / (data.seq_len x min_steps) rows rounded down (on several devices,
  check that they divide over the data axes). Otherwise the large models of small budgets are judged by how few
  updates they got rather than by N and D: a loss still falling steeply after a few hundred steps. 0 (default):
  the batch above for every point.
* `lr_batch_exponent`: with an lr stage, a point that trains at another batch than its size's lr stage point
  would (at `lr_sweep.tokens_per_param`, by the rules above) takes the size's rate times (batch ratio)^exponent:
  0.5 is Adam's square-root rule (Malladi et al. 2022). 0 (default): the size's rate at any batch.
* `lr_sweep`: a learning-rate stage run before the other points: each size of `lr_sweep.sizes` at each rate of
  `lr_sweep.lrs`, on `lr_sweep.tokens_per_param` x N tokens (`LR-s<size>-lr<lr>`). Its results choose every other
  point's train.lr (`choose_lrs`, written to DIR/lr.json): per size the best rate (the vertex of a parabola in
  log lr through the lowest loss and its neighbours), then lr = k N^gamma by least squares over the sizes, so that
  sizes between and beyond them get a rate too (within the grid's range). No `lr_sweep.sizes`: train.lr.
* `lr_rule = (k, gamma)`: without an lr stage, each size's rate is k N^gamma (N as `counting` counts it), to 3
  significant digits: e.g. an earlier study's lr.json `coefficient` and `exponent`.
* `lr_factors = (f, ...)`: every point but the lr stage's trains at each factor times its size's rate (the lr
  stage's, `lr_rule`'s, or train.lr), named `...-lrx<f>`: a rate sweep per point, one vmapped group with
  `group_size` >= len(lr_factors). The fit counts each point at its best rate (`qwenjax.scaling.best_rates`), and
  its quality bar fails a point whose best rate is the lowest or highest tried (`rates_inside`).
* `axes`: any other config values to sweep (`axes.train.lr = (1e-3, 3e-3)`): every combination is a point.
* `max_epochs`: a point that would see the training corpus more often than this is an error at planning time.
* `group_size`: train up to this many points at once, as one step vmapped over them (`qwenjax.train.train_group`):
  within a stage and budget, points that differ only in `qwenjax.group.MEMBER_KEYS` (learning rate, schedule and
  seed), e.g. the lr stage's points of one size, or a point's repeats (`axes.train.seed`) (`groups`). 0 (default):
  one point at a time.
* `estimate`: the plan's GPU-time assumptions (`ESTIMATE`'s keys), for `plan_table` and `pieces`.

Every point is trained by `qwenjax.train.train_and_evaluate` (the code of `python -m qwenjax.train`) in
`DIR/<name>/`, evaluated once at its end (a group's members each in their own). All points share the tokenizer and
the tokenized corpus (`data.prepared_dir`, by default `DIR/prepared`; its files listed once per command,
`documents.fixed_listing`) and one compilation cache (`DIR/compilation_cache`). Each finished point appends one line
to `DIR/results.jsonl`: `name`, `stage` ('lr', 'isoflop' or 'tokens'), `params` (the N of the fits, as `counting`
says), `params_with_head`, `params_non_embedding`, `params_total`, `tokens` (D), `flops` (C as counted: tokens x
flops_per_token), `flops_actual` (what the step computes), `budget`, `eval_loss` (final), `overrides` (the point's
config values), `code` (`code_version`: the sources' hash, the git commit, the jax version), and `epochs`, `mfu`,
`tokens_per_sec`, `seconds` (a grouped point's: its group's, with `group` naming the members). Running the same
command again skips finished points and resumes an interrupted one from its last checkpoint, under the same code
only: a sweep with finished or started points refuses other sources or another jax (`CodeVersionError`, naming the
files) unless `allow_code_change`, which records the change in sweep.json's `code_history`. `check` retrains
committed points and compares their eval losses.

`--emit` prints one `python -m qwenjax.train ...` command per unfinished point instead (for a cluster queue),
after preparing the shared tokenizer and corpus; `plan_table` is the plan as a table (N, D, steps, epochs,
estimated time, the pieces of a stopped-and-resumed run).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import numbers
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Iterator, Mapping, Sequence

from absl import flags
from absl import logging
from etils import epath
import jax
import jaxlib
import ml_collections
from ml_collections import config_flags
import numpy as np

from qwenjax import checkpoint
from qwenjax import cli
from qwenjax import config as config_lib
from qwenjax import data
from qwenjax import distributed
from qwenjax import documents
from qwenjax import files
from qwenjax import group as group_lib
from qwenjax import metrics as metrics_lib
from qwenjax import scaling
from qwenjax import train
from qwenjax import workdir as workdir_lib
from qwenjax.model_config import ModelConfig
from qwenjax.params import count_params

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COUNTINGS = ('porian', 'kaplan')
# The plan's GPU-time estimate per point: FLOPs / (mfu x peak_flops), or steps x step_s when that is longer (small
# models are bound by the host and kernel launches, not FLOPs), plus overhead_s (setup, eval, checkpoint), plus
# compile_s for the first point of each compiled program in a piece. Assumptions to replace by measured values.
ESTIMATE = dict(mfu=0.4, peak_flops=989e12, compile_s=20.0, overhead_s=10.0, step_s=0.0)


@dataclasses.dataclass
class Point:
  """One training run of a sweep."""
  name: str
  overrides: dict[str, Any]  # dotted config key -> value, on top of the base config
  params: int  # the fits' N, as the sweep's counting says
  params_total: int
  flops_per_token: float  # as counted (the budget's C per token)
  tokens: int
  budget: float | None
  size: int
  epochs: float | None = None
  stage: str = 'isoflop'  # 'lr', 'isoflop' or 'tokens'
  params_with_head: int = 0
  params_non_embedding: int = 0
  flops_per_token_actual: float = 0.0  # metrics.flops_per_token: what the step computes
  counting: str = 'porian'

  @property
  def flops(self) -> float:
    return self.tokens * self.flops_per_token

  @property
  def flops_actual(self) -> float:
    return self.tokens * (self.flops_per_token_actual or self.flops_per_token)

  @property
  def lr(self) -> float | None:
    return self.overrides.get('train.lr')


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


@functools.lru_cache(maxsize=None)
def _count_params(model_config: ModelConfig) -> int:
  """count_params (which traces the model's init), once per shape: a plan asks several times for each point."""
  return count_params(model_config)


@functools.lru_cache(maxsize=None)
def _flops_per_token(model_config: ModelConfig, seq_len: int) -> float:
  return metrics_lib.flops_per_token(model_config, seq_len)


def non_embedding_params(model_config: ModelConfig) -> int:
  """Parameters outside the embedding table and the output head (Kaplan et al.'s N)."""
  tables = 1 if model_config.tie_word_embeddings else 2
  return _count_params(model_config) - tables * model_config.vocab_size * model_config.hidden_size


def params_with_head(model_config: ModelConfig) -> int:
  """Parameters a token multiplies: all but the input embedding, the output head counted (tied or not): Porian et
  al.'s N, and the N in `metrics.flops_per_token`'s 6 N for a dense model."""
  return non_embedding_params(model_config) + model_config.vocab_size * model_config.hidden_size


def counted(model_config: ModelConfig, seq_len: int, counting: str) -> tuple[int, float]:
  """(N, C per token) under `counting` (the module docstring says what each counts)."""
  if counting == 'kaplan':
    n = non_embedding_params(model_config)
    return n, 6.0 * n
  return params_with_head(model_config), _flops_per_token(model_config, seq_len)


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


SWEEP_KEYS = ('base', 'overrides', 'ladder', 'budgets', 'tokens', 'tokens_per_param', 'budget_sizes', 'axes',
              'counting', 'warmup_fraction', 'warmup_tokens_per_param', 'warmup_tokens', 'warmup_max_fraction',
              'warmup_min_steps', 'batch_sizes', 'min_steps', 'lr_batch_exponent', 'lr_sweep', 'max_epochs',
              'estimate', 'group_size', 'lr_rule', 'lr_factors')
LADDER_KEYS = ('sizes', 'width_per_size', 'depth', 'depth_per_size', 'head_dim', 'q_per_kv', 'mlp_ratio')
LR_SWEEP_KEYS = ('sizes', 'lrs', 'tokens_per_param')
_LADDER_NEEDED = ('sizes', 'width_per_size', 'head_dim', 'q_per_kv', 'mlp_ratio')
_WARMUPS = ('warmup_fraction', 'warmup_tokens_per_param', 'warmup_tokens')


def _positive_numbers(values: Any) -> bool:
  return (not isinstance(values, (int, float, str, bytes)) and hasattr(values, '__iter__')
          and all(isinstance(v, (int, float)) and v > 0 for v in values))


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
    if not _positive_numbers(values):
      raise ValueError(f'{"ladder." if key == "sizes" else ""}{key} must be a tuple of positive numbers, '
                       f'got {values!r}')
  for key in ('width_per_size', 'head_dim', 'q_per_kv', 'mlp_ratio'):
    if not float(ladder[key]) > 0:
      raise ValueError(f'ladder.{key} must be positive, got {ladder[key]!r}')
  for path, values in flatten(sweep.get('axes', {})).items():
    if isinstance(values, (str, bytes)) or not hasattr(values, '__iter__') or not len(values):
      raise ValueError(f'axes.{path} must be a tuple of the values to sweep, got {values!r}')
  if sweep.get('counting', 'porian') not in COUNTINGS:
    raise ValueError(f'counting must be one of {COUNTINGS}, got {sweep.counting!r}')
  if sum(bool(sweep.get(k)) for k in _WARMUPS) > 1:
    raise ValueError(f'set at most one of {", ".join(_WARMUPS)} (got {[k for k in _WARMUPS if sweep.get(k)]})')
  if not 0 < float(sweep.get('warmup_max_fraction', 1.0)) <= 1:
    raise ValueError(f'warmup_max_fraction must be in (0, 1], got {sweep.warmup_max_fraction!r}')
  for pair in sweep.get('batch_sizes', ()):
    if len(pair) != 2 or not _positive_numbers(pair) or int(pair[1]) != pair[1]:
      raise ValueError(f'batch_sizes holds (N_max, batch) pairs of positive numbers, the batch whole; got {pair!r}')
  min_steps = sweep.get('min_steps', 0)
  if isinstance(min_steps, bool) or not isinstance(min_steps, int) or min_steps < 0:
    raise ValueError(f'min_steps must be a whole number >= 0 (the fewest steps a point trains), got {min_steps!r}')
  exponent = sweep.get('lr_batch_exponent', 0.0)
  if isinstance(exponent, bool) or not isinstance(exponent, numbers.Real) or not math.isfinite(exponent):
    raise ValueError(f'lr_batch_exponent must be a number (0.5: the square-root rule), got {exponent!r}')
  if exponent and not sweep.get('lr_sweep', {}).get('sizes'):
    raise ValueError('lr_batch_exponent scales the lr stage\'s rates to each point\'s batch: it needs lr_sweep.sizes')
  if sweep.get('budget_sizes'):
    if sweep.get('tokens_per_param'):
      raise ValueError('set budget_sizes (the sizes of each budget) or tokens_per_param (a filter), not both')
    listed = {float(b) for b, _ in sweep.budget_sizes}
    for budget, sizes in sweep.budget_sizes:
      if not _positive_numbers(sizes):
        raise ValueError(f'budget_sizes: budget {budget} needs a tuple of positive sizes, got {sizes!r}')
    if listed != {float(b) for b in sweep.get('budgets', ())}:
      raise ValueError(f'budget_sizes names budgets {sorted(listed)} but budgets are {tuple(sweep.get("budgets", ()))}')
  lr_sweep = sweep.get('lr_sweep', {})
  if lr_sweep.get('sizes'):
    unknown = sorted(set(lr_sweep) - set(LR_SWEEP_KEYS))
    if unknown:
      raise ValueError(f'lr_sweep: unknown key(s) {unknown}; it has {", ".join(LR_SWEEP_KEYS)}')
    if not _positive_numbers(lr_sweep.sizes) or not _positive_numbers(lr_sweep.get('lrs', ())):
      raise ValueError(f'lr_sweep.sizes and lr_sweep.lrs must be tuples of positive numbers, got '
                       f'{lr_sweep.sizes!r} and {lr_sweep.get("lrs")!r}')
    if len(lr_sweep.lrs) < 3:
      raise ValueError(f'lr_sweep.lrs needs 3 rates or more to find a best one between others, got {lr_sweep.lrs!r}')
    if not float(lr_sweep.get('tokens_per_param', 0)) > 0:
      raise ValueError('lr_sweep.tokens_per_param must be positive: each lr point trains on that many tokens per N')
    if 'train.lr' in flatten(sweep.get('axes', {})):
      raise ValueError('axes.train.lr and lr_sweep both set learning rates: keep one')
  rule, factors = tuple(sweep.get('lr_rule', ())), tuple(sweep.get('lr_factors', ()))
  if rule:
    if (len(rule) != 2 or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in rule)
        or not rule[0] > 0):
      raise ValueError(f'lr_rule is (k, gamma), lr = k N^gamma with k > 0, e.g. (187.0, -0.744); got {rule!r}')
    if lr_sweep.get('sizes'):
      raise ValueError('lr_rule and lr_sweep both choose each size\'s rate: keep one')
  if factors:
    if not _positive_numbers(factors) or len(set(factors)) != len(factors):
      raise ValueError(f'lr_factors must be distinct positive numbers, e.g. (0.5, 1.0, 2.0); got {factors!r}')
  if (rule or factors) and 'train.lr' in flatten(sweep.get('axes', {})):
    raise ValueError(f'axes.train.lr and {"lr_rule" if rule else "lr_factors"} both set learning rates: keep one')
  group_size = sweep.get('group_size', 0)
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0:
    raise ValueError(f'group_size must be a whole number >= 0 (the most points trained at once), got {group_size!r}')
  unknown = sorted(set(sweep.get('estimate', {})) - set(ESTIMATE))
  if unknown:
    raise ValueError(f'estimate: unknown key(s) {unknown}; it has {", ".join(ESTIMATE)}')


def _batch_size(sweep: ml_collections.ConfigDict, n_with_head: int) -> int | None:
  for n_max, batch in sweep.get('batch_sizes', ()):
    if n_with_head < n_max:
      return int(batch)
  return None


def rows_for(sweep: ml_collections.ConfigDict, batch: int, tokens: float, seq_len: int) -> int:
  """The batch (rows) of a point training on `tokens`: `batch`, or as many rows as leave it `min_steps` steps
  when `batch` would leave it fewer."""
  min_steps = int(sweep.get('min_steps', 0))
  if not min_steps or tokens / (batch * seq_len) >= min_steps:
    return batch
  return max(1, int(tokens // (seq_len * min_steps)))


def warmup_steps(sweep: ml_collections.ConfigDict, config: ml_collections.ConfigDict, n: int, steps: int) -> int:
  """A point's warmup in steps, by the sweep's warmup rule (the module docstring)."""
  tokens_per_step = int(config.train.batch_size) * int(config.data.seq_len)
  if sweep.get('warmup_tokens_per_param'):
    warmup = float(sweep.warmup_tokens_per_param) * n / tokens_per_step
  elif sweep.get('warmup_tokens'):
    warmup = float(sweep.warmup_tokens) / tokens_per_step
  elif sweep.get('warmup_fraction'):
    warmup = float(sweep.warmup_fraction) * steps
  else:
    return min(int(config.train.warmup_steps), steps)
  warmup = min(round(warmup), math.floor(float(sweep.get('warmup_max_fraction', 1.0)) * steps))
  return min(steps, max(warmup, int(sweep.get('warmup_min_steps', 1)), 1))


def _sizes(sweep: ml_collections.ConfigDict) -> list[int]:
  """Every ladder size the sweep trains, in order of first mention."""
  sizes = list(sweep.ladder.sizes) + [s for _, group in sweep.get('budget_sizes', ()) for s in group]
  sizes += list(sweep.get('lr_sweep', {}).get('sizes', ()))
  return list(dict.fromkeys(int(s) for s in sizes))


def plan(sweep: ml_collections.ConfigDict, workdir: str, *, lrs: Mapping[int, float] | None = None) -> list[Point]:
  """Every point of the sweep, with its config overrides, size and token budget (no training).

  In run order: the lr stage's points (`lr_sweep`), then budget by budget, smallest first, so that a sweep stopped
  part-way has whole IsoFLOP curves. After an lr stage the other points train at `lrs[size]` (`choose_lrs`); without
  `lrs` their `lr` is None, to be chosen when the lr stage has finished.
  """
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
  budget_sizes = {float(b): {int(s) for s in sizes} for b, sizes in sweep.get('budget_sizes', ())}
  counting = sweep.get('counting', 'porian')
  lr_sweep = sweep.get('lr_sweep', {})
  staged = bool(lr_sweep.get('sizes'))
  rule, factors = tuple(sweep.get('lr_rule', ())), tuple(float(f) for f in sweep.get('lr_factors', ()))

  def point(size, axis, *, stage, wanted, budget, name, lr=None, factor=None):
    """The point of ladder size `size` training on about `wanted` tokens (or `wanted(N, C per token)`)."""
    overrides = dict(common)
    overrides.update({f'model.{k}': v for k, v in ladder_shape(size, sweep.ladder).items()})
    model_config = ModelConfig.from_dict(apply_overrides(base, overrides).model)
    batch = _batch_size(sweep, params_with_head(model_config))
    if batch:
      overrides['train.batch_size'] = batch
    overrides.update(axis)
    config = apply_overrides(base, overrides)
    model_config = ModelConfig.from_dict(config.model)
    seq_len, batch = int(config.data.seq_len), int(config.train.batch_size)
    if seq_len < 1 or batch < 1:
      raise ValueError(f'data.seq_len ({seq_len}) and train.batch_size ({batch}) must be positive')
    n, per_token = counted(model_config, seq_len, counting)
    tokens = wanted(n, per_token)
    rows = rows_for(sweep, batch, tokens, seq_len)
    exponent = float(sweep.get('lr_batch_exponent', 0.0))
    if staged and stage != 'lr' and lr is not None and exponent:  # the size's rate is for its lr stage's batch
      lr_rows = rows_for(sweep, batch, float(lr_sweep.tokens_per_param) * n, seq_len)
      lr = float(f'{lr * (rows / lr_rows) ** exponent:.3g}') if rows != lr_rows else lr
    if rule and stage != 'lr':
      lr = float(f'{rule[0] * n ** rule[1]:.3g}')
    if factor is not None:
      centre = lr if staged or rule else float(config.train.lr)
      lr = None if centre is None else float(f'{centre * factor:.3g}')
    if staged or rule or factor is not None:
      overrides['train.lr'] = lr
    if rows != batch:
      overrides['train.batch_size'] = batch = rows
    config = apply_overrides(base, overrides)
    steps = max(1, round(tokens / (batch * seq_len)))
    overrides.update({'train.steps': steps, 'train.warmup_steps': warmup_steps(sweep, config, n, steps)})
    return Point(name=name, overrides=overrides, params=n, params_total=_count_params(model_config),
                 flops_per_token=per_token, tokens=steps * batch * seq_len, budget=budget, size=int(size), stage=stage,
                 params_with_head=params_with_head(model_config),
                 params_non_embedding=non_embedding_params(model_config), counting=counting,
                 flops_per_token_actual=_flops_per_token(model_config, seq_len))

  points = []
  for size in lr_sweep.get('sizes', ()):
    for lr in sorted(float(x) for x in lr_sweep.lrs):
      points.append(point(size, {}, stage='lr', budget=None, name=f'LR-s{int(size)}-lr{_number(lr)}', lr=lr,
                          wanted=lambda n, _: float(lr_sweep.tokens_per_param) * n))
  sizes = _sizes(sweep) if budget_sizes else list(sweep.ladder.sizes)
  for axis in _axis_values(sweep.get('axes', {})):
    suffix = [f'{k.rsplit(".", 1)[-1]}{_number(v) if isinstance(v, float) else v}' for k, v in axis.items()]
    for size in sizes:
      lr = (lrs or {}).get(int(size))
      for factor in factors or (None,):
        for budget in budgets or token_budgets:
          if budget_sizes and int(size) not in budget_sizes[float(budget)]:
            continue
          name = '-'.join([f'C{_number(budget)}' if budgets else f'D{_number(budget)}', f's{size}'] + suffix
                          + ([f'lrx{_number(factor)}'] if factor is not None else []))
          p = point(size, axis, stage='isoflop' if budgets else 'tokens', budget=float(budget) if budgets else None,
                    name=name, lr=lr, factor=factor,
                    wanted=(lambda _, c, b=budget: b / c) if budgets else (lambda *_, b=budget: b))
          if budgets and not ratio[0] <= p.tokens / p.params <= ratio[1]:
            continue
          points.append(p)
  order = {'lr': -1.0}
  points.sort(key=lambda p: order.get(p.stage, p.budget if p.budget is not None else 0.0))
  names = [p.name for p in points]
  if len(set(names)) != len(names):
    raise ValueError(f'two points of the sweep have the same name: {sorted(n for n in names if names.count(n) > 1)}')
  if not any(p.stage != 'lr' for p in points):
    raise ValueError(f'the sweep has no points: no size of ladder.sizes={tuple(sweep.ladder.sizes)} has '
                     f'tokens_per_param in {ratio} at budgets {budgets}; widen the range or add sizes')
  return points


def point_config(sweep: ml_collections.ConfigDict, point: Point) -> ml_collections.ConfigDict:
  if point.stage != 'lr' and 'train.lr' in point.overrides and point.lr is None:
    raise ValueError(f'{point.name}: its learning rate comes from the lr stage, which has not finished')
  return apply_overrides(config_lib.load(resolve_base(sweep.base)), point.overrides)


def check_epochs(sweep: ml_collections.ConfigDict, points: list[Point]) -> int:
  """Prepares the shared tokenizer and corpus (once for the whole sweep), sets each point's `epochs`, and raises
  if a point would see the corpus more than `max_epochs` times. Returns the corpus's token count."""
  config = point_config(sweep, points[0])
  run = config_lib.settings(config)
  tokenizer = data.get_tokenizer(run.data, None, model_vocab_size=run.model.vocab_size, init_from_hf=run.init_from_hf)
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


# ---------------------------------------------------------------------------------------------------------
# The lr stage's choice.

def best_lr(lrs: Sequence[float], losses: Sequence[float | None]) -> tuple[float, bool]:
  """(the best learning rate of a grid, whether it is at the grid's edge): `scaling.rate_vertex`'s rate."""
  lr, _, at_edge = scaling.rate_vertex(lrs, losses)
  return lr, at_edge


def choose_lrs(records: Mapping[str, Mapping[str, Any]], points: Sequence[Point]) -> dict[str, Any] | None:
  """The lr stage's choice of a learning rate for every size, from its finished points (`records` by name); None
  while some of them have not finished.

  Per size of `lr_sweep.sizes`, the best rate (`best_lr`); then ln lr = ln k + gamma ln N by least squares over
  those sizes (one size: its rate for all), evaluated at each size's N, kept within the grid's range and rounded to
  3 significant digits. `at_edge` sizes had their best rate at the grid's end: the grid did not bracket it.
  """
  stage = [p for p in points if p.stage == 'lr']
  if not stage or any(p.name not in records for p in stage):
    return None
  anchors = []
  for size in dict.fromkeys(p.size for p in stage):
    group = sorted((p for p in stage if p.size == size), key=lambda p: p.lr)
    losses = [records[p.name].get('eval_loss') for p in group]
    lr, at_edge = best_lr([p.lr for p in group], losses)
    anchors.append(dict(size=size, params=group[0].params, best_lr=lr, at_edge=at_edge,
                        losses={_number(p.lr): loss for p, loss in zip(group, losses)}))
  n = np.array([a['params'] for a in anchors], float)
  best = np.log([a['best_lr'] for a in anchors])
  gamma, log_k = np.polyfit(np.log(n), best, 1) if len(np.unique(n)) > 1 else (0.0, float(np.mean(best)))
  grid = [min(p.lr for p in stage), max(p.lr for p in stage)]
  params = {p.size: p.params for p in points if p.stage != 'lr'} | {a['size']: a['params'] for a in anchors}
  chosen = {size: float(f'{np.clip(np.exp(log_k) * params[size]**gamma, *grid):.3g}') for size in sorted(params)}
  warnings = [f'size {a["size"]}: the best rate {a["best_lr"]:.3g} is at the end of the grid {grid}; add rates '
              'beyond it (lr_sweep.lrs)' for a in anchors if a['at_edge']]
  return dict(anchors=anchors, exponent=float(gamma), coefficient=float(np.exp(log_k)), grid=grid,
              lr={str(k): v for k, v in chosen.items()}, warnings=warnings)


def _lrs_by_size(choice: Mapping[str, Any]) -> dict[int, float]:
  return {int(k): float(v) for k, v in choice['lr'].items()}


# ---------------------------------------------------------------------------------------------------------
# The code a sweep's points were trained by.

class CodeVersionError(ValueError):
  """A sweep with points trained by other sources (or another jax) would mix two versions of the code."""


def _git(root: str, *args: str) -> str | None:
  try:
    out = subprocess.run(['git', '-C', root, *args], capture_output=True, text=True, timeout=20, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() if out.returncode == 0 else None


def code_version(root: str = _REPO) -> dict[str, Any]:
  """What trains a point: `source`, a hash of every .py file under qwenjax/ and configs/ (`files`: each one's),
  the git `commit` and whether those files differ from it (`dirty`; None unless `root` is the top of a checkout:
  a copy of the tree has none, even inside another checkout), and the jax and jaxlib versions (the kernels and
  numerics come with them)."""
  hashes = {}
  for folder, pattern in (('qwenjax', '**/*.py'), ('configs', '*.py')):
    for path in sorted(pathlib.Path(root, folder).glob(pattern)):
      hashes[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
  source = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16]
  top = _git(root, 'rev-parse', '--show-toplevel')  # a copy of the tree inside another checkout is not that commit
  commit = _git(root, 'rev-parse', 'HEAD') if top and os.path.samefile(top, root) else None
  status = _git(root, 'status', '--porcelain', '--untracked-files=no', '--', 'qwenjax', 'configs') if commit else None
  return dict(source=source, commit=commit, dirty=None if commit is None else bool(status), jax=jax.__version__,
              jaxlib=getattr(jaxlib, '__version__', None), files=hashes)


def _short(code: Mapping[str, Any] | None) -> dict[str, Any] | None:
  """A code version without its per-file hashes, as each result records it."""
  return None if code is None else {k: code.get(k) for k in ('source', 'commit', 'dirty', 'jax', 'jaxlib')}


def _describe_code(code: Mapping[str, Any] | None) -> str:
  if not code:
    return 'an unrecorded code version'
  commit = f'commit {code["commit"][:10]}{" + changes" if code.get("dirty") else ""}, ' if code.get('commit') else ''
  return f'sources {code.get("source")} ({commit}jax {code.get("jax")})'


def code_changes(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
  """What differs between two code versions: changed, added and removed files, jax and jaxlib versions."""
  if not old:
    return ['no code version recorded']
  changes = []
  if old.get('source') != new.get('source'):
    before, after = old.get('files') or {}, new.get('files') or {}
    changed = sorted(f for f in set(before) | set(after) if before.get(f) != after.get(f))
    changes.append(f'files {", ".join(changed[:12])}{" ..." if len(changed) > 12 else ""}' if changed
                   else f'sources {old.get("source")} -> {new.get("source")}')
  for key in ('jax', 'jaxlib'):
    if old.get(key) != new.get(key):
      changes.append(f'{key} {old.get(key)} -> {new.get(key)}')
  return changes


def check_code(root: epath.Path, done: Mapping[str, Mapping[str, Any]], code: Mapping[str, Any],
               started: bool, *, allow_code_change: bool = False) -> list[dict[str, Any]]:
  """The sweep's `code_history` after checking that this code is the one its finished points (`done`) and
  sweep.json recorded. A sweep that has started (finished or checkpointed points) under other sources or another
  jax raises CodeVersionError naming the differences, or with `allow_code_change` warns and records them."""
  path = root / 'sweep.json'
  saved = files.read_json(path, 'restore it, or start a new directory') if path.exists() else {}
  history = list(saved.get('code_history', []))
  if not started:
    return history
  problems = []
  if saved.get('code', {}).get('source') != code['source'] or saved['code'].get('jax') != code['jax']:
    problems += [f'sweep.json: {c}' for c in code_changes(saved.get('code'), code)]
  others = [r['name'] for r in done.values()
            if (r.get('code') or {}).get('source') != code['source'] or (r.get('code') or {}).get('jax') != code['jax']]
  if others:
    problems.append(f'{len(others)} finished point(s) trained by other code: {", ".join(others[:8])}'
                    f'{" ..." if len(others) > 8 else ""}')
  if not problems:
    return history
  message = (f'{root} was started by {_describe_code(saved.get("code"))}; this is {_describe_code(code)}. '
             f'Differences: {"; ".join(problems)}. One study, one code version: run it from the commit it started '
             'from (a git worktree of it), or start a new directory; to go on anyway and record the change, pass '
             'allow_code_change (the sweep command\'s --allow_code_change).')
  if not allow_code_change:
    raise CodeVersionError(message)
  logging.warning('sweep: CODE CHANGED, going on as asked and recording it in sweep.json: %s', message)
  return history + [dict(time=time.strftime('%Y-%m-%d %H:%M:%S'), before=_short(saved.get('code')),
                         after=_short(code), differences=problems)]


# ---------------------------------------------------------------------------------------------------------
# Running.

def read_done(workdir: str) -> dict[str, dict[str, Any]]:
  """The finished (or diverged) points of DIR/results.jsonl by name (a later line wins)."""
  path = epath.Path(workdir) / 'results.jsonl'
  return {r['name']: r for r in scaling.read_jsonl(str(path), {'name': str})} if path.exists() else {}


def _append(path: epath.Path, record: dict[str, Any]) -> None:
  """Adds a line, rewriting the file whole through a temporary file (gs:// objects cannot be appended to)."""
  text = path.read_text() if path.exists() else ''
  if text and not text.endswith('\n'):
    text = text[:text.rfind('\n') + 1]  # a line cut short by a kill: dropped (read_done leaves it out too)
  files.write(path, text + files.dumps(record) + '\n')


def _write_json(path: epath.Path, value: Any) -> None:
  if jax.process_index() == 0:  # several processes (a pod slice) share the sweep's directory: one writes
    files.write_json(path, value, default=str)


def write_record(root: epath.Path | pathlib.Path, sweep: ml_collections.ConfigDict, points: Sequence[Point],
                 corpus_tokens: int, code: Mapping[str, Any], history: Sequence[Any], **extra: Any) -> None:
  """DIR/sweep.json: the sweep, its corpus's size, the code its points were trained by (and any changes of it),
  and the plan, point by point."""
  _write_json(epath.Path(root) / 'sweep.json', dict(sweep=sweep.to_dict(), corpus_tokens=corpus_tokens, code=code,
                                                    code_history=list(history), **extra,
                                                    points=[dataclasses.asdict(p) for p in points]))


def _read_metrics(point_dir: str) -> list[dict[str, Any]]:
  path = epath.Path(point_dir) / 'metrics.jsonl'
  return scaling.read_jsonl(str(path), {'step': numbers.Real}) if path.exists() else []


def _record(point: Point, **fields) -> dict[str, Any]:
  """The fields of a results.jsonl line that come from the plan."""
  return dict(
      name=point.name, stage=point.stage, counting=point.counting, params=point.params,
      params_with_head=point.params_with_head, params_non_embedding=point.params_non_embedding,
      params_total=point.params_total, tokens=point.tokens, flops=point.flops, flops_actual=point.flops_actual,
      budget=point.budget, **fields, overrides=point.overrides,
      size=point.size, width=point.overrides['model.hidden_size'], depth=point.overrides['model.num_hidden_layers'],
      steps=point.overrides['train.steps'], warmup_steps=point.overrides['train.warmup_steps'], lr=point.lr,
      flops_per_token=point.flops_per_token, flops_per_token_actual=point.flops_per_token_actual,
      epochs=point.epochs)


def result(point: Point, point_dir: str, seconds: float, code: Mapping[str, Any] | None = None,
           **fields) -> dict[str, Any]:
  """The results.jsonl record of a finished point, from its metrics.jsonl (the final eval at the last step), with
  `fields` added (a grouped point's `group`)."""
  records = _read_metrics(point_dir)
  steps = point.overrides['train.steps']
  final = [r for r in records if r.get('step') == steps and 'eval_loss' in r]
  if not final:
    raise RuntimeError(f'{point.name}: trained to step {steps} but {point_dir}/metrics.jsonl has no eval_loss at '
                       'that step (no eval data, or the run was stopped between training and evaluating). Check the '
                       'data.eval_files of the sweep; to retrain the point, delete its directory.')
  mfu = [r['mfu'] for r in records if r.get('mfu') is not None]  # null: not finite
  speed = [r['tokens_per_sec'] for r in records if r.get('tokens_per_sec') is not None]
  return _record(point, eval_loss=final[-1]['eval_loss'], mfu=statistics.median(mfu) if mfu else None,
                 tokens_per_sec=statistics.median(speed) if speed else None, seconds=round(seconds, 1),
                 device=jax.devices()[0].device_kind, code=_short(code), **fields)


def groups(points: Sequence[Point], group_size: int) -> list[list[Point]]:
  """`points` cut into the groups `_train` trains together (`qwenjax.train.train_group`), in run order: within each
  stage and budget, points whose config values differ only in `group.MEMBER_KEYS` (the lr stage's points of one
  size; points of one shape and budget with other rates), at most `group_size` to a group; 0 or 1: one point
  each."""
  out = []
  for _, unit in itertools.groupby(points, key=lambda p: (p.stage, p.budget)):
    by_key: dict[tuple, list[list[Point]]] = {}
    for point in unit:
      key = tuple(sorted((k, str(v)) for k, v in point.overrides.items() if k not in group_lib.MEMBER_KEYS))
      open_groups = by_key.setdefault(key, [])
      if open_groups and len(open_groups[-1]) < max(group_size, 1):
        open_groups[-1].append(point)
      else:
        open_groups.append([point])
        out.append(open_groups[-1])
  return out


def _train_members(sweep: ml_collections.ConfigDict, root: epath.Path, members: Sequence[Point]) -> list[Any]:
  """Each point's last metrics, or the NonFiniteError that stopped it: a group trained as one vmapped step, or
  one point alone. A group whose members resume from different steps trains them one at a time."""
  if len(members) > 1:
    try:
      return train.train_group([point_config(sweep, p) for p in members], [str(root / p.name) for p in members])
    except group_lib.GroupError as e:
      logging.warning('sweep: %s; training them one at a time', e)
  outcomes = []
  for point in members:
    try:
      outcomes.append(train.train_and_evaluate(point_config(sweep, point), str(root / point.name)))
    except checkpoint.NonFiniteError as e:  # e.g. a learning rate too high: a result of the sweep, not a failure
      outcomes.append(e)
  return outcomes


def _train(sweep: ml_collections.ConfigDict, root: epath.Path, points: Sequence[Point],
           done: dict[str, dict[str, Any]], code: Mapping[str, Any]) -> bool:
  """Trains `points` in order (in groups of `sweep.group_size`: `groups`), appending each finished one to
  DIR/results.jsonl and to `done`; False when a SIGTERM / Ctrl-C stopped a point (checkpointed: it resumes next
  time)."""
  count = 0
  for members in groups(points, int(sweep.get('group_size', 0))):
    for point in members:
      count += 1
      logging.info('sweep: point %d/%d %s: N=%s, D=%s, %.3g FLOPs, %.2f epochs%s%s', count, len(points), point.name,
                   f'{point.params:,}', f'{point.tokens:,}', point.flops, point.epochs or 0.0,
                   f', lr {point.lr:.3g}' if point.lr else '',
                   f' (group of {len(members)}: {members[0].name}...)' if len(members) > 1 else '')
    start = time.time()
    try:
      outcomes = _train_members(sweep, root, members)
    except cli.Stopped as e:  # SIGTERM / Ctrl-C: the point checkpointed (unless stopped at once) and resumes
      raise cli.Stopped(e.signum, f'sweep point {", ".join(p.name for p in members)}: {e}', at_once=e.at_once) from e
    seconds = time.time() - start
    group = dict(group=[p.name for p in members]) if len(members) > 1 else {}
    for point, outcome in zip(members, outcomes):
      if isinstance(outcome, checkpoint.NonFiniteError):  # a result of the sweep, not a failure
        record = _record(point, eval_loss=None, diverged=True, error=str(outcome), seconds=round(seconds, 1),
                         code=_short(code), **group)
        if jax.process_index() == 0:
          _append(root / 'results.jsonl', record)
        done[point.name] = record
        logging.warning('sweep: %s diverged (recorded; the fits leave it out): %s', point.name, outcome)
        continue
      point_dir = str(root / point.name)
      trained = max((r['step'] for r in _read_metrics(point_dir)), default=0)
      if trained < point.overrides['train.steps']:  # stopped by SIGTERM / Ctrl-C: checkpointed, resumes next time
        logging.warning('sweep: %s stopped at step %d of %d; run the sweep again to resume it', point.name, trained,
                        point.overrides['train.steps'])
        return False
      record = result(point, point_dir, seconds, code, **group)
      if jax.process_index() == 0:
        _append(root / 'results.jsonl', record)
      done[point.name] = record
      logging.info('sweep: %s done: eval_loss %.4f in %.0f s%s', point.name, record['eval_loss'], record['seconds'],
                   f', MFU {100 * record["mfu"]:.1f}%' if record['mfu'] else '')
  return True


def _after_lr_stage(sweep: ml_collections.ConfigDict, workdir: str, points: list[Point],
                    done: Mapping[str, Mapping[str, Any]]) -> tuple[list[Point], dict[str, Any] | None]:
  """The plan with the lr stage's choice filled in (and that choice), or the plan as it is while the stage is
  unfinished. A finished point whose learning rate is not the choice (the lr stage's results changed after it
  trained) is an error: the IsoFLOP points would mix two choices."""
  choice = choose_lrs(done, points)
  if choice is None:
    return points, None
  epochs = {p.name: p.epochs for p in points}
  points = plan(sweep, workdir, lrs=_lrs_by_size(choice))
  for p in points:
    p.epochs = epochs.get(p.name)
  stale = [f'{p.name} (trained at lr {done[p.name]["overrides"].get("train.lr")}, chosen {p.lr})' for p in points
           if p.stage != 'lr' and p.name in done and done[p.name].get('overrides', {}).get('train.lr') != p.lr]
  if stale:
    raise ValueError(f'the lr stage now chooses other rates than some finished points trained at: {", ".join(stale)}.'
                     ' Its results changed after they ran; delete those points\' lines from results.jsonl (and their '
                     'directories) to retrain them, or restore the lr stage\'s results.')
  check_plans(points, done)
  for warning in choice['warnings']:
    logging.warning('sweep: lr stage: %s', warning)
  return points, choice


def _one_listing(fn):
  """`fn` under `documents.fixed_listing`: the corpus's files are listed and stat'ed once for all its points."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with documents.fixed_listing():
      return fn(*args, **kwargs)
  return wrapped


@_one_listing
def run(sweep: ml_collections.ConfigDict, workdir: str, *, only: tuple[str, ...] = (),
        allow_code_change: bool = False) -> list[dict[str, Any]]:
  """Trains every unfinished point (or those named in `only`), appending to DIR/results.jsonl; returns the
  records of all finished points. The lr stage's points run first; their results then choose the others' learning
  rates (DIR/lr.json). A point whose loss stops being finite is recorded as diverged (eval_loss null, `diverged`,
  `error`) and the sweep goes on; the fits leave it out. A sweep started by other code raises CodeVersionError
  (`check_code`) unless `allow_code_change`; a finished point the sweep file now plans otherwise, ValueError
  (`check_plans`)."""
  workdir = workdir_lib.resolve(workdir)
  root = epath.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  points = plan(sweep, workdir)
  unknown = sorted(set(only) - {p.name for p in points})
  if unknown:
    raise ValueError(f'--only names {unknown}, which are not points of the sweep: {[p.name for p in points]}')
  corpus_tokens = check_epochs(sweep, points)
  done = read_done(workdir)
  check_plans(points, done)
  code = code_version()
  started = bool(done) or any((root / p.name).exists() for p in points)
  history = check_code(root, done, code, started, allow_code_change=allow_code_change)
  write_record(root, sweep, points, corpus_tokens, code, history)
  wanted = lambda p: p.name not in done and (not only or p.name in only)
  logging.info('sweep: %d points, %d finished, %d to run; corpus of %s tokens', len(points), len(done),
               sum(map(wanted, points)), f'{corpus_tokens:,}')
  if not _train(sweep, root, [p for p in points if p.stage == 'lr' and wanted(p)], done, code):
    return list(done.values())
  points, choice = _after_lr_stage(sweep, workdir, points, done)
  if any(p.stage == 'lr' for p in points):
    if choice is None:
      if any(p.stage != 'lr' and p.name in only for p in points):
        raise ValueError('--only names points whose learning rate the lr stage chooses, and it has not finished: '
                         'run its points (LR-...) first')
      return list(done.values())
    _write_json(root / 'lr.json', choice)
    logging.info('sweep: lr stage: lr = %.3g N^%.3f; %s', choice['coefficient'], choice['exponent'],
                 ', '.join(f's{k} {v:.3g}' for k, v in choice['lr'].items()))
  _train(sweep, root, [p for p in points if p.stage != 'lr' and wanted(p)], done, code)
  return list(done.values())


# Config values that name this machine's files or say how a run goes, not what it computes: left out when a point
# is compared with its record (the corpus is compared by its token count instead).
_MACHINE_KEYS = ('data.prepared_dir', 'train.compilation_cache_dir', 'data.train_files', 'data.eval_files',
                 'data.read_threads', 'train.log_every', 'train.checkpoint_every')


def plan_differences(planned: Mapping[str, Any], committed: Mapping[str, Any]) -> list[str]:
  """The config values (`overrides`) a re-planned point sets otherwise than its committed record, machine paths
  left out: a point that differs there is another experiment."""
  out = []
  for key in sorted(set(planned) & set(committed)):
    a, b = committed[key], planned[key]
    same = (math.isclose(a, b, rel_tol=1e-9) if isinstance(a, (int, float)) and isinstance(b, (int, float))
            and not isinstance(a, bool) else a == b)
    if key not in _MACHINE_KEYS and not same:
      out.append(f'{key}: {a!r} committed, {b!r} now')
  return out


def check_plans(points: Sequence[Point], done: Mapping[str, Mapping[str, Any]]) -> None:
  """Raises ValueError if a finished point trained otherwise than the sweep file now plans it (`plan_differences`;
  the learning rate of a point the lr stage has not chosen yet left out): the sweep file changed after it ran, and
  its result would stand for a point it is not."""
  changed = []
  for p in points:
    record = done.get(p.name, {}).get('overrides')
    if record is None:
      continue
    planned = p.overrides if p.stage == 'lr' or p.lr is not None else \
        {k: v for k, v in p.overrides.items() if k != 'train.lr'}
    differences = plan_differences(planned, record)
    if differences:
      changed.append(f'{p.name} ({"; ".join(differences)})')
  if changed:
    raise ValueError(f'{len(changed)} finished point(s) trained otherwise than the sweep file now plans them: '
                     f'{", ".join(changed[:5])}{" ..." if len(changed) > 5 else ""}. The sweep file changed after '
                     'they ran: move their lines out of results.jsonl (and their directories away) to retrain them, '
                     'or give the changed sweep a new DIR.')


@_one_listing
def check(sweep: ml_collections.ConfigDict, workdir: str, reference: str, names: Sequence[str], *,
          tolerance: float = 0.02, allow_code_change: bool = False) -> list[dict[str, Any]]:
  """Retrains points of a committed sweep (`reference`: its directory, with results.jsonl and sweep.json) in
  `workdir` (a new directory; a rerun resumes it) and compares each final eval loss with the committed one.

  Each point is planned from the sweep file, as `run` would; one whose learning rate an lr stage chose takes the
  committed record's (no lr stage runs). Returns one row per point: `name`, `committed` and `now` (eval losses),
  `difference`, `ok` (within `tolerance`, and planned as committed), `plan_differences` (`plan_differences`, and
  the corpus's token count when it differs from the committed sweep.json's), and both code versions.
  """
  committed = {r['name']: r for r in scaling.read_results(reference)}
  missing = [n for n in names if n not in committed]
  if not names or missing:
    raise ValueError(f'check: name the points to rerun (--only) from {reference}\'s results.jsonl; '
                     f'not there: {missing or "none named"} (it has {sorted(committed)[:20]})')
  workdir = workdir_lib.resolve(workdir)
  root = epath.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  by_name = {p.name: p for p in plan(sweep, workdir)}
  unknown = [n for n in names if n not in by_name]
  if unknown:
    raise ValueError(f'check: {unknown} are not points of this sweep file (its points: {sorted(by_name)[:20]})')
  points = [by_name[n] for n in names]
  for p in points:
    if p.stage != 'lr' and 'train.lr' in p.overrides and p.lr is None:
      p.overrides['train.lr'] = committed[p.name].get('overrides', {}).get('train.lr')
  corpus_tokens = check_epochs(sweep, points)
  saved = epath.Path(reference) / 'sweep.json'
  committed_corpus = files.read_json(saved).get('corpus_tokens') if saved.exists() else None
  done = read_done(workdir)
  code = code_version()
  history = check_code(root, done, code, bool(done) or any((root / n).exists() for n in names),
                       allow_code_change=allow_code_change)
  write_record(root, sweep, points, corpus_tokens, code, history, checks=reference)
  if not _train(sweep, root, [p for p in points if p.name not in done], done, code):
    raise RuntimeError('check: stopped before every point finished; run it again to resume')
  rows = []
  for p in points:
    was, now = committed[p.name].get('eval_loss'), done[p.name].get('eval_loss')
    differences = plan_differences(p.overrides, committed[p.name].get('overrides', {}))
    if committed_corpus is not None and committed_corpus != corpus_tokens:
      differences.append(f'corpus_tokens: {committed_corpus:,} committed, {corpus_tokens:,} now')
    difference = None if was is None or now is None else now - was
    rows.append(dict(name=p.name, committed=was, now=now, difference=difference,
                     ok=difference is not None and abs(difference) <= tolerance and not differences,
                     plan_differences=differences, tolerance=tolerance,
                     committed_code=committed[p.name].get('code'), code=_short(code)))
  return rows


def check_report(rows: Sequence[Mapping[str, Any]]) -> str:
  """`check`'s rows as lines a reader can act on (one per point, then the verdict)."""
  lines = []
  for r in rows:
    now = 'none' if r['now'] is None else f'{r["now"]:.4f}'
    was = 'none' if r['committed'] is None else f'{r["committed"]:.4f}'
    diff = '' if r['difference'] is None else f' ({r["difference"]:+.4f})'
    lines.append(f'{r["name"]}: eval loss {now} now, {was} committed{diff}: '
                 f'{"ok" if r["ok"] else "DIFFERS"} (tolerance {r["tolerance"]})')
    lines += [f'  planned otherwise: {d}' for d in r['plan_differences']]
    if not r['ok']:
      lines.append(f'  committed by {_describe_code(r["committed_code"])}; rerun by {_describe_code(r["code"])}')
  bad = sum(not r['ok'] for r in rows)
  lines.append(f'check: {len(rows) - bad} of {len(rows)} point(s) reproduce' + (f'; {bad} do not' if bad else ''))
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------------
# The plan as a table, with estimated GPU times.

def _program(point: Point) -> tuple:
  """What makes a point's compiled step its own: everything but the schedule (its length, warmup and learning
  rate are inputs of the step) and the data."""
  return tuple(sorted((k, str(v)) for k, v in point.overrides.items()
                      if k not in ('train.steps',) + group_lib.MEMBER_KEYS and not k.startswith('data.')))


def schedule(points: Sequence[Point], estimate: Mapping[str, float] | None = None,
             piece_seconds: float = 0.0, group_size: int = 0) -> list[tuple[int, float]]:
  """(piece, estimated seconds) of each point, in run order. Points are cut into pieces of at most
  `piece_seconds` (0: one piece) at the ends of stages and budgets where they can be: a budget that fits in what
  is left of a piece goes whole into it, else into the next one; a budget longer than a piece is cut between
  points. Each piece pays compile_s once per compiled program it runs (a fresh process, maybe a fresh machine).
  Points trained as a group (`groups`) share its time: its FLOPs at `mfu`, or its steps at `step_s` once."""
  est = dict(ESTIMATE, **dict(estimate or {}))
  share, program = {}, {}
  for members in groups(points, group_size):
    flops = sum(p.flops_actual for p in members)
    seconds = (max(flops / (est['mfu'] * est['peak_flops']), members[0].overrides['train.steps'] * est['step_s'])
               + est['overhead_s'])
    for p in members:
      share[p.name], program[p.name] = seconds / len(members), (_program(p), len(members))

  units = [list(g) for _, g in itertools.groupby(points, key=lambda p: (p.stage, p.budget))]
  out, piece, used, seen = [], 0, 0.0, set()

  def cost(group: Sequence[Point], programs: set) -> float:
    fresh = {program[p.name] for p in group} - programs
    return sum(share[p.name] for p in group) + est['compile_s'] * len(fresh)

  for unit in units:
    if piece_seconds and used and used + cost(unit, seen) > piece_seconds:
      piece, used, seen = piece + 1, 0.0, set()
    for p in unit:
      t = cost([p], seen)
      if piece_seconds and used and used + t > piece_seconds:
        piece, used, seen = piece + 1, 0.0, set()
        t = cost([p], seen)
      seen.add(program[p.name])
      used += t
      out.append((piece, t))
  return out


def _si(value: float) -> str:
  for unit, scale in (('G', 1e9), ('M', 1e6), ('k', 1e3)):
    if abs(value) >= scale:
      return f'{value / scale:.3g}{unit}'
  return f'{value:.3g}'


def plan_table(points: Sequence[Point], *, done: Mapping[str, Mapping[str, Any]] | None = None,
               estimate: Mapping[str, float] | None = None, piece_seconds: float = 0.0, group_size: int = 0) -> str:
  """The plan as a text table, one row per point in run order: its piece (`schedule`), name, N, D, D/N, batch,
  steps, warmup, lr, epochs, C spent, estimated seconds (a grouped point's share of its group's), and its eval
  loss once finished; then the totals of each piece and of the whole sweep (estimates, finished points
  included)."""
  done = done or {}
  timing = schedule(points, estimate, piece_seconds, group_size)
  header = ('piece', 'name', 'N', 'D', 'D/N', 'batch', 'steps', 'warmup', 'lr', 'epochs', 'C', 'est. s', 'eval loss')
  rows = []
  for p, (piece, seconds) in zip(points, timing):
    record = done.get(p.name, {})
    loss = record.get('eval_loss')
    status = f'{loss:.4f}' if loss is not None else ('diverged' if record.get('diverged') else '')
    lr = p.lr if p.lr is not None else record.get('overrides', {}).get('train.lr')
    rows.append((str(piece + 1), p.name, _si(p.params), _si(p.tokens), f'{p.tokens / p.params:.3g}',
                 str(p.overrides.get('train.batch_size', '')), str(p.overrides['train.steps']),
                 str(p.overrides['train.warmup_steps']),
                 '(lr stage)' if lr is None and 'train.lr' in p.overrides else f'{lr:.3g}' if lr else 'base',
                 '?' if p.epochs is None else f'{p.epochs:.2f}', f'{p.flops_actual:.2e}', f'{seconds:.0f}', status))
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
  line = lambda r: '  '.join(c.rjust(w) if i not in (1, 12) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
  out = [line(header)] + [line(r) for r in rows]
  for piece in sorted({t[0] for t in timing}):
    members = [p for p, t in zip(points, timing) if t[0] == piece]
    seconds = sum(t[1] for t in timing if t[0] == piece)
    left = sum(p.name not in done for p in members)
    out.append(f'piece {piece + 1}: {len(members)} points ({left} to run), {sum(p.flops_actual for p in members):.3g}'
               f' FLOPs, about {seconds / 60:.1f} min: --only={",".join(p.name for p in members)}')
  total = sum(t[1] for t in timing)
  out.append(f'total: {len(points)} points, {sum(p.flops_actual for p in points):.3g} FLOPs, about '
             f'{total / 60:.1f} min (estimate: {dict(ESTIMATE, **dict(estimate or {}))})')
  return '\n'.join(out)


def _flag_value(value: Any) -> str:
  return str(value) if not isinstance(value, float) else repr(value)


def emit_plan(sweep: ml_collections.ConfigDict, workdir: str, *, piece_seconds: float = 0.0
              ) -> tuple[str, list[str]]:
  """(`plan_table` of the sweep, one `python -m qwenjax.train` command per unfinished point), after preparing
  the shared corpus. Points whose learning rate the lr stage chooses get commands once it has finished."""
  workdir = workdir_lib.resolve(workdir)
  points = plan(sweep, workdir)
  check_epochs(sweep, points)
  done = read_done(workdir)
  points, _ = _after_lr_stage(sweep, workdir, points, done)
  base = resolve_base(sweep.base)
  commands = []
  for point in points:
    if point.name in done or (point.stage != 'lr' and 'train.lr' in point.overrides and point.lr is None):
      continue
    args = ['python', '-m', 'qwenjax.train', f'--config={base}', f'--workdir={epath.Path(workdir) / point.name}']
    args += [f'--config.{k}={_flag_value(v)}' for k, v in point.overrides.items()]
    commands.append(' '.join(shlex.quote(a) for a in args))
  return plan_table(points, done=done, estimate=sweep.get('estimate'), piece_seconds=piece_seconds,
                    group_size=int(sweep.get('group_size', 0))), commands


def emit(sweep: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """One `python -m qwenjax.train` command per unfinished point (after preparing the shared corpus)."""
  return emit_plan(sweep, workdir)[1]


def _define_flags() -> None:
  """The command line's flags (defined when it runs: importing this module adds none)."""
  config_flags.DEFINE_config_file('sweep', None, 'Sweep file, e.g. experiments/isoflop_small.py.', lock_config=False)
  flags.DEFINE_string('workdir', None, 'The sweep\'s directory: a workdir per point, results.jsonl, the shared '
                      'prepared corpus and compilation cache. Running again resumes.')
  flags.DEFINE_bool('emit', False, 'Print one python -m qwenjax.train command per unfinished point instead of running '
                    'them.')
  flags.DEFINE_list('only', [], 'Run only these points (names as in DIR/sweep.json).')
  flags.DEFINE_string('check', None, 'A committed sweep directory (results.jsonl, sweep.json): retrain the --only '
                      'points in --workdir and compare each eval loss with the committed one (exit 1 if any differs '
                      'by more than 0.02).')
  flags.DEFINE_bool('allow_code_change', False, 'Resume (or check) a sweep that other code started, recording the '
                    'change, instead of refusing.')
  flags.DEFINE_float('piece_seconds', 0.0, 'With --emit: cut the plan into pieces of about this many seconds of '
                     'estimated training (0: one piece).')
  distributed.define_flags()  # every point on all processes


def main(argv: list[str]) -> None:
  del argv  # cli.run: no positional arguments
  logging.get_absl_handler().addFilter(train._LibraryInfoFilter())  # pylint: disable=protected-access
  sweep, workdir = flags.FLAGS.sweep, train.check_workdir(flags.FLAGS.workdir)
  distributed.initialize_from_flags()
  if flags.FLAGS.emit:
    table, commands = emit_plan(sweep, workdir, piece_seconds=flags.FLAGS.piece_seconds)
    print('\n'.join([table, ''] + commands))
    return
  cache = train.compilation_cache_dir(
      str(sweep.get('overrides', {}).get('train', {}).get('compilation_cache_dir',
                                                          os.path.join(workdir, 'compilation_cache'))), workdir)
  if cache:  # jax's process-wide setting, before anything compiles: points of one shape compile once
    jax.config.update('jax_compilation_cache_dir', cache)
  if flags.FLAGS.check:
    rows = check(sweep, workdir, flags.FLAGS.check, tuple(flags.FLAGS.only),
                 allow_code_change=flags.FLAGS.allow_code_change)
    print(check_report(rows))
    if not all(row['ok'] for row in rows):
      raise RuntimeError(f'{sum(not row["ok"] for row in rows)} point(s) did not reproduce their committed eval loss')
    return
  records = run(sweep, workdir, only=tuple(flags.FLAGS.only), allow_code_change=flags.FLAGS.allow_code_change)
  print(f'{len(records)} point(s) finished; results in {os.path.join(workdir, "results.jsonl")}. Fit them with: '
        f'python -m qwenjax.scaling fit {workdir}')


if __name__ == '__main__':
  cli.run(main, _define_flags, required=('sweep', 'workdir'), expected=train.USER_ERRORS)
