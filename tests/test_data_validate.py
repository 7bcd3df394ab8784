"""Every kind of bad input is reported with its file, line and a specific message."""

import io
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFile

from dfer_clip_jax.data import annotations, validate

_SIZE = 24


def _image(mode: str, seed: int, size: int = _SIZE) -> Image.Image:
  rng = np.random.default_rng(seed)
  rgb = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
  if mode == "I;16":
    return Image.frombytes(
      "I;16", (size, size), rng.integers(0, 65536, (size, size), dtype=np.uint16).tobytes()
    )
  return rgb.convert(mode)


def _jpeg_bytes(seed: int) -> bytes:
  buf = io.BytesIO()
  _image("RGB", seed).save(buf, "JPEG", quality=95)
  return buf.getvalue()


def _clip(
  root: pathlib.Path, name: str, count: int, mode: str = "RGB", ext: str = "jpg"
) -> pathlib.Path:
  folder = root / name
  folder.mkdir(parents=True)
  for i in range(count):
    _image(mode, i).save(folder / f"{i:05d}.{ext}")
  return folder


# (line text, expected kind, expected severity, words the message must contain). Line
# numbers follow the order here, starting at 1.
_CASES = [
  ("good 4 0", None, None, None),
  ("missing 4 1", "missing_folder", "error", "does not exist"),
  ("few 6 2", "too_few_frames", "error", "has 4 image files, the list says 6"),
  ("many 3 3", "too_many_frames", "error", "has 4 image files, the list says 3"),
  ("empty_file 3 4", "unreadable_image", "error", "00001.jpg is empty (0 bytes)"),
  ("truncated 3 5", "unreadable_image", "error", "00002.jpg cannot be decoded"),
  ("garbage 3 6", "unreadable_image", "error", "00000.jpg cannot be decoded"),
  ("grey 3 0", "non_rgb", "warning", "mode 'L' (grey)"),
  ("grey_alpha 3 0", "non_rgb", "warning", "mode 'LA'"),
  ("rgba 3 0", "non_rgb", "warning", "mode 'RGBA'"),
  ("cmyk 3 0", "non_rgb", "warning", "mode 'CMYK'"),
  ("sixteen 3 0", "non_rgb", "warning", "mode 'I;16' (16-bit grey"),
  ("palette 3 0", "non_rgb", "warning", "mode 'P' (palette)"),
  ("good 4 0", "duplicate_clip", "error", "first on line 1"),
  ("good2 4 7", "bad_label", "error", r"label must be in [0, 6], got 7"),
  ("good2 4", "malformed_line", "error", "expected 3 fields"),
  ("good2 four 1", "malformed_line", "error", "num_frames must be an integer, got 'four'"),
  ("good2 -4 1", "bad_count", "error", "got -4"),
  ("mixed 3 1", "mixed_sizes", "error", "00002.jpg is 30x24"),
  ("stray 3 1", "ignored_files", "warning", "notes.txt"),
  ("nothing 3 1", "no_frames", "error", "holds no image files"),
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("frames")
  _clip(root, "good", 4)
  _clip(root, "good2", 4)
  _clip(root, "few", 4)
  _clip(root, "many", 4)
  (_clip(root, "empty_file", 3) / "00001.jpg").write_bytes(b"")
  truncated = _clip(root, "truncated", 3) / "00002.jpg"
  truncated.write_bytes(_jpeg_bytes(7)[:-300])
  (_clip(root, "garbage", 3) / "00000.jpg").write_bytes(
    np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes()
  )
  _clip(root, "grey", 3, "L")
  _clip(root, "grey_alpha", 3, "LA", "png")
  _clip(root, "rgba", 3, "RGBA", "png")
  _clip(root, "cmyk", 3, "CMYK", "jpg")
  _clip(root, "sixteen", 3, "I;16", "png")
  _clip(root, "palette", 3, "P", "png")
  _image("RGB", 0, size=_SIZE).resize((30, _SIZE)).save(_clip(root, "mixed", 3) / "00002.jpg")
  (_clip(root, "stray", 3) / "notes.txt").write_text("not a frame")
  (root / "nothing").mkdir()
  lst = root / "list.txt"
  lst.write_text("".join(line + "\n" for line, *_ in _CASES))
  return root, lst


@pytest.fixture(scope="module")
def report(dataset):
  root, lst = dataset
  return validate.validate_clips(lst, data_root=root, num_classes=7, num_threads=4)


def test_every_problem_has_its_kind_file_and_line(dataset, report):
  _, lst = dataset
  for line_no, (_, kind, severity, words) in enumerate(_CASES, start=1):
    found = [p for p in report.problems if p.line == line_no]
    if kind is None:
      assert not found, found
      continue
    assert [(p.kind, p.severity) for p in found] == [(kind, severity)], (line_no, found)
    assert words in found[0].message, (line_no, found[0].message)
    assert found[0].file == str(lst)
    assert found[0].format().startswith(f"{lst}:{line_no}: {severity} [{kind}]")


def test_report_summary(report):
  assert not report.ok
  errors = {i for i, (_, _, severity, _) in enumerate(_CASES, 1) if severity == "error"}
  assert report.bad_lines == errors
  assert len(report.warnings) == 7
  assert report.num_clips == len(_CASES)
  text = report.format()
  assert text.endswith(
    f"{len(_CASES)} clips checked: {len(errors)} errors, 7 warnings (rgb_policy='convert')"
  )
  with pytest.raises(validate.ValidationError, match="too_few_frames"):
    report.raise_for_errors()


def test_shards_merge_into_the_whole_report(dataset, report):
  """Processes that each validate a share of the clips get, merged, the one-process report."""
  root, lst = dataset
  shards = [
    validate.validate_clips(
      lst, data_root=root, num_classes=7, num_threads=2, shard=(i, 3)
    ).to_json()
    for i in range(3)
  ]
  assert all(s["problems"] for s in shards)  # every shard found some of the problems
  assert sum(len(s["problems"]) for s in shards) == len(report.problems)
  assert validate.ValidationReport.merge(json.loads(json.dumps(shards))) == report
  with pytest.raises(ValueError, match="shard"):
    validate.validate_clips(lst, data_root=root, shard=(3, 3))


def test_truncated_jpeg_message_comes_from_pil(report):
  (problem,) = [p for p in report.problems if p.clip == "truncated"]
  assert "truncated" in problem.message


def test_non_rgb_converted_or_rejected(dataset):
  root, _ = dataset
  lst = root / "modes.txt"
  lst.write_text("grey 3 0\nrgba 3 1\ncmyk 3 2\nsixteen 3 3\npalette 3 4\ngood 4 0\n")
  converted = validate.validate_clips(lst, data_root=root, num_classes=7)
  assert converted.ok and len(converted.warnings) == 5
  assert all(
    "converted to RGB when loaded (rgb_policy='convert')" in p.message for p in converted.warnings
  )
  assert "values above 255 are clipped" in converted.warnings[3].message
  rejected = validate.validate_clips(lst, data_root=root, num_classes=7, rgb_policy="reject")
  assert not rejected.ok and rejected.bad_lines == {1, 2, 3, 4, 5}
  assert all(
    "rejected (rgb_policy='reject')" in p.message and p.severity == "error"
    for p in rejected.problems
  )
  with pytest.raises(ValueError, match="rgb_policy"):
    validate.validate_clips(lst, rgb_policy="drop")


def test_annotation_objects_and_class_names(dataset):
  root, _ = dataset
  clip = annotations.ClipAnnotation(
    frame_dir=root / "good", num_frames=4, label=9, line_no=3, source=pathlib.Path("mem.txt")
  )
  report = validate.validate_clips([clip, clip], class_names=("a", "b"))
  assert [(p.line, p.kind) for p in report.problems] == [(3, "bad_label"), (3, "bad_label")]
  ok = validate.validate_clips([clip], num_classes=10, check_images=False)
  assert ok.ok and ok.num_clips == 1


def test_truncated_images_policy_guard(dataset, monkeypatch):
  root, lst = dataset
  monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
  with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
    validate.validate_clips(lst, data_root=root)


def _cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "dfer_clip_jax.data.validate", *args],
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_cli_exit_codes(dataset):
  root, lst = dataset
  bad = _cli(f"--annotations={lst}", f"--data_root={root}", "--num_classes=7", "--threads=2")
  assert bad.returncode == 1, bad.stderr
  assert f"{lst}:3: error [too_few_frames] few:" in bad.stdout
  good_list = root / "good.txt"
  good_list.write_text("good 4 0\ngrey 3 1\n")  # A warning only: still a success.
  good = _cli(f"--annotations={good_list}", f"--data_root={root}", "--classes=dfew", "--noprogress")
  assert good.returncode == 0, good.stdout + good.stderr
  assert "2 clips checked: 0 errors, 1 warnings" in good.stdout
