"""`benchmarks/gpu_check.sh --smoke` runs end to end on the CPU: ours and PyTorch's step in turn,
every record collected, the run table and the side-by-side ratios printed."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_prints_the_side_by_side_table(tmp_path):
  pytest.importorskip("torch")
  env = dict(
    os.environ,
    OUT=str(tmp_path / "out"),
    RUNS=str(tmp_path / "runs"),
    WORK=str(tmp_path / "work"),
    PYTHON=sys.executable,
    JAX_PLATFORMS="cpu",
    ONLY="b32_fp32 torch_b32_fp32",
    BUDGET_S="600",
  )
  env.pop("XLA_FLAGS", None)  # one CPU device, as on a machine without the test's fake eight
  proc = subprocess.run(
    ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-4000:]
  records = json.loads((tmp_path / "out" / "results.json").read_text())
  assert {(r.get("framework"), r["run"], r["status"]) for r in records} == {
    ("jax", "b32_fp32", "ok"),
    ("torch", "torch_b32_fp32", "ok"),
  }
  assert "| jax | tiny | train | float32 |" in out
  assert "| torch | tiny | train | fp32 |" in out
  # The ratio row: ours float32 over torch fp32, computed from the two records.
  ours, torch = (
    next(r for r in records if r["run"] == name) for name in ("b32_fp32", "torch_b32_fp32")
  )
  ratio = ours["clips_per_s"] / torch["clips_per_s"]
  row = next(line for line in out.splitlines() if line.startswith("| tiny | float32 |"))
  assert row.split("|")[-3].strip() == f"{ratio:.2f}x"
  assert (tmp_path / "out" / "summary.md").read_text().count("Ours / PyTorch") == 1
