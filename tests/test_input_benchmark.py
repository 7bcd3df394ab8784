"""The input-pipeline benchmark: its JSON schema on a tiny run, the reference-style baseline."""

import json

import numpy as np

from dfer_clip_jax.benchmarks import input_pipeline
from dfer_clip_jax.data import annotations, synthetic


def test_tiny_run_writes_every_figure(tmp_path):
  out = tmp_path / "bench.json"
  argv = [f"--json={out}", "--clips=14", "--workers=0,1", "--image_size=16", "--render_size=24"]
  argv += ["--min_frames=16", "--max_frames=20", "--batch_size=2", "--repeat=1"]
  assert input_pipeline.main(argv) == 0
  result = json.loads(out.read_text())
  keys = [
    f"{kind}_{source}_{path}_workers{w}"
    for kind in ("train", "eval")
    for source in ("folders", "packed")
    for path in ("exact", "fast")
    for w in (0, 1)
  ]
  assert sorted(result["measurements"]) == sorted(keys)
  for key in [*keys, "baseline"]:
    r = result["measurements"].get(key, result["baseline"])
    for figure in ("first_batch_s", "clips_per_s_after_first", "clips_per_s_whole_pass"):
      assert r[figure] > 0, (key, figure)
    assert r["cpu_ms_per_clip"] > 0 and r["cpu_ms_per_clip_steady"] > 0, key
    assert r["bytes_read_per_clip"] > 0 and r["peak_rss_mb"] > 0, key
    assert set(r["projected_clips_per_s"]) == {"4", "8", "16", "32"}
    assert set(r["cores_for"]) == {"839", "1500"}
  # A worker's own CPU and memory are counted: the main process alone would look cheap.
  zero, one = (result["measurements"][f"train_folders_exact_workers{w}"] for w in (0, 1))
  assert one["cpu_ms_per_clip"] > 0.5 * zero["cpu_ms_per_clip"]
  assert one["peak_rss_mb"] > one["peak_rss_mb_main"]
  assert 0 < result["worker_start_s"] < 30 and result["worker_start_cpu_s"] > 0
  assert result["default_path"] in ("exact", "fast") and result["default_vs_baseline_per_cpu_s"] > 0
  assert result["packed_bytes_per_clip_vs_frames"] > 0
  assert (result["image_size"], result["render_size"], result["num_frames"]) == (16, 24, 16)
  assert result["machine"]["cpu_count"] >= 1


def test_baseline_batches_are_reference_shaped(tmp_path):
  synthetic.generate(tmp_path, num_classes=7, num_clips=14, seed=5, image_size=24, processes=1)
  clips = annotations.read_annotations(tmp_path / "train.txt", data_root=tmp_path)
  batch = next(input_pipeline.baseline_clips(clips, 16, batch_size=3))
  assert batch.shape == (3, 16, 3, 16, 16) and batch.dtype == np.float32
  assert 0.0 <= batch.min() and batch.max() <= 1.0
