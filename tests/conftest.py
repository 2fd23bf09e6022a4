"""Test set-up: 8 fake CPU devices, so sharding code runs as it would on a pod slice.

XLA_FLAGS must be set before jax is imported anywhere, hence here.
"""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
# Prepared corpora and trained tokenizers go to one directory per test session (shared by its tests, as runs
# share ~/.cache/qwenjax), never to the user's cache.
if 'QWENJAX_CACHE' not in os.environ:
  import tempfile  # pylint: disable=g-import-not-at-top
  os.environ['QWENJAX_CACHE'] = tempfile.mkdtemp(prefix='qwenjax-test-cache-')

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='session')
def tokenizer_file(tmp_path_factory):
  """A 512-piece tokenizer trained once on the built-in corpus, shared by the training tests."""
  from qwenjax import documents, tokenizer  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path_factory.mktemp('tokenizer'))
  source = documents.DocumentSource(documents.stdlib_files()[0])
  tokenizer.train(source, directory, vocab_size=512, max_lines=20_000)
  return f'{directory}/tokenizer.model'
