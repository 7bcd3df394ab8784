"""Tables of train-step benchmark records, without importing JAX (so collecting results is cheap).

    python -m dfer_clip_jax.benchmarks.report RECORDS... [--json=all.json] [--md=summary.md]

RECORDS are JSON files written by `dfer_clip_jax.benchmarks.train_step --json` or by
`benchmarks/torch_step.py --json` (a record or a list of records) or folders of such files.
Prints a markdown table, one row per record, with the device named above it, then, when both
frameworks are present, the side-by-side table (`compare`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from dfer_clip_jax import cli

# (record key, column title, format)
COLUMNS = (
  ("framework", "framework", "{}"),
  ("variant", "variant", "{}"),
  ("mode", "mode", "{}"),
  ("precision", "precision", "{}"),
  ("remat", "remat", "{}"),
  ("attention_used", "attention", "{}"),
  ("xla_gpu_flags", "XLA flags", "{}"),
  ("batch", "batch", "{}"),
  ("microbatches", "micro", "{}"),
  ("step_ms_p50", "step ms p50", "{:.1f}"),
  ("step_ms_pipelined", "step ms", "{:.1f}"),
  ("clips_per_s", "clips/s", "{:.1f}"),
  ("frames_per_s", "frames/s", "{:.0f}"),
  ("model_tflops_per_step", "model TFLOP/step", "{:.2f}"),
  ("xla_over_analytic", "XLA/analytic", "{:.2f}"),
  ("achieved_tflops", "TFLOP/s", "{:.1f}"),
  ("mfu", "MFU", "{:.1%}"),
  ("text_share", "text share", "{:.0%}"),
  ("peak_memory_gb", "peak GB", "{:.1f}"),
  ("max_batch_per_device", "max batch/dev", "{}"),
  ("fastest_batch_per_device", "fastest batch/dev", "{}"),
  ("compile_s", "compile s", "{:.1f}"),
  ("status", "status", "{}"),
)


def summarize(records: Sequence[dict[str, Any]]) -> str:
  """A markdown table of benchmark records (one row each), with the device named above it."""
  devices = sorted(
    {f"{r['device_kind']} x{r.get('device_count')}" for r in records if r.get("device_kind")}
  )
  lines = [
    f"Device: {', '.join(devices) if devices else 'unknown'}",
    "",
    "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
    "|" + "---|" * len(COLUMNS),
  ]
  for r in records:
    cells = []
    for key, _, fmt in COLUMNS:
      value = _value(r, key)
      if key == "max_batch_per_device" and value is not None and r.get("max_batch_search"):
        search = r["max_batch_search"]
        if not search.get("exact"):
          value = f">={value} (<{search.get('upper_bound') or '?'})"
      cells.append("-" if value is None else fmt.format(value))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def framework(record: dict[str, Any]) -> str:
  """`jax` (ours) or `torch` (benchmarks/torch_step.py)."""
  return record.get("framework") or "jax"


def precision(record: dict[str, Any]) -> str | None:
  """What the row computes in: ours bfloat16 | float32; torch fp32 | bf16 | bf16-compile."""
  if framework(record) == "torch":
    return record.get("impl")
  return record.get("dtype")


def _value(record: dict[str, Any], key: str) -> Any:
  if key == "framework":
    return framework(record)
  if key == "precision":
    return precision(record)
  return record.get(key)


def _ok(record: dict[str, Any]) -> bool:
  return record.get("status") == "ok" and bool(record.get("clips_per_s"))


def compare(records: Sequence[dict[str, Any]], batch: int | None = None) -> str:
  """Ours against PyTorch's step, per model size and precision, at `batch` clips (training;
  default: the batch most of the torch runs used).

  Ours: the fastest of our runs at that batch and precision (its switches named); torch: fp32
  (the authors' set-up), bf16 (autocast + SDPA) and bf16-compile (the same under torch.compile).
  The ratios divide our clips/s by torch fp32's and by torch bf16-compile's.
  """
  if batch is None:
    batches = [r.get("batch") for r in records if framework(r) == "torch" and _ok(r)]
    batch = max(set(batches), key=batches.count) if batches else 48
  train = [
    r for r in records if _ok(r) and r.get("mode", "train") == "train" and r.get("batch") == batch
  ]
  variants = sorted({r.get("variant") for r in train if r.get("variant")})
  lines = [
    f"Ours / PyTorch, training step, batch {batch} (clips/s):",
    "",
    "| variant | ours precision | ours | ours' switches | torch fp32 | torch bf16 | "
    "torch bf16-compile | ours / torch fp32 | ours / torch bf16-compile |",
    "|---|---|---:|---|---:|---:|---:|---:|---:|",
  ]

  def best(rows):
    return max(rows, key=lambda r: r["clips_per_s"]) if rows else None

  for v in variants:
    torch_rows = {
      impl: best(
        [
          r
          for r in train
          if framework(r) == "torch" and r.get("variant") == v and r.get("impl") == impl
        ]
      )
      for impl in ("fp32", "bf16", "bf16-compile")
    }
    for dtype in ("bfloat16", "float32"):
      ours = best(
        [
          r
          for r in train
          if framework(r) == "jax"
          and r.get("variant") == v
          and r.get("dtype") == dtype
          and not r.get("max_batch_search")
        ]
      )
      if ours is None:
        continue
      switches = (
        f"attention {ours.get('attention_used')}, remat {ours.get('remat')}, XLA "
        f"flags {ours.get('xla_gpu_flags', 'none')}, micro {ours.get('microbatches', 1)}"
      )
      cells = [v, dtype, f"{ours['clips_per_s']:.1f}", switches]
      for impl in ("fp32", "bf16", "bf16-compile"):
        t = torch_rows[impl]
        cells.append("-" if t is None else f"{t['clips_per_s']:.1f}")
      for impl in ("fp32", "bf16-compile"):
        t = torch_rows[impl]
        cells.append("-" if t is None else f"{ours['clips_per_s'] / t['clips_per_s']:.2f}x")
      lines.append("| " + " | ".join(cells) + " |")
  skipped = [r.get("run", "?") for r in records if str(r.get("status", "")).startswith("skipped")]
  failed = [
    f"{r.get('run', '?')} ({r.get('status')})"
    for r in records
    if r.get("status") not in ("ok", None) and not str(r.get("status")).startswith("skipped")
  ]
  if skipped:
    lines += ["", "Skipped (budget): " + ", ".join(skipped)]
  if failed:
    lines += ["", "Not measured: " + ", ".join(failed)]
  return "\n".join(lines)


def emit(record: dict[str, Any], json_path: str = "") -> int:
  """A benchmark's end: the record written to `json_path` (if given) and printed, with its
  one-row table; the exit status (1 for an error, 0 otherwise: an OOM is a result)."""
  text = json.dumps(record, indent=2)
  if json_path:
    pathlib.Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(json_path).write_text(text)
  print(text)
  print(summarize([record]))
  return 1 if record["status"] == "error" else 0


def read_records(paths: Sequence[str | pathlib.Path]) -> list[dict[str, Any]]:
  """Records from JSON files (a record or a list of them) and folders of `*.json`, in order."""
  records = []
  for name in paths:
    path = pathlib.Path(name)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    for f in files:
      try:
        data = json.loads(f.read_text())
      except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{f}: not a benchmark record ({err})") from err
      for r in data if isinstance(data, list) else [data]:
        if not isinstance(r, dict):
          raise ValueError(f"{f}: expected a JSON object or a list of them, got {type(r)}")
        records.append(r)
  return records


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("records", nargs="+", type=cli.absolute, help="JSON files or folders of them")
  p.add_argument(
    "--json", default="", type=cli.absolute, help="write all records, as one list, here"
  )
  p.add_argument("--md", default="", help="write the table here too")
  args = p.parse_args(argv)
  records = read_records(args.records)
  table = summarize([r for r in records if not str(r.get("status", "")).startswith("skipped")])
  if {framework(r) for r in records} == {"jax", "torch"}:
    table += "\n\n" + compare(records)
  print(table)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(records, indent=2))
  if args.md:
    pathlib.Path(args.md).write_text(table + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
