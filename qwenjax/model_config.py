"""`ModelConfig`, the model's shape and numerics, and the names of the implementations it can pick.

A leaf module (no jax, no flax, nothing from qwenjax), so that configs (`qwenjax.config`, `configs/*.py`),
`qwenjax.sharding` and the kernels' dispatchers can read a model's settings without loading the model.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

import ml_dtypes  # pylint: disable=unused-import  (registers bfloat16 and the float8 names with numpy)
import numpy as np

# 'none' (no remat), 'full' (save nothing), `jax.checkpoint_policies` by name, and three of ours:
# * 'dots_and_attention_saveable': what 'dots_with_no_batch_dims_saveable' keeps plus the attention kernels'
#   outputs, so the backward pass recomputes only elementwise work (norms, rotary, SwiGLU).
# * 'activations_saveable': every compute-dtype activation the backward pass reads (`model.ACTIVATION_NAMES` and
#   the attention outputs), so it recomputes nothing, yet keeps none of the float32 temporaries that 'none' keeps.
#   (The routed experts of an MoE block are not named: they are recomputed.)
# * 'attention_saveable', for long sequences: what attention's backward needs (q and k after rotary, v, the
#   kernels' output and logsumexp) and the layer's input; the backward pass recomputes the norms, the output
#   projection and the MLP, never the attention forward, whose cost grows with the sequence.
# A run's config sets it as `train.remat_policy`, where 'auto' (`qwenjax.fit`) picks one; a ModelConfig holding
# 'auto' that nothing resolved runs as 'none'.
REMAT_POLICIES = ('none', 'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable',
                  'dots_and_attention_saveable', 'activations_saveable', 'attention_saveable', 'nothing_saveable',
                  'everything_saveable')
# A decode step's attention (`qwenjax.kv_cache`): 'xla' (LayerCache.append + attend), 'pallas'
# (kernels.decode_gpu; on a CPU only with attention_interpret=True), 'auto' (the kernel on a GPU where it
# applies, else XLA).
DECODE_IMPLEMENTATIONS = ('auto', 'xla', 'pallas')
# Attention over a whole sequence (`qwenjax.attention.dot_product_attention` says what each one is).
ATTENTION_IMPLEMENTATIONS = ('xla', 'cudnn', 'pallas', 'pallas_tpu', 'pallas_gpu', 'auto')
# The MoE experts' grouped matmul (`qwenjax.kernels.gmm.grouped_matmul` says what each one is).
MOE_IMPLEMENTATIONS = ('auto', 'ragged_dot', 'mgpu', 'megablox')
# Rotary scalings (`qwenjax.rotary.inverse_frequencies` computes each as transformers does). Dynamic NTK scaling
# changes the frequencies with each batch's length (transformers keeps state across calls for it): refused by name.
ROPE_TYPES = ('default', 'linear', 'yarn')


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Hugging Face's `rope_scaling` (transformers 5: `rope_parameters`, minus its `rope_theta`).

  `linear` divides every rotary frequency by `factor`; `yarn` (Peng et al. 2023) divides only those that turn
  fewer than `beta_slow` times over `original_max_position_embeddings` (the pretraining context), keeps those
  turning more than `beta_fast` times, ramps between, and scales cos and sin by `attention_factor` (0: derived,
  0.1 ln(factor) + 1, or from `mscale` / `mscale_all_dim` when both are set). Qwen2's long-context checkpoints
  use yarn with factor 4 over 32768.
  """
  rope_type: str = 'default'
  factor: float = 1.0
  original_max_position_embeddings: int = 0
  attention_factor: float = 0.0
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 0.0
  mscale_all_dim: float = 0.0
  truncate: bool = True

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f'rope_scaling.rope_type={self.rope_type!r} is not supported; supported: {ROPE_TYPES} '
                       '(dynamic NTK scaling depends on each batch\'s length and is not)')
    numbers = ('factor', 'attention_factor', 'beta_fast', 'beta_slow', 'mscale', 'mscale_all_dim')
    for name in numbers:
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        raise ValueError(f'rope_scaling.{name} must be a finite number >= 0, got {value!r}')
      object.__setattr__(self, name, float(value))
    if self.rope_type != 'default' and self.factor < 1.0:
      raise ValueError(f'rope_scaling.factor must be >= 1 for {self.rope_type} scaling, got {self.factor}')
    if self.rope_type == 'yarn' and (not isinstance(self.original_max_position_embeddings, int)
                                     or self.original_max_position_embeddings < 1):
      raise ValueError('rope_scaling with rope_type=yarn needs original_max_position_embeddings, the context the '
                       f'model was pretrained on (a positive int), got {self.original_max_position_embeddings!r}')

  @classmethod
  def from_hf(cls, values: Mapping[str, Any] | None, max_position_embeddings: int) -> 'RopeScaling':
    """From a config.json's `rope_parameters` or `rope_scaling` (`type` or `rope_type`; `rope_theta` and other
    keys of no effect here ignored). A yarn entry without `factor` takes max_position_embeddings /
    original_max_position_embeddings, as transformers does."""
    values = dict(values or {})
    rope_type = values.get('rope_type', values.get('type')) or 'default'
    if rope_type == 'default':
      return cls()
    known = {f.name for f in dataclasses.fields(cls)} - {'rope_type'}
    kwargs = {k: v for k, v in values.items() if k in known and v is not None}
    if rope_type == 'yarn' and 'factor' not in kwargs and kwargs.get('original_max_position_embeddings'):
      kwargs['factor'] = max_position_embeddings / kwargs['original_max_position_embeddings']
    return cls(rope_type=rope_type, **kwargs)

  def to_hf(self, rope_theta: float) -> dict[str, Any]:
    """transformers 5's `rope_parameters` entry of a config.json."""
    out = {'rope_type': self.rope_type, 'rope_theta': rope_theta}
    if self.rope_type != 'default':
      out['factor'] = self.factor
    if self.rope_type == 'yarn':
      out.update(original_max_position_embeddings=self.original_max_position_embeddings, beta_fast=self.beta_fast,
                 beta_slow=self.beta_slow, truncate=self.truncate)
      out.update({k: getattr(self, k) for k in ('attention_factor', 'mscale', 'mscale_all_dim') if getattr(self, k)})
    return out


# The smallest value of each integer field; None is allowed for those in _OPTIONAL.
_INT_MINIMUMS = dict(vocab_size=1, hidden_size=1, intermediate_size=1, num_hidden_layers=1, num_attention_heads=1,
                     num_key_value_heads=1, head_dim=1, max_position_embeddings=1, sliding_window=1,
                     max_window_layers=0, num_experts=0, num_experts_per_tok=0, moe_intermediate_size=0,
                     shared_expert_intermediate_size=0, decoder_sparse_step=1)
_OPTIONAL = ('head_dim', 'sliding_window')
_FLOAT_MINIMUMS = dict(rope_theta=0.0, rms_norm_eps=0.0, initializer_range=0.0, router_aux_loss_coef=0.0,
                       router_z_loss_coef=0.0, moe_capacity_factor=0.0)
_POSITIVE_FLOATS = ('rope_theta',)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Model shape and numerics. Field names follow Hugging Face's `Qwen2Config`; the last block is ours."""
  vocab_size: int = 151936
  hidden_size: int = 896
  intermediate_size: int = 4864
  num_hidden_layers: int = 24
  num_attention_heads: int = 14
  num_key_value_heads: int = 2
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  max_position_embeddings: int = 32768
  rope_theta: float = 1_000_000.0
  rope_scaling: RopeScaling = RopeScaling()  # a dict in config files and config.json
  rms_norm_eps: float = 1e-6
  initializer_range: float = 0.02
  tie_word_embeddings: bool = False
  use_sliding_window: bool = False
  sliding_window: int | None = 4096
  max_window_layers: int = 28
  # Mixture of experts (Hugging Face's `Qwen2MoeConfig` names); num_experts=0 is a dense model.
  num_experts: int = 0
  num_experts_per_tok: int = 4
  moe_intermediate_size: int = 1408
  shared_expert_intermediate_size: int = 5632  # 0: none (Hugging Face: a zero-wide one)
  norm_topk_prob: bool = False
  decoder_sparse_step: int = 1  # layer i is MoE iff (i + 1) % decoder_sparse_step == 0 ...
  mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here (a list in Hugging Face's config)
  router_aux_loss_coef: float = 0.001
  output_router_logits: bool = False  # as in Hugging Face: the load-balancing loss is added only if True
  # Ours.
  dtype: str = 'float32'  # activations / compute
  param_dtype: str = 'float32'  # stored parameters
  remat_policy: str = 'none'  # one of REMAT_POLICIES, or 'auto' (see above); set from train.remat_policy
  scan_layers: bool = False  # nn.scan over layers: one compiled layer, params stacked on a `layers` axis
  attention_impl: str = 'auto'  # one of ATTENTION_IMPLEMENTATIONS
  attention_interpret: bool = False  # run a Pallas attention kernel in its interpreter (CPU tests)
  decode_impl: str = 'auto'  # a decode step's attention: one of DECODE_IMPLEMENTATIONS (see kv_cache)
  router_z_loss_coef: float = 0.0  # weight of the router z-loss (ST-MoE) in moe_aux_loss
  moe_capacity_factor: float = 0.0  # 0: dropless; c > 0: each expert takes ceil(c * tokens * k / experts)
  moe_impl: str = 'auto'  # grouped-matmul backend, one of MOE_IMPLEMENTATIONS
  moe_interpret: bool = False  # run a Pallas grouped-matmul kernel in its interpreter (CPU tests)

  def __post_init__(self):
    self._check_values()
    if self.head_dim is None:
      object.__setattr__(self, 'head_dim', self.hidden_size // self.num_attention_heads)
    if not isinstance(self.rope_scaling, RopeScaling):  # a dict (config files, config.json) or ConfigDict
      scaling = dict(self.rope_scaling or {})
      unknown = sorted(set(scaling) - {f.name for f in dataclasses.fields(RopeScaling)})
      if unknown:
        raise ValueError(f'unknown rope_scaling key(s) {unknown}; valid keys: '
                         f'{[f.name for f in dataclasses.fields(RopeScaling)]}')
      object.__setattr__(self, 'rope_scaling', RopeScaling(**scaling))
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f'num_attention_heads ({self.num_attention_heads}) must be a multiple of '
                       f'num_key_value_heads ({self.num_key_value_heads})')
    if self.remat_policy not in REMAT_POLICIES + ('auto',):
      raise ValueError(f'unknown remat_policy {self.remat_policy!r}; choose one of {REMAT_POLICIES} or \'auto\'')
    if self.decode_impl not in DECODE_IMPLEMENTATIONS:
      raise ValueError(f'unknown decode_impl {self.decode_impl!r}; choose one of {DECODE_IMPLEMENTATIONS}')
    if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f'unknown attention_impl {self.attention_impl!r}; '
                       f'choose one of {ATTENTION_IMPLEMENTATIONS}')
    for name in ('dtype', 'param_dtype'):
      try:
        np.dtype(getattr(self, name))  # what jnp.dtype is; ml_dtypes adds the names numpy lacks
      except TypeError:
        raise ValueError(f'unknown {name} {getattr(self, name)!r}: give a dtype name such as float32 or '
                         'bfloat16') from None
    if self.use_sliding_window and not self.sliding_window:
      raise ValueError('use_sliding_window=True needs a positive sliding_window')
    object.__setattr__(self, 'mlp_only_layers', tuple(int(i) for i in self.mlp_only_layers or ()))
    if self.num_experts:
      self._check_moe()

  def _check_values(self):
    """Every field of its kind and range (a whole float such as 256.0 becomes an int), checked before anything is
    computed from them: a size of -256, '256', 256.5 or a NaN epsilon is a ValueError naming the field, not an
    error from deep inside jax."""
    for name, low in _INT_MINIMUMS.items():
      value = getattr(self, name)
      if value is None and name in _OPTIONAL:
        continue
      if isinstance(value, float) and value.is_integer():
        value = int(value)
        object.__setattr__(self, name, value)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f'{name} must be an integer >= {low}{" (or None)" if name in _OPTIONAL else ""}, got '
                         f'{value!r} ({type(value).__name__})')
    for name, low in _FLOAT_MINIMUMS.items():
      value = getattr(self, name)
      if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
          or value < low or (name in _POSITIVE_FLOATS and value == 0)):
        raise ValueError(f'{name} must be a finite number {">" if name in _POSITIVE_FLOATS else ">="} {low}, got '
                         f'{value!r} ({type(value).__name__})')
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.type == 'bool' and not isinstance(value, (bool, np.bool_)):
        raise ValueError(f'{field.name} must be true or false, got {value!r} ({type(value).__name__})')
      if field.type == 'str' and not isinstance(value, str):
        raise ValueError(f'{field.name} must be a string, got {value!r} ({type(value).__name__})')
    layers = self.mlp_only_layers
    if layers is not None and (isinstance(layers, (str, bytes)) or not isinstance(layers, (list, tuple)) or any(
        isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in layers)):
      raise ValueError(f'mlp_only_layers must be a list of layer numbers, got {layers!r}')

  def _check_moe(self):
    if not 1 <= self.num_experts_per_tok <= self.num_experts:
      raise ValueError(f'num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and num_experts '
                       f'({self.num_experts})')
    if self.decoder_sparse_step < 1:
      raise ValueError(f'decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}')
    if self.moe_capacity_factor < 0:
      raise ValueError(f'moe_capacity_factor must be 0 (dropless) or positive, got {self.moe_capacity_factor}')
    if self.moe_impl not in MOE_IMPLEMENTATIONS:
      raise ValueError(f'unknown moe_impl {self.moe_impl!r}; choose one of {MOE_IMPLEMENTATIONS}')
    if self.scan_layers and self.mixes_dense_and_moe:
      raise ValueError('scan_layers=True needs every layer to be the same kind, but mlp_only_layers='
                       f'{self.mlp_only_layers} / decoder_sparse_step={self.decoder_sparse_step} mix dense and '
                       'MoE layers; set scan_layers=False')

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> 'ModelConfig':
    """Builds a config from a dict or ConfigDict, naming any key that is not a field."""
    values = dict(values)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(f'unknown model config key(s) {unknown}; valid keys: {sorted(fields)}')
    return cls(**values)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def is_sliding(self, layer: int) -> bool:
    """Hugging Face's rule: layer i uses the window iff use_sliding_window and i >= max_window_layers."""
    return bool(self.use_sliding_window and layer >= self.max_window_layers)

  def is_moe(self, layer: int) -> bool:
    """Hugging Face's rule: layer i is a sparse MoE block iff num_experts > 0, i is not in mlp_only_layers and
    (i + 1) % decoder_sparse_step == 0."""
    return bool(self.num_experts and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

  @property
  def mixes_dense_and_moe(self) -> bool:
    """Dense and MoE layers in one model: their parameters differ, so the layers cannot be scanned."""
    return len({self.is_moe(i) for i in range(self.num_hidden_layers)}) > 1

  @property
  def has_mixed_layers(self) -> bool:
    kinds = {self.is_sliding(i) for i in range(self.num_hidden_layers)}
    return len(kinds) > 1
