r"""Does `data.fast_decode` change what a run learns? Exact vs fast decoding, several seeds.

    python -m dfer_clip_jax.benchmarks.decode_paths --json=out.json --setup=demo --seeds=0,1

Runs the training CLI (`python -m dfer_clip_jax.main`) once per (decode path, seed) in
`--work_dir`, each run in its own workdir (a rerun resumes or reuses finished runs), and
compares the paths with the seeds' own spread:

  * final test UAR / WAR of each run, and per path their mean and standard deviation;
  * the training loss curves (`metrics.jsonl`): the mean absolute difference between the two
    paths' curves at equal seed, against the mean absolute difference between two seeds of
    the same path (run-to-run noise).

Setups:
  demo       `configs/demo.py` as the README runs it (48 px synthetic frames, 32 px input).
  dfew_like  frames at DFEW's 224 px, input 64 px (so fast decoding reads JPEGs at half
             scale whenever the crop allows, where it differs most from the exact path),
             clips of up to 60 frames; shorter (`--clips`, `--epochs`), the demo's
             augmentation (a smaller crop than area 0.5 would not learn in a short run).

The verdict (`same_within_noise`) holds when the paths' mean test UAR differ by no more than
the larger of the two paths' seed standard deviations plus one point, and the paths' loss
curves differ by no more than 1.5x the seed-to-seed difference.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from dfer_clip_jax import cli

_PROG = "python -m dfer_clip_jax.benchmarks.decode_paths"
PATHS = {"exact": "False", "fast": "True"}


def setup_overrides(setup: str, clips: int, epochs: int) -> tuple[str, list[str]]:
  """(config argument, --config.* overrides) of a setup."""
  if setup == "demo":
    return "configs/demo.py", []
  if setup == "dfew_like":
    return f"configs/demo.py:clips={clips},epochs={epochs}", [
      "data.synthetic_size=224",
      "data.synthetic_max_frames=60",
      "clip.image_size=64",
    ]
  raise ValueError(f"unknown setup {setup!r}: expected demo or dfew_like")


def _loss_curve(workdir: pathlib.Path) -> dict[int, float]:
  curve = {}
  path = workdir / "metrics.jsonl"
  if path.is_file():
    for line in path.read_text().splitlines():
      row = json.loads(line)
      if row.get("train/loss") is not None:
        curve[int(row["step"])] = float(row["train/loss"])
  return curve


def _curve_gap(a: dict[int, float], b: dict[int, float]) -> float | None:
  steps = sorted(set(a) & set(b))
  if not steps:
    return None
  return float(np.mean([abs(a[s] - b[s]) for s in steps]))


def run_one(
  repo: pathlib.Path, config: str, overrides: Sequence[str], workdir: pathlib.Path, log
) -> dict[str, Any]:
  """Trains one run (or reuses its finished report) -> its final figures and loss curve."""
  report = workdir / "report.json"
  seconds = None
  if not report.is_file():
    cmd = [
      sys.executable,
      "-m",
      "dfer_clip_jax.main",
      f"--config={config}",
      f"--workdir={workdir}",
      *(f"--config.{o}" for o in overrides),
    ]
    log(" ".join(cmd))
    start = time.perf_counter()
    with open(workdir.parent / f"{workdir.name}.log", "w") as out:
      subprocess.run(cmd, cwd=repo, stdout=out, stderr=subprocess.STDOUT, check=True)
    seconds = time.perf_counter() - start
  last = json.loads(report.read_text())["last_test"]
  return {
    "test_uar": float(last["uar"]),
    "test_war": float(last["war"]),
    "seconds": seconds,
    "loss_curve": _loss_curve(workdir),
  }


def compare(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
  """Per-path statistics and the paths' difference against the seeds' spread."""
  out: dict[str, Any] = {}
  for path, by_seed in runs.items():
    uar = [r["test_uar"] for r in by_seed.values()]
    war = [r["test_war"] for r in by_seed.values()]
    out[path] = {
      "test_uar": uar,
      "test_war": war,
      "uar_mean": float(np.mean(uar)),
      "uar_std": float(np.std(uar, ddof=1)) if len(uar) > 1 else None,
      "war_mean": float(np.mean(war)),
    }
  seeds = sorted(set(runs["exact"]) & set(runs["fast"]))
  path_gaps = [
    _curve_gap(runs["exact"][s]["loss_curve"], runs["fast"][s]["loss_curve"]) for s in seeds
  ]
  seed_gaps = [
    _curve_gap(by_seed[a]["loss_curve"], by_seed[b]["loss_curve"])
    for by_seed in runs.values()
    for a, b in zip(sorted(by_seed), sorted(by_seed)[1:])
  ]
  path_gap = float(np.mean([g for g in path_gaps if g is not None])) if path_gaps else None
  seed_gap = float(np.mean([g for g in seed_gaps if g is not None])) if seed_gaps else None
  uar_gap = abs(out["exact"]["uar_mean"] - out["fast"]["uar_mean"])
  stds = [out[p]["uar_std"] for p in runs if out[p]["uar_std"] is not None]
  noise = max(stds) if stds else None
  out["uar_mean_difference"] = uar_gap
  out["loss_curve_gap_between_paths"] = path_gap
  out["loss_curve_gap_between_seeds"] = seed_gap
  out["same_within_noise"] = (
    None
    if noise is None or path_gap is None or seed_gap is None
    else bool(uar_gap <= noise + 1.0 and path_gap <= 1.5 * seed_gap)
  )
  return out


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("json", None, "where to write the results", required=True, flag_values=fv)
  flags.DEFINE_enum("setup", "demo", ["demo", "dfew_like"], "what to train", flag_values=fv)
  flags.DEFINE_string("seeds", "0,1", "comma-separated seeds", flag_values=fv)
  flags.DEFINE_string("work_dir", "runs/decode_paths", "where the runs live", flag_values=fv)
  flags.DEFINE_integer("clips", 1400, "dfew_like: synthetic clips", flag_values=fv)
  flags.DEFINE_integer("epochs", 12, "dfew_like: epochs", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  args, _ = cli.parse(_PROG, __doc__, _define, argv, paths=("json", "work_dir"))
  seeds = cli.int_list(_PROG, "seeds", args.seeds)
  if not seeds:
    cli.fail(_PROG, "--seeds needs at least one seed (two give the seed-to-seed noise)")
  config, overrides = setup_overrides(args.setup, args.clips, args.epochs)
  repo = pathlib.Path(__file__).resolve().parents[2]
  root = pathlib.Path(args.work_dir) / args.setup
  root.mkdir(parents=True, exist_ok=True)
  # Every run of a seed shares one generated dataset (the data is the same for both paths).
  runs: dict[str, dict[int, dict[str, Any]]] = {p: {} for p in PATHS}
  for seed in seeds:
    for path, flag in PATHS.items():
      workdir = root / f"{path}_seed{seed}"
      runs[path][seed] = run_one(
        repo,
        config,
        [
          *overrides,
          f"seed={seed}",
          f"data.fast_decode={flag}",
          f"data.synthetic_dir={root / 'synthetic'}",
        ],
        workdir,
        print,
      )
      print(f"{args.setup} {path} seed {seed}: test UAR {runs[path][seed]['test_uar']:.2f}")
  result = {
    "setup": args.setup,
    "config": config,
    "overrides": overrides,
    "seeds": seeds,
    "runs": {p: {str(s): r for s, r in by.items()} for p, by in runs.items()},
    "comparison": compare(runs),
    "cpu_count": os.cpu_count(),
    "date": time.strftime("%Y-%m-%d"),
  }
  out = pathlib.Path(args.json)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  c = result["comparison"]
  print(
    f"exact UAR {c['exact']['uar_mean']:.2f}, fast UAR {c['fast']['uar_mean']:.2f}; loss gap "
    f"paths {c['loss_curve_gap_between_paths']}, seeds {c['loss_curve_gap_between_seeds']}; "
    f"same within noise: {c['same_within_noise']} -> {args.json}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
