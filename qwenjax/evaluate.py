r"""Evaluates a checkpoint: loss, perplexity and bits per byte on text files, and multiple-choice tasks.

    python -m qwenjax.evaluate --workdir=DIR --files='data/val/*.jsonl' --out=eval.json
    python -m qwenjax.evaluate --hf=/path/to/Qwen2-0.5B --files=wiki.txt --tasks=hellaswag.jsonl

`--workdir` evaluates a training run's latest checkpoint (or `--step`) with its own tokenizer; `--hf` a Hugging
Face checkpoint directory with the tokenizer in it. The results are printed as JSON (and written to `--out`).

Text (`--files`, read as `qwenjax.data.DocumentSource` reads them: a .jsonl line or a .txt file is a document)
is scored as lm-evaluation-harness scores `loglikelihood_rolling` (its wikitext task): each document on its own,
every token of it predicted once, the first one from the end-of-text token (`eos_id`, the harness's prefix
token) and the end-of-text token after it not predicted. A document longer than `--seq_len` is cut into
windows of `--seq_len` predicted tokens, each seeing the token before it (with `--overlap=C`, windows after the
first predict `seq_len - C` tokens and see the C tokens before them too, as a strided perplexity does); the
last, shorter window sees as many earlier tokens as fill `--seq_len` inputs. `loss` is the mean negative
log-likelihood per scored token, in nats; `bits_per_byte` is the total over `ln 2` times the UTF-8 bytes of the
documents, which does not depend on the tokenizer, so models with different tokenizers compare.

Tasks (`--tasks`, a .jsonl of `{"context": str, "choices": [str, ...], "answer": int}`) are scored as the
harness scores HellaSwag: each choice's continuation is `--choice_delimiter` (a space) plus the choice, its
log-likelihood the sum over its tokens given the context. `acc` counts examples whose highest log-likelihood is
the answer; `acc_norm` divides each log-likelihood by the UTF-8 byte length of the choice first (the harness
divides by `len(choice)` in characters: the same for ASCII text).

Rows of all documents or choices are sorted by length and scored `--batch_size` at a time, padded to a bucket
of power-of-two lengths, in one jitted call per batch that compiles once per bucket. The parameters are
read straight into shards over every local device (FSDP), so checkpoints larger than one device's memory
evaluate too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Sequence

from absl import flags
from absl import logging
import flax.linen as nn
import jax
import numpy as np

from qwenjax import cli
from qwenjax import data
from qwenjax import files as files_lib
from qwenjax import loss as loss_lib
from qwenjax import pretrained
from qwenjax import sharding
from qwenjax import tokenizer as tokenizer_lib
from qwenjax import train_step
from qwenjax.model_config import ModelConfig

_SMALLEST_BUCKET = 16


def load(workdir: str | None = None, hf: str | None = None, *, step: int | None = None, dtype: str | None = None,
         attention_impl: str | None = None) -> pretrained.Pretrained:
  """The model to score (`qwenjax.pretrained.load`, parameters sharded over the local devices), its experts
  dropless as Hugging Face's Qwen2-MoE runs: a run's expert capacity (moe_capacity_factor) would drop tokens
  depending on the rows they share a batch with, so the results would depend on --batch_size."""
  return pretrained.load(workdir, hf, step=step, dtype=dtype, attention_impl=attention_impl, moe_capacity_factor=0.0)


# ---------------------------------------------------------------------------------------------------------
# Scoring rows of tokens.

@dataclasses.dataclass(frozen=True)
class Row:
  """`tokens[:-1]` are the inputs, `tokens[1:]` the targets; the last `scored` targets count."""
  tokens: tuple[int, ...]
  scored: int


def _hashable(axes):
  return tuple(axes) if isinstance(axes, list) else axes


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _row_nll(model_config: ModelConfig, rules: sharding.Rules, chunk: int, params: Any,
             batch: dict[str, jax.Array]) -> jax.Array:
  """`[rows]` summed NLL of the weighted targets: the training loss (`qwenjax.loss`, chunked logits) per row.

  Module-level, so every Scorer of one model shares its compiled programs (one per bucket)."""
  with nn.logical_axis_rules(rules):
    hidden, head, _ = train_step.hidden_states(model_config, params, batch)
    per_row = lambda h, t, w: loss_lib.cross_entropy(h[None], head, t[None], w[None], chunk=chunk)[1]
    return jax.vmap(per_row)(hidden, batch['targets'], batch['weights'])


class Scorer:
  """Sums of negative log-likelihoods of the scored targets of many rows, `batch_size` rows per jitted call."""

  def __init__(self, ckpt: pretrained.Pretrained, *, seq_len: int, batch_size: int, chunk: int = 512):
    if seq_len > ckpt.model_config.max_position_embeddings:
      raise ValueError(f'seq_len={seq_len} exceeds the model\'s max_position_embeddings='
                       f'{ckpt.model_config.max_position_embeddings}; pass a smaller --seq_len')
    self.ckpt, self.seq_len = ckpt, seq_len
    shards = sharding.batch_shards(ckpt.mesh, ckpt.rules)
    self.batch_size = -(-max(batch_size, 1) // shards) * shards  # rows split evenly over the devices
    self._batch_sharding = sharding.batch_sharding(ckpt.mesh, ckpt.rules)
    self._static = (ckpt.model_config, tuple((name, _hashable(axes)) for name, axes in ckpt.rules), chunk)

  def buckets(self) -> list[int]:
    lengths, n = [], _SMALLEST_BUCKET
    while n < self.seq_len:
      lengths.append(n)
      n *= 2
    return lengths + [self.seq_len]

  def nll(self, rows: Sequence[Row]) -> np.ndarray:
    """Per row, the summed negative log-likelihood (nats) of its scored targets, in float64."""
    for r in rows:
      if not 0 < r.scored < len(r.tokens) <= self.seq_len + 1:
        raise ValueError(f'a row of {len(r.tokens)} tokens scoring {r.scored} does not fit seq_len={self.seq_len}')
    out, pending = np.zeros(len(rows), np.float64), []
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].tokens))
    buckets = self.buckets()
    with jax.set_mesh(self.ckpt.mesh):
      for start in range(0, len(order), self.batch_size):
        group = order[start:start + self.batch_size]
        length = next(b for b in buckets if b >= len(rows[group[-1]].tokens) - 1)
        batch = {'inputs': np.zeros((self.batch_size, length), np.int32),
                 'targets': np.zeros((self.batch_size, length), np.int32),
                 'weights': np.zeros((self.batch_size, length), np.float32)}
        for j, i in enumerate(group):
          tokens, n = rows[i].tokens, len(rows[i].tokens) - 1
          batch['inputs'][j, :n] = tokens[:-1]
          batch['targets'][j, :n] = tokens[1:]
          batch['weights'][j, n - rows[i].scored:n] = 1.0
        batch = {k: jax.device_put(v, self._batch_sharding) for k, v in batch.items()}
        pending.append((group, _row_nll(*self._static, self.ckpt.params, batch)))  # async: the host goes on
    for group, nll in pending:
      out[group] = np.asarray(jax.device_get(nll), np.float64)[:len(group)]
    return out


# ---------------------------------------------------------------------------------------------------------
# Text: loss, perplexity, bits per byte.

def document_rows(ids: Sequence[int], prefix: int, seq_len: int, overlap: int = 0) -> list[Row]:
  """Windows scoring every token of a document once (see the module docstring): the first predicted from
  `prefix`, each window at most `seq_len` inputs, windows after the first seeing `overlap` earlier tokens, and
  the last one as many earlier tokens as fill its `seq_len` inputs (the harness's `get_rolling_token_windows`
  with `context_len = overlap + 1`)."""
  if not 0 <= overlap < seq_len:
    raise ValueError(f'overlap={overlap} must be at least 0 and less than seq_len={seq_len}')
  full = [prefix, *ids]
  rows, start = [], 0
  while start < len(ids):
    end = min(len(ids), start + seq_len - min(start, overlap))
    context = min(start, seq_len - (end - start))  # the last, shorter window: up to seq_len inputs in all
    rows.append(Row(tuple(full[start - context:end + 1]), end - start))
    start = end
  return rows


def text_metrics(scorer: Scorer, documents: Sequence[str], overlap: int = 0) -> dict[str, float]:
  """Loss, perplexity and bits per byte of `documents` (strings)."""
  tok = scorer.ckpt.tokenizer
  rows, total_bytes = [], 0
  for ids, text in zip(tok.encode_batch(list(documents)), documents):
    rows.extend(document_rows(ids, tok.eos_id, scorer.seq_len, overlap))
    total_bytes += len(text.encode('utf-8'))
  nll = float(scorer.nll(rows).sum())
  tokens = sum(r.scored for r in rows)
  loss = nll / max(tokens, 1)
  return {'loss': loss, 'perplexity': math.exp(min(loss, 700.0)),
          'bits_per_byte': nll / (math.log(2) * max(total_bytes, 1)), 'documents': len(documents),
          'tokens': tokens, 'bytes': total_bytes, 'windows': len(rows)}


# ---------------------------------------------------------------------------------------------------------
# Multiple choice.

@dataclasses.dataclass(frozen=True)
class Example:
  context: str
  choices: tuple[str, ...]
  answer: int


def read_tasks(path: str) -> list[Example]:
  """`{"context", "choices", "answer"}` lines of a .jsonl file, checked."""
  examples = []
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{path} line {number}'
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{where} is not JSON: {e}') from e
      if not isinstance(record, dict) or not {'context', 'choices', 'answer'} <= set(record):
        raise ValueError(f'{where} must be an object with "context" (a string), "choices" (a list of strings) '
                         f'and "answer" (the index of the right choice); it has '
                         f'{sorted(record) if isinstance(record, dict) else type(record).__name__}')
      choices, answer = record['choices'], record['answer']
      if (not isinstance(choices, list) or len(choices) < 2
          or not all(isinstance(c, str) and c for c in choices)):
        raise ValueError(f'{where}: "choices" must be a list of at least 2 non-empty strings')
      if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f'{where}: "answer" must be the index (0..{len(choices) - 1}) of the right choice, '
                         f'got {answer!r}')
      if not isinstance(record['context'], str):
        raise ValueError(f'{where}: "context" must be a string, got {type(record["context"]).__name__}')
      examples.append(Example(record['context'], tuple(choices), answer))
  if not examples:
    raise ValueError(f'{path} holds no examples')
  return examples


def _encode_pair(tok: tokenizer_lib.Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """The harness's split: trailing spaces of the context go to the continuation; the continuation's tokens are
  those of `context + continuation` after the context's (so a merge across the boundary is tokenized as in
  running text); an empty context is the end-of-text token."""
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  if not context:
    return [tok.eos_id], tok.encode(continuation)
  whole, context_ids = tok.encode(context + continuation), tok.encode(context)
  return context_ids, whole[len(context_ids):]


def choice_loglikelihoods(scorer: Scorer, examples: Sequence[Example], delimiter: str = ' ') -> list[np.ndarray]:
  """Per example, the log-likelihood (nats) of each choice's continuation given the context."""
  rows, sizes = [], []
  for ex in examples:
    for choice in ex.choices:
      context_ids, continuation = _encode_pair(scorer.ckpt.tokenizer, ex.context, delimiter + choice)
      if not continuation or len(continuation) > scorer.seq_len:
        raise ValueError(f'choice {choice!r} is {len(continuation)} tokens: it must be 1..seq_len={scorer.seq_len}')
      tokens = (context_ids + continuation)[-(scorer.seq_len + 1):]  # the context is cut on the left if long
      rows.append(Row(tuple(tokens), len(continuation)))
    sizes.append(len(ex.choices))
  nll = scorer.nll(rows)
  return [-part for part in np.split(nll, np.cumsum(sizes)[:-1])]


def choice_metrics(examples: Sequence[Example], loglikelihoods: Sequence[np.ndarray]) -> dict[str, float]:
  """acc (argmax of the log-likelihoods) and acc_norm (argmax of log-likelihood per byte of the choice)."""
  acc = [int(np.argmax(ll)) == ex.answer for ex, ll in zip(examples, loglikelihoods)]
  acc_norm = [int(np.argmax(ll / np.array([len(c.encode('utf-8')) for c in ex.choices]))) == ex.answer
              for ex, ll in zip(examples, loglikelihoods)]
  return {'acc': float(np.mean(acc)), 'acc_norm': float(np.mean(acc_norm)), 'examples': len(examples)}


# ---------------------------------------------------------------------------------------------------------
# The command line.

def evaluate(ckpt: pretrained.Pretrained, *, files: str | None = None, tasks: str | Sequence[str] = (),
             seq_len: int = 0, overlap: int = 0, batch_size: int = 8, text_key: str = 'text', max_documents: int = 0,
             choice_delimiter: str = ' ') -> dict[str, Any]:
  """The results `python -m qwenjax.evaluate` prints, for `--files` and/or `--tasks` (a list of paths, or a
  comma-separated string as on the command line). A task's results are keyed by its file's name without the
  extension, or by its path where two files share a name."""
  if not files and not tasks:
    raise ValueError('nothing to evaluate: give --files (text to score) and/or --tasks (multiple-choice .jsonl)')
  seq_len = seq_len or ckpt.seq_len or min(2048, ckpt.model_config.max_position_embeddings)
  scorer = Scorer(ckpt, seq_len=seq_len, batch_size=batch_size)
  results: dict[str, Any] = {'checkpoint': ckpt.name, 'step': ckpt.step, 'seq_len': seq_len}
  if files:
    paths = data.expand_files(files, '--files')
    source = data.DocumentSource(paths, text_key)
    count = len(source) if not max_documents else min(max_documents, len(source))
    start = time.time()
    results.update(files=paths, overlap=overlap, **text_metrics(scorer, [source[i] for i in range(count)], overlap))
    logging.info('scored %d tokens of %d documents in %.1f s', results['tokens'], count, time.time() - start)
  if isinstance(tasks, str):
    tasks = [t for t in tasks.split(',') if t]
  if tasks:
    results['tasks'] = {}
    names = [os.path.splitext(os.path.basename(path))[0] for path in tasks]
    for path, name in zip(tasks, names):
      examples = read_tasks(path)
      if names.count(name) > 1:
        name = path
      scores = choice_metrics(examples, choice_loglikelihoods(scorer, examples, choice_delimiter))
      results['tasks'][name] = {'file': os.path.abspath(path), **scores}
  return results


def _define_flags() -> None:
  """The command line's flags; defined only when run as a program, so importing this module (tests, notebooks,
  other tools) adds no global flags."""
  flags.DEFINE_string('workdir', None, 'A training run\'s directory: evaluates its latest checkpoint.')
  flags.DEFINE_string('hf', None, 'A Hugging Face checkpoint directory (config.json, safetensors, tokenizer).')
  flags.DEFINE_integer('step', None, 'With --workdir: the checkpoint step (default: the latest).')
  flags.DEFINE_string('files', None, 'Glob, or comma-separated globs, of .jsonl / .txt files to score.')
  flags.DEFINE_string('text_key', 'text', 'The field of a .jsonl line that holds the document.')
  flags.DEFINE_integer('max_documents', 0, 'Score only the first N documents (0: all).')
  flags.DEFINE_list('tasks', [], 'Multiple-choice .jsonl files of {"context", "choices", "answer"}.')
  flags.DEFINE_string('choice_delimiter', ' ', 'Put between the context and each choice.')
  flags.DEFINE_integer('seq_len', 0, 'Tokens per window (0: the run\'s data.seq_len; with --hf 2048, at most '
                       'max_position_embeddings).')
  flags.DEFINE_integer('overlap', 0, 'Earlier tokens each window after the first sees, unscored.')
  flags.DEFINE_integer('batch_size', 8, 'Rows per call (rounded up to a multiple of the devices).')
  flags.DEFINE_string('dtype', '', 'Compute dtype (float32, bfloat16); default: the run\'s model.dtype, float32 '
                      'for --hf.')
  flags.DEFINE_string('attention_impl', '', 'Attention kernel (default: the run\'s model.attention_impl).')
  flags.DEFINE_string('out', None, 'Also write the results here, as JSON.')


def main(argv: list[str]) -> None:
  del argv  # cli.run: no positional arguments
  f = flags.FLAGS
  if not f.files and not f.tasks:
    raise cli.UsageError('nothing to evaluate: give --files (text to score) and/or --tasks (multiple-choice .jsonl)')
  ckpt = load(f.workdir, f.hf, step=f.step, dtype=f.dtype, attention_impl=f.attention_impl)
  results = evaluate(ckpt, files=f.files, tasks=f.tasks, seq_len=f.seq_len, overlap=f.overlap,
                     batch_size=f.batch_size, text_key=f.text_key, max_documents=f.max_documents,
                     choice_delimiter=f.choice_delimiter)
  text = files_lib.dumps(results, indent=2)  # strict JSON: a loss that is not finite is null
  print(text)
  if f.out:
    os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
    files_lib.write(f.out, text + '\n')


if __name__ == '__main__':
  cli.run(main, _define_flags)
