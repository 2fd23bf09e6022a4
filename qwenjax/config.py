"""A run's settings: the ml-collections ConfigDict every file under `configs/` builds, and the typed values each part
of the job takes, read from it once by `settings(config)`.

The ConfigDict is what the command line (`--config.train.steps=2000`), sweeps and a workdir's config.json use. It
has four sections and one top-level key:

* `model`: the `ModelConfig` fields (Hugging Face names) but `remat_policy`, which `train.remat_policy` sets;
* `data`: `DataConfig`, the input pipeline;
* `train`: `LoopConfig`, `OptimizerConfig`, `LossConfig`, `FitConfig`, `CheckpointConfig` and `LoraConfig`, and
  `seed`;
* `mesh`: `MeshConfig`, the device mesh;
* `init_from_hf`: path of a Hugging Face checkpoint to start from ('' for random init).

Each section is built from its dataclasses' defaults (`model_section()`, `data_section()`, ...), so a default and
what it means are written once, below. Files under `configs/` call `base_config()` and override what differs,
e.g. `configs/1b.py`. `settings(config)` checks every value's key, type and range before the run does anything,
and each part gets only its own: `qwenjax.data` a DataConfig, `qwenjax.train_step` an OptimizerConfig and a
LossConfig, `qwenjax.sharding` a MeshConfig, `qwenjax.checkpoint` a CheckpointConfig.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import numbers
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

from qwenjax.model_config import ModelConfig
from qwenjax.model_config import REMAT_POLICIES

# (logical axis name, mesh axis / tuple of mesh axes / None): where each named dimension of the model's
# parameters and activations lives on the mesh (`qwenjax.sharding`). flax applies the first rule whose mesh axes
# are still free in the array, so order matters only when two names compete for one mesh axis.
DEFAULT_RULES = (
    # Activations.
    ('activation_batch', ('data', 'fsdp', 'expert')),
    ('activation_length', 'context'),  # context parallelism: each sequence split over `context` (zig-zag)
    ('activation_embed', None),
    ('activation_heads', 'tensor'),
    ('activation_kv_heads', 'tensor'),
    ('activation_head_dim', None),
    ('activation_mlp', 'tensor'),
    ('activation_vocab', 'tensor'),
    # Parameters.
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('mlp', 'tensor'),
    ('norm', None),
    ('layers', None),
    ('expert', 'expert'),
    ('expert_router', None),
)

# The mesh's axes (`qwenjax.sharding`), each sized by the `mesh` section.
MESH_AXES = ('data', 'fsdp', 'tensor', 'expert', 'context')
LR_SCHEDULES = ('cosine', 'constant')
# LoRA's target projections: attention's q, k, v, o and the SwiGLU's gate, up, down (of the dense MLP, the shared
# expert and the routed experts alike).
LORA_TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
LOGITS_DTYPES = ('float32', 'bfloat16')
# What the training files hold (`data.format`) and what the step minimizes (`train.objective`): docs/post_training.md.
DATA_FORMATS = ('text', 'chat', 'preference')
OBJECTIVES = ('cross_entropy', 'dpo')


def _check_ranges(settings: Any, section: str, **minimums: float) -> None:
  """Every float setting of a settings dataclass finite (NaN and infinity are no learning rate, no loss weight),
  and each one named in `minimums` at least that: a ValueError naming the first that is not, before anything runs
  (`train.lr=-1.0 must be >= 0`)."""
  for field in dataclasses.fields(settings):
    value = getattr(settings, field.name)
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f'{section}.{field.name}={value!r} must be a finite number')
    low = minimums.get(field.name)
    if low is not None and isinstance(value, numbers.Real) and not isinstance(value, bool) and value < low:
      raise ValueError(f'{section}.{field.name}={value!r} must be >= {low}')


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The input pipeline (`qwenjax.data`). Empty `train_files` trains on the built-in corpus (Python's stdlib)."""
  train_files: str = ''  # glob, or comma-separated globs, of .jsonl / .txt / ArrayRecord files
  eval_files: str = ''  # likewise; empty: the built-in corpus's held-out split, or no eval for your own files
  text_key: str = 'text'  # field holding the document in .jsonl lines and JSON ArrayRecord records
  seq_len: int = 2048  # tokens per packed row
  # 'train': a BPE trained on train_files at first use, or with init_from_hf the checkpoint's own tokenizer
  # when its directory holds one; or a path: sentencepiece .model, tokenizer.json, or a directory holding one.
  tokenizer: str = 'train'
  vocab_size: int = 32000  # pieces of the tokenizer trained when tokenizer='train'
  tokenizer_sentences: int = 200_000  # at most this many lines feed tokenizer training (keeps it to seconds)
  # Which lines a trained BPE learns from. Not train.seed: runs of other seeds (a sweep's repeats) share one
  # tokenizer, so their losses count the same pieces.
  tokenizer_seed: int = 0
  # Tokenized corpora (and trained tokenizers), kept and shared by every run: '' is $QWENJAX_CACHE or
  # ~/.cache/qwenjax/prepared. On several hosts it must be a filesystem they all see.
  prepared_dir: str = ''
  shuffle_window: int = 512  # packed rows shuffled together so batches mix documents (aim for ~1M tokens); 0: off
  read_threads: int = 2  # threads reading batches ahead of the step
  # 'text': documents (text_key); 'chat': {"messages": [...]} conversations, trained on the assistant's tokens;
  # 'preference': {"prompt", "chosen", "rejected"} pairs for train.objective='dpo' (qwenjax.chat_data).
  format: str = 'text'
  # > 0: leave out of the eval set each document with this share or more of its lines (40+ characters) found in
  # some training document (`qwenjax.overlap`), e.g. 0.2; 0: every eval document counts.
  decontaminate: float = 0.0

  def __post_init__(self):
    if self.format not in DATA_FORMATS:
      raise ValueError(f'unknown data.format {self.format!r}; choose one of {", ".join(DATA_FORMATS)}')
    _check_ranges(self, 'data', seq_len=1, vocab_size=1, tokenizer_sentences=1, shuffle_window=0, read_threads=0,
                  decontaminate=0)
    if self.decontaminate > 1:
      raise ValueError(f'data.decontaminate={self.decontaminate} is a share of lines: give one in (0, 1], e.g. 0.2, '
                       'or 0 to keep every eval document')


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """The training loop (`qwenjax.train`): how long, how big a batch, what it logs, evaluates and profiles."""
  steps: int = 10_000
  batch_size: int = 64  # global, in sequences of data.seq_len tokens
  log_every: int = 50
  eval_every: int = 1000  # 0: only at the end
  eval_steps: int = 20  # eval batches (of batch_size sequences) per evaluation
  max_nonfinite_steps: int = 20  # a step with a non-finite loss or gradient is skipped; this many in a row stop the run
  peak_tflops: float = 0.0  # per-device peak for MFU; 0: look up the device kind (unknown kinds: no MFU)
  profile_steps: int = 0  # trace this many steps with jax.profiler into workdir/profile (Perfetto); 0: off
  profile_from: int = 10  # ... starting after this step, past compilation and warm-up
  # Compiled programs kept for the next run of the same shapes (a resumed run skips most compilation):
  # 'workdir' (WORKDIR/compilation_cache), a directory runs share, or '' (off). Set by the command line only.
  compilation_cache_dir: str = 'workdir'

  def __post_init__(self):
    _check_ranges(self, 'train', steps=1, batch_size=1, log_every=0, eval_every=0, eval_steps=0,
                  max_nonfinite_steps=0, peak_tflops=0, profile_steps=0, profile_from=0)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimizer and its learning-rate schedule (`qwenjax.train_step.make_optimizer`)."""
  steps: int = 10_000  # the schedule's length: the loop's train.steps
  lr: float = 3e-4
  warmup_steps: int = 500
  lr_schedule: str = 'cosine'  # 'cosine' (to lr * lr_final_fraction) or 'constant' (after warmup)
  lr_final_fraction: float = 0.1
  adam_b1: float = 0.9
  adam_b2: float = 0.95
  adam_eps: float = 1e-8
  weight_decay: float = 0.1  # AdamW, not applied to norm scales and biases
  grad_clip: float = 1.0  # global-norm clipping; 0: off
  # μP (qwenjax/mup.py): the hidden size at which init and learning rates are the standard ones; at other
  # widths they scale so that the tuned lr transfers. Needs untied embeddings. 0: off.
  mup_base_width: int = 0

  def __post_init__(self):
    if self.lr_schedule not in LR_SCHEDULES:
      raise ValueError(f"unknown train.lr_schedule {self.lr_schedule!r}; choose 'cosine' or 'constant'")
    _check_ranges(self, 'train', steps=0, lr=0, warmup_steps=0, lr_final_fraction=0, adam_b1=0, adam_b2=0,
                  adam_eps=0, weight_decay=0, grad_clip=0, mup_base_width=0)
    for name in ('adam_b1', 'adam_b2'):
      if getattr(self, name) >= 1:
        raise ValueError(f'train.{name}={getattr(self, name)!r} must be below 1 (a decay rate of Adam\'s moments)')


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """How the loss of a batch is computed, in training and evaluation (`qwenjax.train_step`, `qwenjax.loss`)."""
  # Micro-batches of batch_size / grad_accum_steps per step, or 'auto', a run's default (`train_section`): with
  # train.remat_policy, the setting of fastest expected speed whose compiled step fits the device's memory: the
  # biggest micro-batch up to 32k tokens (and 2^48 FLOPs) per data shard, the policy recomputing least, traded
  # at ~5% per halving of the micro-batch against the FLOPs recomputed (`qwenjax.fit`, docs/training.md). A
  # LossConfig built directly (tests, benchmarks) is 1; a step given an 'auto' nothing resolved runs one.
  grad_accum_steps: int | str = 1
  z_loss: float = 1e-4  # weight of mean(logsumexp(logits)^2); 0: off
  loss_chunk: int = 1024  # sequence positions per chunk of logits in the loss (never [batch, seq, vocab] at once)
  logits_dtype: str = 'float32'  # what the LM head's matmul writes; 'bfloat16' as under HF autocast (faster)
  loss_impl: str = 'auto'  # the loss's passes over the logits: 'xla', 'pallas' (GPU kernels), 'auto' (pallas on GPU)
  # 'cross_entropy': next-token loss on the weighted targets (pretraining, SFT); 'dpo': Rafailov et al.'s sigmoid
  # loss against the initial model, on data.format='preference' pairs (qwenjax.dpo).
  objective: str = 'cross_entropy'
  dpo_beta: float = 0.1  # DPO's beta: the strength of the pull towards the reference model

  def __post_init__(self):
    accum = self.grad_accum_steps
    if accum != 'auto' and (isinstance(accum, bool) or not isinstance(accum, int) or accum < 1):
      raise ValueError(f"train.grad_accum_steps must be 'auto' or an int >= 1, got {accum!r}")
    if self.objective not in OBJECTIVES:
      raise ValueError(f'unknown train.objective {self.objective!r}; choose one of {", ".join(OBJECTIVES)}')
    if self.dpo_beta <= 0:
      raise ValueError(f'train.dpo_beta must be > 0, got {self.dpo_beta}')
    if self.logits_dtype not in LOGITS_DTYPES:
      raise ValueError(f"train.logits_dtype must be 'float32' or 'bfloat16', got {self.logits_dtype!r}")
    _check_ranges(self, 'train', z_loss=0, loss_chunk=1)


@dataclasses.dataclass(frozen=True)
class FitConfig:
  """How a run's step fits the device's memory, with `LossConfig.grad_accum_steps` (`qwenjax.fit`)."""
  # What a layer keeps for the backward pass: one of model_config.REMAT_POLICIES, or 'auto', the fastest that fits
  # (docs/training.md). `settings` hands it to the model as ModelConfig.remat_policy.
  remat_policy: str = 'auto'
  # The memory per device that 'auto' fits, in GiB; 0: what the device reports. A CPU reports none, so there
  # 'auto' means one micro-batch and no remat unless this is set.
  device_memory_gib: float = 0.0

  def __post_init__(self):
    if self.remat_policy not in REMAT_POLICIES + ('auto',):
      raise ValueError(f"unknown train.remat_policy {self.remat_policy!r}; choose 'auto' or one of {REMAT_POLICIES}")
    if not self.device_memory_gib >= 0:
      raise ValueError(f'train.device_memory_gib must be >= 0 (0: ask the device), got {self.device_memory_gib}')


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Checkpoints (`qwenjax.checkpoint.Checkpointer`): how often, how many are kept, what an unreadable one does."""
  checkpoint_every: int = 1000  # 0: only at the end (and when stopped by SIGTERM / Ctrl-C)
  keep_checkpoints: int = 3
  # When checkpoints exist but none can be read, the run stops; True starts again from step 0 instead.
  restart_if_unreadable: bool = False

  def __post_init__(self):
    if self.checkpoint_every < 0:
      raise ValueError(f'train.checkpoint_every={self.checkpoint_every} must be >= 0 (0: only at the end)')
    _check_ranges(self, 'train', keep_checkpoints=1)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA (`qwenjax.lora`): with a rank, only low-rank adapters on the target projections train; the base stays
  frozen. The adapters' output is scaled by lora_alpha / lora_rank, as PEFT scales it."""
  lora_rank: int = 0  # 0: off, every parameter trains
  lora_alpha: float = 16.0
  lora_targets: str = ','.join(LORA_TARGETS)  # comma-separated names of LORA_TARGETS

  def __post_init__(self):
    if self.lora_rank < 0:
      raise ValueError(f'train.lora_rank must be >= 0 (0: LoRA off), got {self.lora_rank}')
    if self.lora_rank and self.lora_alpha <= 0:
      raise ValueError(f'train.lora_alpha must be positive, got {self.lora_alpha}')
    unknown = [t for t in self.targets if t not in LORA_TARGETS]
    if unknown or (self.lora_rank and not self.targets):
      raise ValueError(f'train.lora_targets={self.lora_targets!r}: give comma-separated names of {LORA_TARGETS}')

  @property
  def targets(self) -> tuple[str, ...]:
    return tuple(t.strip() for t in self.lora_targets.split(',') if t.strip())

  @property
  def scale(self) -> float:
    return self.lora_alpha / self.lora_rank


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The device mesh (`qwenjax.sharding.make_mesh`): one size may be -1 (the remaining devices)."""
  data: int = 1
  fsdp: int = -1
  tensor: int = 1
  expert: int = 1  # expert > 1: expert parallelism for MoE models
  context: int = 1  # context > 1: each sequence split over this many devices (docs/multihost.md)
  dcn_data: int = 1  # slices (TPU) or hosts (GPU) the data axis spans; the sizes above are those of one slice
  rules: tuple = DEFAULT_RULES  # (logical axis name, mesh axis / axes / None) pairs

  def __post_init__(self):
    if isinstance(self.dcn_data, bool) or not isinstance(self.dcn_data, numbers.Integral) or self.dcn_data < 1:
      raise ValueError(f'mesh.dcn_data must be a positive int (the number of slices), got {self.dcn_data!r}')
    sizes = self.sizes()
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
      described = ' x '.join(f'{axis}={size}' for axis, size in zip(MESH_AXES, sizes))
      raise ValueError(f'mesh sizes {described}: each must be a positive int, and at most one may be -1 '
                       '(the remaining devices)')

  def sizes(self) -> tuple[int, ...]:
    """The sizes of `MESH_AXES` within one slice, as set (one may be -1)."""
    return tuple(int(getattr(self, axis)) for axis in MESH_AXES)



@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything a training run is told, typed and checked: what `settings(config)` returns."""
  model: ModelConfig
  data: DataConfig = DataConfig()
  loop: LoopConfig = LoopConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  loss: LossConfig = LossConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  lora: LoraConfig = LoraConfig()
  mesh: MeshConfig = MeshConfig()
  seed: int = 0  # parameter init and data order (train.seed)
  init_from_hf: str = ''
  fit: FitConfig = FitConfig()

  def __post_init__(self):
    context = self.mesh.context
    if context > 1 and self.data.seq_len % (2 * context):
      raise ValueError(context_error(self.data.seq_len, context))
    if self.data.seq_len > self.model.max_position_embeddings:
      raise ValueError(f'data.seq_len={self.data.seq_len} exceeds model.max_position_embeddings='
                       f'{self.model.max_position_embeddings}')
    batch, accum = self.loop.batch_size, self.loss.grad_accum_steps
    if batch < 1 or (accum != 'auto' and batch % accum):
      raise ValueError(f'train.batch_size={batch} must be a positive multiple of train.grad_accum_steps={accum}')
    dpo, pairs = self.loss.objective == 'dpo', self.data.format == 'preference'
    if dpo != pairs:
      raise ValueError(f'train.objective={self.loss.objective!r} with data.format={self.data.format!r}: DPO trains '
                       "on preference pairs, so set both train.objective='dpo' and data.format='preference' (or "
                       'neither)')
    if self.optimizer.steps != self.loop.steps:
      raise ValueError(f'the optimizer\'s schedule is {self.optimizer.steps} steps long but the loop runs '
                       f'train.steps={self.loop.steps}')
    if self.lora.lora_rank and self.optimizer.mup_base_width:
      raise ValueError('train.lora_rank and train.mup_base_width do not go together: μP scales the learning rates '
                       'of a model trained whole; set one of them to 0')


def context_error(seq_len: int, context: int) -> str:
  """What is wrong when `seq_len` does not split into the 2 x `context` zig-zag chunks of context parallelism."""
  chunks = 2 * context
  return (f'data.seq_len={seq_len} does not split into the {chunks} equal chunks that mesh.context={context} '
          f'needs (each device holds 2 chunks of the sequence, zig-zag). Use a data.seq_len that is a multiple '
          f'of {chunks} (e.g. {max(chunks, seq_len // chunks * chunks)}), or another mesh.context.')


# The `train` section: these dataclasses' fields (a name two of them share, `steps`, once), and `seed`.
_TRAIN_PARTS = (LoopConfig, OptimizerConfig, LossConfig, FitConfig, CheckpointConfig, LoraConfig)
# Where a run's section differs from its dataclass's default: a run fits the device (`qwenjax.fit`).
_RUN_DEFAULTS = {'grad_accum_steps': 'auto'}
_TOP_LEVEL = ('model', 'data', 'train', 'mesh', 'init_from_hf')


# ---------------------------------------------------------------------------------------------------------
# The ConfigDict sections, from the dataclasses' defaults.

# Fields whose default is None get a typed placeholder so the command line can still set them.
_OPTIONAL_TYPES = {'head_dim': int, 'sliding_window': int}


def model_section(**overrides) -> ml_collections.ConfigDict:
  """A `model` section holding every ModelConfig field but `remat_policy` (a train setting, `train.remat_policy`,
  which `settings` hands to the model), defaults first, then `overrides`."""
  if 'remat_policy' in overrides:
    raise ValueError(f"remat_policy is a train setting: set config.train.remat_policy = "
                     f"{overrides['remat_policy']!r} (or 'auto'), not model_section(remat_policy=...)")
  values = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name != 'remat_policy'}
  values['rope_scaling'] = dataclasses.asdict(values['rope_scaling'])  # a subsection: model.rope_scaling.factor
  unknown = sorted(set(overrides) - set(values))
  if unknown:
    raise ValueError(f'unknown model config key(s) {unknown}; valid keys: {sorted(values)}')
  values.update(overrides)
  for name, type_ in _OPTIONAL_TYPES.items():
    if values[name] is None:
      values[name] = config_dict.placeholder(type_)
  return ml_collections.ConfigDict(values)


def _defaults(*classes) -> dict[str, Any]:
  values = {}
  for cls in classes:
    for field in dataclasses.fields(cls):
      if field.name not in values:
        values[field.name] = field.default
      elif values[field.name] != field.default:
        raise AssertionError(f'{cls.__name__}.{field.name} and another part of its section disagree on the '
                             'default')
  return values


def data_section() -> ml_collections.ConfigDict:
  """Input pipeline (`qwenjax.data`): the `DataConfig` fields."""
  return ml_collections.ConfigDict(_defaults(DataConfig))


def train_section() -> ml_collections.ConfigDict:
  """Loop, optimizer, loss, memory fit, checkpoints and LoRA (`qwenjax.train`, `qwenjax.train_step`, `qwenjax.fit`,
  `qwenjax.checkpoint`, `qwenjax.lora`): the fields of `LoopConfig`, `OptimizerConfig`, `LossConfig`, `FitConfig`,
  `CheckpointConfig` (`grad_accum_steps` 'auto') and `LoraConfig`, and `seed`."""
  values = {**_defaults(*_TRAIN_PARTS), 'seed': RunConfig.seed}
  for name, value in _RUN_DEFAULTS.items():  # an int or 'auto': a field of any type, so either can be set
    values[name] = config_dict.FieldReference(value, field_type=object)
  return ml_collections.ConfigDict(values)


def mesh_section() -> ml_collections.ConfigDict:
  """Device mesh (`qwenjax.sharding`): the `MeshConfig` fields."""
  return ml_collections.ConfigDict(_defaults(MeshConfig))


def load(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file such as `configs/tiny.py` (what `--config=PATH` loads)."""
  spec = importlib.util.spec_from_file_location(f'_qwenjax_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = model_section()
  config.data = data_section()
  config.train = train_section()
  config.mesh = mesh_section()
  config.init_from_hf = ''
  return config


# ---------------------------------------------------------------------------------------------------------
# Reading a ConfigDict, once.

def settings(config: ml_collections.ConfigDict) -> RunConfig:
  """The typed settings of a run's config: every key known, every value of its default's type, every range
  checked; a ValueError naming the setting otherwise. A key the config lacks takes its default."""
  _check_keys(config, 'config', _TOP_LEVEL)
  for name in ('data', 'train', 'mesh'):
    if name in config and not isinstance(config[name], (Mapping, ml_collections.ConfigDict)):
      raise ValueError(f'config.{name} must be a section (a ConfigDict), got {config[name]!r}')
  data, train, mesh = config.get('data', {}), config.get('train', {}), config.get('mesh', {})
  _check_keys(data, 'config.data', [f.name for f in dataclasses.fields(DataConfig)])
  _check_keys(train, 'config.train', list(_defaults(*_TRAIN_PARTS)) + ['seed'])
  _check_keys(mesh, 'config.mesh', [f.name for f in dataclasses.fields(MeshConfig)])
  model = dict(config.get('model', {}))
  fit = _read(FitConfig, train, 'train')
  if 'remat_policy' in model:  # a config.json written before the policy moved to the train section
    legacy = model.pop('remat_policy')
    if 'remat_policy' not in train or fit.remat_policy == 'auto':
      fit = FitConfig(remat_policy=legacy, device_memory_gib=fit.device_memory_gib)
    elif legacy != fit.remat_policy:
      raise ValueError(f'model.remat_policy={legacy!r} and train.remat_policy={fit.remat_policy!r}: the policy is '
                       'a train setting now; set train.remat_policy alone')
  loss = _read(LossConfig, {**train, 'grad_accum_steps': train.get('grad_accum_steps', 'auto')}, 'train')
  return RunConfig(
      model=ModelConfig.from_dict({**model, 'remat_policy': fit.remat_policy}),
      data=_read(DataConfig, data, 'data'),
      loop=_read(LoopConfig, train, 'train'),
      optimizer=_read(OptimizerConfig, train, 'train'),
      loss=loss,
      checkpoint=_read(CheckpointConfig, train, 'train'),
      lora=_read(LoraConfig, train, 'train'),
      mesh=_read(MeshConfig, mesh, 'mesh'),
      seed=_typed(train.get('seed', RunConfig.seed), RunConfig.seed, 'train.seed'),
      init_from_hf=_typed(config.get('init_from_hf', '') or '', '', 'init_from_hf'),
      fit=fit)


def _check_keys(section: Any, where: str, known: list[str] | tuple[str, ...]) -> None:
  for name in section.keys():
    if name not in known:
      close = difflib.get_close_matches(name, known, n=1)
      hint = f' Did you mean {where}.{close[0]}?' if close else ''
      raise ValueError(f'unknown config key: {where} has no key {name!r}.{hint} Its keys are: '
                       f'{", ".join(sorted(known))}.')


def _read(cls, section: Any, where: str):
  """An instance of `cls` from the section's values of its fields (defaults for those it lacks)."""
  def typed(name, default):
    value = section[name]
    if name not in _RUN_DEFAULTS:
      return _typed(value, default, f'{where}.{name}')
    if value == 'auto':
      return value
    try:  # an int, or '4' as a program may hand it over
      return _typed(int(value) if isinstance(value, str) and value.strip().isdigit() else value, default, '')
    except ValueError:
      raise ValueError(f"{where}.{name} must be 'auto' or an int, got {value!r}") from None

  return cls(**{f.name: typed(f.name, f.default) for f in dataclasses.fields(cls) if f.name in section})


def _typed(value: Any, default: Any, name: str) -> Any:
  """`value` as the type of `default`: ints stay ints (a float only when whole), floats take ints too, bools and
  strings must be what they are, tuples of pairs (the mesh rules) become nested tuples."""
  kind = type(default)
  number = isinstance(value, numbers.Real) and not isinstance(value, bool)
  if kind is bool:
    ok = isinstance(value, bool)
  elif kind is int:
    ok = number and float(value).is_integer()
    value = int(value) if ok else value
  elif kind is float:
    ok = number
    value = float(value) if ok else value
  elif kind is str:
    ok = isinstance(value, str)
  else:  # tuple
    ok = isinstance(value, (list, tuple))
    value = _tuples(value) if ok else value
  if not ok:
    raise ValueError(f'{name} must be {"an" if kind is int else "a"} {kind.__name__}, got {value!r} '
                     f'({type(value).__name__})')
  return value


def _tuples(value: Any) -> Any:
  """Lists (as config.json gives them back) as tuples, all the way down."""
  return tuple(_tuples(x) for x in value) if isinstance(value, (list, tuple)) else value
