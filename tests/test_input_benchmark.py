"""The input-pipeline benchmark: its JSON schema on a tiny run, the reference-style baseline."""

import json

import numpy as np
import pytest

from dfer_clip_jax.benchmarks import input_pipeline
from dfer_clip_jax.data import annotations, synthetic


def test_tiny_run_writes_every_figure(tmp_path):
  out = tmp_path / "bench.json"
  argv = [f"--json={out}", "--clips=14", "--workers=0,1", "--image_size=16", "--render_size=24"]
  argv += ["--min_frames=16", "--max_frames=20", "--batch_size=2", "--repeat=1", "--pairs=1"]
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
  assert result["default_packed_vs_baseline_per_cpu_s"] > 0
  assert len(result["default_rounds_cpu_ms_per_clip"]) == 1
  assert result["packed_bytes_per_clip_vs_frames"] > 0
  assert (result["image_size"], result["render_size"], result["num_frames"]) == (16, 24, 16)
  assert result["machine"]["cpu_count"] >= 1


def test_baseline_batches_are_reference_shaped(tmp_path):
  synthetic.generate(tmp_path, num_classes=7, num_clips=14, seed=5, image_size=24, processes=1)
  clips = annotations.read_annotations(tmp_path / "train.txt", data_root=tmp_path)
  batch = next(input_pipeline.baseline_clips(clips, 16, batch_size=3))
  assert batch.shape == (3, 16, 3, 16, 16) and batch.dtype == np.float32
  assert 0.0 <= batch.min() and batch.max() <= 1.0


def _run(uar, losses):
  return {"test_uar": uar, "test_war": uar + 1, "loss_curve": dict(enumerate(losses))}


def test_decode_paths_verdict_weighs_the_paths_against_the_seeds():
  from dfer_clip_jax.benchmarks import decode_paths

  seeds_apart = {
    "exact": {0: _run(80.0, [2.0, 1.0, 0.5]), 1: _run(82.0, [2.2, 1.2, 0.6])},
    "fast": {0: _run(81.0, [2.05, 1.0, 0.5]), 1: _run(81.5, [2.2, 1.25, 0.6])},
  }
  c = decode_paths.compare(seeds_apart)
  assert c["exact"]["uar_mean"] == 81.0 and c["fast"]["uar_mean"] == 81.25
  assert c["loss_curve_gap_between_paths"] < c["loss_curve_gap_between_seeds"]
  assert c["same_within_noise"] is True
  # A path that learns worse than the seeds' spread allows is not the same.
  worse = {**seeds_apart, "fast": {s: _run(70.0, [2.5, 2.0, 1.8]) for s in (0, 1)}}
  assert decode_paths.compare(worse)["same_within_noise"] is False
  config, overrides = decode_paths.setup_overrides("dfew_like", 300, 3)
  assert config.endswith("clips=300,epochs=3") and "clip.image_size=64" in overrides


def test_list_flags_refuse_what_is_not_a_list_of_integers(tmp_path, capsys):
  from dfer_clip_jax.benchmarks import decode_paths

  for main, argv in (
    (input_pipeline.main, ["--workers=0,two"]),
    (decode_paths.main, ["--seeds=0,x"]),
  ):
    with pytest.raises(SystemExit) as e:
      main([f"--json={tmp_path / 'out.json'}", *argv])
    assert e.value.code == 2
    assert "must be comma-separated integers" in capsys.readouterr().err
