"""Test set-up: 8 fake CPU devices, so sharding code runs as it would on a pod slice.

XLA_FLAGS must be set before jax is imported anywhere, hence here.
"""

import os
import tempfile

# --xla_backend_optimization_level=0: the CPU code of the tests' small programs is generated without LLVM's
# optimization passes, which halves their compile time (most of this suite's time on 2 cores). The programs (HLO)
# are the same; their results agree to rounding (a multiply-add fused or not), within every test's tolerance, and
# runs that a test compares with each other are compiled alike. Subprocesses that keep XLA_FLAGS inherit it.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
# Prepared corpora and trained tokenizers go to one directory per test session (shared by its tests, as runs
# share ~/.cache/qwenjax), never to the user's cache.
if 'QWENJAX_CACHE' not in os.environ:
  os.environ['QWENJAX_CACHE'] = tempfile.mkdtemp(prefix='qwenjax-test-cache-')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# One persistent compilation cache for the tests of this session (a fresh directory each session, so nothing
# carries over between sessions): the many tests that build the same program (the train step of one config, run,
# stopped, resumed, restored; the same model under several checks) compile it once, as runs sharing
# train.compilation_cache_dir do. What a program computes does not depend on where it was compiled.
# Subprocesses (the command-line tests) are not affected: they compile on their own, as users' runs do.
jax.config.update('jax_compilation_cache_dir', tempfile.mkdtemp(prefix='qwenjax-test-compilation-cache-'))


@pytest.fixture(scope='session')
def tokenizer_file(tmp_path_factory):
  """A 512-piece tokenizer trained once on the built-in corpus, shared by the training tests."""
  from qwenjax import documents, tokenizer  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path_factory.mktemp('tokenizer'))
  source = documents.DocumentSource(documents.stdlib_files()[0])
  tokenizer.train(source, directory, vocab_size=512, max_lines=20_000)
  return f'{directory}/tokenizer.model'
