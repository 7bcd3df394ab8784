"""Annotation lists, frame listing and the frame-folder source."""

import pathlib
import pickle

import pytest

from dfer_clip_jax.data import annotations, datasets


def _write(path: pathlib.Path, text: str) -> pathlib.Path:
  path.write_text(text)
  return path


def test_class_lists():
  assert datasets.DFEW_CLASSES == (
    "happiness",
    "sadness",
    "neutral",
    "anger",
    "surprise",
    "disgust",
    "fear",
  )
  assert datasets.MAFW_CLASSES[:7] == datasets.DFEW_CLASSES
  assert datasets.MAFW_CLASSES[7:] == ("contempt", "anxiety", "helplessness", "disappointment")
  assert datasets.get("ferv39k").classes() == datasets.DFEW_CLASSES
  assert len(datasets.get("synthetic11").classes()) == 11
  with pytest.raises(ValueError, match="unknown dataset"):
    datasets.get("kinetics")


def test_read_relative_absolute_and_data_root(tmp_path):
  lst = _write(tmp_path / "list.txt", "clips/a 20 3\n/abs/path/b 7 0\r\n\nclips/c 16 6\n")
  clips = annotations.read_annotations(lst, data_root="/data/DFEW", num_classes=7)
  assert [c.frame_dir for c in clips] == [
    pathlib.Path("/data/DFEW/clips/a"),
    pathlib.Path("/abs/path/b"),
    pathlib.Path("/data/DFEW/clips/c"),
  ]
  assert [(c.num_frames, c.label, c.line_no) for c in clips] == [(20, 3, 1), (7, 0, 2), (16, 6, 4)]
  assert clips[0].clip_id == "clips/a" and clips[0].origin == f"{lst}:1"
  # Without a data root, relative folders are relative to the list's folder.
  clips = annotations.read_annotations(lst)
  assert clips[0].frame_dir == tmp_path / "clips/a"


@pytest.mark.parametrize(
  "line, kind, match",
  [
    ("clips/a 20", "malformed_line", "expected 3 fields"),
    ("clips/a 20 3 extra", "malformed_line", "got 4"),
    ("clips/a twenty 3", "malformed_line", "num_frames must be an integer, got 'twenty'"),
    ("clips/a 20 3.0", "malformed_line", "label must be an integer, got '3.0'"),
    ("clips/a -4 3", "bad_count", "got -4"),
    ("clips/a 0 3", "bad_count", "at least one frame"),
    ("clips/a 20 7", "bad_label", r"label must be in \[0, 6\], got 7"),
    ("clips/a 20 -1", "bad_label", "got -1"),
  ],
)
def test_each_malformed_line_names_file_and_line(tmp_path, line, kind, match):
  lst = _write(tmp_path / "list.txt", f"clips/ok 30 1\n{line}\n")
  with pytest.raises(annotations.AnnotationError, match=match) as info:
    annotations.read_annotations(lst, num_classes=7)
  err = info.value
  assert err.file == lst and err.line == 2
  assert [e.kind for e in err.errors] == [kind]
  assert str(err).startswith(f"{lst}:2: ")


def test_all_bad_lines_reported_and_duplicates(tmp_path):
  lst = _write(tmp_path / "list.txt", "a 10 1\nb 10\nc x 1\na 10 1\nd/../a 12 2\ne 5 9\n")
  clips, errors = annotations.scan_annotations(lst, num_classes=7)
  assert [c.clip_id for c in clips] == ["a"]
  assert [(e.line, e.kind) for e in errors] == [
    (2, "malformed_line"),
    (3, "malformed_line"),
    (4, "duplicate_clip"),
    (5, "duplicate_clip"),
    (6, "bad_label"),
  ]
  assert "first on line 1" in errors[2].message
  with pytest.raises(annotations.AnnotationError) as info:
    annotations.read_annotations(lst, num_classes=7)
  assert str(info.value).count("\n") == 4  # One line per problem.


def test_empty_list_is_an_error(tmp_path):
  with pytest.raises(annotations.AnnotationError, match="no clips"):
    annotations.read_annotations(_write(tmp_path / "empty.txt", "\n\n"))


def test_list_frames_sorted_as_strings_images_only(tmp_path):
  d = tmp_path / "clip"
  d.mkdir()
  for name in ("10.jpg", "9.jpg", "2.PNG", "notes.txt", ".hidden.jpg", "1.jpeg"):
    (d / name).write_bytes(b"x")
  (d / "sub.jpg").mkdir()  # A folder named like an image is not a frame.
  assert [p.name for p in annotations.list_frames(d)] == ["1.jpeg", "10.jpg", "2.PNG", "9.jpg"]
  with pytest.raises(FileNotFoundError):
    annotations.list_frames(tmp_path / "missing")


def test_frame_folder_source(tmp_path):
  for name, count in (("a", 3), ("b", 2)):
    (tmp_path / name).mkdir()
    for i in range(count):
      (tmp_path / name / f"{i:03d}.jpg").write_bytes(b"x")
  lst = _write(tmp_path / "list.txt", "a 3 1\nb 2 4\nmissing 5 0\n")
  source = annotations.FrameFolderSource.from_file(lst, num_classes=7)
  assert len(source) == 3 and source.labels == [1, 4, 0]
  record = source[1]
  assert record == {
    "clip_id": "b",
    "label": 4,
    "num_frames": 2,
    "frames": [str(tmp_path / "b" / "000.jpg"), str(tmp_path / "b" / "001.jpg")],
    "origin": f"{lst}:2",
  }
  with pytest.raises(FileNotFoundError, match=r"list.txt:3: frame folder .*missing"):
    source[2]
  with pytest.raises(IndexError):
    source[3]
  # Picklable: grain worker processes receive the source.
  assert pickle.loads(pickle.dumps(source))[0]["frames"] == source[0]["frames"]


def test_reference_absolute_paths_are_rerooted_under_data_root(tmp_path):
  """The reference's lists hold the authors' absolute paths; they work given the data root."""
  from PIL import Image

  root = tmp_path / "DFEW"
  for clip in ("00001", "00002"):
    (root / "DFEW_Frame_Face" / clip).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "DFEW_Frame_Face" / clip / "1.jpg")
  lst = tmp_path / "set_1_train.txt"
  lst.write_text(
    "/data/EECS-IoannisLab/datasets/DFEW/DFEW_Frame_Face/00001 1 0\n"
    "/data/EECS-IoannisLab/datasets/DFEW/DFEW_Frame_Face/00002 1 3\n"
  )
  anns = annotations.read_annotations(lst, data_root=root, num_classes=7)
  assert [a.frame_dir for a in anns] == [
    root / "DFEW_Frame_Face" / "00001",
    root / "DFEW_Frame_Face" / "00002",
  ]
  assert all(a.frame_dir.is_dir() for a in anns)
