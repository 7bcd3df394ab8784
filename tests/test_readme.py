"""The README's shell commands, run as printed.

Marker convention: a line `<!-- readme-test -->` (an HTML comment, invisible on GitHub)
immediately before a fenced ```bash block marks that block as run by this test. The marked
blocks are run in the order they appear, each with `bash -eo pipefail`, in a copy of the
repository (its `git ls-files`) in a temporary folder, with their relative paths exactly as
printed; `DFER_README_TEST=1` shrinks the demo (configs/demo.py) to seconds. Editing a marked
command without keeping it working fails this test.

A block that reads files a user brings declares them: `<!-- readme-test: model_best.pth
video.mp4 -->`. Before the block runs, each declared path with a maker in `MAKERS` is made at
that path in the copy (the reference's checkpoint from the reference fixture, a short video of a
real face); a declared path without a maker must have been made by an earlier block. When a
maker cannot run here (the ../shared fixtures absent, torch or PyAV missing), or an earlier block
that makes a declared path was skipped, the block is skipped, the others still run, and the test
ends as skipped with the reasons once everything else has passed.

Installing is simulated, since the test runs inside an environment that has the package and
nothing may be downloaded: on PATH, `python3 -m venv DIR` makes `DIR/bin/python` (this test's
interpreter, importing the copy) and `DIR/bin/pip` (checks that the files it is asked to
install from exist, installs nothing); `python` and `python3` otherwise are this interpreter.
"""

import json
import os
import pathlib
import re
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
MARKER = "<!-- readme-test -->"
# The marker, optionally with the paths the block needs: `<!-- readme-test: a.pth b.mp4 -->`.
_MARK = re.compile(r"<!-- readme-test(?::(?P<needs>[^>]*?))?\s*-->")
# Commands that must stay covered by the marked blocks (the list).
REQUIRED = (
  "dfer_clip_jax.main --config=configs/demo.py --workdir=runs/demo",
  "--mode=eval",
  "dfer_clip_jax.predict",
  "dfer_clip_jax.data.validate",
  "dfer_clip_jax.data.build",
  "dfer_clip_jax.folds",
  "launch/local.sh",
  "dfer_clip_jax.convert --reference=model_best.pth",
  "--checkpoint=exports/dfew_fold1 --input=video.mp4",
)


class Unavailable(Exception):
  """A maker cannot run here (its reason is the message): the block that needs it is skipped."""


def make_reference_checkpoint(path: pathlib.Path) -> None:
  """The authors' `model_best.pth` form (torch pickle, `module.` names), of the tiny reference
  model in the fixture."""
  from conftest import REFERENCE  # pylint: disable=g-import-not-at-top

  fixture = REFERENCE / "tiny_forward.npz"
  if not fixture.is_file():
    raise Unavailable(f"{fixture} is absent (the reference fixtures live in ../shared)")
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise Unavailable("torch is not installed (it writes the reference's .pth)") from None
  from test_convert_options import save_pth  # pylint: disable=g-import-not-at-top

  with np.load(fixture) as f:
    save_pth({k: f[k] for k in f.files if not k.startswith("_")}, path)


def make_face_video(path: pathlib.Path) -> None:
  """2 s of a real face photograph moving a little (test_prepare's video), H.264 at 10 fps."""
  try:
    from test_prepare import astronaut_video  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise Unavailable(f"cannot make a video here: {e}") from None
  astronaut_video(path, 0, 0)


# Files a user brings, by the name the README gives them.
MAKERS = {"model_best.pth": make_reference_checkpoint, "video.mp4": make_face_video}


def marked_blocks(text: str) -> list[tuple[tuple[str, ...], str]]:
  """(declared paths, bash text) of each block that follows a marker line (indentation of list
  items removed)."""
  blocks = []
  lines = text.splitlines()
  for i, line in enumerate(lines):
    mark = _MARK.fullmatch(line.strip())
    if not mark:
      continue
    fence = lines[i + 1]
    indent = len(fence) - len(fence.lstrip())
    assert fence.strip() == "```bash", f"README line {i + 2}: {MARKER} must precede ```bash"
    body = []
    for inner in lines[i + 2 :]:
      if inner.strip() == "```":
        break
      body.append(inner[indent:])
    blocks.append((tuple((mark["needs"] or "").split()), "\n".join(body)))
  return blocks


def _script(path: pathlib.Path, text: str) -> None:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _shims(bin_dir: pathlib.Path, copy: pathlib.Path) -> None:
  """`python`, `python3` (with `-m venv`) and the venv's `python` / `pip`, see the docstring."""
  bin_dir.mkdir()
  real = sys.executable
  _script(bin_dir / "venv_python", f'#!/usr/bin/env bash\nexec "{real}" "$@"\n')
  _script(
    bin_dir / "venv_pip",
    "#!/usr/bin/env bash\n"
    '# Installs nothing: checks that the files named by -r exist.\nprev=""\nfor a in "$@"; do\n'
    '  if [[ "$prev" == "-r" && ! -f "$a" ]]; then echo "pip: no file $a" >&2; exit 1; fi\n'
    '  prev="$a"\ndone\necho "pip (readme test): already installed"\n',
  )
  python = (
    "#!/usr/bin/env bash\n"
    'if [[ "$1" == "-m" && "$2" == "venv" ]]; then\n'
    '  mkdir -p "$3/bin" && cp "$(dirname "$0")/venv_python" "$3/bin/python" '
    '&& cp "$(dirname "$0")/venv_pip" "$3/bin/pip"; exit $?\n'
    f'fi\nexec "{real}" "$@"\n'
  )
  _script(bin_dir / "python3", python)
  _script(bin_dir / "python", python)


def test_marked_blocks_cover_the_commands():
  text = "\n".join(b for _, b in marked_blocks((REPO / "README.md").read_text()))
  missing = [c for c in REQUIRED if c not in text]
  assert not missing, f"README blocks marked {MARKER} no longer run {missing}"


def test_marked_blocks_extract_what_is_printed():
  text = "1. x\n\n   <!-- readme-test -->\n   ```bash\n   a --b=c \\\n     d\n   ```\n"
  text += "<!-- readme-test: x.pth  v/y.mp4 -->\n```bash\ne x.pth\n```\n"
  assert marked_blocks(text) == [((), "a --b=c \\\n  d"), (("x.pth", "v/y.mp4"), "e x.pth")]


@pytest.mark.skipif(shutil.which("git") is None, reason="copying the repository needs git")
def test_readme_commands_run_as_printed(tmp_path):
  files = subprocess.run(
    ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
    cwd=REPO,
    capture_output=True,
    check=True,
  ).stdout.split(b"\0")
  copy = tmp_path / "repo"
  for name in filter(None, (f.decode() for f in files)):
    src = REPO / name
    if src.is_file():
      (copy / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(src, copy / name)
  _shims(tmp_path / "bin", copy)
  env = {
    **os.environ,
    "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
    "PYTHONPATH": str(copy),
    "DFER_README_TEST": "1",
    "TMPDIR": str(tmp_path),
  }
  env.pop("XLA_FLAGS", None)  # the tests' 8 fake devices are not what a user has
  outputs, skipped = [], []
  for k, (needs, block) in enumerate(marked_blocks((copy / "README.md").read_text())):
    why = None
    for need in needs:
      path = copy / need
      if need in MAKERS:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
          MAKERS[need](path)
        except Unavailable as e:
          why = f"{need}: {e}"
          break
      elif not path.exists():
        # Made by an earlier block: one that was skipped, or this is a broken README.
        assert skipped, f"README block {k + 1} needs {need}, which no earlier block made"
        why = f"{need} was not made: an earlier block was skipped"
        break
    if why is not None:
      skipped.append(f"block {k + 1} ({why})")
      outputs.append("")
      continue
    proc = subprocess.run(
      ["bash", "-eo", "pipefail", "-c", block],
      cwd=copy,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert proc.returncode == 0, (
      f"README block {k + 1} failed (exit {proc.returncode}):\n{block}\n--- stdout ---\n"
      f"{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
    )
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    # No spurious warnings: Orbax's unrestored-item notice, or one problem told twice.
    assert "could not be restored" not in proc.stdout + proc.stderr
    outputs.append(proc.stdout)
  demo = copy / "runs" / "demo"
  report = json.loads((demo / "report.json").read_text())
  best = report["rows"]["best by validation"]
  for name in ("latest", "best"):
    assert (demo / "eval" / name / "metrics.json").is_file()
  assert (copy / "predictions" / "c00000" / "predictions.json").is_file()
  assert list((copy / "runs" / "tfds" / "synthetic").glob("classes7/*/*"))
  assert "mean" in (copy / "runs" / "demo_folds" / "folds.md").read_text()
  # --checkpoint=best evaluates the report's best step and says which epoch it is.
  said = f"step {best['step']}, epoch {best['epoch']}, the best by the selection rule"
  assert any(said in out for out in outputs), said
  # The reference checkpoint converted, then predictions on the video in the DFEW class names.
  export = copy / "exports" / "dfew_fold1"
  if export.is_dir():
    from dfer_clip_jax.conversion import reference  # pylint: disable=g-import-not-at-top
    from dfer_clip_jax.data.datasets import DFEW_CLASSES  # pylint: disable=g-import-not-at-top

    written = {p.name for p in export.iterdir()}
    assert {reference.EXPORT_WEIGHTS, reference.EXPORT_CONFIG} <= written, written
    pred = json.loads((copy / "predictions" / "video" / "predictions.json").read_text())
    assert pred["class_names"] == list(DFEW_CLASSES)
    top = pred["tracks"][0]["summary"]["top_class"]
    assert top in DFEW_CLASSES and any(f"{top} (" in out for out in outputs), top
  # Deliberate: a block whose inputs cannot be made here (the ../shared reference fixtures or
  # torch/PyAV absent) is not a failure of the README; the others ran and passed above, and the
  # skip names each block left out and why.
  if skipped:
    pytest.skip("README blocks not run here: " + "; ".join(skipped) + " (the others passed)")
