"""Your own videos end to end: prepare (crops, lists, report, skips, kill and rerun) -> a tiny
training run with configs/custom.py -> predict naming the user's classes; Hub ids for the CLIP
checkpoint; class names of converted reference checkpoints.

The videos are a real face photograph (skimage.data.astronaut, shipped in the wheel) framed,
scaled and brightened differently per class and moved a little per frame, plus a corrupt file
and a face-less clip.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dfer_clip_jax import config_lib, predict, train
from dfer_clip_jax.data import prepare
from dfer_clip_jax.video import faces

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from test_predict import write_video  # noqa: E402  pylint: disable=g-import-not-at-top

from configs import custom  # noqa: E402  pylint: disable=g-import-not-at-top

# Sorted, none of them a built-in emotion name; seven, so that the model's shapes are those of
# the other tests' tiny models (compiles are shared).
CLASSES = ["calm", "doubt", "glee", "grief", "joy", "rage", "shock"]
SIZE = 64  # side of the prepared frames (large enough for the detector to check the crops)


def astronaut_video(path, c: int, v: int, frames: int = 20):
  """Class c: its own framing (scale), position and brightness; video v: its own motion."""
  from skimage import data as skdata  # pylint: disable=g-import-not-at-top

  photo = skdata.astronaut()
  side = 400 - 25 * c
  out = []
  for i in range(frames):
    x0 = 60 + 5 * c + int(round(8 * np.sin(i / 3 + v)))
    y0 = 40 + int(round(5 * np.cos(i / 4 + v)))
    crop = Image.fromarray(photo[y0 : y0 + side, x0 : x0 + side])
    rgb = np.asarray(crop.resize((160, 160), Image.Resampling.BILINEAR), np.float32)
    out.append(np.clip(rgb * (0.7 + 0.1 * c), 0, 255).astype(np.uint8))
  return write_video(path, out)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  root = tmp_path_factory.mktemp("videos")
  rows = ["video,label"]
  for c, name in enumerate(CLASSES):
    for v in range(3):
      astronaut_video(root / f"{name}_{v}.mp4", c, v)
      rows.append(f"{name}_{v}.mp4,{name}")
  (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
  ramp = np.linspace(0, 255, 96, dtype=np.uint8)
  write_video(root / "no_face.mp4", [np.broadcast_to(ramp[None, :, None], (96, 96, 3))] * 20)
  rows += ["corrupt.mp4,joy", "no_face.mp4,rage"]
  (root / "labels.csv").write_text("\n".join(rows) + "\n")
  return root


def tiny_custom_config(data):
  """configs/custom.py on the prepared folder, at the tiny shapes of the other tests."""
  c = custom.get_config(f"data={data},variant=tiny,protocol=paper")  # no validation split
  config_lib.apply_preset(
    c,
    {
      "clip.image_size": 16,
      "model.num_frames": 4,
      "model.normalize": True,
      "model.temporal_heads": 4,
      "model.temporal_dim_head": 16,
      "model.temporal_mlp_dim": 128,
      "train.epochs": 1,
      "train.batch_size": 8,
      "train.eval_batch_size": 8,
      "data.worker_count": 0,
    },
  )
  return c


def test_prepare_train_predict(videos, tmp_path, capsys):
  data = tmp_path / "data"
  rc = prepare.main(
    [f"--videos={videos / 'labels.csv'}", f"--out={data}", f"--size={SIZE}", "--workers=2"]
  )
  assert rc == 1  # some skipped
  report = json.loads((data / "prepare_report.json").read_text())
  assert report["counts"] == {"prepared": 21, "already prepared": 0, "skipped": 2}
  why = {pathlib.Path(v["video"]).name: v.get("reason") for v in report["videos"]}
  assert "cannot open it as a video" in why["corrupt.mp4"]
  assert "no face found" in why["no_face.mp4"]
  assert (data / "classes.txt").read_text().split() == CLASSES
  # Stratified: one of each class's three videos in test.
  test_lines = (data / "test.txt").read_text().split("\n")[:-1]
  assert sorted(int(ln.split()[2]) for ln in test_lines) == list(range(7))
  assert report["splits"] == {"train": 14, "test": 7}

  for v in report["videos"]:
    if v["status"] != "prepared":
      continue
    assert v["frames"] == 20 and v["face_coverage"] >= 0.8 and v["time_span_s"] == [0.0, 1.9]
    # The crop is the face: the detector finds it centred and filling most of the frame.
    middle = np.asarray(Image.open(data / v["folder"] / "00010.jpg"))
    assert middle.shape == (SIZE, SIZE, 3)
    (face,) = faces.HaarFaceDetector(min_face=0.3)(middle)
    centre = (face.box[:2] + face.box[2:]) / 2
    assert np.all(np.abs(centre - SIZE / 2) < 0.15 * SIZE), (v["folder"], face.box)
    assert face.box[2] - face.box[0] > 0.45 * SIZE, (v["folder"], face.box)

  # The validator's CLI accepts the result.
  check = subprocess.run(
    [sys.executable, "-m", "dfer_clip_jax.data.validate", f"--data_root={data}"]
    + [f"--annotations={data / s}.txt" for s in ("train", "test")]
    + ["--classes=custom", f"--classes_file={data / 'classes.txt'}", "--threads=2"],
    capture_output=True,
    text=True,
    cwd=REPO,
    env={**os.environ, "PYTHONPATH": str(REPO)},
    timeout=120,
  )
  assert check.returncode == 0, check.stdout + check.stderr

  run = tmp_path / "run"
  result = train.train_and_evaluate(tiny_custom_config(data), run)
  assert result["class_names"] == CLASSES

  new = astronaut_video(tmp_path / "new.mp4", 4, 7)
  capsys.readouterr()
  assert predict.main([f"--checkpoint={run}", f"--input={new}", f"--out={tmp_path / 'pred'}"]) == 0
  printed = capsys.readouterr().out
  pred = json.loads((tmp_path / "pred" / "new" / "predictions.json").read_text())
  assert pred["class_names"] == CLASSES
  top = pred["tracks"][0]["summary"]["top_class"]
  assert top in CLASSES and f"{top} (" in printed


def test_prepare_killed_then_rerun(videos, tmp_path):
  """Killed (SIGKILL) while writing the third video: the rerun keeps the two finished folders
  as they are, removes the half-written one and prepares the rest. The input here is the
  folder-per-class form (split drawn per class)."""
  src = tmp_path / "videos"
  for name in CLASSES[:2]:
    (src / name).mkdir(parents=True)
    for v in range(2):
      (src / name / f"{name}_{v}.mp4").symlink_to(videos / f"{name}_{v}.mp4")
  data = tmp_path / "data"
  args = [f"--videos={src}", f"--out={data}", f"--size={SIZE}"]
  killed = subprocess.run(
    [sys.executable, "-m", "dfer_clip_jax.data.prepare", *args],
    capture_output=True,
    text=True,
    cwd=REPO,
    env={**os.environ, "PYTHONPATH": str(REPO), prepare.TEST_KILL_ENV: "3"},
    timeout=120,
  )
  assert killed.returncode == -signal.SIGKILL, killed.stderr
  frames = data / "frames"
  done = sorted(p for p in frames.glob("*/*") if p.is_dir() and not p.name.startswith("."))
  partial = sorted(frames.glob("*/.*.partial"))
  assert [p.name for p in done] == ["calm_0", "calm_1"]
  assert [p.name for p in partial] == [".doubt_0.partial"] and list(partial[0].iterdir())
  stamps = {f: f.stat().st_mtime_ns for p in done for f in p.iterdir()}

  assert prepare.main(args) == 0
  report = json.loads((data / "prepare_report.json").read_text())
  status = {v["folder"]: v["status"] for v in report["videos"]}
  assert status == {
    "frames/calm/calm_0": "already prepared",
    "frames/calm/calm_1": "already prepared",
    "frames/doubt/doubt_0": "prepared",
    "frames/doubt/doubt_1": "prepared",
  }
  assert report["removed_partial_folders"] == ["frames/doubt/.doubt_0.partial"]
  assert not list(frames.glob("*/.*"))
  assert {f: f.stat().st_mtime_ns for f in stamps} == stamps  # not rewritten
  lines = sorted((data / "train.txt").read_text().split("\n")[:-1])
  lines += sorted((data / "test.txt").read_text().split("\n")[:-1])
  assert len(lines) == 4 and all(ln.split()[1] == "20" for ln in lines)
  assert report["splits"] == {"train": 2, "test": 2}


def test_labels_errors_name_the_line(tmp_path):
  bad = tmp_path / "labels.csv"
  bad.write_text("video,label,split\na.mp4,joy,train\nb.mp4,calm,validation\n")
  with pytest.raises(prepare.LabelsError, match=r"labels.csv:3: split 'validation'"):
    prepare.read_labels(bad)
  bad.write_text("file,label\na.mp4,joy\n")
  with pytest.raises(prepare.LabelsError, match=r"labels.csv:1: .*missing \['video'\]"):
    prepare.read_labels(bad)


def _cached_hub_repo(hf_home: pathlib.Path, repo_id: str, files: dict) -> pathlib.Path:
  """A Hugging Face cache entry as `hf download` leaves it: refs/main -> snapshots/<commit>."""
  commit = "0123456789abcdef0123456789abcdef01234567"
  repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
  snapshot = repo / "snapshots" / commit
  snapshot.mkdir(parents=True)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(commit)
  for name, write in files.items():
    write(snapshot / name)
  return snapshot


def test_clip_checkpoint_from_a_hub_id_offline(tmp_path, monkeypatch):
  """A tiny CLIP cached under a Hub id in a temporary HF_HOME: with HF_HUB_OFFLINE=1 the
  loader and tokenizer find it by id; an id not cached fails naming it and what to run."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  from dfer_clip_jax import demo_tokenizer, tokenizer  # pylint: disable=g-import-not-at-top
  from dfer_clip_jax.conversion import clip_weights  # pylint: disable=g-import-not-at-top
  from dfer_clip_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top

  config = clip_lib.tiny_config()
  # Weights of the right shapes, made without running an initialiser (no compiles).
  graphdef, shapes = nnx.split(nnx.eval_shape(lambda: clip_lib.CLIP(config, rngs=nnx.Rngs(0))))
  model = nnx.merge(graphdef, jax.tree.map(lambda s: np.full(s.shape, 0.01, s.dtype), shapes))
  weights = clip_weights.params_to_openai(model)
  words = tmp_path / "tok"
  demo_tokenizer.build_demo_tokenizer(words, ["an expression of calm."], vocab_size=600)
  hf_home = tmp_path / "hf"
  snapshot = _cached_hub_repo(
    hf_home,
    "tiny-org/tiny-clip",
    {
      "config.json": lambda p: p.write_text("{}"),  # OpenAI-named weights: sizes from shapes
      "model.safetensors": lambda p: save_file(weights, str(p)),
      "vocab.json": lambda p: p.write_bytes((words / "vocab.json").read_bytes()),
      "merges.txt": lambda p: p.write_bytes((words / "merges.txt").read_bytes()),
    },
  )
  # A fresh process, so that huggingface_hub reads HF_HOME and HF_HUB_OFFLINE as users set them.
  script = (
    "from dfer_clip_jax.conversion import hub\n"
    "print(hub.resolve('tiny-org/tiny-clip'))\n"
    "try:\n"
    "  hub.resolve('openai/clip-vit-base-patch32')\n"
    "except FileNotFoundError as e:\n"
    "  print(e)\n"
  )
  env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
  proc = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
  )
  assert proc.returncode == 0, proc.stderr
  found, error = proc.stdout.strip().split("\n", 1)
  assert pathlib.Path(found) == snapshot
  assert "openai/clip-vit-base-patch32" in error and "HF_HUB_OFFLINE is set" in error
  assert "hf download openai/clip-vit-base-patch32" in error

  # In this process: the CLIP loader and the tokenizer take the id (the cache and offline switch set directly,
  # as huggingface_hub read the environment at import).
  import huggingface_hub  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  _, loaded = clip_weights.load_clip("tiny-org/tiny-clip")
  assert loaded == config
  assert len(tokenizer.load_tokenizer("tiny-org/tiny-clip")) == 600


def test_converted_reference_checkpoints_carry_class_names(reference_dir, tmp_path):
  from dfer_clip_jax import convert  # pylint: disable=g-import-not-at-top

  # Without --class_names, 7 classes get the DFEW order: test_predict's converted checkpoint.
  source = f"--reference={reference_dir / 'tiny_forward.npz'}"
  (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
  assert (
    convert.main([source, f"--out={tmp_path / 'own'}", f"--class_names={tmp_path}/classes.txt"])
    == 0
  )
  names = json.loads((tmp_path / "own" / "config.json").read_text())["dfer_clip"]
  assert names["class_names"] == CLASSES
  with pytest.raises(SystemExit, match="2"):
    convert.main([source, f"--out={tmp_path / 'bad'}", "--class_names=a,b,c"])
