r"""Exports a training checkpoint as a Hugging Face directory, or a LoRA run's adapters as a PEFT adapter directory.

    python -m qwenjax.export --workdir=DIR --out=PATH [--step=N] [--dtype=bfloat16]
    python -m qwenjax.export --workdir=DIR --out=PATH --adapter        # a LoRA run: PEFT's adapter directory

PATH gets `config.json` and safetensors (`qwenjax.hf.save_pretrained`), which
`transformers.AutoModelForCausalLM.from_pretrained(PATH)` loads as `Qwen2ForCausalLM` (or `Qwen2MoeForCausalLM`)
with our logits, a `generation_config.json` naming the tokenizer's end-of-text and stop ids, and the run's
tokenizer files:

- a Hugging Face tokenizer (`tokenizer.json`, with its `tokenizer_config.json` and `generation_config.json` when
  the run had them) is copied as it is: `AutoTokenizer.from_pretrained(PATH)` loads it. For `model_type` qwen2,
  transformers builds `Qwen2Tokenizer`, which keeps the vocabulary and merges but rebuilds Qwen2's normalizer and
  pre-tokenizer: the same ids for Qwen2's own tokenizer, other ids for a tokenizer.json that splits text
  differently. When transformers is installed the export encodes a few probe texts both ways and, if they
  differ, says so and how to load the file as it is (`PreTrainedTokenizerFast(tokenizer_file=...)`).
- a sentencepiece tokenizer (`tokenizer.model`, what `data.tokenizer='train'` trains) is copied too, and
  `qwenjax.tokenizer.load(PATH)` (so `python -m qwenjax.evaluate --hf=PATH` and `qwenjax.sample --hf=PATH`)
  reads it, but transformers has no tokenizer class that reads it with the same ids (its sentencepiece
  tokenizers add a BOS token and a leading space): transformers users encode with
  `sentencepiece.SentencePieceProcessor(model_file=PATH + '/tokenizer.model')`. The export says so.

The run is opened by `qwenjax.pretrained` with its parameters in host memory (no optimizer state), so a checkpoint
larger than one accelerator exports too. A LoRA run (`train.lora_rank > 0`) exports merged: its base with
lora_alpha / lora_rank * A @ B added to each adapted kernel (`qwenjax.lora.merge`).

With `--adapter`, a LoRA run's adapters alone go to PATH as PEFT writes them (`adapter_config.json`,
`adapter_model.safetensors`): `peft.PeftModel.from_pretrained(base, PATH)` puts them on the base checkpoint
(`init_from_hf`, named in `base_model_name_or_path`) and computes the merged export's logits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any, Iterator

from absl import flags
from absl import logging
import jax
import ml_dtypes
import numpy as np

from safetensors.numpy import save_file

from qwenjax import checkpoint
from qwenjax import cli
from qwenjax import config as config_lib
from qwenjax import files
from qwenjax import hf
from qwenjax import lora as lora_lib
from qwenjax import pretrained
from qwenjax import tokenizer as tokenizer_lib
from qwenjax import workdir as workdir_lib

DTYPES = ('float32', 'bfloat16')
SENTENCEPIECE_NOTE = (
    'the run\'s tokenizer is a sentencepiece model: tokenizer.model is copied, and qwenjax.tokenizer.load reads '
    'it, but transformers\' AutoTokenizer does not read it with the same ids; encode with '
    'sentencepiece.SentencePieceProcessor(model_file=".../tokenizer.model") (no BOS, no leading space)')


# Probe texts for AutoTokenizer against the run's tokenizer: spaces, digits, code, accents, CJK, emoji.
_PROBES = ('Hello world', '  two leading spaces', 'Numbers 12345 and 3.14', 'def f(x):\n    return x  # ok\n',
           'café déjà vu', '我们在训练一个语言模型。', 'emoji 😀🎉')


def autotokenizer_note(out: str, tok: tokenizer_lib.Tokenizer, name: str | None = None) -> str | None:
  """Why `AutoTokenizer.from_pretrained(out)` would encode differently from `tok`, or None when it does not
  (or transformers is not installed to check). `name`: what to call `out` in the note (default: `out`)."""
  try:
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  auto = transformers.AutoTokenizer.from_pretrained(out)
  differ = [t for t in _PROBES if auto(t, add_special_tokens=False)['input_ids'] != tok.encode(t)]
  if not differ:
    return None
  return (f'transformers\' AutoTokenizer loads {name or out} as {type(auto).__name__}, which encodes {differ[0]!r} '
          'with other ids than the run\'s tokenizer (it rebuilds the model type\'s own pre-tokenizer); load the '
          'tokenizer as it is with transformers.PreTrainedTokenizerFast(tokenizer_file=".../tokenizer.json")')


def _cast(params: Any, dtype: str) -> Any:
  np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == 'bfloat16' else np.dtype(dtype)
  return jax.tree.map(lambda x: np.asarray(x).astype(np_dtype, copy=False), params)


def generation_config(tok: tokenizer_lib.Tokenizer) -> dict[str, Any]:
  """What transformers' `generate` needs from the tokenizer: documents start after, and generation stops at,
  the end-of-text token (Qwen2 base checkpoints write the same)."""
  stops = list(tok.stop_ids)
  return {'bos_token_id': tok.eos_id, 'eos_token_id': stops[0] if len(stops) == 1 else stops,
          'pad_token_id': tok.eos_id}


def _check_out(out: str) -> str:
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.isdir(out) and os.listdir(out):
    raise ValueError(f'--out={out} is not empty: export into a new or empty directory')
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f'--out={out} is a file: export into a new or empty directory')
  return out


@contextlib.contextmanager
def _staged(out: str) -> Iterator[str]:
  """A hidden directory beside `out`, renamed to `out` once the body has written it: a failure (a full disk, a bad
  tensor) leaves no half export behind, and `out` as it was (empty or absent, `_check_out`)."""
  os.makedirs(os.path.dirname(out), exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.partial-', dir=os.path.dirname(out))
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would leave the export readable by its owner alone
    yield staging
    os.replace(staging, out)  # replaces `out` if it is an empty directory
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def export(workdir: str, out: str, *, step: int | None = None, dtype: str | None = None,
           adapter: bool = False) -> dict[str, Any]:
  """Writes the Hugging Face directory `out` from `workdir`'s checkpoint (with `adapter`, a LoRA run's PEFT
  adapter directory: `export_adapter`); returns what it wrote."""
  if adapter:
    if dtype:
      raise cli.UsageError('--dtype applies to the whole model; --adapter writes the adapters in float32')
    return export_adapter(workdir, out, step=step)
  if dtype and dtype not in DTYPES:
    raise ValueError(f'--dtype={dtype!r}: choose one of {DTYPES} (or leave it out to keep the trained dtype)')
  out = _check_out(out)
  run = pretrained.load(workdir, step=step, on_host=True)  # host memory: never the accelerator's
  model_config, params, tok, workdir, step = run.model_config, run.params, run.tokenizer, run.name, run.step
  if dtype:
    params = _cast(params, dtype)

  with _staged(out) as staging:
    hf.save_pretrained(staging, model_config, params)
    tok.save(staging)
    if not os.path.exists(os.path.join(staging, 'generation_config.json')):
      files.write_json(os.path.join(staging, 'generation_config.json'), generation_config(tok), indent=2)
    note = SENTENCEPIECE_NOTE if isinstance(tok, tokenizer_lib.SentencePieceTokenizer) else autotokenizer_note(
        staging, tok, out)
  if note:
    logging.warning('%s', note)
  dtypes = sorted({str(np.asarray(x).dtype) for x in jax.tree.leaves(params)})
  return {'out': out, 'workdir': workdir, 'step': step, 'dtype': '/'.join(dtypes),
          'files': sorted(os.listdir(out)), 'tokenizer': type(tok).__name__, 'note': note}


def export_adapter(workdir: str, out: str, *, step: int | None = None) -> dict[str, Any]:
  """Writes a LoRA run's adapters as a PEFT adapter directory: `adapter_config.json` (r, lora_alpha,
  target_modules, base_model_name_or_path: the run's init_from_hf), `adapter_model.safetensors` (float32
  `lora_A` `[r, in]` and `lora_B` `[out, r]` per adapted module, `qwenjax.lora.peft_tensors`) and the run's
  tokenizer files."""
  config = workdir_lib.read_config(workdir)
  settings = config_lib.settings(config)
  lora = settings.lora
  if not lora.lora_rank:
    raise cli.UsageError(f'--adapter: {workdir} is not a LoRA run (train.lora_rank=0); export its whole model '
                         'without --adapter')
  out = _check_out(out)
  _, adapters, step = checkpoint.restore_params(workdir, step)
  tensors = lora_lib.peft_tensors(adapters)
  with _staged(out) as staging:
    files.write_json(os.path.join(staging, 'adapter_config.json'),
                     lora_lib.peft_config(lora, settings.model, settings.init_from_hf), indent=2)
    _save_safetensors(os.path.join(staging, 'adapter_model.safetensors'), tensors)
    workdir_lib.load_tokenizer(workdir, config).save(staging)  # so AutoTokenizer.from_pretrained(out) works too
  if not settings.init_from_hf:
    logging.warning('the run trained its adapters on a random base (no init_from_hf): PEFT needs that base, '
                    'which python -m qwenjax.export without --adapter does not write')
  return {'out': out, 'workdir': workdir_lib.resolve(workdir), 'step': step, 'adapter': True,
          'base_model': settings.init_from_hf or None, 'r': lora.lora_rank, 'lora_alpha': lora.lora_alpha,
          'tensors': len(tensors), 'files': sorted(os.listdir(out))}


def _save_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  """safetensors' `save_file`, written whole (`files.write`), with the usual permissions (safetensors leaves its
  files readable by their owner alone)."""
  def write(tmp):
    save_file(tensors, tmp, metadata={'format': 'pt'})
  files.write(path, write)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def _define_flags() -> None:
  """The command line's flags; defined only when run as a program, so importing this module adds none."""
  flags.DEFINE_string('workdir', None, 'The training run\'s directory.')
  flags.DEFINE_string('out', None, 'The Hugging Face directory to write (new or empty).')
  flags.DEFINE_integer('step', None, 'The checkpoint step (default: the latest).')
  flags.DEFINE_enum('dtype', None, DTYPES, 'Cast the parameters (default: keep the trained dtype).')
  flags.DEFINE_bool('adapter', False, 'A LoRA run: write its adapters as a PEFT adapter directory instead of the '
                    'merged model.')


def main(argv: list[str]) -> None:
  del argv  # cli.run: no positional arguments
  f = flags.FLAGS
  print(files.dumps(export(f.workdir, f.out, step=f.step, dtype=f.dtype, adapter=f.adapter), indent=2))


if __name__ == '__main__':
  cli.run(main, _define_flags, required=('workdir', 'out'))
