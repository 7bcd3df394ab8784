"""Shared test fixtures: paths to ../shared test data (skipped cleanly when absent)."""

import os
import pathlib

import pytest

# Keep tests on the CPU with several fake devices so sharding code is exercised.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

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
