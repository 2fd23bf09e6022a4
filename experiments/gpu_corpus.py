"""The extra training text of the GPU studies, packed into one .jsonl file.

    PYTHONPATH=. python experiments/gpu_corpus.py DIR

The GPU machine has no internet, so its corpus is what is installed: the `.py` files of site-packages (a glob in
the sweep file) plus this file, which holds what a glob cannot give the data pipeline (it reads .py, .txt, .jsonl
and ArrayRecord files only):

* the Python standard library's training split (`documents.stdlib_files()[0]`): the eval set is the other 2% of
  it, so these files are left out of a glob of the standard library's directory only by listing them;
* the other text files of site-packages: type stubs, C, C++ and CUDA sources and headers, Markdown,
  reStructuredText and plain text (`EXTENSIONS`), UTF-8 files of at most `MAX_BYTES` (larger ones are generated
  tables, not text).

One JSON line per file, `{"text": ..., "path": ...}`, in sorted path order, so the file (and the tokens the
sweep trains on) is the same on any machine with the same packages. Written once: if DIR already holds it, it is
kept (rewriting it would change its modification time, which makes the data pipeline tokenize it again).
"""

import json
import os
import pathlib
import sys
import sysconfig

from qwenjax import documents

EXTENSIONS = ('.pyi', '.c', '.h', '.cc', '.cpp', '.hpp', '.cu', '.cuh', '.md', '.rst', '.txt')
MAX_BYTES = 2_000_000
NAME = 'gpu_corpus.jsonl'


def files() -> list[str]:
  """Every file the extra corpus holds, in order."""
  train, _ = documents.stdlib_files()
  root = pathlib.Path(sysconfig.get_paths()['purelib'])
  extra = sorted(str(p) for p in root.rglob('*') if p.suffix in EXTENSIONS and p.is_file()
                 and p.stat().st_size <= MAX_BYTES)
  return sorted(train) + extra


def write(directory: str) -> str:
  """DIR/gpu_corpus.jsonl, written unless it exists; returns its path."""
  path = os.path.join(directory, NAME)
  if os.path.exists(path):
    return path
  os.makedirs(directory, exist_ok=True)
  tmp, count = f'{path}.{os.getpid()}', 0
  with open(tmp, 'w', encoding='utf-8') as out:
    for name in files():
      try:
        with open(name, encoding='utf-8') as f:
          text = f.read()
      except (UnicodeDecodeError, OSError):
        continue
      if text.strip():
        out.write(json.dumps(dict(text=text, path=name)) + '\n')
        count += 1
  os.replace(tmp, path)
  print(f'{path}: {count} documents, {os.path.getsize(path) / 1e6:.1f} MB')
  return path


if __name__ == '__main__':
  if len(sys.argv) != 2:
    sys.exit('usage: PYTHONPATH=. python experiments/gpu_corpus.py DIR')
  write(sys.argv[1])
