"""tpu/pod.py: the gcloud commands it prints for a v5p-64 run, and its preemption loop against a fake gcloud."""

import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
V5P_64 = ['--name=qwen-1b', '--zone=us-east5-a', '--accelerator=v5p-64', '--workdir=gs://my-bucket/qwen-1b']

# A stand-in for gcloud: records each call, answers `describe` from a scripted state, and fails the first
# training command (as a preempted slice's ssh session does) when the scenario says so, or stops it as
# `pod.py stop` does (the job's SIGTERM status, 143).
FAKE_GCLOUD = '''#!{python}
import json, os, sys
calls = os.environ['FAKE_GCLOUD_CALLS']
with open(calls, 'a') as f:
  f.write(json.dumps(sys.argv[1:]) + '\\n')
state_file = os.environ['FAKE_GCLOUD_STATE']
state = json.load(open(state_file)) if os.path.exists(state_file) else {{'trains': 0, 'describes': 0}}
args, scenario = sys.argv[1:], os.environ['FAKE_GCLOUD_SCENARIO']
code = 0
if 'create' in args:
  state['describes'] = 0
  state['preempted'] = False
elif 'describe' in args:
  state['describes'] += 1
  if state.get('preempted'):
    print('SUSPENDED')
  else:
    print('WAITING_FOR_RESOURCES' if state['describes'] == 1 else 'ACTIVE')
elif 'ssh' in args and any('qwenjax.train' in a for a in args):
  state['trains'] += 1
  if state['trains'] == 1 and scenario != 'succeed':
    state['preempted'] = scenario == 'preempt'
    code = 143 if scenario == 'stopped' else 255
json.dump(state, open(state_file, 'w'))
sys.exit(code)
'''


def _pod(*args, tmp_path, scenario=None):
  """Runs tpu/pod.py with a fake gcloud first on PATH; returns (exit code, output, gcloud calls)."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir(exist_ok=True)
  fake = bin_dir / 'gcloud'
  fake.write_text(FAKE_GCLOUD.format(python=sys.executable))
  fake.chmod(0o755)
  calls = tmp_path / 'calls.jsonl'
  env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', TMPDIR=str(tmp_path),
             FAKE_GCLOUD_CALLS=str(calls), FAKE_GCLOUD_STATE=str(tmp_path / 'state.json'),
             FAKE_GCLOUD_SCENARIO=scenario or 'succeed')
  done = subprocess.run([sys.executable, str(ROOT / 'tpu' / 'pod.py'), *args], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=False)
  recorded = [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
  return done.returncode, done.stdout + done.stderr, recorded


def _gcloud_lines(output):
  return [shlex.split(line) for line in output.splitlines() if line.startswith('gcloud ')]


def _remote(argv):
  """The command an `ssh --command=...` line runs on the hosts, split into words."""
  [command] = [a[len('--command='):] for a in argv if a.startswith('--command=')]
  return command


def test_v5p_64_spot_dry_run(tmp_path):
  code, out, calls = _pod('run', *V5P_64, '--spot', '--dry_run', tmp_path=tmp_path)
  assert code == 0, out
  assert calls == []  # gcloud never ran
  assert not (tmp_path / 'qwenjax-source.tar.gz').exists()  # nor git archive
  lines = _gcloud_lines(out)
  create, describe, install, train, delete = lines[1:]
  assert lines[0] == ['gcloud', 'storage', 'cp', str(tmp_path / 'qwenjax-source.tar.gz'),
                      'gs://my-bucket/qwen-1b/source/qwenjax.tar.gz']
  assert create[:5] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create']
  assert {'qwen-1b', '--accelerator-type=v5p-64', '--runtime-version=v2-alpha-tpuv5', '--node-id=qwen-1b',
          '--spot', '--zone=us-east5-a'} <= set(create)
  assert describe[3:6] == ['queued-resources', 'describe', 'qwen-1b']
  for ssh in (install, train):
    assert ssh[3:6] == ['tpu-vm', 'ssh', 'qwen-1b'] and '--worker=all' in ssh and '--zone=us-east5-a' in ssh
  assert 'gs://my-bucket/qwen-1b/source/qwenjax.tar.gz' in _remote(install)
  assert '"jax[tpu]"' in _remote(install)
  words = shlex.split(_remote(train))
  start = words.index('python3')
  assert words[start:start + 5] == ['python3', '-m', 'qwenjax.train', '--config=configs/1b.py',
                                    '--workdir=gs://my-bucket/qwen-1b']
  # fsdp over the 32 chips of a v5p-64 (64 TensorCores), one slice; 8 hosts, so jax.distributed.
  assert {'--config.mesh.fsdp=32', '--config.mesh.tensor=1', '--config.mesh.dcn_data=1', '--multihost'} <= set(words)
  assert delete[3:] == ['queued-resources', 'delete', 'qwen-1b', '--force', '--quiet', '--zone=us-east5-a']
  assert '32 chips, 8 hosts' in out


def test_multi_slice_and_72b_meshes_and_runtime_versions(tmp_path):
  code, out, calls = _pod('run', *V5P_64, '--num_slices=2', '--dry_run', tmp_path=tmp_path)
  assert code == 0 and not calls, out
  create, train = _gcloud_lines(out)[1], _gcloud_lines(out)[-2]
  assert {'--node-count=2', '--node-prefix=qwen-1b'} <= set(create) and '--spot' not in create
  assert train[3:6] == ['queued-resources', 'ssh', 'qwen-1b'] and {'--worker=all', '--node=all'} <= set(train)
  assert {'--config.mesh.dcn_data=2', '--config.mesh.fsdp=32'} <= set(shlex.split(_remote(train)))

  code, out, _ = _pod('train', *V5P_64, '--config=configs/qwen2_72b.py', '--mesh=tensor=4,fsdp=-1',
                      '--set=train.steps=10', '--dry_run', tmp_path=tmp_path)
  words = shlex.split(_remote(_gcloud_lines(out)[0]))
  assert code == 0 and {'--config=configs/qwen2_72b.py', '--config.mesh.tensor=4', '--config.mesh.fsdp=-1',
                        '--config.train.steps=10'} <= set(words), out

  for accelerator, version in (('v4-32', 'tpu-ubuntu2204-base'), ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
                               ('v6e-8', 'v2-alpha-tpuv6e')):
    code, out, _ = _pod('create', '--name=n', '--zone=z', f'--accelerator={accelerator}', '--noqueued',
                        '--dry_run', tmp_path=tmp_path)
    create = _gcloud_lines(out)[0]
    assert code == 0 and create[3:6] == ['tpu-vm', 'create', 'n'], out
    assert f'--version={version}' in create and f'--accelerator-type={accelerator}' in create


def test_run_recreates_a_preempted_slice_and_relaunches(tmp_path):
  code, out, calls = _pod('run', *V5P_64, '--spot', '--poll_seconds=0', tmp_path=tmp_path, scenario='preempt')
  assert code == 0, out
  kinds = []
  for call in calls:
    if call[:2] == ['storage', 'cp']:
      kinds.append('upload')
    elif 'ssh' in call:
      kinds.append('train' if 'qwenjax.train' in _remote(call) else 'install')
    else:
      kinds.append(call[3])  # create / describe / delete
  assert kinds == ['upload',
                   'create', 'describe', 'describe', 'install', 'train',  # waits, then preempted mid-run
                   'describe', 'delete',  # SUSPENDED: recreate
                   'create', 'describe', 'describe', 'install', 'train',  # resumes from its checkpoint
                   'delete']
  assert 'SUSPENDED: recreating it' in out
  assert (tmp_path / 'qwenjax-source.tar.gz').stat().st_size > 0  # git archive of this checkout


def test_run_keeps_a_slice_that_failed_without_preemption(tmp_path):
  code, out, calls = _pod('run', *V5P_64, '--poll_seconds=0', tmp_path=tmp_path, scenario='crash')
  assert code != 0 and 'not preempted' in out
  assert not any('delete' in call for call in calls)


def test_a_job_stopped_on_a_signal_is_not_a_failure(tmp_path):
  """`stop` (SIGTERM) or Ctrl-C: the job saved a checkpoint and exited 143 / 130; `run` neither relaunches it nor
  keeps the slice as after a failure, and passes the status on; `train` too."""
  code, out, calls = _pod('run', *V5P_64, '--poll_seconds=0', tmp_path=tmp_path, scenario='stopped')
  assert code == 143 and 'stopped by SIGTERM after saving a checkpoint' in out and 'failed' not in out, out
  assert sum('qwenjax.train' in _remote(call) for call in calls if 'ssh' in call) == 1
  assert 'delete' in calls[-1]
  (tmp_path / 'state.json').unlink()
  code, out, _ = _pod('train', *V5P_64, tmp_path=tmp_path, scenario='stopped')
  assert code == 143 and 'resumes it' in out and 'failed' not in out, out


@pytest.mark.parametrize('args,message', [
    (['--workdir=/tmp/run'], 'must be on GCS'),
    (['--accelerator=v5p'], 'expected GENERATION-SIZE'),
    (['--num_slices=2', '--noqueued'], 'needs a queued resource'),
    (['--mesh=tensor4'], 'comma-separated AXIS=SIZE'),
    (['--mesh=tensr=4'], 'comma-separated AXIS=SIZE'),
    (['--nmae=x'], 'unknown flag --nmae: did you mean --name?'),
    (['--num_slices=two'], '--num_slices'),
])
def test_bad_flags_give_named_errors(tmp_path, args, message):
  """A usage error is one `error:` line naming the flag, exit status 2, and no gcloud call (qwenjax.cli)."""
  code, out, calls = _pod('run', *V5P_64, *args, '--dry_run', tmp_path=tmp_path)
  assert code == 2 and message in out and not calls, out
  assert [line for line in out.splitlines() if line.strip()] == [next(l for l in out.splitlines() if 'error:' in l)]
