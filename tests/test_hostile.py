"""Hostile inputs and hard faults (issue 34): every failure one clear line, no result ever overwritten, nothing read
outside a checkpoint's own directory.

Each test stands for a class of faults, named in its docstring; the checks are examples of the class:
- every file the project writes is written whole or not at all (`qwenjax.files.write`), in strict JSON;
- nonsense settings are refused before anything runs; a run that trained nothing is a failure;
- a file matched twice (links, a symlink loop) is read once; an earlier run's metrics are never dropped;
- a line of a .jsonl file that is valid JSON but not a record is skipped with a warning naming it;
- a Hugging Face checkpoint's config.json, index and safetensors headers are checked before anything is built from
  them, and a checkpoint names no file outside its directory; a tokenizer that cannot encode text is refused;
- a read-only workdir, a full disk, Ctrl-C twice and the libraries' background failures end in one line.
"""

import ast
import errno
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

import hf_utils
import jax
import ml_collections
import numpy as np
import pytest

from model_utils import random_params
from qwenjax import checkpoint
from qwenjax import cli
from qwenjax import config as config_lib
from qwenjax import corpus as corpus_lib
from qwenjax import data
from qwenjax import documents
from qwenjax import export
from qwenjax import files
from qwenjax import hf
from qwenjax import metrics as metrics_lib
from qwenjax import pretrained
from qwenjax import scaling
from qwenjax import sweep
from qwenjax import tokenizer as tokenizer_lib
from qwenjax import train
from qwenjax import workdir as workdir_lib
from qwenjax.model_config import ModelConfig
from train_utils import ROOT, TINY, small_config

pytestmark = [pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning'),
              pytest.mark.filterwarnings('ignore:coroutine .* was never awaited:RuntimeWarning')]


def _strict(text: str):
  """json.loads that refuses the bare NaN / Infinity words, as strict JSON readers do."""
  return json.loads(text, parse_constant=lambda word: pytest.fail(f'bare {word} in {text[:200]!r}'))


def _run(args, timeout=300, **kwargs):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout, check=False, **kwargs)


def _one_error_line(done, status=1):
  """The command ended with `status` and exactly one `error:` line, its last, and no traceback."""
  errors = [line for line in done.stderr.splitlines() if line.startswith('error: ')]
  assert done.returncode == status and len(errors) == 1, (done.returncode, done.stderr[-3000:])
  assert done.stderr.rstrip().endswith(errors[0]) and 'Traceback' not in done.stderr, done.stderr[-3000:]
  return errors[0]


# ---------------------------------------------------------------------------------------------------------
# Every file written whole or not at all, in strict JSON.

# Calls that write a file, allowed only where listed (module, function): each of these writes through
# `files.write` (the function is the callable it is given) or is not a rewrite of a file a failure could damage.
ALLOWED_WRITES = {
    ('files.py', 'write'): 'the one writer: a temporary file renamed over the target',
    ('corpus.py', '_save_npy.write'): 'the callable given to files.write',
    ('chat_data.py', '_save_npy.write'): 'the callable given to files.write',
    ('scaling.py', '_savefig'): 'the callable given to files.write',
    ('hf.py', '_save_file'): 'the callable given to files.write',
    ('export.py', '_save_safetensors.write'): 'the callable given to files.write',
    ('lock.py', '_create'): 'an exclusive create (O_EXCL); a lock cut short is taken over (test_robustness)',
    ('metrics.py', '_open'): 'metrics.jsonl appended to during a run: a kill loses at most the line being written',
    ('data.py', 'shared_by_all_processes'): 'a probe file, removed at once',
}


def _write_calls():
  """(module, function, call) of every call in qwenjax/ that writes a file."""
  found = []
  root = os.path.join(ROOT, 'qwenjax')
  for folder, _, names in os.walk(root):
    for name in sorted(n for n in names if n.endswith('.py')):
      path = os.path.join(folder, name)
      stack = []

      class Visitor(ast.NodeVisitor):

        def visit_FunctionDef(self, node):  # pylint: disable=invalid-name
          stack.append(node.name)
          self.generic_visit(node)
          stack.pop()

        def visit_Call(self, node):  # pylint: disable=invalid-name
          f = node.func
          called = f.attr if isinstance(f, ast.Attribute) else getattr(f, 'id', None)
          owner = getattr(f.value, 'id', None) if isinstance(f, ast.Attribute) else None
          mode = next((a.value for a in node.args[1:2] if isinstance(a, ast.Constant)), None)
          mode = next((k.value.value for k in node.keywords if k.arg == 'mode'), mode)
          writes = (called in ('open', 'fdopen') and isinstance(mode, str) and set(mode) & set('wax+')
                    or called in ('write_text', 'write_bytes', 'savefig', 'save_file', 'savez', 'to_csv')
                    or (owner, called) in (('json', 'dump'), ('np', 'save'), ('numpy', 'save'), ('pickle', 'dump'))
                    or owner == 'shutil' and called in ('copy', 'copy2', 'copyfile', 'copytree'))
          if writes:
            found.append((os.path.relpath(path, root), '.'.join(stack), called))
          self.generic_visit(node)

      Visitor().visit(ast.parse(open(path, encoding='utf-8').read()))
  return found


@pytest.mark.slow
def test_every_file_the_project_writes_goes_through_files_write():
  """Class: a file written in place (open 'w', write_text, json.dump, savefig, a safetensors save) is truncated by
  a failure halfway; every writer goes through files.write (a temporary file renamed over the target)."""
  stray = [site for site in _write_calls() if site[:2] not in ALLOWED_WRITES]
  assert not stray, f'write these through qwenjax.files.write: {stray}'


def _fail_fsync(monkeypatch):
  """Every later write fails as a full disk fails it: files.write syncs before renaming, so this is its last moment."""
  def full(fd):
    raise OSError(errno.ENOSPC, 'No space left on device')
  monkeypatch.setattr(os, 'fsync', full)


def _leftovers(directory):
  return [os.path.join(d, n) for d, _, names in os.walk(directory) for n in names if n.startswith('.tmp-')]


def test_a_failed_write_leaves_the_previous_version_whole(tmp_path, monkeypatch):
  path = tmp_path / 'out.json'
  files.write(path, 'old')

  def half(tmp):
    with open(tmp, 'w') as f:
      f.write('{"half": ')
    raise OSError(errno.ENOSPC, 'No space left on device')

  with pytest.raises(OSError, match='No space'):
    files.write(path, half)
  _fail_fsync(monkeypatch)
  with pytest.raises(OSError, match='No space'):
    files.write(path, b'new')
  assert path.read_text() == 'old' and not _leftovers(tmp_path)


def _results(n=12):
  """IsoFLOP-like results: 3 budgets x 4 sizes on a known law."""
  rows = []
  for c in (1e14, 1e15, 1e16):
    for n_params in np.geomspace(1e4, 1e6, n // 3):
      d = c / (6 * n_params)
      loss = 0.8 + 30 / n_params**0.25 + 600 / d**0.4
      rows.append(dict(name=f'C{c:.0e}-N{n_params:.3g}', params=float(n_params), tokens=float(d), flops=c,
                       budget=c, eval_loss=float(loss)))
  return rows


def _write_lines(path, rows):
  path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in rows))


@pytest.mark.slow
def test_a_point_without_tokens_is_left_out_and_fit_json_stays_strict(tmp_path, monkeypatch):
  """Was: a result with tokens=0 made `scaling fit` fail while writing fit.json, leaving it truncated."""
  monkeypatch.setattr(scaling, 'plot_fit', lambda *args: [])  # the plots: test_each_writer_leaves_...
  _write_lines(tmp_path / 'results.jsonl', _results())
  scaling.fit_directory(str(tmp_path), bootstrap=0)
  _write_lines(tmp_path / 'results.jsonl', _results() + [dict(name='zero', params=1e5, tokens=0, eval_loss=3.0)])
  fitted = scaling.fit_directory(str(tmp_path), bootstrap=0)
  on_disk = _strict((tmp_path / 'fit.json').read_text())
  assert on_disk['points'] == 12 == fitted['points']
  assert [x['name'] for x in on_disk['excluded']] == ['zero'] and 'tokens 0' in on_disk['excluded'][0]['reason']


def _writers(tmp_path, tokenizer_file):
  """(name, the file it rewrites, a call that rewrites it): each call writes its file again."""
  run = tmp_path / 'run'
  sweep_dir = tmp_path / 'sweep'
  sweep_dir.mkdir()
  _write_lines(sweep_dir / 'results.jsonl', _results())
  tok = tokenizer_lib.load(tokenizer_file)
  steps = iter(range(10, 100))

  def changed_config():
    config = small_config()
    config.train.steps = next(steps)
    workdir_lib.write_config(str(run), config, 3)

  def metrics_rewrite():  # drops the line past the resume step that a killed run left
    metrics_lib.MetricWriter(str(run), resume_step=1)

  return [
      ('fit.json and plots', (sweep_dir / 'fit.json', sweep_dir / 'isoflop.png', sweep_dir / 'optimal.png'),
       lambda: scaling.fit_directory(str(sweep_dir), bootstrap=0)),
      ('results.jsonl', sweep_dir / 'results.jsonl',
       lambda: sweep._append(sweep_dir / 'results.jsonl', dict(name='x'))),  # pylint: disable=protected-access
      ('sweep.json', sweep_dir / 'sweep.json', lambda: sweep._write_json(sweep_dir / 'sweep.json', {'a': 1})),  # pylint: disable=protected-access
      ('config.json', run / 'config.json', changed_config),
      ('metrics.jsonl', run / 'metrics.jsonl', metrics_rewrite),
      ('tokenizer', tmp_path / 'tok' / 'tokenizer.model', lambda: tok.save(str(tmp_path / 'tok'))),
      ('prepared meta', tmp_path / 'meta.json', lambda: corpus_lib._save_json(str(tmp_path / 'meta.json'), {})),  # pylint: disable=protected-access
  ]


@pytest.mark.slow
def test_each_writer_leaves_its_previous_file_whole_on_a_full_disk(tmp_path, tokenizer_file, monkeypatch):
  """Class: a failure while rewriting any file (fit.json, plots, results.jsonl, sweep.json, config.json,
  metrics.jsonl, tokenizer copies, prepared corpora) leaves its previous version whole, and no temporary file."""
  run = tmp_path / 'run'
  run.mkdir()
  workdir_lib.write_config(str(run), small_config(), 0)
  _write_lines(run / 'metrics.jsonl', [{'step': 1, 'loss': 2.0}, {'step': 2, 'loss': 1.0}])
  writers = _writers(tmp_path, tokenizer_file)
  for _, _, write in writers:  # the previous versions
    write()
  for name, paths, write in writers:
    paths = paths if isinstance(paths, tuple) else (paths,)
    if name == 'metrics.jsonl':  # a line past the resume step, as a killed run leaves it: to be dropped
      with open(paths[0], 'a') as f:
        f.write('{"step": 5, "loss": 1.0}\n')
    before = [path.read_bytes() for path in paths]
    with monkeypatch.context() as patch:
      _fail_fsync(patch)
      with pytest.raises(OSError, match='No space left'):
        write()
    assert [path.read_bytes() for path in paths] == before, name
  assert not _leftovers(tmp_path)


def test_export_is_whole_or_absent(tmp_path, tokenizer_file, monkeypatch):
  """An export that fails halfway (a full disk) leaves no directory behind, and a later export can go there."""
  model_config = ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)
  run = pretrained.Pretrained(model_config, random_params(model_config), tokenizer_lib.load(tokenizer_file),
                              str(tmp_path / 'run'), None, None, step=4)
  monkeypatch.setattr(pretrained, 'load', lambda *args, **kwargs: run)
  out = tmp_path / 'hf'
  with monkeypatch.context() as patch:
    _fail_fsync(patch)
    with pytest.raises(OSError, match='No space left'):
      export.export('unused', str(out))
  assert sorted(os.listdir(tmp_path)) == []  # neither the export nor its staging directory
  written = export.export('unused', str(out))
  assert 'model.safetensors' in written['files'] and hf.load_config(str(out)).hidden_size == 32


def test_written_json_is_strict_and_reads_back(tmp_path):
  """Class: JSON the project writes has no bare NaN / Infinity (null instead), and readers take both."""
  writer = metrics_lib.MetricWriter(str(tmp_path))
  writer.write(1, {'loss': float('nan'), 'grad_norm': float('inf'), 'mfu': 0.5})
  writer.write(2, {'loss': 2.0, 'grad_norm': 1.0, 'mfu': float('nan')})
  writer.close()
  lines = [_strict(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert lines[0]['loss'] is None and lines[0]['grad_norm'] is None and lines[1]['mfu'] is None
  with open(tmp_path / 'metrics.jsonl', 'a') as f:  # an older run's bare NaN
    f.write('{"step": 3, "loss": NaN, "mfu": 0.25}\n')
  records = sweep._read_metrics(str(tmp_path))  # pylint: disable=protected-access
  assert [r['step'] for r in records] == [1, 2, 3] and np.isnan(records[2]['loss'])
  sweep._append(tmp_path / 'results.jsonl', dict(name='a', eval_loss=float('nan')))  # pylint: disable=protected-access
  assert _strict((tmp_path / 'results.jsonl').read_text())['eval_loss'] is None
  assert files.dumps({'a': [np.float32('inf'), np.int64(3)]}) == '{"a": [null, 3]}'


# ---------------------------------------------------------------------------------------------------------
# Settings refused before anything runs; a run that trained nothing fails.

def _with(section, **values):
  config = config_lib.load(TINY).to_dict()
  config[section].update(values)
  return ml_collections.ConfigDict(config)


@pytest.mark.parametrize('config,message', [
    (_with('train', lr=-1.0), r'train.lr=-1.0 must be >= 0'),
    (_with('train', lr=float('nan')), r'train.lr=nan must be a finite number'),
    (_with('train', lr=float('inf')), r'train.lr=inf must be a finite number'),
    (_with('train', z_loss=float('nan')), r'train.z_loss=nan must be a finite number'),
    (_with('train', batch_size=0), r'train.batch_size=0 must be >= 1'),
    (_with('train', batch_size=-8), r'train.batch_size=-8 must be >= 1'),
    (_with('train', steps=0), r'train.steps=0 must be >= 1'),
    (_with('train', keep_checkpoints=0), r'train.keep_checkpoints=0 must be >= 1'),
    (_with('train', adam_b2=1.0), r'train.adam_b2=1.0 must be below 1'),
    (_with('train', eval_steps=-1), r'train.eval_steps=-1 must be >= 0'),
    (_with('data', seq_len=0), r'data.seq_len=0 must be >= 1'),
    (_with('data', shuffle_window=-1), r'data.shuffle_window=-1 must be >= 0'),
    (_with('model', rms_norm_eps=float('nan')), r'rms_norm_eps must be a finite number >= 0.0, got nan'),
    (_with('model', hidden_size=-256), r'hidden_size must be an integer >= 1, got -256'),
    (_with('model', num_hidden_layers=0), r'num_hidden_layers must be an integer >= 1, got 0'),
    (_with('model', rope_theta=0.0), r'rope_theta must be a finite number > 0.0'),
])
def test_a_nonsense_setting_is_refused_naming_it(config, message):
  """Class: a value no run can use (negative, zero, NaN or infinite where that means nothing) is a usage error
  naming the setting, found by config.settings before anything starts (the command exits 2: test_cli)."""
  with pytest.raises(ValueError, match=message):
    config_lib.settings(config)


def fast_config(tokenizer_file, **train_overrides):
  config = small_config(**{'steps': 3, 'log_every': 1, 'checkpoint_every': 2, 'warmup_steps': 1,
                           **train_overrides})
  config.model.update(num_hidden_layers=1, hidden_size=64, intermediate_size=128)
  config.data.update(tokenizer=tokenizer_file, seq_len=32, shuffle_window=0)
  config.train.update(batch_size=8, eval_steps=0)
  return config


@pytest.mark.slow
def test_a_run_that_trains_nothing_fails(tmp_path, tokenizer_file, monkeypatch):
  """Class: exit status 0 means the run's final state was saved. Every step skipped for a non-finite loss (a NaN lr,
  a float16 model, bad data), with fewer steps than max_nonfinite_steps, used to end 'successfully' with no
  checkpoint."""
  original = data.StepBatches.__call__

  def poisoned(self, step):
    batch = original(self, step)
    batch['weights'] = batch['weights'] * np.nan
    return batch

  monkeypatch.setattr(data.StepBatches, '__call__', poisoned)
  workdir = str(tmp_path / 'run')
  with pytest.raises(checkpoint.NonFiniteError, match=r'every one of its 3 steps was skipped.*final state was not '
                     r'saved \(checkpoints kept: none\)'):
    train.train_and_evaluate(fast_config(tokenizer_file, max_nonfinite_steps=20), workdir)
  assert checkpoint.Checkpointer(workdir).all_steps() == []


# ---------------------------------------------------------------------------------------------------------
# Files matched once; an earlier run's metrics kept; lines that are not records skipped.

def test_a_file_reached_twice_is_read_once_and_a_symlink_loop_is_named(tmp_path, caplog):
  """Class: a file matched under several paths (a symlink pointing back up made one file 41; links to one
  directory) is read once, by its real path, with a warning that names the loop."""
  (tmp_path / 'data' / 'sub').mkdir(parents=True)
  (tmp_path / 'data' / 'a.jsonl').write_text('{"text": "hello"}\n')
  os.symlink('..', tmp_path / 'data' / 'sub' / 'up')
  os.symlink(tmp_path / 'data', tmp_path / 'alias')
  with caplog.at_level(logging.WARNING):
    found = documents.expand_files(f'{tmp_path}/data/**/*.jsonl,{tmp_path}/alias/*.jsonl')
  assert found == [str(tmp_path / 'data' / 'a.jsonl')]
  assert 'each file is read once' in caplog.text and f'{tmp_path}/data/sub/up is a symlink loop' in caplog.text


def test_starting_over_moves_an_earlier_runs_metrics_aside(tmp_path, caplog):
  """Class: a run that starts from step 0 over an earlier run's metrics.jsonl (its checkpoints deleted) keeps the
  old lines, moved to metrics.<n>.jsonl with a warning; it used to drop them without a word."""
  old = [{'step': 1, 'loss': 5.0}, {'step': 2, 'loss': 4.0}]
  _write_lines(tmp_path / 'metrics.jsonl', old)
  with caplog.at_level(logging.WARNING):
    writer = metrics_lib.MetricWriter(str(tmp_path), resume_step=0)
  writer.write(1, {'loss': 6.0})
  writer.close()
  assert 'moved to metrics.1.jsonl' in caplog.text
  assert [json.loads(line) for line in (tmp_path / 'metrics.1.jsonl').read_text().splitlines()] == old
  assert [json.loads(line)['loss'] for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()] == [6.0]
  _write_lines(tmp_path / 'metrics.jsonl', old)
  metrics_lib.MetricWriter(str(tmp_path), resume_step=0)
  assert (tmp_path / 'metrics.2.jsonl').exists()  # a third start keeps the second's lines too


NOT_RECORDS = ['42', '[1, 2, 3]', '{"step": null}', '"text"', '{"loss": 1.0}', '{"step": true}']


def test_lines_that_are_not_records_are_skipped_with_a_warning(tmp_path, caplog):
  """Class: a .jsonl line that is valid JSON but not a record of its file (metrics.jsonl: a `step`; results.jsonl: a
  `name`) is left out with a warning naming the line, never a TypeError that stops every later run."""
  good = [{'step': 1, 'loss': 3.0}, {'step': 2, 'loss': 2.0}]
  _write_lines(tmp_path / 'metrics.jsonl', good[:1] + NOT_RECORDS + good[1:])
  with caplog.at_level(logging.WARNING):
    metrics_lib.MetricWriter(str(tmp_path), resume_step=1)  # drops step 2 (past the resume step), keeps the rest
    assert [r['step'] for r in sweep._read_metrics(str(tmp_path))] == [1]  # pylint: disable=protected-access
  assert f'{tmp_path}/metrics.jsonl line 2 is not a record' in caplog.text
  results = [dict(name='a', eval_loss=1.0), 42, [1, 2], {'eval_loss': 2.0}, {'name': None}, dict(name='b')]
  _write_lines(tmp_path / 'results.jsonl', results)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert [r['name'] for r in scaling.read_results(str(tmp_path))] == ['a', 'b']
    assert sorted(sweep.read_done(str(tmp_path))) == ['a', 'b']
  assert f'{tmp_path}/results.jsonl line 4 is not a record (an object without "name")' in caplog.text


# ---------------------------------------------------------------------------------------------------------
# Hugging Face checkpoints and tokenizers: checked before anything is built; nothing outside their directory.

HF_SHAPE = dict(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=64)


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  """A tiny Qwen2 checkpoint with its tokenizer (no torch needed)."""
  directory = tmp_path_factory.mktemp('hf') / 'good'
  config = ModelConfig(**HF_SHAPE)
  hf.save_pretrained(str(directory), config, random_params(config))
  hf_utils.save_tiny_qwen2_tokenizer(str(directory))
  return directory


def _hostile(hf_dir, tmp_path, name, config=None, raw=None, tensors=None, damage=None):
  """A copy of the good checkpoint with its config.json changed (`config` updates, or `raw` text), its tensors
  replaced, or `damage(directory)` done to it."""
  directory = tmp_path / name
  shutil.copytree(hf_dir, directory)
  if config is not None or raw is not None:
    good = json.loads((hf_dir / 'config.json').read_text())
    (directory / 'config.json').write_text(raw if raw is not None else json.dumps({**good, **config}))
  if tensors is not None:
    from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
    save_file(tensors(load_file(str(hf_dir / 'model.safetensors'))), str(directory / 'model.safetensors'))
  if damage is not None:
    damage(directory)
  return directory


def _nan_weights(tensors):
  tensors = {name: np.array(t) for name, t in tensors.items()}
  tensors['model.layers.1.mlp.up_proj.weight'][3, :5] = np.nan
  return tensors


def _cut_header(directory):
  data_ = (directory / 'model.safetensors').read_bytes()
  (directory / 'model.safetensors').write_bytes(data_[:100])


def _huge_header(directory):
  data_ = (directory / 'model.safetensors').read_bytes()
  (directory / 'model.safetensors').write_bytes(struct.pack('<Q', 2**62) + data_[8:])


def _index_naming(name):
  def damage(directory):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    names = load_file(str(directory / 'model.safetensors'))
    (directory / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': dict.fromkeys(names, name)}))
    shutil.copy(directory / 'model.safetensors', directory.parent / 'outside.safetensors')
    os.remove(directory / 'model.safetensors')
  return damage


def _linked_out(directory):
  shutil.move(directory / 'model.safetensors', directory.parent / 'elsewhere.safetensors')
  os.symlink(directory.parent / 'elsewhere.safetensors', directory / 'model.safetensors')


# (case, how to make it, what the one error names)
HOSTILE_HF = {
    'layers 10**9': (dict(config=dict(num_hidden_layers=10**9)),
                     r'config.json has num_hidden_layers=1000000000 but its safetensors files hold 2 layers'),
    'negative width': (dict(config=dict(hidden_size=-256)), r'config.json: hidden_size must be an integer >= 1, got -256'),
    'vocab 0': (dict(config=dict(vocab_size=0)), r'config.json: vocab_size must be an integer >= 1, got 0'),
    'width a string': (dict(config=dict(hidden_size='32')), r"config.json: hidden_size must be an integer >= 1, got '32'"),
    'width 32.5': (dict(config=dict(hidden_size=32.5)), r'config.json: hidden_size must be an integer >= 1, got 32.5'),
    'window a string': (dict(config=dict(use_sliding_window=True, sliding_window='x')),
                        r"config.json: sliding_window must be an integer >= 1 \(or None\), got 'x'"),
    'heads a list': (dict(config=dict(num_attention_heads=[2])), r'config.json: num_attention_heads must be an integer'),
    'rms_norm_eps NaN': (dict(raw=None, config=dict(rms_norm_eps=float('nan'))),
                         r'config.json: rms_norm_eps must be a finite number >= 0.0, got nan'),
    'config a list': (dict(raw='[1, 2, 3]'), r'config.json holds a JSON list, not an object'),
    'config not JSON': (dict(raw='{"vocab_size": '), r'config.json is not valid JSON'),
    'rope a string': (dict(config=dict(rope_scaling='yarn')), r"config.json: rope_scaling must be a JSON object"),
    'NaN weights': (dict(tensors=_nan_weights),
                    r'tensor model.layers.1.mlp.up_proj.weight of .* holds \d+ NaN or infinite value'),
    'header cut short': (dict(damage=_cut_header), r'model.safetensors is not a readable safetensors file'),
    'header of 2**62 bytes': (dict(damage=_huge_header), r'model.safetensors is not a readable safetensors file'),
    'index leaves the directory': (dict(damage=_index_naming('../outside.safetensors')),
                                   r"index.json names the file '../outside.safetensors', which is not in the "
                                   r'checkpoint directory'),
    'index names an absolute path': (dict(damage=lambda d: _index_naming(str(d.parent / 'outside.safetensors'))(d)),
                                     r'index.json names the file .*outside.safetensors.*which is not in the checkpoint'),
    'a link out of the directory': (dict(damage=_linked_out), r'is a link to .*elsewhere.safetensors, outside the '
                                                              r'checkpoint directory'),
}


@pytest.mark.parametrize('case', list(HOSTILE_HF))
def test_a_hostile_checkpoint_is_one_clear_error(hf_dir, tmp_path, case):
  """Class: a checkpoint's config.json (sizes huge, negative, zero, of the wrong type; not an object; NaN numbers),
  its tensors (NaN) and its files (headers cut short or claiming 2^62 bytes, an index or a link naming a file outside
  the directory) give one ValueError naming the file and the field, from every loader (host, sharded, config alone),
  before anything proportional to a size is built."""
  make, message = HOSTILE_HF[case]
  directory = str(_hostile(hf_dir, tmp_path, 'ckpt', **make))
  with pytest.raises(ValueError, match=message):
    hf.from_pretrained(directory)
  with pytest.raises(ValueError, match=message):
    pretrained.load(hf=directory)  # the sharded load of sample and evaluate
  if 'weights' not in case:
    with pytest.raises(ValueError, match=message):
      hf.load_config(directory)


def test_a_hub_snapshots_links_into_its_blobs_are_followed(hf_dir, tmp_path):
  """The Hugging Face cache links snapshots/<revision>/FILE to ../../blobs/<hash>: inside its repository."""
  repo = tmp_path / 'models--qwen--tiny'
  (repo / 'blobs').mkdir(parents=True)
  snapshot = repo / 'snapshots' / 'abc123'
  snapshot.mkdir(parents=True)
  for name in os.listdir(hf_dir):
    shutil.copy(hf_dir / name, repo / 'blobs' / f'hash-{name}')
    os.symlink(f'../../blobs/hash-{name}', snapshot / name)
  config, _ = hf.from_pretrained(str(snapshot))
  assert config.hidden_size == HF_SHAPE['hidden_size']


def test_a_tokenizer_that_cannot_encode_text_is_refused_when_loaded(tmp_path):
  """Class: a tokenizer.json that fails on some text (a WordLevel model without its unknown token) is refused when
  loaded, naming the file, rather than raising a bare Exception mid-run."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({'<|endoftext|>': 0, 'hello': 1}, unk_token='[UNK]'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / 'tokenizer.json'))
  with pytest.raises(ValueError, match=r"tokenizer.json': tokenizer.json cannot encode text \(WordLevel error: "
                     r'Missing \[UNK\] token.*needs its unknown token'):
    tokenizer_lib.load(str(tmp_path))


@pytest.mark.slow
def test_hostile_checkpoints_through_the_commands(hf_dir, tmp_path):
  """sample and evaluate --hf, train --config.init_from_hf: each hostile checkpoint is one `error:` line and exit
  status 1; none hangs (10**9 layers used to grow memory until killed)."""
  (tmp_path / 'text.txt').write_text('The quick brown fox.')
  shape = [f'--config.model.{k}={v}' for k, v in HF_SHAPE.items()] + [
      '--config.model.tie_word_embeddings=False', '--config.data.seq_len=16', f'--config.data.train_files={tmp_path}/text.txt', '--config.train.batch_size=8',
      '--config.train.steps=2', '--config.train.eval_steps=0', '--config.train.compilation_cache_dir=']
  cases = {}
  for i, case in enumerate(['layers 10**9', 'NaN weights', 'index leaves the directory', 'config a list']):
    directory = _hostile(hf_dir, tmp_path, f'case{i}', **HOSTILE_HF[case][0])
    cases[f'sample {case}'] = (['-m', 'qwenjax.sample', f'--hf={directory}', '--prompt=hi'], HOSTILE_HF[case][1])
    cases[f'evaluate {case}'] = (['-m', 'qwenjax.evaluate', f'--hf={directory}', f'--files={tmp_path}/text.txt'],
                                 HOSTILE_HF[case][1])
    if case != 'config a list':
      cases[f'train {case}'] = (['-m', 'qwenjax.train', f'--config={TINY}', f'--workdir={tmp_path}/run{i}',
                                 f'--config.init_from_hf={directory}', *shape], HOSTILE_HF[case][1])
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    done = {name: pool.submit(_run, args, 120) for name, (args, _) in cases.items()}
  for name, (_, message) in cases.items():
    line = _one_error_line(done[name].result())
    assert __import__('re').search(message, line), (name, line)


def test_a_runs_config_is_checked_against_its_checkpoint_before_use(tmp_path, monkeypatch):
  """Class: a training run's config.json is a checkpoint's config too: sizes that disagree with the checkpoint's
  parameters (10**9 layers, another width) are one error before anything is built from them."""
  model_config = ModelConfig(**HF_SHAPE)
  saved = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), random_params(model_config))
  monkeypatch.setattr(checkpoint, 'saved_params', lambda workdir, step: (4, saved))
  run = tmp_path / 'run'
  run.mkdir()
  for change, message in [(dict(num_hidden_layers=10**9), r'model.num_hidden_layers=1000000000 but the checkpoint'),
                          (dict(hidden_size=-256), r'model: hidden_size must be an integer >= 1, got -256'),
                          (dict(intermediate_size=96), r'mlp/down_proj/kernel of shape \(64, 32\) but the model '
                                                       r'config gives \(96, 32\)')]:
    config = small_config()
    config.model.update(HF_SHAPE)
    config.model.update(change)
    (run / 'config.json').write_text(json.dumps(config.to_dict()))
    with pytest.raises(ValueError, match=message):
      pretrained.load(workdir=str(run), on_host=True)


# ---------------------------------------------------------------------------------------------------------
# Hard faults: one line each.

def _mount_tmpfs(directory, options):
  """Mounts a tmpfs there (root only); False where mounting is not permitted."""
  directory.mkdir(parents=True, exist_ok=True)
  return subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(directory)], capture_output=True,
                        check=False).returncode == 0


def _unmount(directory):
  subprocess.run(['umount', '-l', str(directory)], capture_output=True, check=False)


@pytest.fixture
def read_only_dir(tmp_path):
  """A directory no one can write to: a read-only tmpfs (root, as CI runs), else one without write permission."""
  directory = tmp_path / 'ro'
  if _mount_tmpfs(directory, 'ro,size=1m'):
    yield directory
    _unmount(directory)
  elif os.geteuid() != 0:
    directory.chmod(0o555)
    yield directory
    directory.chmod(0o755)
  else:
    pytest.skip('running as root without permission to mount a tmpfs: no directory root cannot write to')


@pytest.mark.slow
def test_a_read_only_workdir_is_one_line(read_only_dir, tokenizer_file):
  """Class: a workdir that cannot be written (read-only, no permission): one `error:` line naming it, exit 1."""
  for workdir in (read_only_dir, read_only_dir / 'new'):
    done = _run(['-m', 'qwenjax.train', f'--config={TINY}', f'--workdir={workdir}',
                 f'--config.data.tokenizer={tokenizer_file}'])
    line = _one_error_line(done)
    assert str(workdir) in line and ('writable' in line or 'where you can write' in line), line


def test_a_failed_save_removes_its_partial_files_and_says_why(tmp_path, monkeypatch):
  """Class: a checkpoint save that fails (a full disk) is one SaveError naming the cause; orbax's temporary
  directory is removed and the earlier checkpoints are kept. (The whole command on a full tmpfs: below.)"""
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  state = {'params': {'w': jax.numpy.ones(4)}}
  ckpt.save(1, state, {})
  ckpt.wait()

  def fail():
    (tmp_path / 'checkpoints' / '2.orbax-checkpoint-tmp-1234').mkdir()
    raise ValueError('RESOURCE_EXHAUSTED: Error writing local file ".../2.orbax-checkpoint-tmp-1234/x": '
                     'Failed writing: No space left on device [system:28]')

  monkeypatch.setattr(ckpt._manager, 'wait_until_finished', fail)  # pylint: disable=protected-access
  with pytest.raises(checkpoint.SaveError, match=r'No space left on device\. Its partial files were removed '
                     r'\(2.orbax-checkpoint-tmp-1234\); the checkpoints before it are kept \(\[1\]\)'):
    ckpt.wait()
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1']
  monkeypatch.undo()
  # A write of the failed save still in flight when the manager closes re-creates its directory: close() waits
  # until none has reappeared for checkpoint.SETTLE_S, and removes it.
  late = threading.Timer(0.3 * checkpoint.SETTLE_S, lambda: (tmp_path / 'checkpoints' / '2.orbax-checkpoint-tmp-1234'
                                                             / 'state').mkdir(parents=True))
  late.start()
  ckpt.close()
  late.join()
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1']


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, tokenizer_file):
  """A run on a disk that fills up at its checkpoint: one `error:` line (no orbax tracebacks, no "Event loop is
  closed"), exit 1, and no temporary checkpoint left behind."""
  disk = tmp_path / 'disk'
  if not _mount_tmpfs(disk, 'size=200k'):
    pytest.skip('mounting a tmpfs needs root (test_a_failed_save_removes_its_partial_files_and_says_why covers '
                'the checkpoint without one)')
  try:
    overrides = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, vocab_size=512)
    args = [f'--config.model.{k}={v}' for k, v in overrides.items()] + [
        f'--config.data.tokenizer={tokenizer_file}', '--config.data.seq_len=32', '--config.data.shuffle_window=0',
        '--config.train.batch_size=8', '--config.train.steps=2', '--config.train.eval_steps=0',
        '--config.train.compilation_cache_dir=']
    done = _run(['-m', 'qwenjax.train', f'--config={TINY}', f'--workdir={disk}/run', *args])
    line = _one_error_line(done)
    assert 'No space left on device' in line and 'Event loop is closed' not in done.stderr, done.stderr[-3000:]
    left = os.listdir(disk / 'run' / 'checkpoints')
    assert not left, (left, done.stderr[-3000:])  # the log says when the save failed and what was removed
  finally:
    _unmount(disk)


NOISY_LIBRARY = r'''
import logging, sys
from absl import flags
from qwenjax import cli

def main(argv):
  class Dying:
    def __del__(self):
      raise RuntimeError('Event loop is closed')
  for _ in range(50):  # what tensorstore's callbacks do once an aborted orbax read has closed its loop
    Dying()
  # The reads an aborted orbax restore leaves, closed at exit: "Exception ignored in: <coroutine ...>" each.
  library = {}
  exec(compile('class Read:\n  def __del__(self):\n    raise Exception("Encountered error while reading array")\n',
               '/site-packages/orbax/checkpoint/_src/serialization/serialization.py', 'exec'), library)
  for _ in range(20):
    library['Read']()
  record = logging.LogRecord('orbax', logging.ERROR, '/site-packages/orbax/checkpoint/future.py', 1,
                             'raised an exception', None, (ValueError, ValueError('boom'), None))
  logging.getLogger().handle(record)
  raise ValueError('the one line')

cli.run(main, lambda: None)
'''


def test_a_libraries_repeated_reports_of_one_failure_stay_off_the_terminal(tmp_path):
  """Class: background threads of orbax, asyncio and tensorstore report one failure many times (tracebacks per
  thread, "Event loop is closed" by the hundred after a damaged checkpoint's aborted read); the command prints its
  one line. --verbose lets them through."""
  (tmp_path / 'noisy.py').write_text(NOISY_LIBRARY)
  done = _run([str(tmp_path / 'noisy.py')])
  assert _one_error_line(done) == 'error: the one line' and 'Event loop' not in done.stderr, done.stderr
  verbose = _run([str(tmp_path / 'noisy.py'), '--verbose'])
  assert 'Encountered error' not in done.stderr, done.stderr
  assert verbose.stderr.count('RuntimeError: Event loop is closed') == 50 and 'boom' in verbose.stderr
  assert verbose.stderr.count('Exception: Encountered error while reading array') == 20


CTRL_C_MID_STEP = r'''
import sys, time
from absl import flags
from qwenjax import cli, train

def main(argv):
  stop = train._StopSignal()
  print('stepping', flush=True)
  while True:  # a step that never ends
    sum(range(10000))

cli.run(main, lambda: None)
'''


@pytest.mark.slow
def test_ctrl_c_twice_mid_step_is_one_line_and_status_130(tmp_path):
  """A second Ctrl-C while a step runs stops at once: one `stopped:` line, exit status 130, no traceback (was a
  40-line KeyboardInterrupt traceback and status -2)."""
  (tmp_path / 'step.py').write_text(CTRL_C_MID_STEP)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))
  process = subprocess.Popen([sys.executable, str(tmp_path / 'step.py')], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  assert process.stdout.readline() == 'stepping\n'
  process.send_signal(signal.SIGINT)
  time.sleep(0.5)
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=60)
  lines = [line for line in stderr.splitlines() if not line.startswith(('I', 'W'))]
  assert process.returncode == 130 and 'Traceback' not in stderr, stderr
  assert lines == ['stopped: Ctrl-C again: stopped at once, without saving; the same command resumes from the last '
                   'checkpoint'], stderr
