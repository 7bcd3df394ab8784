"""`python -m dfer_clip_jax.predict`: the exit status when nothing can start, `--which`, and that
`--detect_fps`, `--margin` and `--min_face` change what they say (the tiny model and videos of
test_predict)."""

import json
import re

import pytest

# The tiny model in its checkpoint layouts, and the test videos.
from test_predict import media, saved  # noqa: F401  pylint: disable=g-bad-import-order,unused-import

from dfer_clip_jax import predict


def test_exit_status_2_when_nothing_can_start(saved, media, tmp_path, capsys):  # noqa: F811
  """No input found, an unreadable checkpoint, a bad option: status 2 and nothing written."""
  clip = f"--input={media['root'] / 'frames_clip'}"
  for args, message in (
    ([f"--checkpoint={saved['root'] / 'folder'}", f"--input={tmp_path / 'none*.mp4'}"], "no input"),
    ([f"--checkpoint={tmp_path / 'missing'}", clip], "cannot load the model"),
    ([f"--checkpoint={saved['root'] / 'run'}", "--which=3", clip], "no checkpoint step 3"),
    ([f"--checkpoint={saved['root'] / 'folder'}", "--margin=-0.1", clip], "--margin"),
    ([f"--checkpoint={saved['root'] / 'folder'}", "--min_face=0", clip], "--min_face"),
  ):
    out = tmp_path / "out"
    assert predict.main([*args, f"--out={out}", "--face=none"]) == 2, args
    assert message in capsys.readouterr().err, args
    assert not out.exists(), args


def test_which_picks_the_checkpoint_of_a_workdir(saved, media, tmp_path):  # noqa: F811
  """The workdir holds steps 4 (best validation) and 7 (latest)."""
  for which, step in (("best", 4), ("latest", 7), ("4", 4)):
    out = tmp_path / which
    args = [f"--checkpoint={saved['root'] / 'run'}", f"--input={media['root'] / 'frames_clip'}"]
    assert predict.main([*args, f"--which={which}", f"--out={out}", "--face=none"]) == 0
    pred = json.loads((out / "frames_clip" / "predictions.json").read_text())
    assert re.search(rf"checkpoints/{step} \(step {step}\b", pred["model"]["checkpoint"]), (
      which,
      pred["model"],
    )


def _faces(out, name):
  return json.loads((out / name / "predictions.json").read_text())


def _crop_over_face(window) -> float:
  f, c = window["face_box"], window["crop_box"]
  return (c[2] - c[0]) / max(f[2] - f[0], f[3] - f[1])


def test_detect_fps_margin_and_min_face(saved, media, tmp_path):  # noqa: F811
  """Defaults, then --detect_fps=2 (4 of the 2 s video's 20 frames examined instead of 10) with
  --margin=0.5 (crop side = 2x the face side instead of 1.5x), and --min_face between the two
  faces' sizes in two_faces.mp4 (only the larger one is found)."""
  astronaut, two_faces = (str(media["root"] / n) for n in ("astronaut.mp4", "two_faces.mp4"))
  export = f"--checkpoint={saved['root'] / 'export'}"
  default = tmp_path / "default"
  assert (
    predict.main([export, "--input", astronaut, two_faces, "--all_faces", f"--out={default}"]) == 0
  )
  pred = _faces(default, "astronaut")
  assert pred["face_detector"]["frames_examined"] == 10
  (w,) = pred["tracks"][0]["windows"]
  assert _crop_over_face(w) == pytest.approx(1.5, abs=0.02)
  two = _faces(default, "two_faces")["tracks"]
  assert len(two) == 2
  sides = [t["mean_face_box"][2] - t["mean_face_box"][0] for t in two]
  min_face = 0.95 * max(sides) / 160  # just under the larger face (160: the shorter side)

  changed = tmp_path / "changed"
  flags = ["--detect_fps=2", "--margin=0.5"]
  assert predict.main([export, f"--input={astronaut}", *flags, f"--out={changed}"]) == 0
  pred = _faces(changed, "astronaut")
  assert pred["face_detector"]["frames_examined"] == 4
  (w,) = pred["tracks"][0]["windows"]
  assert _crop_over_face(w) == pytest.approx(2.0, abs=0.02)
  flags = [f"--min_face={min_face:.3f}", "--all_faces"]
  assert predict.main([export, f"--input={two_faces}", *flags, f"--out={changed}"]) == 0
  (big,) = _faces(changed, "two_faces")["tracks"]
  assert big["mean_face_box"][2] < 160  # the left, larger face
