"""One optimizer step: the loss, AdamW, gradient accumulation, and the sharded train state.

Kept apart from the loop in `qwenjax.train` so benchmarks run the very same step with synthetic batches.

A batch is a dict of `[batch, seq]` arrays: `inputs` and `targets` (int32 token ids), `weights` (float32, 0
where the target is padding or belongs to another document), and optionally `positions` and `segment_ids`
(packed documents; without them every row is one document starting at position 0).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qwenjax import loss as loss_lib
from qwenjax import model as model_lib
from qwenjax.config import LossConfig, OptimizerConfig
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


def hidden_states(model_config: ModelConfig, params: Any, batch: Batch):
  """(final hidden states, output head in the compute dtype, auxiliary losses) of one forward pass.

  The loss builds logits from these chunk by chunk (`qwenjax.loss`), never all at once.
  """
  hidden, aux = model_lib.apply_with_aux(model_config, params, batch['inputs'], batch.get('positions'),
                                         batch.get('segment_ids'), return_hidden=True)
  head = model_lib.output_head(model_config, params).astype(model_config.dtype)
  return hidden, head, aux


def _sums(model_config: ModelConfig, params: Any, batch: Batch, z_loss: float,
          chunk: int = loss_lib.DEFAULT_CHUNK, logits_dtype: str = 'float32', loss_impl: str = 'auto'):
  """(objective to differentiate, (nll sum, z sum, target count, count-weighted aux losses)) of a (micro-)batch.

  Everything is a sum over target tokens, so micro-batches add up and one division by the total count gives
  the mean loss; the auxiliary losses (per-pass means, see `model.apply_with_aux`) are weighted by the pass's
  token count to match. `moe_aux_loss` joins the objective; every entry is logged.
  """
  hidden, head, aux = hidden_states(model_config, params, batch)
  total, nll, z = loss_lib.cross_entropy(hidden, head, batch['targets'], batch['weights'], z_coef=z_loss,
                                         chunk=chunk, logits_dtype=logits_dtype, impl=loss_impl)
  count = jnp.sum(batch['weights'].astype(jnp.float32))
  weighted_aux = {k: jax.lax.stop_gradient(v) * count for k, v in aux.items()}
  return total + aux['moe_aux_loss'] * count, (nll, z, count, weighted_aux)


def _loss_keywords(loss: LossConfig) -> dict[str, Any]:
  """`_sums`'s loss keywords (chunk, logits_dtype, loss_impl) of the loss settings."""
  loss_lib.resolve_impl(loss.loss_impl)  # an unknown name stops here, naming the choices
  return dict(chunk=loss.loss_chunk, logits_dtype=loss.logits_dtype, loss_impl=loss.loss_impl)


def micro_batches(batch: Batch, accum: int) -> dict[str, jax.Array]:
  """`[rows, ...]` arrays -> `[accum, rows / accum, ...]`: row i goes to micro-batch i % accum, so each device
  keeps its own rows (no data moves between devices)."""
  def split(x):
    rows = x.shape[0]
    if rows % accum:
      raise ValueError(f'batch of {rows} rows does not split into grad_accum_steps={accum} micro-batches')
    x = x.reshape(rows // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None,) + sharding.BATCH_AXES + (None,) * (x.ndim - 3))

  return jax.tree.map(split, dict(batch))


def make_train_step(model_config: ModelConfig, optimizer: OptimizerConfig, loss: LossConfig = LossConfig()
                    ) -> Callable[[TrainState, Batch, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
  """`train_step(state, batch, horizon) -> (state, metrics)`, to be jitted under the mesh and logical axis rules.

  The optimizer is `make_optimizer(optimizer, horizon)`, with `horizon = schedule_horizon(optimizer)` passed at
  each call (replicated scalars): one compiled step serves every `train.steps`, `train.warmup_steps`, `train.lr`
  and `train.lr_final_fraction`.

  With `loss.grad_accum_steps = A`, the batch is cut into A micro-batches (`micro_batches`) and their gradients
  are summed in a `lax.scan`. Loss and gradient are normalized by the number of target tokens in the whole
  batch, so any A gives the same update.
  """
  accum, loss_kwargs = loss.grad_accum_steps, _loss_keywords(loss)
  grad_fn = jax.value_and_grad(lambda p, b: _sums(model_config, p, b, loss.z_loss, **loss_kwargs),
                               has_aux=True)

  def train_step(state: TrainState, batch: Batch, horizon: Mapping[str, jax.Array]):
    tx = make_optimizer(optimizer, horizon)
    if accum == 1:
      (_, sums), grads = grad_fn(state.params, batch)
    else:
      def body(carry, micro):
        (_, sums), grads = grad_fn(state.params, micro)
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

      micro = micro_batches(batch, accum)
      sums_shape = jax.eval_shape(lambda p, b: grad_fn(p, b)[0][1], state.params,
                                  jax.tree.map(lambda x: x[0], micro))
      zeros = jax.tree.map(jnp.zeros_like, (state.params, sums_shape))
      (grads, sums), _ = jax.lax.scan(body, zeros, micro)
    nll, z, count, aux = sums
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient is not applied: parameters and optimizer state stay as they were, the step
    # counter moves on (the loop counts skipped steps and stops the run after too many in a row).
    finite = jnp.isfinite(nll) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), (params, opt_state),
                                     (state.params, state.opt_state))
    metrics = {
        'loss': nll / denom,
        'z_loss': z / denom,
        'grad_norm': grad_norm,
        'param_norm': optax.tree.norm(params),
        'lr': learning_rate_schedule(optimizer, horizon)(state.step),
        'target_tokens': count,
        'skipped': 1.0 - finite.astype(jnp.float32),
    }
    if model_config.num_experts:
      metrics.update({name: value / denom for name, value in aux.items()})
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model_config: ModelConfig,
                   loss: LossConfig = LossConfig()) -> Callable[[Any, Batch], tuple[jax.Array, jax.Array]]:
  """`eval_step(params, batch) -> (nll sum, target count)`, with the run's own memory settings.

  Like the train step, the batch is evaluated in `loss.grad_accum_steps` micro-batches (a `lax.scan`), with
  `loss.loss_chunk` positions of `loss.logits_dtype` logits at a time, so evaluation never needs more memory
  than a training step. The default: the whole batch at once, float32 logits.
  """
  accum, loss_kwargs = loss.grad_accum_steps, _loss_keywords(loss)

  def sums(params, batch):
    _, (nll, _, count, _) = _sums(model_config, params, batch, 0.0, **loss_kwargs)
    return nll, count

  def eval_step(params, batch):
    if accum == 1:
      return sums(params, batch)

    def body(carry, micro):
      return jax.tree.map(jnp.add, carry, sums(params, micro)), None

    zero = jnp.zeros((), jnp.float32)
    (nll, count), _ = jax.lax.scan(body, (zero, zero), micro_batches(batch, accum))
    return nll, count

  return eval_step


# ---------------------------------------------------------------------------------------------------------
# The sharded train state.
#
# Parameters are initialized with the logical axis rules switched off: placement comes from `out_shardings`,
# not from constraints inside the model.

def _abstract_params(model_config: ModelConfig):
  with nn.logical_axis_rules(()):
    return params_lib.abstract_params(model_config)


def param_shardings(model_config: ModelConfig, mesh: jax.sharding.Mesh, rules: sharding.Rules) -> Any:
  """NamedShardings of the parameters alone (for `checkpoint.restore_params`, evaluation and sampling)."""
  return sharding.param_shardings(_abstract_params(model_config), mesh, rules)


def state_shardings(model_config: ModelConfig, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, rules: sharding.Rules) -> TrainState:
  """NamedShardings of every leaf of the train state: optimizer moments follow their parameters."""
  boxed = _abstract_params(model_config)
  params = sharding.param_shardings(boxed, mesh, rules)
  abstract_opt = jax.eval_shape(tx.init, sharding.strip_boxes(boxed))
  replicated = sharding.replicated(mesh)
  opt = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, params,
                              transform_non_params=lambda _: replicated,
                              is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  return TrainState(step=replicated, params=params, opt_state=opt)


def abstract_state(model_config: ModelConfig, tx: optax.GradientTransformation,
                   shardings: TrainState) -> TrainState:
  """The train state as ShapeDtypeStructs carrying their shardings (what checkpoint restore fills in)."""
  params = sharding.strip_boxes(_abstract_params(model_config))
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                      opt_state=jax.eval_shape(tx.init, params))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def create_state(model_config: ModelConfig, tx: optax.GradientTransformation, shardings: TrainState,
                 rng: jax.Array | None = None, params: Any = None, mup_base_width: int = 0) -> TrainState:
  """A new train state, each array created directly in its sharding (never whole on one device).

  Random parameters from `rng`, or `params` (host numpy arrays, or jax arrays already in `shardings.params` as a
  sharded Hugging Face load gives them), which are cast to `model_config.param_dtype` and placed shard by shard. `mup_base_width` > 0: random parameters
  scaled by width as μP does (`qwenjax.mup.scale_init`).
  """
  if params is None:
    def init(rng):
      with nn.logical_axis_rules(()):
        p = params_lib.init_params(model_config, rng)
      if mup_base_width:
        p = mup.scale_init(p, mup_base_width)
      return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))

    return jax.jit(init, out_shardings=shardings)(rng)

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
