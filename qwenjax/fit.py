"""Fitting a run's train step to the device's memory, and out-of-memory errors as messages, not tracebacks.

`train.grad_accum_steps='auto'` and `train.remat_policy='auto'` (the defaults) choose among compiled versions of
the very step the run then executes:

1. Candidates. A micro-batch holds `rows` rows per data shard (`batch_size / grad_accum_steps / batch shards`),
   from one row up to the target: the fewest rows holding `TARGET_TOKENS` tokens and `TARGET_FLOPS` training FLOPs
   (`metrics.flops_per_token`) per data shard. Past it a micro-batch only costs memory. Policies: `AUTO_POLICIES`
   ('none' is left out: 'activations_saveable' recomputes nothing either and keeps less).
2. Predicted speed: `HALVING_SPEED` for each halving of the micro-batch below the target, divided by 1 + the
   forward FLOPs the policy recomputes over the step's FLOPs (`recompute_flops_per_token`).
3. Fastest first, each candidate is compiled unless the activations its backward pass keeps (traced, not compiled:
   `train_step.saved_bytes`) already exceed the device. The first whose compiled step fits (`needed_bytes`, XLA's
   memory analysis, within `MARGIN` of the device's limit) is the run's step, compiled once.
4. Nothing fits: `OutOfMemoryError`, saying what the smallest setting (one row per data shard, 'full') needs and
   what the device has.

Without a memory figure (a CPU, with `train.device_memory_gib=0`) 'auto' means one micro-batch and no remat. An
explicit setting is compiled the same way and stops the run before its first step when XLA's analysis puts it
over the device's memory. The measurements behind the constants are in docs/performance.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Callable, Iterator, Mapping

from absl import logging
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from qwenjax import attention
from qwenjax import group as group_lib
from qwenjax import metrics
from qwenjax import sharding
from qwenjax import train_step
from qwenjax.config import FitConfig, RunConfig
from qwenjax.kernels import attention_contract
from qwenjax.model_config import ModelConfig

# What 'auto' tries, least recomputation first at equal memory (the order breaks ties of predicted speed).
AUTO_POLICIES = ('activations_saveable', 'dots_and_attention_saveable', 'attention_saveable',
                 'dots_with_no_batch_dims_saveable', 'full')
SMALLEST_POLICY = 'full'  # keeps only each layer's input
TARGET_TOKENS = 32768  # per data shard: a micro-batch this big runs matmuls at full speed (docs/performance.md) ...
TARGET_FLOPS = 2.0**48  # ... and this much work (~0.5 s of a GPU) hides each micro-batch's fixed costs
HALVING_SPEED = 0.95  # the speed of half a micro-batch below the target, relative
MARGIN = 0.05  # of the device's memory, left free by 'auto' (fragmentation, the next batch, evaluation)
GIB = 2**30


class OutOfMemoryError(RuntimeError):
  """The step does not fit the device's memory; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Candidate:
  grad_accum_steps: int
  remat_policy: str
  rows: int  # rows per data shard in each micro-batch
  speed: float  # predicted, relative to the target micro-batch with nothing recomputed


@dataclasses.dataclass(frozen=True)
class Choice:
  """The step a run executes, what it needs and what the device has: for the log and for error messages."""
  grad_accum_steps: int
  remat_policy: str
  needed: int | None  # bytes per device (XLA's memory analysis of the compiled step)
  limit: int | None  # bytes per device; None: no memory figure
  automatic: tuple[str, ...]  # the settings 'auto' chose ('grad_accum_steps', 'remat_policy')
  batch_size: int
  seq_len: int
  batch_shards: int
  source: str = 'the device'  # of the limit: 'the device' or 'train.device_memory_gib'
  compiled: int = 1  # candidates compiled
  skipped: int = 0  # candidates whose saved activations alone exceed the device
  seconds: float = 0.0

  @property
  def rows(self) -> int:
    return self.batch_size // self.grad_accum_steps // self.batch_shards


def gib(n: float | None) -> str:
  """Bytes for a message: GiB, or MiB below a tenth of one (a CPU test's device)."""
  if n is None:
    return 'unknown'
  return f'{n / GIB:.2f} GiB' if n >= GIB / 10 else f'{n / 2**20:.1f} MiB'


def device_memory(fit: FitConfig, devices: Any = None) -> int | None:
  """Bytes per device that a step may use: `train.device_memory_gib`, else the smallest `bytes_limit` the devices
  report (the least on any process); None when a device reports none (CPUs)."""
  if fit.device_memory_gib:
    return int(fit.device_memory_gib * GIB)
  devices = jax.local_devices() if devices is None else [d for d in np.ravel(devices)
                                                          if d.process_index == jax.process_index()]
  limits = []
  for device in devices:
    try:
      limits.append((device.memory_stats() or {}).get('bytes_limit'))
    except Exception:  # pylint: disable=broad-except  (a backend without memory statistics)
      limits.append(None)
  limit = min(limits) if limits and all(limits) else 0
  if jax.process_count() > 1:
    every = multihost_utils.process_allgather(np.array(limit, np.int64))
    limit = 0 if not np.all(every) else int(np.min(every))
  return int(limit) or None


def recompute_flops_per_token(model: ModelConfig, seq_len: int, policy: str) -> float:
  """Forward FLOPs per token that `policy`'s backward pass computes again: how 'auto' ranks the policies.

  Matmuls at 2 FLOPs per weight; attention at `4 * heads * head_dim` per visible (query, key) pair. The attention
  kernels' outputs are saved by name only with cuDNN and the GPU Pallas kernel (`attention.forward_saveable`);
  otherwise the policies that keep them recompute attention too. Elementwise work (norms, rotary) is not counted.
  """
  h, heads, kv, d = model.hidden_size, model.num_attention_heads, model.num_key_value_heads, model.head_dim
  qkv = 2 * h * (heads + 2 * kv) * d
  attention_forward = matmuls = routed = 0.0
  for layer in range(model.num_hidden_layers):
    window = model.sliding_window if model.is_sliding(layer) else None
    attention_forward += 4 * heads * d * attention_contract.band_pairs(seq_len, window) / seq_len
    if model.is_moe(layer):
      experts = 2 * 3 * h * model.moe_intermediate_size * model.num_experts_per_tok
      routed += experts
      ffn = experts + 2 * 3 * h * model.shared_expert_intermediate_size
    else:
      ffn = 2 * 3 * h * model.intermediate_size
    matmuls += qkv + 2 * heads * d * h + ffn
  try:
    named = attention.resolve_impl(model.attention_impl, model.attention_interpret) in ('cudnn', 'pallas_gpu')
  except ValueError:
    named = False
  unsaved_attention = 0.0 if named else attention_forward
  return {
      'none': 0.0,
      'everything_saveable': 0.0,
      'activations_saveable': unsaved_attention + routed,  # routed experts are not named
      'dots_and_attention_saveable': unsaved_attention,
      'attention_saveable': matmuls - model.num_hidden_layers * qkv + unsaved_attention,
      'dots_saveable': attention_forward,
      'dots_with_no_batch_dims_saveable': attention_forward,
  }.get(policy, matmuls + attention_forward)  # 'full', 'nothing_saveable'


def target_rows(model: ModelConfig, seq_len: int) -> int:
  """Rows per data shard of the biggest micro-batch 'auto' considers (step 1 of the module's rule)."""
  tokens = max(TARGET_TOKENS, TARGET_FLOPS / metrics.flops_per_token(model, seq_len))
  return max(1, int(tokens // seq_len))


def candidates(settings: RunConfig, batch_shards: int) -> list[Candidate]:
  """Every (grad_accum_steps, remat_policy) the settings leave open, fastest first by the module's rule."""
  batch, seq, model = settings.loop.batch_size, settings.data.seq_len, settings.model
  accum = settings.loss.grad_accum_steps
  if accum == 'auto':
    accums = [a for a in range(1, batch + 1) if batch % a == 0 and (batch // a) % batch_shards == 0]
  else:
    accums = [accum]
  policies = AUTO_POLICIES if model.remat_policy == 'auto' else (model.remat_policy,)
  flops = metrics.flops_per_token(model, seq)
  recompute = {p: recompute_flops_per_token(model, seq, p) / flops for p in policies}
  target = target_rows(model, seq)
  out = []
  for a in accums:
    rows = batch // a // batch_shards
    if accum == 'auto' and rows > target:
      continue  # bigger than it needs to be
    size = HALVING_SPEED ** max(0.0, math.log2(target / rows))
    out.extend(Candidate(a, p, rows, size / (1 + recompute[p])) for p in policies)
  order = {p: i for i, p in enumerate(policies)}
  return sorted(out, key=lambda c: (-c.speed, -c.rows, order[c.remat_policy]))


def needed_bytes(compiled: Any) -> int | None:
  """Device memory a compiled step needs, from XLA's memory analysis: arguments + outputs + temporaries + code,
  less what the outputs take over from donated arguments. None where the backend gives no analysis."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             + m.generated_code_size_in_bytes - m.alias_size_in_bytes)


def resolved(settings: RunConfig, grad_accum_steps: int, remat_policy: str) -> RunConfig:
  """The settings with these values: in the loss, the model (which reads the policy) and the fit section."""
  return dataclasses.replace(
      settings, loss=dataclasses.replace(settings.loss, grad_accum_steps=grad_accum_steps),
      model=dataclasses.replace(settings.model, remat_policy=remat_policy),
      fit=dataclasses.replace(settings.fit, remat_policy=remat_policy))


def choose(settings: RunConfig, batch_shards: int, limit: int | None, compile_step: Callable[[RunConfig], Any],
           saved_bytes: Callable[[RunConfig], int] | None = None, source: str = 'the device'
           ) -> tuple[Choice, Any]:
  """(the choice, its compiled step) by the module's rule. `compile_step(settings)` compiles the step of
  settings without 'auto'; `saved_bytes(settings)` is a lower bound of its memory per device, without compiling.
  Raises OutOfMemoryError when nothing fits `limit` (bytes per device, from `source`)."""
  start = time.time()
  accum, policy = settings.loss.grad_accum_steps, settings.model.remat_policy
  automatic = tuple(name for name, value in (('grad_accum_steps', accum), ('remat_policy', policy))
                    if value == 'auto')
  make = lambda a, p, needed, **counts: Choice(a, p, needed, limit, automatic, settings.loop.batch_size,
                                               settings.data.seq_len, batch_shards, source, **counts)
  if limit is None:  # no memory figure: one micro-batch, no remat
    a, p = 1 if accum == 'auto' else accum, 'none' if policy == 'auto' else policy
    compiled, needed = _compile(compile_step, resolved(settings, a, p), make(a, p, None))
    return make(a, p, needed, seconds=time.time() - start), compiled

  usable = int(limit * (1 - MARGIN)) if automatic else limit
  tried: dict[tuple[int, str], int | None] = {}  # compiled: bytes needed (None: out of memory compiling)
  skipped = 0
  options = candidates(settings, batch_shards)
  if not options:
    raise ValueError(f'train.batch_size={settings.loop.batch_size} does not divide over the {batch_shards} '
                     'data-parallel shards')
  for c in options:
    s = resolved(settings, c.grad_accum_steps, c.remat_policy)
    if automatic and saved_bytes is not None:
      bound = saved_bytes(s)
      if bound > limit:
        logging.info('memory: grad_accum_steps=%d, remat_policy=%r skipped: its saved activations alone take %s '
                     'of %s', c.grad_accum_steps, c.remat_policy, gib(bound), gib(limit))
        skipped += 1
        continue
    compiled, needed = _compile(compile_step, s, make(c.grad_accum_steps, c.remat_policy, None))
    tried[(c.grad_accum_steps, c.remat_policy)] = needed
    if compiled is not None and needed is None:  # nothing to judge by: take it (its first step will tell)
      logging.warning('memory: XLA gave no memory analysis of the train step; taking grad_accum_steps=%d, '
                      'remat_policy=%r unchecked', c.grad_accum_steps, c.remat_policy)
      return make(c.grad_accum_steps, c.remat_policy, None, compiled=len(tried), skipped=skipped,
                  seconds=time.time() - start), compiled
    fits = needed is not None and needed <= usable
    logging.info('memory: grad_accum_steps=%d, remat_policy=%r needs %s of %s usable: %s', c.grad_accum_steps,
                 c.remat_policy, gib(needed), gib(usable), 'fits' if fits else 'too big')
    if fits:
      return make(c.grad_accum_steps, c.remat_policy, needed, compiled=len(tried), skipped=skipped,
                  seconds=time.time() - start), compiled
    del compiled
  smallest = (settings.loop.batch_size // batch_shards if accum == 'auto' else accum,
              SMALLEST_POLICY if policy == 'auto' else policy)
  if smallest not in tried:
    tried[smallest] = _compile(compile_step, resolved(settings, *smallest), make(*smallest, None))[1]
  raise OutOfMemoryError(_nothing_fits(make(*smallest, tried[smallest]), usable))


def _compile(compile_step: Callable[[RunConfig], Any], settings: RunConfig, choice: Choice) -> tuple[Any, int | None]:
  """(compiled step, bytes it needs); (None, None) when XLA runs out of memory compiling it and 'auto' may try
  another candidate. An explicit setting that does not compile is an OutOfMemoryError."""
  try:
    compiled = compile_step(settings)
  except Exception as e:  # pylint: disable=broad-except
    if not is_out_of_memory(e):
      raise
    if not choice.automatic:
      raise OutOfMemoryError(message('compiling the train step', choice, e)) from e
    return None, None
  return compiled, needed_bytes(compiled)


def _nothing_fits(smallest: Choice, usable: int) -> str:
  if not smallest.automatic:
    return (f'out of memory: the train step, {_setting(smallest)}, needs {gib(smallest.needed)} per device and '
            f'{smallest.source} has {gib(smallest.limit)}. {_advice(smallest)}')
  what = ' and '.join(f"train.{name}='auto'" for name in smallest.automatic)
  return (f'out of memory: nothing {what} can choose fits in {gib(usable)} per device ({smallest.source} has '
          f'{gib(smallest.limit)}, less a {MARGIN:.0%} margin). The smallest setting, {_setting(smallest)}, needs '
          f'{gib(smallest.needed)}. {_advice(smallest, smallest=True)}')


def _setting(choice: Choice) -> str:
  return (f'train.grad_accum_steps={choice.grad_accum_steps} (micro-batches of {choice.rows} x {choice.seq_len} '
          f'tokens per data shard) with train.remat_policy={choice.remat_policy!r}')


def _next_accum(choice: Choice) -> int | None:
  """The next grad_accum_steps above the choice's that splits the batch over the data shards, or None."""
  batch = choice.batch_size
  return next((a for a in range(choice.grad_accum_steps + 1, batch + 1)
               if batch % a == 0 and (batch // a) % choice.batch_shards == 0), None)


def _advice(choice: Choice, smallest: bool = False) -> str:
  """What to change, most specific first."""
  tips = []
  if not smallest:
    bigger = _next_accum(choice)
    if bigger and 'grad_accum_steps' not in choice.automatic:
      tips.append(f"--config.train.grad_accum_steps=auto (the fewest micro-batches that fit) or {bigger} or more")
    elif bigger:
      tips.append(f'--config.train.grad_accum_steps={bigger} or more')
    if choice.remat_policy != SMALLEST_POLICY:
      tips.append("--config.train.remat_policy=auto (the fastest policy that fits) or 'full' (keeps the least)"
                  if 'remat_policy' not in choice.automatic else "--config.train.remat_policy=full")
    if choice.automatic and choice.limit:
      tips.insert(0, f'--config.train.device_memory_gib={0.85 * choice.limit / GIB:.3g} (less than the '
                  f'{gib(choice.limit)} \'auto\' fitted, so that its choice leaves more room)')
    tips.append(f'a smaller train.batch_size (now {choice.batch_size}) or data.seq_len (now {choice.seq_len})')
  else:
    tips.append(f'a smaller data.seq_len (now {choice.seq_len})')
    if choice.source == 'train.device_memory_gib':
      tips.append(f'a larger train.device_memory_gib (now {choice.limit / GIB:.3g})')
  tips.append('more devices (mesh.fsdp shards the train state)')
  return 'Use ' + '; or '.join(tips) + '.'


def message(where: str, choice: Choice, error: BaseException | None = None) -> str:
  """One line: out of memory `where`, with which settings, what XLA said, and what to change."""
  chosen = ''
  if choice.automatic:
    chosen = f" (chosen by 'auto': XLA's analysis put the step at {gib(choice.needed)} of {gib(choice.limit)})"
  elif choice.needed is not None and choice.limit is not None:
    chosen = f' (XLA\'s analysis of the step: {gib(choice.needed)}; the device: {gib(choice.limit)})'
  said = ''
  if error is not None:
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    said = f' [XLA: {first[:200]}]'
  return f'out of memory {where} with {_setting(choice)}{chosen}{said}. {_advice(choice)}'


def is_out_of_memory(error: BaseException) -> bool:
  """Whether `error` is XLA running out of device memory (compiling, allocating or running a program)."""
  text = str(error)
  return isinstance(error, jax.errors.JaxRuntimeError) and (
      'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower())


@contextlib.contextmanager
def out_of_memory(where: Callable[[], str], choice: Choice) -> Iterator[None]:
  """Turns XLA's out-of-memory error inside the block into an OutOfMemoryError whose one line says `where()` it
  happened and what to change; other errors pass as they are."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    if not is_out_of_memory(e):
      raise
    raise OutOfMemoryError(message(where(), choice, e)) from e


def describe(choice: Choice) -> str:
  """The log line of a choice: the values, what the step needs and what the device has."""
  values = ', '.join(f'train.{name}={getattr(choice, name)!r}' + (' (auto)' if name in choice.automatic else '')
                     for name in ('grad_accum_steps', 'remat_policy'))
  if choice.limit is None:
    room = (f'needs {gib(choice.needed)}; no memory figure (set train.device_memory_gib to fit one, and \'auto\' '
            'chooses for it)')
  else:
    room = f'needs {gib(choice.needed)} of the device\'s {gib(choice.limit)}'
  counts = f'{choice.compiled} compiled' + (f', {choice.skipped} skipped' if choice.skipped else '')
  return (f'{values}: micro-batches of {choice.rows} x {choice.seq_len} tokens per data shard; the step {room} '
          f'(XLA\'s memory analysis; {counts} in {choice.seconds:.1f} s)')


def record(config: ml_collections.ConfigDict, choice: Choice) -> ml_collections.ConfigDict:
  """`config` as the run's config.json records it: the values the run uses in place of 'auto'."""
  values = config.to_dict()
  values['train'] = {**values.get('train', {}), 'grad_accum_steps': choice.grad_accum_steps,
                     'remat_policy': choice.remat_policy}
  values.get('model', {}).pop('remat_policy', None)  # a config of before, which kept it in the model section
  return ml_collections.ConfigDict(values)


def fit_step(settings: RunConfig, *, mesh: jax.sharding.Mesh, rules: sharding.Rules, tx: Any, shardings: Any,
             batch: Mapping[str, jax.ShapeDtypeStruct], jit_step: Callable[[RunConfig], Any],
             frozen: tuple = (), members: int = 1, member_batches: bool = False) -> tuple[RunConfig, Any, Choice]:
  """(settings with 'auto' resolved, the compiled train step, the choice), logged.

  `batch`: the global batch as ShapeDtypeStructs with their sharding; `jit_step(settings)`: the train step jitted
  as the run calls it, `(state, batch, horizon, *frozen) -> (state, metrics)`; `frozen`: the step's read-only
  inputs as ShapeDtypeStructs (LoRA's base parameters); `members` > 1: a group's step, vmapped over that many
  stacked train states (`qwenjax.group`), so the program fitted is the one the group runs; `member_batches`: the
  batch holds each member's own, stacked in front.
  """
  batch_shards = sharding.batch_shards(mesh, rules)
  limit = device_memory(settings.fit, mesh.devices)
  replicated = sharding.replicated(mesh)
  single = train_step.abstract_state(settings.model, tx, shardings, settings.lora)
  stacked = () if members == 1 else (members,)
  state = single if not stacked else jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(stacked + x.shape, x.dtype, sharding=s), single,
      group_lib.stacked_shardings(shardings))
  horizon = {k: jax.ShapeDtypeStruct(stacked, np.asarray(v).dtype, sharding=replicated)
             for k, v in train_step.schedule_horizon(settings.optimizer).items()}
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  # The model's parameters: the state's, or with LoRA the frozen base (the state then holds the adapters).
  params = frozen[0] if frozen else single.params
  state_bytes, param_bytes = nbytes(state) + nbytes(frozen), nbytes(params)

  def compile_step(s: RunConfig):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jit_step(s).lower(state, dict(batch), horizon, *frozen).compile()

  def saved_bytes(s: RunConfig) -> int:
    rows = settings.loop.batch_size // s.loss.grad_accum_steps
    first = 2 if member_batches else 1  # the rows' axis, then what follows it
    micro = {k: jax.ShapeDtypeStruct((rows,) + x.shape[first:], x.dtype) for k, x in batch.items()}
    try:
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        residuals = train_step.saved_bytes(s.model, s.loss, params, micro)
    except Exception as e:  # pylint: disable=broad-except  (only a shortcut: compile instead)
      logging.warning('memory: could not trace what the backward pass keeps (%s); compiling to find out', e)
      return 0
    # Per device at least the even share (parameters among the residuals are already counted in the state); a
    # group's members each keep their own.
    return (state_bytes + members * max(0, residuals - param_bytes)) // mesh.size

  source = 'train.device_memory_gib' if settings.fit.device_memory_gib else 'the device'
  choice, compiled = choose(settings, batch_shards, limit, compile_step, saved_bytes, source)
  logging.info('memory: %s', describe(choice))
  return resolved(settings, choice.grad_accum_steps, choice.remat_policy), compiled, choice
