"""The tree is formatted and linted as pyproject.toml configures ruff (`ruff format .` and
`ruff check --fix .` from the repository root fix what this finds)."""

import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
  exe = pathlib.Path(sys.executable).with_name("ruff")
  if exe.is_file():
    return [str(exe)]
  if shutil.which("ruff"):
    return ["ruff"]
  # requirements-test.txt installs ruff: without it the style is unchecked, which is a failure.
  pytest.fail("ruff is not installed: pip install -r requirements-test.txt")


@pytest.mark.parametrize("command", [["format", "--check", "."], ["check", "."]])
def test_ruff(command):
  proc = subprocess.run(
    _ruff() + command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False
  )
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
