"""Flag parsing of the package's command-line tools: absl flags, one library for every CLI.

`main.py` and `folds.py` run under `absl.app` with the global flags (`--config` is a config
file). The other tools parse into a private `FlagValues` per call, so that their `main(argv)`
can also be called from Python (tests, notebooks) any number of times.

Every path a user gives is made absolute (and `~` expanded) once, here, as the command line is
read (`parse(paths=...)`, `absolute`): the libraries below, Orbax among them (which refuses
relative paths), then see one meaning of each path whatever folder they run in.
"""

from __future__ import annotations

import os
import re
import sys
import types
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import flags


def fail(prog: str, message: str) -> NoReturn:
  """A usage error: the message on stderr, exit status 2."""
  print(f"{prog}: error: {message}", file=sys.stderr)
  raise SystemExit(2)


def int_list(prog: str, name: str, value: str) -> list[int]:
  """The comma-separated integers of flag `--name` (empty items ignored); a usage error else."""
  try:
    return [int(item) for item in value.split(",") if item.strip()]
  except ValueError:
    fail(prog, f"--{name} must be comma-separated integers, got {value!r}")


_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def absolute(path: str | os.PathLike | None) -> str | None:
  """`path` with `~` expanded, made absolute against the current folder; None and "" (unset)
  stay as they are. Globs keep their wildcards."""
  if path is None or str(path) == "" or _URL.match(os.fspath(path)):
    return path  # unset, or a URL (refused or handled where it is used)
  return os.path.abspath(os.path.expanduser(os.fspath(path)))


def parse(
  prog: str,
  doc: str,
  define: Callable[[flags.FlagValues], None],
  argv: Sequence[str] | None,
  *,
  positional: bool = False,
  paths: Sequence[str] = (),
) -> tuple[types.SimpleNamespace, list[str]]:
  """Defines flags with `define(flag_values)` and parses `argv` (default: `sys.argv[1:]`).

  Returns the flag values (as attributes) and the positional arguments, which are refused
  unless `positional`. The flags named in `paths` (strings or lists of strings) and, when they
  are paths too, the positional arguments come back absolute (`absolute`). `--help` prints `doc` and every flag; a bad or missing flag exits with
  status 2 and the reason.
  """
  fv = flags.FlagValues()
  define(fv)
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--help" in argv or "-h" in argv:
    print(f"usage: {prog} [flags]\n\n{doc.strip()}\n\nflags:\n{fv.get_help()}")
    raise SystemExit(0)
  try:
    rest = fv([prog] + argv)[1:]
  except flags.Error as e:
    fail(prog, str(e))
  if rest and not positional:
    fail(prog, f"unexpected arguments: {rest}")
  values = fv.flag_values_dict()
  for name in paths:
    value = values[name]
    values[name] = [absolute(v) for v in value] if isinstance(value, list) else absolute(value)
  return types.SimpleNamespace(**values), rest
