"""The notebooks in colabs/ run top to bottom and show what they say they show.

Each notebook runs in a fresh `python3` kernel (nbclient) with `QWENJAX_NOTEBOOK_SMOKE=1`, its small settings,
and as on a Colab CPU runtime: one CPU device (the 8 fake devices of conftest are not passed on; the sharding
notebook makes its own). A cell that raises fails the test; each test then reads the values the notebook printed
and checks them. The committed notebooks themselves must keep the outputs of a full run and stay small.
"""

import math
import os
import re

import nbformat
from nbclient import NotebookClient
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(ROOT, 'colabs')
NOTEBOOKS = ('quickstart', 'hf_round_trip', 'scaling_laws', 'sharding', 'post_training')
MAX_BYTES = 300_000


def execute(name: str, tmp_path) -> nbformat.NotebookNode:
  """The notebook after running every cell with the small settings (raises CellExecutionError on a cell error).

  The kernel's temporary files (the notebooks' workdirs) go to `tmp_path`.
  """
  notebook = nbformat.read(os.path.join(COLABS, f'{name}.ipynb'), as_version=4)
  env = dict(os.environ, QWENJAX_NOTEBOOK_SMOKE='1', TMPDIR=str(tmp_path))
  xla_flags = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                       if not f.startswith('--xla_force_host_platform_device_count'))
  env['XLA_FLAGS'] = xla_flags
  client = NotebookClient(notebook, kernel_name='python3', timeout=600, resources={'metadata': {'path': COLABS}})
  client.execute(env=env)
  return notebook


def texts(notebook: nbformat.NotebookNode) -> str:
  """Everything the code cells printed (stdout and stderr) and returned as text."""
  out = []
  for cell in notebook.cells:
    for output in cell.get('outputs', []):
      if output.output_type == 'stream':
        out.append(output.text)
      elif 'text/plain' in output.get('data', {}):
        out.append(output.data['text/plain'])
  return '\n'.join(out)


def images(notebook: nbformat.NotebookNode) -> int:
  return sum('image/png' in output.get('data', {}) for cell in notebook.cells for output in cell.get('outputs', []))


def number(pattern: str, text: str) -> float:
  match = re.search(pattern, text)
  assert match, f'the notebook did not print a line matching {pattern!r}'
  return float(match[1])


@pytest.mark.slow
def test_quickstart_trains_plots_and_samples(tmp_path):
  notebook = execute('quickstart', tmp_path)
  out = texts(notebook)
  assert images(notebook) == 1  # the loss curves
  first = number(r'training loss: ([\d.]+) at step', out)
  last = number(r'-> ([\d.]+) at step', out)
  eval_loss = number(r'; eval loss ([\d.]+)', out)
  assert last < first - 0.2, out
  assert math.isfinite(eval_loss) and eval_loss < first
  samples = out.split('new tokens at most:')[1].split('-' * 60)[1:]
  prompts = ['def main(', 'import os\n', 'class Parser:\n    def ']
  assert len(samples) == len(prompts)
  assert all(sample.lstrip('\n').startswith(prompt) for prompt, sample in zip(prompts, samples)), samples
  assert any(len(sample.strip()) > len(prompt.strip()) for prompt, sample in zip(prompts, samples)), samples


@pytest.mark.slow
def test_hf_round_trip_matches_transformers(tmp_path):
  notebook = execute('hf_round_trip', tmp_path)
  out = texts(notebook)
  assert images(notebook) == 1  # the per-position difference
  assert number(r'logits max relative difference: ([\d.e+-]+)\n', out) < 1e-5
  assert 'greedy tokens agree: True' in out
  assert number(r'exported checkpoint: logits max relative difference: ([\d.e+-]+)', out) < 1e-6


@pytest.mark.slow
def test_scaling_laws_sweeps_and_fits(tmp_path):
  notebook = execute('scaling_laws', tmp_path)
  out = texts(notebook)
  rows = re.findall(r'^(C\S+-s\d)\s+[\d,]+\s+[\d,]+\s+\S+\s+([\d.]+)\s+\d+$', out, re.M)
  assert len(rows) == 6, out  # 2 sizes x 3 budgets, each trained and evaluated
  assert all(math.isfinite(float(loss)) for _, loss in rows)
  assert images(notebook) >= 1  # the fit's plots
  assert number(r'loss falls as N\^-([\d.]+)', out) >= 0 and number(r'as D\^-([\d.]+)', out) >= 0
  a = number(r'compute-optimal N grows as C\^([\d.]+)', out)
  b = number(r', D as C\^([\d.]+)', out)
  assert a + b == pytest.approx(1.0, abs=0.011)  # C = 6 N D: the two exponents add up to 1


@pytest.mark.slow
def test_sharding_places_parameters_and_steps(tmp_path):
  notebook = execute('sharding', tmp_path)
  out = texts(notebook)
  assert "mesh: {'data': 2, 'fsdp': 2, 'tensor': 2, 'expert': 1, 'context': 1}" in out
  # The embedding table [vocab, embed]: vocabulary over `tensor`, width over `fsdp`.
  assert re.search(r"^embed_tokens\s+\(4096, 256\)\s+\('vocab', 'embed'\)\s+\('tensor', 'fsdp'\)\s+\(2048, 128\)$",
                   out, re.M), out
  assert re.search(r'each device holds [\d,]+ of them \((\d+\.\d)%\)', out)
  assert 'CPU 0' in out  # jax.debug.visualize_array_sharding's picture
  loss = number(r'loss ([\d.]+) \(the same batch', out)
  assert math.isfinite(loss) and loss < number(r'first step \(compiling\): [\d.]+ s, loss ([\d.]+)', out)


@pytest.mark.slow
def test_post_training_runs_sft_then_dpo(tmp_path):
  notebook = execute('post_training', tmp_path)
  out = texts(notebook)
  assert images(notebook) == 1  # SFT loss, DPO loss, DPO rewards
  assert "'The sky is blue.' + the end of turn" in out  # the mask: the reply and its end-of-turn token
  first, last = number(r'SFT loss: ([\d.]+) at step', out), number(r'SFT loss: [\d.]+ at step \d+ -> ([\d.]+)', out)
  assert last < first - 1.0 and math.isfinite(number(r'; eval loss ([\d.]+)', out))
  assert abs(number(r'DPO loss at step 1: ([\d.]+)', out) - math.log(2)) < 1e-4  # the policy starts as its reference
  assert number(r'\) -> ([\d.]+) at step', out) < math.log(2) - 0.05
  assert number(r'rewards/accuracies ([\d.]+)', out) > 0.5 and number(r'rewards/margins ([\d.-]+)', out) > 0
  assert re.search(r"^What color is the sky\?\s+'.*'\s*'.*'$", out, re.M), out  # a reply after each stage


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_committed_notebook_keeps_a_full_run(name):
  """The file on GitHub shows the outputs of a run at the normal settings (plots included), and stays small."""
  path = os.path.join(COLABS, f'{name}.ipynb')
  assert os.path.getsize(path) < MAX_BYTES
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  code = [cell for cell in notebook.cells if cell.cell_type == 'code']
  assert all(cell.get('outputs') for cell in code[2:]), 'every cell after the install and parameter cells has output'
  assert not any(output.output_type == 'error' for cell in code for output in cell.outputs)
  assert images(notebook) >= 1 or name == 'sharding'
  assert 'QWENJAX_NOTEBOOK_SMOKE' in ''.join(code[1].source) and 'parameters' in code[1].metadata.get('tags', [])
  install = ''.join(code[0].source)  # from the clone the notebook sits in: there is no public URL to install from
  assert '%pip install -q ..' in install and 'git+' not in install and 'YOUR_ORG' not in install


def test_readme_links_every_notebook():
  with open(os.path.join(COLABS, 'README.md')) as f:
    readme = f.read()
  on_disk = sorted(n[:-len('.ipynb')] for n in os.listdir(COLABS) if n.endswith('.ipynb'))
  assert on_disk == sorted(NOTEBOOKS)
  for name in NOTEBOOKS:
    assert f'[`{name}.ipynb`]({name}.ipynb)' in readme, name
  assert 'YOUR_ORG' not in readme
