"""The base training config that every file under `configs/` starts from.

A config is an `ml_collections.ConfigDict` with four sections and a few top-level keys:

* `model`: the `qwenjax.model_config.ModelConfig` fields (Hugging Face names).
* `data`, `train`, `mesh`: the input pipeline, the optimizer and loop, and the device mesh.
* `init_from_hf`: path of a Hugging Face checkpoint to start from ('' for random init).

Files under `configs/` call `base_config()` and override what differs, e.g. `configs/1b.py`.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import ml_collections
from ml_collections import config_dict

from qwenjax import sharding
from qwenjax.model_config import ModelConfig

# Fields whose default is None get a typed placeholder so the command line can still set them.
_OPTIONAL_TYPES = {'head_dim': int, 'sliding_window': int}


def model_section(**overrides) -> ml_collections.ConfigDict:
  """A `model` section holding every ModelConfig field, defaults first, then `overrides`."""
  values = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - set(values))
  if unknown:
    raise ValueError(f'unknown model config key(s) {unknown}; valid keys: {sorted(values)}')
  values.update(overrides)
  for name, type_ in _OPTIONAL_TYPES.items():
    if values[name] is None:
      values[name] = config_dict.placeholder(type_)
  return ml_collections.ConfigDict(values)


def data_section() -> ml_collections.ConfigDict:
  """Input pipeline (`qwenjax.data`). Empty `train_files` trains on the built-in corpus (Python's stdlib)."""
  return ml_collections.ConfigDict(dict(
      train_files='',  # glob, or comma-separated globs, of .jsonl / .txt / ArrayRecord files
      eval_files='',  # likewise; empty: the built-in corpus's held-out split, or no eval for your own files
      text_key='text',  # field holding the document in .jsonl lines and JSON ArrayRecord records
      seq_len=2048,  # tokens per packed row
      # 'train': a BPE trained on train_files at first use, or with init_from_hf the checkpoint's own tokenizer
      # when its directory holds one; or a path: sentencepiece .model, tokenizer.json, or a directory holding one.
      tokenizer='train',
      vocab_size=32000,  # pieces of the tokenizer trained when tokenizer='train'
      tokenizer_sentences=200_000,  # at most this many lines feed tokenizer training (keeps it to seconds)
      # Tokenized corpora (and trained tokenizers), kept and shared by every run: '' is $QWENJAX_CACHE or
      # ~/.cache/qwenjax/prepared. On several hosts it must be a filesystem they all see.
      prepared_dir='',
      shuffle_window=512,  # packed rows shuffled together so batches mix documents (aim for ~1M tokens); 0: off
      read_threads=2,  # threads reading batches ahead of the step
  ))


def train_section() -> ml_collections.ConfigDict:
  """Optimizer and loop (`qwenjax.train`, `qwenjax.train_step`)."""
  return ml_collections.ConfigDict(dict(
      steps=10_000,
      batch_size=64,  # global, in sequences of data.seq_len tokens
      lr=3e-4,
      warmup_steps=500,
      lr_schedule='cosine',  # 'cosine' (to lr * lr_final_fraction) or 'constant' (after warmup)
      lr_final_fraction=0.1,
      adam_b1=0.9,
      adam_b2=0.95,
      adam_eps=1e-8,
      weight_decay=0.1,  # AdamW, not applied to norm scales and biases
      grad_clip=1.0,  # global-norm clipping; 0: off
      grad_accum_steps=1,  # micro-batches of batch_size / grad_accum_steps per step
      z_loss=1e-4,  # weight of mean(logsumexp(logits)^2); 0: off
      loss_chunk=1024,  # sequence positions per chunk of logits in the loss (never [batch, seq, vocab] at once)
      logits_dtype='float32',  # what the LM head's matmul writes; 'bfloat16' as under HF autocast (faster)
      loss_impl='auto',  # the loss's passes over the logits: 'xla', 'pallas' (GPU kernels), 'auto' (pallas on GPU)
      seed=0,  # parameter init and data order
      log_every=50,
      eval_every=1000,  # 0: only at the end
      eval_steps=20,  # eval batches (of batch_size sequences) per evaluation
      checkpoint_every=1000,  # 0: only at the end (and when stopped by SIGTERM / Ctrl-C)
      keep_checkpoints=3,
      max_nonfinite_steps=20,  # a step with a non-finite loss or gradient is skipped; this many in a row stop the run
      # When checkpoints exist but none can be read, the run stops; True starts again from step 0 instead.
      restart_if_unreadable=False,
      # μP (qwenjax/mup.py): the hidden size at which init and learning rates are the standard ones; at other
      # widths they scale so that the tuned lr transfers. Needs untied embeddings. 0: off.
      mup_base_width=0,
      peak_tflops=0.0,  # per-device peak for MFU; 0: look up the device kind (unknown kinds: no MFU)
      profile_steps=0,  # trace this many steps with jax.profiler into workdir/profile (Perfetto); 0: off
      profile_from=10,  # ... starting after this step, past compilation and warm-up
      # Compiled programs kept for the next run of the same shapes (a resumed run skips most compilation):
      # 'workdir' (WORKDIR/compilation_cache), a directory runs share, or '' (off). Set by the command line only.
      compilation_cache_dir='workdir',
  ))


def mesh_section() -> ml_collections.ConfigDict:
  """Device mesh (`qwenjax.sharding`): one size may be -1 (the remaining devices)."""
  return ml_collections.ConfigDict(dict(
      data=1, fsdp=-1, tensor=1, expert=1,  # expert > 1: expert parallelism for MoE models
      dcn_data=1,  # slices (TPU) or hosts (GPU) the data axis spans; the sizes above are those of one slice
      rules=sharding.DEFAULT_RULES,  # (logical axis name, mesh axis / axes / None) pairs
  ))


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
