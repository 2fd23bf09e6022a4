"""The one command-line convention of every `python -m qwenjax.<command>` (train, sample, evaluate, export, sweep,
scaling, prepare, and any later one).

A command defines its own flags in a function that `run` calls, never at import: importing a command's module
(the sweep imports train) registers nothing, and `--help` lists that command's flags alone, one line each. `run`
then ends every way a command can end with at most one line on stderr and one exit status:

  0    done.
  2    a usage error, found from the command line alone (an unknown or misspelt flag, a value of the wrong type,
       an unknown config key, a missing required flag, a stray argument, flags that cannot go together; a command
       raises `UsageError` for these): `error: ...` naming the flag and the fix. No traceback.
  1    a failure at run time (bad input files, an unreadable checkpoint, out of memory: anything raised):
       `error: ...`. The traceback goes to stderr with `--verbose`; an exception that is not of an expected kind
       (its message says what to do) also writes it to a file the line names, as a crash in a long run is costly
       to reproduce.
  130  stopped by Ctrl-C (SIGINT), 143 by SIGTERM: `stopped: ...`. A command with something to save (train) saves
       it first and raises `Stopped`, and the same command resumes; a second Ctrl-C stops at once.

A failure inside a library's background threads (orbax's asynchronous saves and reads, asyncio, tensorstore) is
reported by the command's one line; the library's own reports of it (a traceback per thread and per pending read,
"Event loop is closed" by the hundred) are kept off the terminal (`--verbose` lets them through).

    def _define_flags() -> None:
      flags.DEFINE_string('workdir', None, 'A training run\\'s directory.')

    def main(argv: list[str]) -> None:   # argv: the positional arguments (none unless `run(args=...)`)
      if ...:
        raise cli.UsageError('--a and --b cannot go together: give one')
      ...

    if __name__ == '__main__':
      cli.run(main, _define_flags, required=('workdir',))
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import re
import signal
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, NoReturn, Sequence
import warnings

from absl import app
from absl import flags
from absl import logging as absl_logging
import ml_collections

from qwenjax import files

FAILURE, USAGE = 1, 2
# Failures whose message says what to do: one line, and a traceback only with --verbose.
EXPECTED = (ValueError, KeyError, OSError)
_HELP = ('-h', '-?', '--help', '--helpshort')
_LONGEST = 600  # characters of an unexpected exception's message on the terminal (all of it in the file)


class UsageError(ValueError):
  """A command line that cannot work (exit status 2). A ValueError, so that Python callers of code raising it
  (e.g. `distributed.initialize`) see one."""


class Stopped(KeyboardInterrupt):
  """The command stopped on a signal (after saving what it had): exit status 128 + the signal's number.

  A KeyboardInterrupt, as Ctrl-C's own exception is, so an `except Exception` on its way up does not take it for a
  failure. `at_once`: stopped without saving (a second Ctrl-C); the process then exits without waiting for
  anything more."""

  def __init__(self, signum: int, message: str, *, at_once: bool = False):
    super().__init__(message)
    self.signum, self.at_once = int(signum), at_once

  @property
  def status(self) -> int:
    return 128 + self.signum


def program() -> str:
  """How the user ran this command, e.g. `python -m qwenjax.sample`."""
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  if spec is not None and spec.name:
    return f'python -m {spec.name}'
  return f'python {sys.argv[0]}' if sys.argv and sys.argv[0] else 'the command'


def run(main: Callable[[list[str]], int | None], define_flags: Callable[[], None], *, required: Sequence[str] = (),
        args: str = '', expected: tuple[type[BaseException], ...] = ()) -> NoReturn:
  """Defines the command's flags, parses the command line and runs `main(positional arguments)`, ending as the
  module docstring says. `required`: flags that must be given a value. `args`: the positional arguments the
  command takes, for its help (e.g. 'fit DIR | plot DIR [DIR ...]'); '' (none): a stray one is a usage error.
  `expected`: more exception types whose message says what to do (no traceback file). `main` may return an exit
  status."""
  if _main_thread():
    signal.signal(signal.SIGTERM, _raise_stopped)  # the default would kill the process without a word
  before = set(flags.FLAGS)
  define_flags()
  flags.DEFINE_bool('verbose', False, 'On a failure, print its traceback too.')
  own = list(dict.fromkeys(flags.FLAGS[name].name for name in flags.FLAGS if name not in before))
  expected = EXPECTED + tuple(expected)
  parser = lambda argv: _guard(lambda: parse(argv, own, required=required, args=args), expected)
  app.run(lambda positional: sys.exit(_guard(lambda: _contained(main, positional), expected)), flags_parser=parser)
  raise AssertionError('unreachable: app.run exits')


def _contained(main: Callable[[list[str]], int | None], positional: list[str]) -> int | None:
  if not _verbose():
    contain_library_noise()
  return main(positional)


# Where the libraries whose background threads report one failure many times log from.
_NOISY = re.compile(r'[\\/](orbax|asyncio|tensorstore)[\\/]')


class _LibraryTracebacks(logging.Filter):
  """Drops the error records with tracebacks that orbax, asyncio and tensorstore log from their background threads
  (the failure reaches the command, which reports it once)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or not _NOISY.search(record.pathname or ''):
      return True
    return not (record.exc_info or 'exception was never retrieved' in str(record.msg))


def _from_library(info: Any) -> bool:
  """Whether an exception Python could not raise (in a finalizer, a coroutine closed at exit) comes from orbax,
  asyncio or tensorstore: raised in their code, or in a coroutine of theirs."""
  tb = info.exc_traceback
  while tb is not None:
    if _NOISY.search(tb.tb_frame.f_code.co_filename):
      return True
    tb = tb.tb_next
  code = getattr(info.object, 'cr_code', None)
  return code is not None and bool(_NOISY.search(code.co_filename))


def contain_library_noise() -> None:
  """Keeps the libraries' repeated reports of one failure off the terminal (the module docstring says why):
  their tracebacks in the log, asyncio's "Event loop is closed" from callbacks that outlive an aborted read or
  save, the exceptions of their coroutines closed at exit, and "coroutine ... was never awaited". Idempotent."""
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _LibraryTracebacks) for f in handler.filters):
    handler.addFilter(_LibraryTracebacks())
  if not getattr(sys.unraisablehook, '_qwenjax', False):
    previous = sys.unraisablehook

    def unraisable(info) -> None:
      if isinstance(info.exc_value, RuntimeError) and 'Event loop is closed' in str(info.exc_value):
        return
      if _from_library(info):  # e.g. "Exception ignored in: <coroutine ...>" of each read an aborted restore left
        return
      previous(info)

    unraisable._qwenjax = True  # pylint: disable=protected-access
    sys.unraisablehook = unraisable
  warnings.filterwarnings('ignore', message='coroutine .* was never awaited', category=RuntimeWarning)


def parse(argv: Sequence[str], own: Sequence[str], *, required: Sequence[str] = (), args: str = '') -> list[str]:
  """absl's parse of `argv` with one `UsageError` for anything wrong; returns the positional arguments. `--help`
  prints the help of the flags named in `own` and exits."""
  argv = list(argv)
  words = argv[1:argv.index('--')] if '--' in argv else argv[1:]
  if any(word in _HELP for word in words):
    print(help_text(own, args))
    sys.exit(0)
  if '--helpfull' in words:
    print(help_text(own, args) + '\n\nevery flag:\n' + flags.FLAGS.get_help())
    sys.exit(0)
  for name in own:
    if _is_config(flags.FLAGS[name]):
      error = config_override_error(words, name)
      if error:
        raise UsageError(error)
  try:
    rest = flags.FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    raise UsageError(_unknown_flag(e.flagname, own)) from None
  except flags.IllegalFlagValueError as e:
    raise UsageError(_bad_value(str(e))) from None
  except flags.Error as e:
    raise UsageError(f'{_one_line(str(e))} ({program()} --help lists its flags)') from None
  for name in required:
    value = flags.FLAGS[name].value
    if value is None or value == '' or value == []:  # pylint: disable=g-explicit-bool-comparison
      flag = flags.FLAGS[name]
      raise UsageError(f'--{name} is required: pass --{name}={_placeholder(flag)} ({flag.help.rstrip(".")})')
  if rest[1:] and not args:
    configs = [n for n in own if _is_config(flags.FLAGS[n])]
    hint = f'; set config values as --{configs[0]}.SECTION.KEY=VALUE' if configs else ''
    raise UsageError(f'unexpected argument {rest[1]!r}: {program()} takes only flags, --NAME=VALUE{hint}')
  return rest[1:]


def config_override_error(argv: Sequence[str], name: str = 'config') -> str | None:
  """What is wrong with the config file of `--NAME=FILE` and its `--NAME.KEY=VALUE` overrides, or None.

  Found before absl parses them, which would say "FATAL", raise a bare AttributeError, or defer a missing file."""
  path, overrides = None, []
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      path = arg.split('=', 1)[1]
    elif arg == f'--{name}' and i + 1 < len(argv):
      path = argv[i + 1]
    elif re.match(rf'--?(no)?{re.escape(name)}\.', arg):
      overrides.append(arg)
  flag = flags.FLAGS[name] if name in flags.FLAGS else None
  what = f' ({flag.help.rstrip(".")})' if flag is not None and flag.help else ''
  if path is None:
    return f'{overrides[0]} needs --{name}=FILE too{what}' if overrides else None
  arguments = []
  if not os.path.exists(path) and ':' in path:
    path, argument = path.split(':', 1)  # FILE:ARGUMENT, an argument of get_config
    arguments.append(argument)
  if not os.path.isfile(path):
    return f'--{name}={path}: no such file{what}'
  spec = importlib.util.spec_from_file_location(f'_qwenjax_cli_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(*arguments)
  if not isinstance(config, ml_collections.ConfigDict):
    return None
  for arg in overrides:
    parts = arg.lstrip('-').split('=', 1)[0].split('.')[1:]
    node = config
    for depth, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict):
        break  # indexing into a tuple or a value: left to ml_collections
      if part not in node:
        section = '.'.join([name] + parts[:depth])
        keys = sorted(node.keys())
        close = [f'{section}.{key}' for key in difflib.get_close_matches(part, keys, n=1)]
        # A key of another section (e.g. model.remat_policy, which is train.remat_policy).
        moved = [f'{name}.{other}.{part}' for other in config.keys() if depth == 1 and other != parts[0]
                 and isinstance(config[other], ml_collections.ConfigDict) and part in config[other]]
        hint = f' Did you mean {(moved or close)[0]}?' if moved or close else ''
        return f'unknown config key in {arg}: {section} has no key {part!r}.{hint} Its keys are: {", ".join(keys)}.'
      node = node[part]
  return None


def help_text(own: Sequence[str], args: str = '') -> str:
  """The module docstring of the command, then one line per flag of `own`."""
  doc = (getattr(sys.modules.get('__main__'), '__doc__', None) or '').strip('\n')
  lines = [doc, ''] if doc else []
  lines.append(f'{program()}{" " + args if args else ""} flags:')
  for name in own:
    flag = flags.FLAGS[name]
    default = flag.default
    if isinstance(default, (list, tuple)):
      default = ','.join(map(str, default))
    shown = '' if default in (None, '', False) or _is_config(flag) else f' (default: {default})'
    synopsis = f'--[no]{name}' if flag.boolean else f'--{name}={_placeholder(flag)}'
    extra = f'; values as --{name}.SECTION.KEY=VALUE' if _is_config(flag) else ''
    text = flag.help.rstrip('.') + extra if extra else flag.help
    lines.append(f'  {synopsis}  {text}{shown}')
  lines.append('  (absl\'s own flags, e.g. --verbosity=1 for more logging: --helpfull)')
  return '\n'.join(lines)


def _is_config(flag: flags.Flag) -> bool:
  """A flag of `config_flags.DEFINE_config_file` (or `_dict`), which takes `--NAME.KEY=VALUE` overrides."""
  return flag.flag_type() == 'config object'


def _placeholder(flag: flags.Flag) -> str:
  kind = flag.flag_type()
  if _is_config(flag):
    return 'FILE'
  if kind in ('int', 'float'):
    return 'NUMBER' if kind == 'float' else 'N'
  if flag.name in ('workdir', 'hf', 'out') or flag.name.endswith('_dir'):
    return 'PATH'
  if 'enum' in kind and hasattr(flag.parser, 'enum_values'):
    return '|'.join(flag.parser.enum_values)
  if 'list' in kind:
    return 'A,B,...'
  return 'VALUE'


def _unknown_flag(name: str, own: Sequence[str]) -> str:
  names = [n for n in own] + [f'no{n}' for n in own if flags.FLAGS[n].boolean]
  close = difflib.get_close_matches(name, names, n=1)
  hint = f': did you mean --{close[0]}?' if close else ''
  return f'unknown flag --{name}{hint} ({program()} --help lists its flags)'


def _bad_value(message: str) -> str:
  """absl's 'flag --NAME=VALUE: reason' with what the flag takes."""
  match = re.match(r'flag --([\w.-]+)=(.*?): (.*)$', _one_line(message))
  if not match:
    return _one_line(message)
  name, value, reason = match.groups()
  kind = {'int': 'an integer', 'float': 'a number', 'bool': 'true or false'}.get(
      flags.FLAGS[name].flag_type() if name in flags.FLAGS else '')
  return f'--{name}={value}: {reason}' + (f'; --{name} takes {kind}' if kind else '')


def _one_line(text: str) -> str:
  return ' '.join(line.strip() for line in str(text).splitlines() if line.strip())


def _message(error: BaseException) -> str:
  if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
    return _one_line(error.args[0])  # str() of a KeyError is its repr
  return _one_line(str(error)) or type(error).__name__


def _main_thread() -> bool:
  import threading  # pylint: disable=g-import-not-at-top
  return threading.current_thread() is threading.main_thread()


def _raise_stopped(signum, frame) -> None:
  del frame
  raise Stopped(signum, f'{signal.Signals(signum).name} received')


def _verbose() -> bool:
  if 'verbose' in flags.FLAGS and flags.FLAGS.is_parsed():
    return bool(flags.FLAGS.verbose)
  return '--verbose' in sys.argv


def _guard(function: Callable[[], Any], expected: tuple[type[BaseException], ...]) -> Any:
  """`function()`, with every exception turned into its line and exit status."""
  try:
    return function()
  except SystemExit:
    raise
  except UsageError as e:
    _exit(USAGE, f'error: {_message(e)}')
  except KeyboardInterrupt as e:  # Ctrl-C, or a command's Stopped
    if _main_thread():
      signal.signal(signal.SIGINT, signal.SIG_IGN)  # one more Ctrl-C would print a traceback from here
    if isinstance(e, Stopped):
      _exit(e.status, f'stopped: {_message(e)}', at_once=e.at_once)
    _exit(128 + signal.SIGINT, 'stopped: Ctrl-C', at_once=True)
  except Exception as e:  # pylint: disable=broad-except
    line = _message(e)
    if _verbose():
      sys.stderr.write(''.join(traceback.format_exception(e)[:-1]))  # its last line is the message, below
    if not isinstance(e, expected):
      line = f'{type(e).__name__}: {line}'
      if not _verbose():
        line = (line if len(line) <= _LONGEST else line[:_LONGEST] + ' ...') + (
            f' (traceback in {_traceback_file(e)}; --verbose prints it)')
    _exit(FAILURE, f'error: {line}')


def _traceback_file(error: BaseException) -> str:
  name = program().split()[-1].replace('/', '_').replace('.', '_')
  path = os.path.join(tempfile.gettempdir(), f'{name}-{time.strftime("%Y%m%d-%H%M%S")}-{os.getpid()}.traceback')
  files.write(path, ''.join(traceback.format_exception(error)))
  return path


def _exit(status: int, line: str, *, at_once: bool = False) -> NoReturn:
  sys.stdout.flush()
  sys.stderr.write(line + '\n')
  sys.stderr.flush()
  if at_once:  # without waiting for threads still running (a data loader, an async save)
    os._exit(status)  # pylint: disable=protected-access
  sys.exit(status)
