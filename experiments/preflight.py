"""Fails fast when this Python lacks a package that setup.py requires, before a GPU piece spends its minutes:

    python3 experiments/preflight.py [SETUP_PY]      # default: ./setup.py

A device image with most of the stack and a few wheels added by hand can miss one that is imported only deep in
a run (tensorboardX, by the metrics writer): every worker of a piece then fails after its setup. Prints one
`error:` line naming the missing distributions and exits 1; exits 0 when all are installed.
"""

import ast
import importlib.metadata
import re
import sys


def requirements(setup_py: str) -> list[str]:
  """The distribution names of setup.py's install_requires (versions, extras and markers left out)."""
  with open(setup_py) as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if isinstance(node, ast.keyword) and node.arg == 'install_requires':
      return [re.split(r'[<>=!~;\[\s]', spec, maxsplit=1)[0] for spec in ast.literal_eval(node.value)]
  return []


def missing(names: list[str]) -> list[str]:
  out = []
  for name in names:
    try:
      importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
      out.append(name)
  return out


def main(argv: list[str]) -> int:
  if len(argv) > 2:
    print('error: give at most one argument, the setup.py to read (default: ./setup.py)', file=sys.stderr)
    return 2
  lacking = missing(requirements(argv[1] if len(argv) == 2 else 'setup.py'))
  if lacking:
    print(f'error: this Python lacks {", ".join(lacking)} (setup.py requires them): install them, or on a device '
          'machine add their wheels to the ones it installs', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
