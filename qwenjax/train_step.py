"""One optimizer step: the loss, AdamW, gradient accumulation, and the sharded train state.

Kept apart from the loop in `qwenjax.train` so benchmarks run the very same step with synthetic batches.

A batch is a dict of `[batch, seq]` arrays: `inputs` and `targets` (int32 token ids), `weights` (float32, 0
where the target is padding or belongs to another document), and optionally `positions` and `segment_ids`
(packed documents; without them every row is one document starting at position 0).

With LoRA (`train.lora_rank > 0`, `qwenjax.lora`) the train state's `params` are the adapters alone, and the step
and eval step take the frozen base parameters as one more argument (`frozen_inputs`; DPO's reference model is
taken the same way): `train_step(state, batch, horizon, base)`. The model with its adapters is
`params, adapters = model_inputs(state.params, (base,), lora)`, then
`hidden_states(model_config, params, batch, adapters)`; the base without adapters (a reference model, e.g. DPO's
with LoRA) is `hidden_states(model_config, base, batch)`: no copy of the base, no second parameter tree.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qwenjax import context
from qwenjax import dpo
from qwenjax import lora as lora_lib
from qwenjax import loss as loss_lib
from qwenjax import model as model_lib
from qwenjax.config import LoraConfig, LossConfig, OptimizerConfig
from qwenjax import mup
from qwenjax import params as params_lib
from qwenjax import sharding
from qwenjax.model_config import ModelConfig

Batch = Mapping[str, jax.Array]

# Parameters that get no weight decay: norm scales and biases.
_NO_DECAY = ('scale', 'bias')


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def schedule_horizon(optimizer: OptimizerConfig) -> dict[str, np.ndarray]:
  """The schedule's values as scalars: `warmup_steps`, `steps` (int32), `lr`, `lr_final_fraction` (float32): the
  train step's `horizon` argument.

  They are inputs of the compiled step, not constants in it, so runs that differ only in them (the points of one
  model shape in a scaling sweep: their lengths, warmups and learning rates) run one compiled program and share
  it through the compilation cache; a group of such runs (`qwenjax.train.train_group`) stacks them.
  """
  return {'warmup_steps': np.int32(optimizer.warmup_steps), 'steps': np.int32(optimizer.steps),
          'lr': np.float32(optimizer.lr), 'lr_final_fraction': np.float32(optimizer.lr_final_fraction)}


def learning_rate_schedule(optimizer: OptimizerConfig, horizon: Mapping[str, Any] | None = None
                           ) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine decay to `lr * lr_final_fraction` at `steps` (or constant `lr`).

  The values of optax's `warmup_cosine_decay_schedule(0, lr, warmup, max(steps, warmup + 1), ...)` and of
  `join_schedules` of `linear_schedule(0, lr, max(warmup, 1))` and `constant_schedule(lr)`. `horizon`
  (`schedule_horizon`; None: the optimizer's own) gives lr, its final fraction, warmup and length, and may hold
  traced values, which the train step passes: optax's schedule constructors need Python ints (they branch on them
  and raise on tracers), so the schedule is written out here in jnp. (OptimizerConfig has checked that
  `lr_schedule` is one of the two.)
  """
  kind = optimizer.lr_schedule
  horizon = schedule_horizon(optimizer) if horizon is None else horizon

  def schedule(step):
    lr, final = jnp.asarray(horizon['lr'], jnp.float32), jnp.asarray(horizon['lr_final_fraction'], jnp.float32)
    step = jnp.asarray(step, jnp.float32)
    warmup = jnp.asarray(horizon['warmup_steps'], jnp.float32)
    warming = lr * step / jnp.maximum(warmup, 1.0)
    if kind == 'constant':
      return jnp.where(step < warmup, warming, lr)
    decay = jnp.maximum(jnp.asarray(horizon['steps'], jnp.float32), warmup + 1.0) - warmup  # at least 1 step
    cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(step - warmup, decay) / decay))
    return jnp.where(step < warmup, warming, lr * ((1.0 - final) * cosine + final))

  return schedule


def decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay: everything except norm scales and biases."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) not in _NO_DECAY, params)


def make_optimizer(optimizer: OptimizerConfig, horizon: Mapping[str, Any] | None = None
                   ) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (decoupled weight decay, masked off norms and biases) with the learning
  rate `learning_rate_schedule(optimizer, horizon)`.

  The horizon changes no state: the one made without it initializes, shards and restores the state, and the
  train step makes the same chain from its runtime horizon to update it.
  """
  adamw = optax.adamw(
      learning_rate_schedule(optimizer, horizon), b1=optimizer.adam_b1, b2=optimizer.adam_b2,
      eps=optimizer.adam_eps, weight_decay=optimizer.weight_decay, mask=decay_mask)
  # The same chain either way, so the optimizer state keeps its structure when grad_clip is turned on or off.
  clip = optimizer.grad_clip
  if optimizer.mup_base_width:  # μP: per-layer learning rates by width (qwenjax/mup.py)
    return optax.chain(optax.clip_by_global_norm(clip) if clip > 0 else optax.identity(), adamw,
                       mup.scale_learning_rates(optimizer.mup_base_width))
  return optax.chain(optax.clip_by_global_norm(clip) if clip > 0 else optax.identity(), adamw)


def hidden_states(model_config: ModelConfig, params: Any, batch: Batch, lora: Any = None):
  """(final hidden states, output head in the compute dtype, auxiliary losses) of one forward pass.

  The loss builds logits from these chunk by chunk (`qwenjax.loss`), never all at once. `lora`: the model's `lora`
  collection (`qwenjax.lora.scaled(adapters, ...)`), or None for the model of `params` alone.
  """
  hidden, aux = model_lib.apply_with_aux(model_config, params, batch['inputs'], batch.get('positions'),
                                         batch.get('segment_ids'), return_hidden=True, lora=lora)
  head = model_lib.output_head(model_config, params).astype(model_config.dtype)
  return hidden, head, aux


def _context_order(batch: Batch) -> Batch:
  """The batch in the zig-zag order a sequence is split in under context parallelism (`qwenjax.context`), else
  as it is. Losses are sums over tokens (or segments), so the order changes nothing else."""
  return context.zigzag_batch(batch) if sharding.context_size() > 1 else batch


def _sums(model_config: ModelConfig, params: Any, batch: Batch, z_loss: float,
          chunk: int = loss_lib.DEFAULT_CHUNK, logits_dtype: str = 'float32', loss_impl: str = 'auto',
          lora: Any = None):
  """(objective to differentiate, (nll sum, z sum, target count, count-weighted aux losses)) of a (micro-)batch.

  Everything is a sum over target tokens, so micro-batches add up and one division by the total count gives
  the mean loss; the auxiliary losses (per-pass means, see `model.apply_with_aux`) are weighted by the pass's
  token count to match. `moe_aux_loss` joins the objective; every entry is logged.

  Under context parallelism (the rules split `activation_length` over the mesh) the batch is first put into the
  zig-zag order each sequence is split in (`qwenjax.context`); every term is a sum over tokens, so nothing else
  changes.
  """
  batch = _context_order(batch)
  hidden, head, aux = hidden_states(model_config, params, batch, lora)
  total, nll, z = loss_lib.cross_entropy(hidden, head, batch['targets'], batch['weights'], z_coef=z_loss,
                                         chunk=chunk, logits_dtype=logits_dtype, impl=loss_impl)
  count = jnp.sum(batch['weights'].astype(jnp.float32))
  weighted_aux = {k: jax.lax.stop_gradient(v) * count for k, v in aux.items()}
  return total + aux['moe_aux_loss'] * count, (nll, z, count, weighted_aux)


def _loss_keywords(loss: LossConfig) -> dict[str, Any]:
  """`_sums`'s loss keywords (chunk, logits_dtype, loss_impl) of the loss settings."""
  loss_lib.resolve_impl(loss.loss_impl)  # an unknown name stops here, naming the choices
  return dict(chunk=loss.loss_chunk, logits_dtype=loss.logits_dtype, loss_impl=loss.loss_impl)


def accum_steps(loss: LossConfig) -> int:
  """The micro-batches of a step: `loss.grad_accum_steps`, where an 'auto' that nothing resolved (`qwenjax.fit`
  resolves it for a run) is 1, what it means without a memory figure."""
  return 1 if loss.grad_accum_steps == 'auto' else loss.grad_accum_steps


def saved_bytes(model_config: ModelConfig, loss: LossConfig, params: Any, batch: Batch) -> int:
  """Bytes the backward pass keeps from the forward pass of `batch` (one micro-batch) under the model's remat
  policy: the residuals of the loss's VJP, parameters included where the backward reads them. Traced from abstract
  arrays (`jax.ShapeDtypeStruct`s), never compiled: a lower bound of the step's memory that `qwenjax.fit` checks
  before compiling a candidate."""
  loss_kwargs = _loss_keywords(loss)

  def backward(params, batch):
    objective = lambda p: _sums(model_config, p, batch, loss.z_loss, **loss_kwargs)
    return jax.vjp(objective, params, has_aux=True)[1]  # a pytree whose leaves are the residuals

  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(backward, params, batch)))


def micro_batches(batch: Batch, accum: int) -> dict[str, jax.Array]:
  """`[rows, ...]` arrays -> `[accum, rows / accum, ...]`: row i goes to micro-batch i % accum, so each device
  keeps its own rows (no data moves between devices)."""
  def split(x):
    rows = x.shape[0]
    if rows % accum:
      raise ValueError(f'batch of {rows} rows does not split into grad_accum_steps={accum} micro-batches')
    x = x.reshape(rows // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None,) + sharding.INPUT_AXES + (None,) * (x.ndim - 3))

  return jax.tree.map(split, dict(batch))


def model_inputs(trainable: Any, frozen: tuple, lora: LoraConfig) -> tuple[Any, Any]:
  """(parameters, `lora` collection or None) of the model a step trains, for `hidden_states`: the state's
  parameters, or with LoRA the frozen base (`frozen[0]`) and the state's adapters, scaled. (The base alone,
  adapters off, is `hidden_states(model_config, base, batch)`.)"""
  if lora.lora_rank:
    return frozen[0], lora_lib.scaled(trainable, lora)
  return trainable, None


def frozen_inputs(loss: LossConfig, lora: LoraConfig) -> int:
  """How many read-only inputs the train and eval steps take after their others: LoRA's base parameters, or
  DPO's reference model (with LoRA the base is the reference: the model without its adapters)."""
  return 1 if lora.lora_rank or loss.objective == 'dpo' else 0


def make_train_step(model_config: ModelConfig, optimizer: OptimizerConfig, loss: LossConfig = LossConfig(),
                    lora: LoraConfig = LoraConfig()
                    ) -> Callable[..., tuple[TrainState, dict]]:
  """`train_step(state, batch, horizon, *frozen) -> (state, metrics)`, to be jitted under the mesh and logical
  axis rules.

  The optimizer is `make_optimizer(optimizer, horizon)`, with `horizon = schedule_horizon(optimizer)` passed at
  each call (replicated scalars): one compiled step serves every `train.steps`, `train.warmup_steps`, `train.lr`
  and `train.lr_final_fraction`.

  With `loss.grad_accum_steps = A`, the batch is cut into A micro-batches (`micro_batches`) and their gradients
  are summed in a `lax.scan`. Loss and gradient are normalized by the number of target tokens in the whole
  batch (with `loss.objective='dpo'`: of pairs), so any A gives the same update.

  `frozen` (`frozen_inputs` of them) is read and never written. With LoRA (`lora.lora_rank > 0`) it is `(base,)`,
  the frozen parameters, and `state.params` are the adapters, the only thing differentiated and updated. With
  `loss.objective='dpo'` (`qwenjax.dpo`) `frozen[0]` is the reference model (with LoRA the base, applied without
  adapters); each micro-batch runs its forward pass (`dpo.reference_logprobs`, no gradient) before the policy's
  forward and backward.
  """
  accum, loss_kwargs = accum_steps(loss), _loss_keywords(loss)
  dpo_objective = loss.objective == 'dpo'

  def objective(trainable, micro, frozen, reference):
    params, adapters = model_inputs(trainable, frozen, lora)
    if dpo_objective:
      return dpo.sums(model_config, params, micro, reference, loss.dpo_beta, lora=adapters, **loss_kwargs)
    return _sums(model_config, params, micro, loss.z_loss, lora=adapters, **loss_kwargs)

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def train_step(state: TrainState, batch: Batch, horizon: Mapping[str, jax.Array], *frozen: Any):
    tx = make_optimizer(optimizer, horizon)

    def micro_step(micro):
      reference = None
      if dpo_objective:
        micro = _context_order(micro)
        reference = dpo.reference_logprobs(model_config, frozen[0], micro, **loss_kwargs)
      (_, sums), grads = grad_fn(state.params, micro, frozen, reference)
      return sums, grads

    if accum == 1:
      sums, grads = micro_step(batch)
    else:
      def body(carry, micro):
        sums, grads = micro_step(micro)
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

      micro = micro_batches(batch, accum)
      sums_shape = jax.eval_shape(lambda b: micro_step(b)[0], jax.tree.map(lambda x: x[0], micro))
      zeros = jax.tree.map(jnp.zeros_like, (state.params, sums_shape))
      (grads, sums), _ = jax.lax.scan(body, zeros, micro)
    if dpo_objective:
      denom = jnp.maximum(sums['pairs'], 1.0)
      loss_metrics, counts, aux_metrics = dpo.metrics(sums, model_config.num_experts), {}, {}
    else:
      nll, z, count, aux = sums
      denom = jnp.maximum(count, 1.0)
      loss_metrics, counts = {'loss': nll / denom, 'z_loss': z / denom}, {'target_tokens': count}
      aux_metrics = {name: value / denom for name, value in aux.items()} if model_config.num_experts else {}
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient is not applied: parameters and optimizer state stay as they were, the step
    # counter moves on (the loop counts skipped steps and stops the run after too many in a row).
    finite = jnp.isfinite(loss_metrics['loss']) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), (params, opt_state),
                                     (state.params, state.opt_state))
    metrics = {
        **loss_metrics,
        'grad_norm': grad_norm,
        'param_norm': optax.tree.norm(params),
        'lr': learning_rate_schedule(optimizer, horizon)(state.step),
        **counts,
        'skipped': 1.0 - finite.astype(jnp.float32),
        **aux_metrics,
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model_config: ModelConfig, loss: LossConfig = LossConfig(),
                   lora: LoraConfig = LoraConfig()) -> Callable[..., Any]:
  """`eval_step(params, batch, *frozen) -> (nll sum, target count)`, with the run's own memory settings; with
  `loss.objective='dpo'`, `dpo.sums` of the batch (`dpo.metrics` of their total gives the means). `frozen` as for
  `make_train_step` (with LoRA `params` are the adapters).

  Like the train step, the batch is evaluated in `loss.grad_accum_steps` micro-batches (a `lax.scan`), with
  `loss.loss_chunk` positions of `loss.logits_dtype` logits at a time, so evaluation never needs more memory
  than a training step. The default: the whole batch at once, float32 logits. With LoRA it is
  `eval_step(adapters, batch, base)`.
  """
  accum, loss_kwargs = accum_steps(loss), _loss_keywords(loss)

  def sums(trainable, batch, frozen):
    params, adapters = model_inputs(trainable, frozen, lora)
    if loss.objective == 'dpo':
      batch = _context_order(batch)
      ref = dpo.reference_logprobs(model_config, frozen[0], batch, **loss_kwargs)
      return dpo.sums(model_config, params, batch, ref, loss.dpo_beta, lora=adapters, **loss_kwargs)[1]
    _, (nll, _, count, _) = _sums(model_config, params, batch, 0.0, lora=adapters, **loss_kwargs)
    return nll, count

  def eval_step(params, batch, *frozen):
    if accum == 1:
      return sums(params, batch, frozen)

    def body(carry, micro):
      return jax.tree.map(jnp.add, carry, sums(params, micro, frozen)), None

    micro = micro_batches(batch, accum)
    zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda b: sums(params, b, frozen),
                                                       jax.tree.map(lambda x: x[0], micro)))
    total, _ = jax.lax.scan(body, zero, micro)
    return total

  return eval_step


# ---------------------------------------------------------------------------------------------------------
# The sharded train state.
#
# Parameters are initialized with the logical axis rules switched off: placement comes from `out_shardings`,
# not from constraints inside the model.

def _abstract_params(model_config: ModelConfig):
  with nn.logical_axis_rules(()):
    return params_lib.abstract_params(model_config)


def _abstract_trainable(model_config: ModelConfig, lora: LoraConfig):
  """The boxed abstract tree the train state's `params` hold: the model's parameters, or the LoRA adapters."""
  return lora_lib.abstract(model_config, lora) if lora.lora_rank else _abstract_params(model_config)


def param_shardings(model_config: ModelConfig, mesh: jax.sharding.Mesh, rules: sharding.Rules) -> Any:
  """NamedShardings of the parameters alone (for `checkpoint.restore_params`, evaluation and sampling)."""
  return sharding.param_shardings(_abstract_params(model_config), mesh, rules)


def abstract_params(model_config: ModelConfig, shardings: Any) -> Any:
  """The model's parameters as ShapeDtypeStructs carrying `shardings` (`param_shardings`): a frozen input of the
  step (LoRA's base) as compiling it for the memory fit sees it."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      sharding.strip_boxes(_abstract_params(model_config)), shardings)


def state_shardings(model_config: ModelConfig, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, rules: sharding.Rules, lora: LoraConfig = LoraConfig()) -> TrainState:
  """NamedShardings of every leaf of the train state: optimizer moments follow their parameters (with LoRA, the
  adapters, each placed like the kernel it adapts)."""
  boxed = _abstract_trainable(model_config, lora)
  params = sharding.param_shardings(boxed, mesh, rules)
  abstract_opt = jax.eval_shape(tx.init, sharding.strip_boxes(boxed))
  replicated = sharding.replicated(mesh)
  opt = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, params,
                              transform_non_params=lambda _: replicated,
                              is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  return TrainState(step=replicated, params=params, opt_state=opt)


def abstract_state(model_config: ModelConfig, tx: optax.GradientTransformation,
                   shardings: TrainState, lora: LoraConfig = LoraConfig()) -> TrainState:
  """The train state as ShapeDtypeStructs carrying their shardings (what checkpoint restore fills in)."""
  params = sharding.strip_boxes(_abstract_trainable(model_config, lora))
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                      opt_state=jax.eval_shape(tx.init, params))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def _random_params(model_config: ModelConfig, rng: jax.Array, mup_base_width: int) -> Any:
  with nn.logical_axis_rules(()):
    p = params_lib.init_params(model_config, rng)
  return mup.scale_init(p, mup_base_width) if mup_base_width else p


_INITS: dict[Any, Any] = {}  # jitted initializers by what fixes their program: runs of one shape compile one


def _jitted_init(key: Any, init: Callable[[jax.Array], Any], shardings: Any) -> Callable[[jax.Array], Any]:
  """`init` jitted into `shardings`; the one jitted for `key` (with these shardings) by an earlier call, if any.
  `key` None: not kept."""
  if key is None:
    return jax.jit(init, out_shardings=shardings)
  leaves, treedef = jax.tree.flatten(shardings)
  key = (key, treedef, tuple(leaves))
  if key not in _INITS:
    if len(_INITS) >= 16:
      _INITS.clear()
    _INITS[key] = jax.jit(init, out_shardings=shardings)
  return _INITS[key]


def random_params(model_config: ModelConfig, param_shardings: Any, rng: jax.Array, mup_base_width: int = 0) -> Any:
  """The parameters `create_state` draws from `rng`, alone (no optimizer state), created in their shardings: a
  LoRA run's base when it has no `init_from_hf`."""
  init = lambda r: _random_params(model_config, r, mup_base_width)
  return _jitted_init(('params', model_config, mup_base_width), init, param_shardings)(rng)


def create_state(model_config: ModelConfig, tx: optax.GradientTransformation, shardings: TrainState,
                 rng: jax.Array | None = None, params: Any = None, mup_base_width: int = 0,
                 lora: LoraConfig = LoraConfig(), optimizer_key: Any = None) -> TrainState:
  """A new train state, each array created directly in its sharding (never whole on one device).

  Random parameters from `rng`, or `params` (host numpy arrays, or jax arrays already in `shardings.params` as a
  sharded Hugging Face load gives them), which are cast to `model_config.param_dtype` and placed shard by shard.
  `mup_base_width` > 0: random parameters scaled by width as μP does (`qwenjax.mup.scale_init`). With LoRA, new
  adapters from `rng` (`qwenjax.lora.init`). `optimizer_key`: a hashable value that fixes what `tx.init` makes
  (the optimizer settings without the learning rate and schedule, which its state does not hold); later states of
  the same shape and key reuse the compiled initializer instead of compiling their own (None: never).
  """
  key = None if optimizer_key is None else (model_config, mup_base_width, lora, optimizer_key)
  if lora.lora_rank:
    def init_adapters(rng):
      adapters = lora_lib.init(model_config, lora, rng)
      return TrainState(step=jnp.zeros((), jnp.int32), params=adapters, opt_state=tx.init(adapters))

    return _jitted_init(key, init_adapters, shardings)(rng)
  if params is None:
    def init(rng):
      p = _random_params(model_config, rng, mup_base_width)
      return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))

    return _jitted_init(key, init, shardings)(rng)

  dtype = jnp.dtype(model_config.param_dtype)

  def place(x, s):
    if isinstance(x, jax.Array) and x.sharding == s:  # already placed (a sharded Hugging Face load)
      return x.astype(dtype)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: np.asarray(x[index], dtype=dtype))

  params = jax.tree.map(place, params, shardings.params)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return TrainState(step=step, params=params, opt_state=opt_state)
