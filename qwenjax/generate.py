"""Text generation with a KV cache: batched prefill, then decoding under jit, greedy or sampled.

`generate` takes prompts of different lengths as token-id lists and returns each one's new tokens. The prompts
are right-padded to a bucket length and run through the model once (`prefill`), which fills a preallocated
cache (`qwenjax.kv_cache.init_cache`: full-attention layers hold every position, sliding-window layers a ring of
`sliding_window` entries); then `decode` runs a `jax.lax.while_loop` that feeds each row its last token at its
own position until every row has met a stop token or the step limit. Both functions are jitted on the bucket
shapes, so a new prompt length or token count compiles nothing new unless it crosses a bucket (`TRACES`
counts the traces). Sampling: temperature, top-k and top-p, with one key per step folded from the seed, so a
run is reproducible from its seed.

Sharded decoding: pass a mesh (`qwenjax.sharding.make_mesh`); parameters are placed by the logical axis rules
(tensor parallelism over heads, MLP width and vocabulary with the default rules), the cache's kv heads follow
the same rules, and the batch is split over the data axes (padded with idle rows to divide evenly).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwenjax import kernels
from qwenjax import kv_cache
from qwenjax import model as model_lib
from qwenjax import params as params_lib
from qwenjax import sharding
from qwenjax.model_config import ModelConfig

# How often `prefill` and `decode` were traced (each trace is one compilation), for tests and benchmarks.
TRACES = collections.Counter()


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is drawn. The flags are static (they change the program); the values are not."""
  greedy: bool = True
  top_k: bool = False
  top_p: bool = False
  vocab_limit: bool = False  # mask the ids past a limit

  @classmethod
  def of(cls, temperature: float, top_k: int, top_p: float, vocab_limit: bool = False) -> 'Sampling':
    if temperature == 0:
      return cls(vocab_limit=vocab_limit)
    return cls(greedy=False, top_k=top_k > 0, top_p=top_p < 1.0, vocab_limit=vocab_limit)


def sample_tokens(logits: jax.Array, key: jax.Array, temperature, top_k, top_p, sampling: Sampling,
                  vocab_limit=0) -> jax.Array:
  """Next tokens `[batch]` from float32 logits `[batch, vocab]` (never an id >= `vocab_limit` if
  `sampling.vocab_limit`).

  Top-k keeps the k largest logits, then top-p the smallest set of the most likely of those whose probability
  (renormalized over them) reaches p (at least one), as transformers' logits warpers do in that order; then a
  categorical draw at `temperature`.
  """
  if sampling.vocab_limit:  # embedding tables are often padded past the tokenizer's last id
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if sampling.top_k or sampling.top_p:
    ordered = -jnp.sort(-logits, axis=-1)  # descending
    threshold = jnp.full(logits.shape[:1], -jnp.inf)
    if sampling.top_k:
      k = jnp.clip(top_k, 1, logits.shape[-1])
      threshold = jnp.maximum(threshold, jnp.take(ordered, k - 1, axis=-1))
    if sampling.top_p:  # over the top-k survivors
      probs = jax.nn.softmax(jnp.where(ordered >= threshold[:, None], ordered, -jnp.inf), axis=-1)
      before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above each one
      kept = jnp.where(before < top_p, ordered, jnp.inf)
      threshold = jnp.maximum(threshold, jnp.min(kept, axis=-1))
    logits = jnp.where(logits >= threshold[:, None], logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _bucket(length: int) -> int:
  """Prompt lengths are padded to a power of two (at least 16) up to 1024, then to a multiple of 1024."""
  if length <= 1024:
    return max(16, 1 << (length - 1).bit_length())
  return -(-length // 1024) * 1024


def cache_length(prompt_bucket: int, max_new_tokens: int) -> int:
  """Slots of a full-attention layer's cache: the prompt bucket plus the new tokens, rounded up to 128."""
  return -(-(prompt_bucket + max_new_tokens) // 128) * 128


def _scope(mesh, rules) -> contextlib.ExitStack:
  """The mesh and logical axis rules to trace under (no mesh: nothing to set)."""
  stack = contextlib.ExitStack()
  if mesh is not None:
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))
  return stack


@functools.partial(jax.jit, static_argnames=('config', 'cache_len', 'sampling', 'rules', 'mesh'))
def prefill(params, input_ids, lengths, active, stop_ids, key, temperature, top_k, top_p, vocab_limit, *,
            config: ModelConfig, cache_len: int, sampling: Sampling, rules=(), mesh=None) -> dict[str, Any]:
  """Runs right-padded prompts `input_ids [batch, bucket]` of `lengths` real tokens through the model, fills a
  new cache of `cache_len` positions and draws each row's first new token. Returns the decoding state.

  `active [batch]` is False for padding rows (done from the start); `stop_ids` holds stop tokens (-1 unused).
  """
  TRACES['prefill'] += 1
  del mesh  # part of the jit cache key only: the caller sets the mesh (`_scope`)
  with nn.logical_axis_rules(rules):
    batch = input_ids.shape[0]
    cache = kv_cache.init_cache(config, batch, cache_len)
    logits, cache = model_lib.Qwen2(config).apply({'params': params}, input_ids, cache=cache, lengths=lengths)
    token = sample_tokens(logits[:, 0], jax.random.fold_in(key, 0), temperature, top_k, top_p, sampling,
                          vocab_limit)
    out = jnp.zeros((batch, cache_len), jnp.int32).at[:, 0].set(token)
    return dict(cache=cache, token=token, position=lengths.astype(jnp.int32), step=jnp.ones((), jnp.int32),
                done=jnp.logical_not(active) | jnp.isin(token, stop_ids), out=out)


def decode_rows(batch: int, platform: str) -> int:
  """Rows a decode step runs for `batch` rows on `platform`.

  XLA:GPU rewrites a product of one row by a matrix under about 10M elements into a reduction, slower than the
  GEMM it emits for two rows (and `o_proj`, with two contracted axes, into a multiply that writes out the whole
  product first), so a single row decodes with an idle second row (docs/generation.md has the measurement).
  """
  return 2 if batch == 1 and platform == 'gpu' else batch


def pad_rows(state: dict[str, Any], rows: int) -> dict[str, Any]:
  """A decoding state (of `prefill`) with idle rows added up to `rows`, done from the start (`decode_rows`)."""
  batch = state['token'].shape[0]
  return state if rows == batch else _pad_rows(state, rows)


@functools.partial(jax.jit, static_argnames=('rows',))
def _pad_rows(state: dict[str, Any], rows: int) -> dict[str, Any]:
  def pad(x, axis, fill=0):
    widths = [(0, 0)] * x.ndim
    widths[axis % x.ndim] = (0, rows - x.shape[axis])
    return jnp.pad(x, widths, constant_values=fill)
  cache = {name: kv_cache.LayerCache(pad(c.key, -4), pad(c.value, -4), pad(c.positions, -2, -1))
           for name, c in state['cache'].items()}
  rest = {name: pad(x, 0, name == 'done') for name, x in state.items() if name not in ('cache', 'step')}
  return dict(rest, cache=cache, step=state['step'])


@functools.partial(jax.jit, static_argnames=('config', 'sampling', 'rules', 'mesh'), donate_argnames=('state',))
def decode(params, state: dict[str, Any], until, stop_ids, key, temperature, top_k, top_p, vocab_limit, *,
           config: ModelConfig, sampling: Sampling, rules=(), mesh=None) -> dict[str, Any]:
  """Decodes from `state` (of `prefill` or `decode`) until step `until` or until every row is done.

  `until` is a traced value: any number of steps runs the same program. A row's tokens after its first stop
  token are computed but not used.
  """
  TRACES['decode'] += 1
  del mesh

  def body(s):
    logits, cache = model_lib.Qwen2(config).apply({'params': params}, s['token'][:, None],
                                                  s['position'][:, None], cache=s['cache'])
    token = sample_tokens(logits[:, 0], jax.random.fold_in(key, s['step']), temperature, top_k, top_p, sampling,
                          vocab_limit)
    out = jax.lax.dynamic_update_slice_in_dim(s['out'], token[:, None], s['step'], axis=1)
    return dict(cache=cache, token=token, position=s['position'] + 1, step=s['step'] + 1,
                done=s['done'] | jnp.isin(token, stop_ids), out=out)

  def more(s):
    return (s['step'] < until) & jnp.logical_not(jnp.all(s['done']))

  with nn.logical_axis_rules(rules):
    return jax.lax.while_loop(more, body, state)


def check_prompts(config: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
  """Raises a ValueError naming the problem with the prompts or the token count."""
  if isinstance(prompts, (str, bytes)) or not len(prompts):
    raise ValueError('prompts must be a non-empty list of token-id lists (encode text with a tokenizer first)')
  if any(isinstance(p, (int, np.integer)) for p in prompts):
    raise ValueError('prompts must be a list of token-id lists, one per prompt; got a flat list of ids (for '
                     'one prompt, pass [ids])')
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
    raise ValueError(f'max_new_tokens must be an int, got {max_new_tokens!r}')
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
  for i, prompt in enumerate(prompts):
    if isinstance(prompt, (str, bytes)) or not len(prompt):
      raise ValueError(f'prompt {i} is empty: every prompt needs at least one token' if not len(prompt) else
                       f'prompt {i} is text, not token ids: encode it with a tokenizer first')
    ids = np.asarray(prompt)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f'prompt {i} must be a flat list of int token ids, got {ids.dtype} of shape {ids.shape}')
    if ids.min() < 0 or ids.max() >= config.vocab_size:
      raise ValueError(f'prompt {i} has token ids outside [0, {config.vocab_size}): min {ids.min()}, '
                       f'max {ids.max()}')
    if len(ids) > config.max_position_embeddings:
      raise ValueError(f'prompt {i} has {len(ids)} tokens, longer than the model\'s max_position_embeddings '
                       f'({config.max_position_embeddings}): shorten it')
    if len(ids) + max_new_tokens > config.max_position_embeddings:
      raise ValueError(f'prompt {i} ({len(ids)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the '
                       f"model's max_position_embeddings ({config.max_position_embeddings}): lower max_new_tokens "
                       'or shorten the prompt')


def check_sampling(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                   vocab_limit: int | None = None) -> None:
  """Raises a ValueError naming a sampling setting out of range."""
  if not temperature >= 0 or top_k < 0 or not 0 < top_p <= 1:  # `not >=` also refuses NaN
    raise ValueError(f'need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got temperature={temperature}, '
                     f'top_k={top_k}, top_p={top_p}')
  if vocab_limit is not None and vocab_limit < 1:
    raise ValueError(f'vocab_limit must be None (any id) or >= 1 (the tokenizer\'s vocab_size), got {vocab_limit}')


def unrolled(config: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
  """(config, params) with scanned layers unrolled (`layers_{i}`): how `generate` decodes a scanned model.

  A decode step through `nn.scan` slices every layer's weights and cache out of the stacks and writes the
  cache back, several times slower than unrolled layers (docs/generation.md). Host (numpy) parameters are
  unstacked as views; device arrays are copied, one more copy of the layer weights while the caller keeps the
  stacked ones.
  """
  if not config.scan_layers:
    return config, params
  return dataclasses.replace(config, scan_layers=False), params_lib.unstack_layers(params)


def place_params(config: ModelConfig, params: Any, mesh: jax.sharding.Mesh,
                 rules: sharding.Rules) -> Any:
  """The parameters placed on `mesh` as the logical axis rules say (tensor parallelism with the defaults)."""
  shardings = sharding.param_shardings(params_lib.abstract_params(config), mesh, rules)
  if 'layers' in params and 'layers' not in shardings or 'layers' in shardings and 'layers' not in params:
    raise ValueError('the parameters and config.scan_layers disagree (scanned `layers` vs `layers_{i}`): set '
                     'scan_layers to match, or convert with qwenjax.params.stack_layers / unstack_layers')
  return jax.device_put(params, shardings)


@dataclasses.dataclass
class Request:
  """One `generate` call's arrays, ready for `prefill` and `decode`."""
  input_ids: np.ndarray  # [batch, bucket], right-padded with 0
  lengths: np.ndarray  # [batch]
  active: np.ndarray  # [batch]: False for rows added to divide the batch over the mesh
  stop_ids: np.ndarray  # [multiple of 8], -1 unused
  cache_len: int


def make_request(config: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 stop_token_ids: Sequence[int] = (), batch_multiple: int = 1) -> Request:
  """Checks the prompts and pads them (to the bucket length, and to `batch_multiple` rows)."""
  check_prompts(config, prompts, max_new_tokens)
  lengths = np.array([len(p) for p in prompts], np.int32)
  bucket = _bucket(int(lengths.max()))
  batch = -(-len(prompts) // batch_multiple) * batch_multiple
  input_ids = np.zeros((batch, bucket), np.int32)
  for i, prompt in enumerate(prompts):
    input_ids[i, :len(prompt)] = prompt
  active = np.arange(batch) < len(prompts)
  lengths = np.concatenate([lengths, np.ones(batch - len(prompts), np.int32)])
  stops = sorted({int(t) for t in stop_token_ids})
  stop_ids = np.full(max(8, -(-len(stops) // 8) * 8), -1, np.int32)
  stop_ids[:len(stops)] = stops
  return Request(input_ids, lengths, active, stop_ids, cache_length(bucket, max_new_tokens))


def generate(model_config: ModelConfig, params: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_token_ids: Sequence[int] = (), mesh: jax.sharding.Mesh | None = None,
             rules: Sequence[Sequence[Any]] | None = None, vocab_limit: int | None = None,
             callback: Callable[[list[list[int]]], None] | None = None) -> list[list[int]]:
  """The new tokens of each prompt: up to `max_new_tokens`, ending with (and including) its first stop token.

  Args:
    model_config: the model; its `dtype` is the compute dtype (and the cache's).
    params: its parameters (host or device arrays; with `mesh`, placed on it by the rules if they are not).
    prompts: token-id lists, of different lengths if need be.
    max_new_tokens: new tokens per prompt at most.
    temperature: 0 is greedy (argmax); otherwise logits are divided by it before sampling.
    top_k: sample among the k most likely tokens only (0: all).
    top_p: sample among the most likely tokens whose probability reaches top_p (1: all).
    seed: the sampling key; the same seed gives the same tokens.
    stop_token_ids: tokens that end a row (e.g. the tokenizer's `stop_ids`).
    mesh: decode sharded over this mesh (`qwenjax.sharding.make_mesh`); None: the default device.
    rules: logical axis rules for `mesh` (default `qwenjax.sharding.DEFAULT_RULES`).
    vocab_limit: never emit ids >= this (a tokenizer's `vocab_size` when the embedding table is padded past it,
      as Qwen2's is); None: any id of the model.
    callback: called after each token with every row's tokens since the last call (empty once a row has
      stopped): streaming. Each token then costs one host round trip; without it the whole loop runs on device.
  """
  check_sampling(temperature, top_k, top_p, vocab_limit)
  model_config, params = unrolled(model_config, params)
  # A training run's expert capacity (moe_capacity_factor) caps work per batch; decoding is dropless, as
  # Hugging Face's is, so a row's tokens never depend on the other rows.
  model_config = dataclasses.replace(model_config, moe_capacity_factor=0.0)
  batch_multiple, fitted = 1, ()
  if mesh is not None:
    fitted = sharding.logical_axis_rules(rules or sharding.DEFAULT_RULES, mesh, model_config)
    batch_multiple = sharding.batch_shards(mesh, fitted)
  request = make_request(model_config, prompts, max_new_tokens, stop_token_ids, batch_multiple)
  if mesh is not None:
    with jax.set_mesh(mesh):
      params = place_params(model_config, params, mesh, fitted)
  else:  # host arrays (e.g. from hf.from_pretrained) move once, not at every decode call
    params = jax.device_put(params)
  limited = vocab_limit is not None and vocab_limit < model_config.vocab_size
  sampling = Sampling.of(temperature, top_k, top_p, limited)
  key = jax.random.key(int(seed) % 2**32)  # jax keeps a seed's low 32 bits: fold the rest in
  if int(seed) // 2**32:
    key = jax.random.fold_in(key, int(seed) // 2**32 % 2**32)
  knobs = (jnp.float32(max(temperature, 1e-6)), jnp.int32(top_k), jnp.float32(top_p),
           jnp.int32(min(vocab_limit or model_config.vocab_size, model_config.vocab_size)))
  static = dict(config=model_config, sampling=sampling, rules=fitted, mesh=mesh)
  with _scope(mesh, fitted):
    inputs = [request.input_ids, request.lengths, request.active]
    if mesh is not None:
      inputs = [jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
          *sharding.batch_sharding(mesh, fitted).spec[:x.ndim]))) for x in inputs]
    state = prefill(params, *inputs, request.stop_ids, key, *knobs, cache_len=request.cache_len, **static)
    state = pad_rows(state, decode_rows(len(request.lengths), kernels.target_platform()))
    emitted = [[] for _ in prompts]
    if callback is None:
      state = decode(params, state, max_new_tokens, request.stop_ids, key, *knobs, **static)
    else:
      for step in range(1, max_new_tokens + 1):
        out, done = np.asarray(state['out'][:, step - 1]), np.asarray(state['done'])
        fresh = [[int(out[i])] if _open(emitted[i], request.stop_ids) else [] for i in range(len(prompts))]
        for row, new in zip(emitted, fresh):
          row.extend(new)
        callback(fresh)
        if step == max_new_tokens or done[:len(prompts)].all():
          break
        state = decode(params, state, step + 1, request.stop_ids, key, *knobs, **static)
    out = np.asarray(state['out'])
  steps = int(state['step'])
  return [_trim(out[i, :min(steps, max_new_tokens)], request.stop_ids) for i in range(len(prompts))]


def _open(row: list[int], stop_ids: np.ndarray) -> bool:
  """A row is still open until it has emitted a stop token."""
  return not row or row[-1] not in set(stop_ids.tolist()) - {-1}


def _trim(tokens: np.ndarray, stop_ids: np.ndarray) -> list[int]:
  """A row's tokens up to and including its first stop token."""
  stops = np.isin(tokens, stop_ids[stop_ids >= 0])
  end = int(np.argmax(stops)) + 1 if stops.any() else len(tokens)
  return [int(t) for t in tokens[:end]]
