"""Shared test fixtures: paths to ../shared test data (skipped cleanly when absent)."""

import atexit
import os
import pathlib
import shutil
import tempfile

import pytest

# Keep tests on the CPU with several fake devices so sharding code is exercised.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

# One persistent XLA compilation cache for the whole session: the tests' processes (pytest-xdist
# workers, and the training runs, launchers and CLIs they start, which inherit the environment)
# compile the same tiny programs many times over, and compiling is most of the suite's time. The
# cache returns the executables the compiler would have produced; it changes no result. It is
# made fresh for each session (never reused from an earlier one) and removed at its end.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="dfer-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE = SHARED / "reference"
TOKENIZER = SHARED / "clip_tokenizer"


def _require(path: pathlib.Path) -> pathlib.Path:
  if not path.exists():
    pytest.skip(f"{path} is absent: the reference fixtures live in ../shared beside the repo")
  return path


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
  return _require(REFERENCE)


@pytest.fixture(scope="session")
def tokenizer_dir() -> pathlib.Path:
  return _require(TOKENIZER)


@pytest.fixture(scope="session")
def eval_forward():
  """(model, float video) -> (logits, aux), jitted once for the session: tests that run models
  of the same structure share its compilations."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  return nnx.jit(lambda model, video: model(video, train=False))


@pytest.fixture(scope="session")
def fwd(reference_dir):
  """The reference's tiny forward fixture: its state dict plus '_' arrays (video, logits...)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  with np.load(reference_dir / "tiny_forward.npz") as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def weights(fwd):
  """The reference state dict alone (the fixture's '_' arrays dropped)."""
  return {k: v for k, v in fwd.items() if not k.startswith("_")}
