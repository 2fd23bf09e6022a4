"""Tokens per second of the training input pipeline, no model: tokenizing a corpus, then reading batches.

The pipeline of `python -m qwenjax.train` for a config: its documents (the built-in corpus unless
`data.train_files` is set), its tokenizer (trained into --workdir if `data.tokenizer` is 'train' or ''),
tokenizing into a fresh prepared corpus under --workdir (`qwenjax.prepare`, timed: tokens/s, and per core),
then reading packed batches by step (`qwenjax.data.train_batches`, with `read_threads`). Batches are
`--batch_size` rows of `data.seq_len` (default: the config's global batch), as one process reads them;
compare the rate with what the train step consumes. From the repository root after `pip install -e .`:

    python benchmarks/data_throughput.py --config configs/1b.py --batches 50

Prints one JSON line: the tokenizer's and the tokenization's times, the first batch's latency, then tokens/s
over `--batches` more batches.

`--block 128` also reports, over those batches, how the packed documents meet attention's tiles: of the
(query block, key block) pairs of the causal band (and of the band of a `--window`), the share where some
query and key share a document (`blocks_needed`: what a kernel that skips by document must visit) and the
share inside one document (`blocks_unmasked`: no mask needed).

`--save FILE.npz` keeps those batches (inputs, targets, positions, segment_ids, weights; rows concatenated) for
the step benchmarks' `--batches_file`, so qwenjax and the peer train on the same packed documents:

    python benchmarks/data_throughput.py --batch_size 4 --batches 8 --save /tmp/docs.npz
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from qwenjax import config as config_lib
from qwenjax import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout, for the default config


def block_shares(segment_ids: np.ndarray, block: int, window: int = 0) -> tuple[int, int, int]:
  """(pairs in the band, pairs some query and key share a document, pairs inside one document) of
  `block`-sized (query, key) tiles of `[rows, seq]` packed segment ids (increasing along each row)."""
  rows, seq = segment_ids.shape
  tiles = segment_ids.reshape(rows, seq // block, block)
  first, last = tiles[:, :, 0], tiles[:, :, -1]
  q, k = np.meshgrid(np.arange(seq // block), np.arange(seq // block), indexing='ij')
  band = k <= q
  if window:
    band &= (q - k) * block < window + block  # a tile with any key in some query's window
  shared = last[:, None, :] >= first[:, :, None]  # the key tile reaches the query tile's first document
  one_doc = (first == last)[:, :, None] & (first == last)[:, None, :] & (first[:, :, None] == first[:, None, :])
  return rows * int(band.sum()), int((shared & band).sum()), int((one_doc & band).sum())


def measure(config, workdir: str, batch_size: int, batches: int, block: int = 0, window: int = 0,
            save: str = '') -> dict:
  config.data.prepared_dir = os.path.join(workdir, 'prepared')  # tokenize afresh: that is measured too
  start = time.perf_counter()
  run = config_lib.settings(config)
  tokenizer = data.get_tokenizer(run.data, workdir, model_vocab_size=run.model.vocab_size)
  tokenizer_s = time.perf_counter() - start
  start = time.perf_counter()
  corpus, _ = data.prepared_corpora(run.data, tokenizer)
  tokenize_s = time.perf_counter() - start
  seq_len = int(config.data.seq_len)
  it = data.train_batches(corpus, seq_len=seq_len, batch_size=batch_size, seed=int(config.train.seed),
                          shuffle_window=int(config.data.shuffle_window), local_rows=range(batch_size), start=0,
                          steps=batches + 1, read_threads=int(config.data.read_threads))
  start = time.perf_counter()
  next(it)
  first_s = time.perf_counter() - start
  kept, seconds = [], 0.0
  for _ in range(batches):
    start = time.perf_counter()
    batch = next(it)
    seconds += time.perf_counter() - start
    if block or save:
      kept.append(batch)
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  result = {'seq_len': seq_len, 'batch_size': batch_size, 'batches': batches,
            'shuffle_window': int(config.data.shuffle_window), 'read_threads': int(config.data.read_threads),
            'tokenizer_s': tokenizer_s, 'corpus_tokens': corpus.meta['tokens'], 'tokenize_s': tokenize_s,
            'tokenize_tokens_per_s': corpus.meta['tokens'] / tokenize_s,
            'tokenize_tokens_per_s_per_core': corpus.meta['tokens'] / tokenize_s / cpus,
            'first_batch_s': first_s, 'tokens_per_s': batches * batch_size * seq_len / seconds, 'cpus': cpus}
  if block:
    total, shared, one_doc = block_shares(np.concatenate([b['segment_ids'] for b in kept]), block, window)
    result.update(block=block, window=window, blocks_needed=shared / total, blocks_unmasked=one_doc / total)
  if save:
    np.savez(save, **{key: np.concatenate([b[key] for b in kept]) for key in kept[0]})
    result['saved'] = save
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', '1b.py'))
  parser.add_argument('--batch_size', type=int, default=0, help="rows per batch; 0: the config's global batch")
  parser.add_argument('--batches', type=int, default=300)
  parser.add_argument('--read_threads', type=int, default=0, help="0: the config's data.read_threads")
  parser.add_argument('--workdir', default='', help="where a trained tokenizer goes (default: a temp dir)")
  parser.add_argument('--block', type=int, default=0, help='attention tile size for the document statistics')
  parser.add_argument('--window', type=int, default=0, help='sliding window for the document statistics')
  parser.add_argument('--save', default='', help='write the measured batches to this .npz (--batches_file)')
  args = parser.parse_args()
  config = config_lib.load(args.config)
  if args.read_threads:
    config.data.read_threads = args.read_threads
  batch_size = args.batch_size or int(config.train.batch_size)
  with tempfile.TemporaryDirectory() as tmp:
    print(json.dumps(measure(config, args.workdir or tmp, batch_size, args.batches, args.block, args.window,
                             args.save)),
          flush=True)


if __name__ == '__main__':
  main()
