"""Tokens per second of `qwenjax.tokenizer`'s `encode_batch` (all cores) and `encode` (one document at a time).

From the repository root after `pip install -e .`:

    python benchmarks/tokenizer_throughput.py --mb 4
    taskset -c 0 python benchmarks/tokenizer_throughput.py --mb 4     # one core

Text: the first `--mb` MiB of `--files` (read whole, in sorted order), by default the Python standard library's
`.py` files (the built-in corpus). Tokenizers: each `--tokenizer PATH` (anything `tokenizer.load` takes), and
by default the two kinds built here from the other files: sentencepiece BPEs trained with `tokenizer.train`
(`--vocab_sizes`, by default 4096 and 32000 pieces: configs/tiny.py and configs/1b.py), and a byte-level BPE with
Qwen2's pipeline (NFC, its split pattern) of the last of those sizes, trained with the `tokenizers` package.
Prints one JSON line per tokenizer: tokens, MiB and the best of `--repeats` rates.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sysconfig
import tempfile
import time

from qwenjax import tokenizer

# transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX.
QWEN2_SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                       r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def read_texts(patterns: list[str]) -> list[str]:
  paths = sorted({p for pattern in patterns for p in glob.glob(pattern, recursive=True)})
  texts = []
  for path in paths:
    try:
      with open(path, encoding='utf-8') as f:
        texts.append(f.read())
    except (UnicodeDecodeError, OSError):
      continue
  return texts


def qwen2_style_bpe(texts: list[str], directory: str, vocab_size: int) -> str:
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers  # pylint: disable=all
  tok = tokenizers.Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT_PATTERN), behavior='isolated', invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=False,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.add_special_tokens(['<|endoftext|>'])
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, 'tokenizer.json'))
  return directory


def rate(fn, texts: list[str], repeats: int) -> tuple[int, float]:
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    ids = fn(texts)
    best = min(best, time.perf_counter() - start)
  return sum(map(len, ids)), best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--files', nargs='+', default=[os.path.join(sysconfig.get_paths()['stdlib'], '**', '*.py')])
  parser.add_argument('--mb', type=float, default=4.0, help='MiB of text to encode')
  parser.add_argument('--tokenizer', action='append', default=[], help='a path for tokenizer.load (repeatable)')
  parser.add_argument('--vocab_sizes', default='4096,32000', help='of the tokenizers built here')
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()

  texts, size = [], 0
  everything = read_texts(args.files)
  for text in everything:
    if size >= args.mb * 2**20:
      break
    texts.append(text)
    size += len(text.encode())
  rest = everything[len(texts):] or everything
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  with tempfile.TemporaryDirectory() as tmp:
    named = {path: tokenizer.load(path) for path in args.tokenizer}
    if not args.tokenizer:
      sizes = [int(v) for v in args.vocab_sizes.split(',')]
      for pieces in sizes:
        named[f'sentencepiece BPE {pieces}'] = tokenizer.train(rest, os.path.join(tmp, f'spm{pieces}'),
                                                               vocab_size=pieces)
      named[f'byte-level BPE {sizes[-1]}, Qwen2 pipeline'] = tokenizer.load(
          qwen2_style_bpe(rest, os.path.join(tmp, 'hf'), sizes[-1]))
    for name, tok in named.items():
      tokens, batch_s = rate(tok.encode_batch, texts, args.repeats)
      _, one_s = rate(lambda xs, tok=tok: [tok.encode(x) for x in xs], texts, args.repeats)
      print(json.dumps({
          'tokenizer': name, 'kind': type(tok).__name__, 'vocab_size': tok.vocab_size, 'cores': cores,
          'documents': len(texts), 'mib': round(size / 2**20, 2), 'tokens': tokens,
          'encode_batch_tokens_per_s': round(tokens / batch_s), 'encode_tokens_per_s': round(tokens / one_s),
          'encode_batch_mib_per_s': round(size / 2**20 / batch_s, 2)}), flush=True)


if __name__ == '__main__':
  main()
