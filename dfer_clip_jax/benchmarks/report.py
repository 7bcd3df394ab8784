"""Tables of train-step benchmark records, without importing JAX (so collecting results is cheap).

    python -m dfer_clip_jax.benchmarks.report RECORDS... [--json=all.json] [--md=summary.md]

RECORDS are JSON files written by `dfer_clip_jax.benchmarks.train_step --json` (a record or a
list of records) or folders of such files. Prints a markdown table, one row per record, with
the device named above it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

# (record key, column title, format)
COLUMNS = (
    ("variant", "variant", "{}"), ("mode", "mode", "{}"), ("dtype", "dtype", "{}"),
    ("remat", "remat", "{}"), ("attention_used", "attention", "{}"), ("batch", "batch", "{}"),
    ("step_ms_p50", "step ms p50", "{:.1f}"), ("step_ms_pipelined", "step ms", "{:.1f}"),
    ("clips_per_s", "clips/s", "{:.1f}"), ("frames_per_s", "frames/s", "{:.0f}"),
    ("model_tflops_per_step", "model TFLOP/step", "{:.2f}"),
    ("xla_over_analytic", "XLA/analytic", "{:.2f}"),
    ("achieved_tflops", "TFLOP/s", "{:.1f}"), ("mfu", "MFU", "{:.1%}"),
    ("peak_memory_gb", "peak GB", "{:.1f}"), ("max_batch_per_device", "max batch/dev", "{}"),
    ("compile_s", "compile s", "{:.1f}"), ("status", "status", "{}"),
)


def summarize(records: Sequence[dict[str, Any]]) -> str:
  """A markdown table of benchmark records (one row each), with the device named above it."""
  devices = sorted({f"{r['device_kind']} x{r.get('device_count')}" for r in records
                    if r.get("device_kind")})
  lines = [f"Device: {', '.join(devices) if devices else 'unknown'}", "",
           "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
           "|" + "---|" * len(COLUMNS)]
  for r in records:
    cells = []
    for key, _, fmt in COLUMNS:
      value = r.get(key)
      if key == "max_batch_per_device" and value is not None and r.get("max_batch_search"):
        search = r["max_batch_search"]
        if not search.get("exact"):
          value = f">={value} (<{search.get('upper_bound') or '?'})"
      cells.append("-" if value is None else fmt.format(value))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


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
  p.add_argument("records", nargs="+", help="JSON files or folders of them")
  p.add_argument("--json", default="", help="write all records, as one list, here")
  p.add_argument("--md", default="", help="write the table here too")
  args = p.parse_args(argv)
  records = read_records(args.records)
  table = summarize(records)
  print(table)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(records, indent=2))
  if args.md:
    pathlib.Path(args.md).write_text(table + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
