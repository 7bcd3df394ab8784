"""Prediction on the user's videos: inputs, windows, faces, checkpoint layouts, the CLI end to end.

The model is tiny (random weights, 4 frames of 16 px) and saved in each checkpoint layout; the
videos are a synthetic face clip (the dataset generator's), a real photograph of a face shipped
in the scikit-image wheel moved around a little, a face-less clip, and a corrupt file.
"""

import dataclasses
import fractions
import json
import logging
import pathlib
import shutil

import av
import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from dfer_clip_jax import checkpointing, inference, predict, restore, train
from dfer_clip_jax import state as state_lib
from dfer_clip_jax.conversion import reference
from dfer_clip_jax.data import augment, sampling, synthetic
from dfer_clip_jax.data.datasets import DFEW_CLASSES, MAFW_CLASSES
from dfer_clip_jax.models import clip as clip_lib
from dfer_clip_jax.models import dfer_clip as dfer_lib
from dfer_clip_jax.video import faces, sources, windows

NUM_FRAMES, IMAGE_SIZE = 4, 16
# The astronaut's face in skimage.data.astronaut() (512 x 512), x0, y0, x1, y1, by hand.
ASTRONAUT_FACE = np.array([177.0, 66.0, 272.0, 161.0])


def write_video(path, frames, *, fps=10, times_s=None):
  """Encodes RGB frames to H.264; `times_s` gives each frame's time (variable rate)."""
  container = av.open(str(path), "w")
  stream = container.add_stream("libx264", rate=1000 if times_s is not None else fps)
  stream.height, stream.width = frames[0].shape[:2]
  stream.pix_fmt = "yuv420p"
  if times_s is not None:
    stream.codec_context.time_base = fractions.Fraction(1, 1000)
  for i, rgb in enumerate(frames):
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    if times_s is not None:
      frame.pts = int(round(times_s[i] * 1000))
    for packet in stream.encode(frame):
      container.mux(packet)
  for packet in stream.encode():
    container.mux(packet)
  container.close()
  return path


def read_video(path):
  container = av.open(str(path))
  frames = [(f.time, f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
  container.close()
  return frames


def tiny_model():
  """A random-weight model of a tiny spec (no jit compile: weights are drawn with numpy)."""
  cc = clip_lib.tiny_config()
  cc = cc.replace(
    vision=dataclasses.replace(cc.vision, image_size=IMAGE_SIZE),
    text=dataclasses.replace(cc.text, vocab_size=1000),
  )
  dc = dfer_lib.DFERCLIPConfig(
    class_names=MAFW_CLASSES[:7],
    num_frames=NUM_FRAMES,
    normalize=True,
    temporal_heads=4,
    temporal_dim_head=16,
    temporal_mlp_dim=128,
  )
  spec = state_lib.ModelSpec(clip=cc, model=dc)
  graphdef, shapes = nnx.split(
    nnx.eval_shape(lambda: state_lib.model_from_spec(spec, rngs=nnx.Rngs(0)))
  )
  rng = np.random.default_rng(0)
  values = jax.tree.map(
    lambda s: (
      (rng.normal(size=s.shape) * 0.3).astype(s.dtype)
      if np.issubdtype(s.dtype, np.floating)
      else np.full(s.shape, 3, s.dtype)
    ),
    shapes,
  )
  return nnx.merge(graphdef, values), spec


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """The tiny model in three layouts: checkpoint folder, training workdir, model export."""
  root = tmp_path_factory.mktemp("ckpt")
  model, spec = tiny_model()
  config = {
    "format": train.CHECKPOINT_FORMAT,
    "has_optimizer": False,
    "model": spec.to_dict(),
    "config": {},
  }
  checkpointing.save_checkpoint_dir(
    root / "folder", state={"model": nnx.state(model)}, config=config
  )
  # A training run: steps with metrics, and optimizer state that inference must skip.
  momentum = jax.tree.map(np.zeros_like, nnx.state(model, nnx.Param))
  with checkpointing.Checkpointer(
    root / "run" / "checkpoints", best_metric="select", async_save=False
  ) as ckptr:
    for step, select in ((4, 50.0), (7, 40.0)):
      ckptr.save(
        step,
        state={"model": nnx.state(model), "optimizer": {"momentum": momentum}},
        data_state={},
        config={**config, "has_optimizer": True},
        metrics={"select": select},
      )
  reference.export_model(model, spec.clip, root / "export")
  return {"root": root, "model": model, "spec": spec}


@pytest.fixture(scope="module")
def predictor(saved):
  model, spec, _ = restore.load_model(saved["root"] / "folder")
  return inference.Predictor(model, spec, batch_size=4)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
  root = tmp_path_factory.mktemp("media")
  # 3 s of a synthetic face at 10 fps.
  synth = synthetic.render_clip(0, 30, np.random.default_rng(3), size=64)
  write_video(root / "synth.mp4", list(synth))
  folder = root / "frames_clip"
  folder.mkdir()
  for t, rgb in enumerate(synth[:20]):
    Image.fromarray(rgb).save(folder / f"{t + 1:05d}.png")
  (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
  # A real face photograph moved by a few pixels per frame (2 s at 10 fps), at 240 px.
  from skimage import data as skdata  # shipped inside the wheel: no download

  photo = skdata.astronaut()
  offsets, frames = [], []
  for i in range(20):
    dx, dy = int(round(8 * np.sin(i / 3))), int(round(5 * np.cos(i / 4)))
    x0, y0 = 60 + dx, 40 + dy
    offsets.append((x0, y0))
    crop = Image.fromarray(photo[y0 : y0 + 400, x0 : x0 + 400])
    frames.append(np.asarray(crop.resize((240, 240), Image.Resampling.BILINEAR)))
  write_video(root / "astronaut.mp4", frames)
  # Two faces (the same photo at two sizes) on a grey background, moving apart and together.
  head = Image.fromarray(photo[30:210, 130:310])
  big, small = (np.asarray(head.resize((s, s), Image.Resampling.BILINEAR)) for s in (120, 90))
  two = []
  for i in range(20):
    f = np.full((160, 320, 3), 90, np.uint8)
    dx = int(round(4 * np.sin(i / 3)))
    f[20:140, 20 + dx : 140 + dx] = big
    f[40:130, 200 - dx : 290 - dx] = small
    two.append(f)
  write_video(root / "two_faces.mp4", two)
  ramp = np.linspace(0, 255, 96, dtype=np.uint8)
  blank = np.stack([np.broadcast_to(ramp[None, :, None], (96, 96, 3))] * 10)
  write_video(root / "no_face.mp4", list(blank))
  return {"root": root, "synth": synth, "astronaut_offsets": offsets}


def test_windows_cover_the_video_and_sample_like_the_test_sampler():
  for n in (1, 5, 16, 17, 31, 70, 233):
    times = np.arange(n) / 30.0
    got = windows.sample_frames(times, 0.0, n / 30.0, 16)
    np.testing.assert_array_equal(got, sampling.test_indices(n, 16), err_msg=f"n={n}")
  ws = windows.make_windows(10.05, 3.0, 1.0)
  assert ws[0].start_s == 0.0 and ws[-1].end_s == pytest.approx(10.05)
  assert all(b.start_s <= a.end_s for a, b in zip(ws, ws[1:]))
  assert all(w.end_s - w.start_s == pytest.approx(3.0) for w in ws)
  assert windows.make_windows(2.5, 3.0, 1.0) == [windows.Window(0, 0.0, 2.5)]
  # Variable rate: 10 fps for 1 s, then 30 fps: the frame shown at each segment's middle.
  vfr = np.concatenate([np.arange(10) / 10, 1 + np.arange(60) / 30])
  assert not windows.is_constant_rate(vfr)
  idx = windows.sample_frames(vfr, 0.0, 3.0, 6)
  np.testing.assert_allclose(vfr[idx], [0.2, 0.7, 1.2333, 1.7333, 2.2333, 2.7333], atol=1e-3)
  with pytest.raises(ValueError, match="stride_s must be positive|must be positive"):
    windows.make_windows(5.0, 3.0, 0.0)


def test_tracking_follows_the_main_face_and_drops_false_alarms():
  def det(x, y, side, score=1.0):
    return faces.Detection(np.array([x, y, x + side, y + side], float), score)

  obs = []
  for i in range(12):
    t = i * 0.2
    dets = [det(100 + 3 * i, 50, 80), det(300, 200 - 2 * i, 40)]
    if i == 5:
      dets.append(det(10, 300, 30))  # a one-frame false alarm
    if 6 <= i <= 8:
      dets = dets[1:]  # the big face is missed for 0.8 s: two fragments
    obs.append((t, dets))
  tracks = faces.track_faces(obs, max_gap_s=0.5)
  main = faces.select_tracks(tracks, num_examined=len(obs), all_faces=False)
  assert len(main) == 1 and len(main[0].times) == 9  # fragments joined across the miss
  assert main[0].box_at(1.4, 0.3)[0] == pytest.approx(100 + 3 * 7, abs=3)  # interpolated
  every = faces.select_tracks(tracks, num_examined=len(obs), all_faces=True)
  assert len(every) == 2 and every[1].boxes[0][0] == 300
  assert faces.square_crop_box(np.array([0.0, 10.0, 20.0, 30.0]), 0.25, 100, 100) == (0, 5, 30, 35)
  x0, y0, x1, y1 = faces.square_crop_box(np.array([40.0, 40.0, 90.0, 90.0]), 0.5, 60, 200)
  assert (x1 - x0, y1 - y0) == (100, 100) and x0 == 15  # wider than the frame: centred


def test_discover_inputs(media, tmp_path):
  root = media["root"]
  found = sources.discover_inputs(
    [
      str(root / "synth.mp4"),
      str(root / "frames_clip"),
      str(root / "*.mp4"),
      str(tmp_path / "missing.mp4"),
      str(tmp_path),
    ]
  )
  kinds = [(it.path.name, it.kind) for it in found.items]
  assert kinds[:2] == [("synth.mp4", "video"), ("frames_clip", "frames")]
  assert sorted(kinds[2:]) == [
    ("astronaut.mp4", "video"),
    ("corrupt.mp4", "video"),
    ("no_face.mp4", "video"),
    ("two_faces.mp4", "video"),
  ]
  assert [p[0] for p in found.problems] == [str(tmp_path / "missing.mp4"), str(tmp_path)]
  assert "does not exist" in found.problems[0][1]
  # A folder of videos and frame folders gives one input each.
  assert {it.path.name for it in sources.discover_inputs([str(root)]).items} == {
    "synth.mp4",
    "frames_clip",
    "astronaut.mp4",
    "corrupt.mp4",
    "no_face.mp4",
    "two_faces.mp4",
  }


def test_variable_frame_rate_and_rotation(tmp_path):
  times = [0.0, 0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.7, 1.0]
  frames = [np.full((32, 48, 3), 20 * i, np.uint8) for i in range(len(times))]
  reader = sources.VideoFileReader(write_video(tmp_path / "vfr.mp4", frames, times_s=times))
  recs = list(reader.frames())
  np.testing.assert_allclose([r.time for r in recs], times, atol=1e-3)
  assert reader.info.variable_frame_rate and reader.info.num_frames == len(times)
  assert [int(round(r.rgb.mean() / 20)) for r in recs] == list(range(len(times)))
  # The rest writes a rotated video, which needs PyAV >= 18; older (still supported) PyAVs
  # can read rotation but not write it, so only this last part is skipped there.
  if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
    pytest.skip("this PyAV cannot write a display rotation")
  container = av.open(str(tmp_path / "rot.mp4"), "w")
  stream = container.add_stream("libx264", rate=10)
  stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
  stream.set_display_rotation(-90)  # stored landscape, shown turned clockwise (portrait)
  stored = np.zeros((32, 64, 3), np.uint8)
  stored[:, :8] = 255  # a white band on the stored frame's left edge
  for packet in stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")):
    container.mux(packet)
  for packet in stream.encode():
    container.mux(packet)
  container.close()
  reader = sources.VideoFileReader(tmp_path / "rot.mp4")
  (rec,) = list(reader.frames())
  assert rec.rgb.shape == (64, 32, 3) and (reader.info.width, reader.info.height) == (32, 64)
  assert rec.rgb[:6].mean() > 200 and rec.rgb[10:].mean() < 50  # the band is now on top


def test_checkpoint_layouts_give_the_same_model(saved, predictor):
  root = saved["root"]
  clip = np.random.default_rng(0).integers(0, 256, (5,) + predictor.clip_shape, dtype=np.uint8)
  probs = predictor(clip)  # 5 clips: one full batch of 4 and a padded one
  assert probs.shape == (5, 7)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(probs[4:], predictor(clip[4:]), atol=1e-6)
  want = jax.tree.leaves(nnx.state(saved["model"]))
  for path, which, kind, step in (
    (root / "run", "latest", "workdir", 7),
    (root / "run", "best", "workdir", 4),
    (root / "run" / "checkpoints", "4", "workdir", 4),
    (root / "run" / "checkpoints" / "7", "best", "checkpoint", 7),
    (root / "folder", "latest", "checkpoint", None),
    (root / "export", "latest", "export", None),
  ):
    ref = restore.resolve_checkpoint(path, which)
    assert (ref.kind, ref.step) == (kind, step)
    model, spec, _ = restore.load_model(ref)
    assert spec.class_names == saved["spec"].class_names and spec.model.normalize
    assert (spec.num_frames, spec.image_size) == (NUM_FRAMES, IMAGE_SIZE)
    got = jax.tree.leaves(nnx.state(model))
    assert len(got) == len(want)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
  with pytest.raises(FileNotFoundError, match="no checkpoint step 3"):
    restore.resolve_checkpoint(root / "run", "3")
  with pytest.raises(FileNotFoundError, match="no checkpoint in .* was saved with evaluation"):
    restore.resolve_checkpoint(root, "best")  # `folder` is not a step: no ranked steps here
  with pytest.raises(ValueError, match="expected 'latest', 'best' or a step number"):
    restore.resolve_checkpoint(root / "run", "newest")
  with pytest.raises(FileNotFoundError, match="holds no usable checkpoint"):
    restore.resolve_checkpoint(root / "export" / "..", "latest")


def test_cli_whole_frames_with_a_corrupt_input(saved, media, predictor, tmp_path, capsys):
  root, out = media["root"], tmp_path / "out"
  rc = predict.main(
    [
      f"--checkpoint={saved['root'] / 'folder'}",
      f"--input={root / 'synth.mp4'}",
      f"--input={root / 'corrupt.mp4'}",
      f"--input={root / 'frames_clip'}",
      f"--out={out}",
      "--face=none",
      "--window_s=1.5",
      "--stride_s=0.5",
      "--annotate",
      "--batch_size=4",
    ]
  )
  assert rc == 1  # one input failed, the others were processed
  printed = capsys.readouterr()
  assert "corrupt.mp4: cannot open it as a video" in printed.err
  assert "2 of 3 inputs succeeded" in printed.out

  pred = json.loads((out / "synth" / "predictions.json").read_text())
  assert pred["format"] == predict.FORMAT and pred["class_names"] == list(saved["spec"].class_names)
  info = pred["input"]
  assert (info["kind"], info["num_frames"], info["width"], info["height"]) == ("video", 30, 64, 64)
  assert info["duration_s"] == pytest.approx(3.0, abs=1e-3) and not info["variable_frame_rate"]
  assert pred["model"]["num_frames"] == NUM_FRAMES and pred["face_detector"] is None
  (track,) = pred["tracks"]
  rows = track["windows"]
  assert [(w["start_s"], w["end_s"]) for w in rows] == [
    (0.0, 1.5),
    (0.5, 2.0),
    (1.0, 2.5),
    (1.5, 3.0),
  ]
  for w in rows:
    assert w["status"] == "ok" and len(w["frame_indices"]) == NUM_FRAMES
    assert all(w["start_s"] <= t < w["end_s"] for t in w["frame_times_s"])
    assert sum(w["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert w["top_class"] == max(w["probabilities"], key=w["probabilities"].get)
    assert w["face_box"] == [0.0, 0.0, 64.0, 64.0]
  assert track["summary"]["windows_with_face"] == 4

  # The CLI's probabilities are the model's on the evaluation preprocessing of those frames.
  decoded = read_video(root / "synth.mp4")
  idx = rows[2]["frame_indices"]
  clip = augment.test_transform([Image.fromarray(decoded[i][1]) for i in idx], size=IMAGE_SIZE)
  want = predictor(clip[None])[0]
  got = np.array([rows[2]["probabilities"][c] for c in pred["class_names"]])
  np.testing.assert_allclose(got, want, atol=2e-6)

  timeline = Image.open(out / "synth" / "timeline.png")
  assert timeline.size[0] == 1000 and timeline.getextrema() != ((255, 255),) * 3
  annotated = read_video(out / "synth" / "annotated.mp4")
  assert len(annotated) == 30 and annotated[29][0] == pytest.approx(2.9, abs=1e-3)

  frames_pred = json.loads((out / "frames_clip" / "predictions.json").read_text())
  assert frames_pred["input"]["kind"] == "frames"
  assert frames_pred["input"]["duration_s"] == pytest.approx(20 / 25)  # --fps 25
  (fw,) = frames_pred["tracks"][0]["windows"]  # 0.8 s: one clip, the test sampler's frames
  assert fw["frame_indices"] == sampling.test_indices(20, NUM_FRAMES).tolist()

  summary = json.loads((out / "summary.json").read_text())
  status = {pathlib.Path(r["input"]).name: r["status"] for r in summary["inputs"]}
  assert status == {"synth.mp4": "ok", "corrupt.mp4": "error", "frames_clip": "ok"}
  assert not (out / "corrupt").exists()


def test_cli_finds_the_face_in_a_photograph(saved, media, tmp_path, capsys):
  root, out = media["root"], tmp_path / "out"
  rc = predict.main(
    [
      f"--checkpoint={saved['root'] / 'export'}",
      "--input",
      str(root / "astronaut.mp4"),
      str(root / "no_face.mp4"),
      str(root / "two_faces.mp4"),
      f"--out={out}",
      "--batch_size=4",
      "--all_faces",
    ]
  )
  assert rc == 1
  assert "no_face.mp4: no face found in the 5 frames examined" in capsys.readouterr().err
  pred = json.loads((out / "astronaut" / "predictions.json").read_text())
  assert pred["face_detector"]["frames_examined"] == 10  # 5 per second of a 2 s video
  (track,) = pred["tracks"]
  assert track["detections"] >= 8
  (w,) = track["windows"]  # 2 s <= --window_s: one clip
  assert w["frame_indices"] == sampling.test_indices(20, NUM_FRAMES).tolist()
  # The photo's face, in the frames' coordinates (crop offset, then 400 -> 240 px).
  x0, y0 = np.mean(media["astronaut_offsets"], axis=0)
  want = (ASTRONAUT_FACE - [x0, y0, x0, y0]) * 240 / 400
  assert faces.iou(np.array(w["face_box"]), want) > 0.6, (w["face_box"], want)
  cx0, cy0, cx1, cy1 = w["crop_box"]
  assert cx1 - cx0 == pytest.approx(cy1 - cy0, abs=1)  # square
  assert cx0 <= want[0] and cy0 <= want[1] and cx1 >= want[2] and cy1 >= want[3]
  assert sum(w["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)

  # --all_faces: one track per face, the larger first, each where its face is.
  two = json.loads((out / "two_faces" / "predictions.json").read_text())["tracks"]
  assert [t["track_id"] for t in two] == [0, 1]
  boxes = [np.array(t["mean_face_box"]) for t in two]
  assert boxes[0][2] < 160 < boxes[1][0]  # left (big) face, then right (small) face
  assert boxes[0][2] - boxes[0][0] > boxes[1][2] - boxes[1][0]
  for t in two:
    (w,) = t["windows"]
    assert w["status"] == "ok" and sum(w["probabilities"].values()) == pytest.approx(1, abs=1e-4)


def test_cli_on_a_converted_reference_checkpoint(reference_dir, media, tmp_path):
  from dfer_clip_jax import convert

  export = tmp_path / "export"
  assert convert.main([f"--reference={reference_dir / 'tiny_forward.npz'}", f"--out={export}"]) == 0
  out = tmp_path / "out"
  assert (
    predict.main(
      [
        f"--checkpoint={export}",
        f"--input={media['root'] / 'synth.mp4'}",
        f"--out={out}",
        "--face=none",
      ]
    )
    == 0
  )
  pred = json.loads((out / "synth" / "predictions.json").read_text())
  assert pred["model"]["checkpoint"].startswith("export ")
  assert pred["class_names"] == list(DFEW_CLASSES)  # a 7-class reference: the DFEW order
  assert not pred["model"]["normalize"]  # the reference feeds [0, 1] pixels
  (w,) = pred["tracks"][0]["windows"]  # 3 s <= the default 3 s window: one clip
  assert len(w["frame_indices"]) == pred["model"]["num_frames"] == 16
  assert w["frame_indices"] == sampling.test_indices(30, 16).tolist()
  assert sum(w["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_model_spec_round_trip_and_old_format_refused(saved):
  spec = saved["spec"]
  again = state_lib.ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
  assert again == spec and again.model.class_names == spec.class_names
  old = {**spec.to_dict(), "format": "dfer_clip_jax.model/1"}
  with pytest.raises(ValueError, match="older version of dfer_clip_jax"):
    state_lib.ModelSpec.from_dict(old)


def test_a_damaged_latest_step_without_its_integrity_record_falls_back(saved, tmp_path, caplog):
  """The integrity record is missing when a run stopped between a save and its record: damage
  then shows only when the weights are read, and asking for "latest" takes the step before."""
  run = tmp_path / "run"
  shutil.copytree(saved["root"] / "run", run)
  step7 = run / "checkpoints" / "7"
  (step7 / checkpointing.INTEGRITY_FILE).unlink()
  # The largest data file's second half overwritten (its size kept): the metadata still reads.
  data = max(
    (p for p in (step7 / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
    key=lambda p: p.stat().st_size,
  )
  size = data.stat().st_size
  with open(data, "r+b") as fh:
    fh.seek(size // 2)
    fh.write(b"\xff" * (size - size // 2))
  with caplog.at_level(logging.WARNING):
    model, _, ref = restore.load_model(run, "latest")
  assert ref.step == 4 and ref.path == run / "checkpoints" / "4"
  assert any(
    str(step7) in r.getMessage() and "using step 4" in r.getMessage() for r in caplog.records
  )
  want = jax.tree.leaves(nnx.state(saved["model"]))
  for a, b in zip(jax.tree.leaves(nnx.state(model)), want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert step7.is_dir()  # evaluation renames nothing
  with pytest.raises(restore.UnreadableWeightsError, match="cannot read the model weights"):
    restore.load_model(run, "7")  # a step asked for by number is never swapped
