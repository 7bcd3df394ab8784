"""UAR / WAR / confusion matrix against hand-computed values, and the evaluation outputs."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from dfer_clip_jax import metrics

NAMES = ("a", "b", "c", "d", "e")
# Class 3 ("d") is in the labels but never predicted; class 4 ("e") is in neither.
LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
PREDS = np.array([0, 0, 1, 1, 0, 2, 2, 1, 0, 0])
EXPECTED_CM = np.array(
  [[2, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 2, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
)


def test_confusion_matrix_hand_computed():
  cm = metrics.confusion_matrix(LABELS, PREDS, 5)
  assert cm.dtype == np.int64
  np.testing.assert_array_equal(cm, EXPECTED_CM)


def test_summary_hand_computed():
  s = metrics.summarize(EXPECTED_CM, NAMES)
  # Recalls: a 2/3, b 1/2, c 2/4, d 0/1 (never predicted: counts as 0), e absent: excluded.
  assert s["per_class_recall"]["a"] == pytest.approx(200 / 3)
  assert s["per_class_recall"]["b"] == pytest.approx(50.0)
  assert s["per_class_recall"]["c"] == pytest.approx(50.0)
  assert s["per_class_recall"]["d"] == 0.0
  assert s["per_class_recall"]["e"] is None
  assert s["uar"] == pytest.approx((200 / 3 + 50 + 50 + 0) / 4)
  assert s["war"] == pytest.approx(50.0)  # 5 correct of 10
  assert s["classes_absent_from_labels"] == ["e"]
  assert s["counts"] == {
    "per_class": {"a": 3, "b": 2, "c": 4, "d": 1, "e": 0},
    "predicted": {"a": 5, "b": 3, "c": 2, "d": 0, "e": 0},
    "total": 10,
  }
  assert s["confusion_matrix"] == EXPECTED_CM.tolist()
  json.dumps(s, allow_nan=False)  # JSON-ready


def test_mask_drops_padding():
  # Padding rows carry an invalid label (-1): masked out they must neither count nor raise.
  labels = np.concatenate([LABELS, [-1, 0, 0]])
  preds = np.concatenate([PREDS, [0, 0, 4]])
  mask = np.concatenate([np.ones(10, bool), np.zeros(3, bool)])
  np.testing.assert_array_equal(metrics.confusion_matrix(labels, preds, 5, mask=mask), EXPECTED_CM)
  # 2-D batches (B, N) are flattened the same way.
  np.testing.assert_array_equal(
    metrics.confusion_matrix(
      labels.reshape(1, -1), preds.reshape(1, -1), 5, mask=mask.reshape(1, -1)
    ),
    EXPECTED_CM,
  )
  with pytest.raises(ValueError, match=r"labels has 1 ids outside \[0, 5\), e.g. -1"):
    metrics.confusion_matrix(labels, preds, 5)


def test_bad_inputs():
  with pytest.raises(ValueError, match="10 entries but preds has 9"):
    metrics.confusion_matrix(LABELS, PREDS[:9], 5)
  with pytest.raises(ValueError, match="preds has 1 ids outside"):
    metrics.confusion_matrix([0], [5], 5)
  with pytest.raises(ValueError, match="mask must be boolean"):
    metrics.confusion_matrix([0], [0], 5, mask=[1])
  with pytest.raises(ValueError, match=r"expected \(4, 4\)"):
    metrics.summarize(EXPECTED_CM, NAMES[:4])
  with pytest.raises(ValueError, match="empty"):
    metrics.summarize(np.zeros((5, 5), int), NAMES)


def test_write_eval_outputs(tmp_path):
  names = (
    "happiness",
    "sadness",
    "neutral",
    "anger",
    "surprise",
    "disgust",
    "fear",
    "contempt",
    "anxiety",
    "helplessness",
    "disappointment",
  )
  labels = np.array([0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 10])  # no "helplessness" (9)
  preds = np.array([0, 0, 1, 2, 2, 3, 4, 5, 6, 7, 9, 10])
  probs = np.full((12, 11), 0.01, np.float32)
  probs[np.arange(12), preds] = 0.9
  s = metrics.summarize(metrics.confusion_matrix(labels, preds, 11), names)
  ids = [f"clips/{i:03d}" for i in range(12)]
  paths = metrics.write_eval_outputs(
    tmp_path / "eval" / "best",
    metrics=s,
    clip_ids=ids,
    labels=labels,
    preds=preds,
    probs=probs,
    class_names=names,
  )

  assert json.loads(paths["metrics"].read_text()) == s

  with open(paths["predictions"], newline="") as fh:
    rows = list(csv.reader(fh))
  assert rows[0] == (
    ["clip_id", "label", "label_name", "prediction", "prediction_name"]
    + [f"prob_{n}" for n in names]
  )
  assert len(rows) == 13
  assert rows[4][:5] == ["clips/003", "1", "sadness", "2", "neutral"]
  np.testing.assert_array_equal(np.array(rows[4][5:], np.float32), probs[3])  # exact round trip

  with Image.open(paths["confusion_matrix"]) as img:
    img.load()
    assert img.format == "PNG" and img.mode == "RGB"
    assert 600 <= img.width <= 1600 and 600 <= img.height <= 1600
    colours = {c for _, c in img.getcolors(maxcolors=1 << 20)}
  # A 100% cell is drawn in the darkest colour; the row of the absent class is grey.
  assert metrics._colour(1.0) in colours
  assert (200, 200, 200) in colours


def test_eval_outputs_reject_mismatched_shapes(tmp_path):
  s = metrics.summarize(EXPECTED_CM, NAMES)
  with pytest.raises(ValueError, match=r"probs has shape \(10, 4\), expected \(10, 5\)"):
    metrics.write_eval_outputs(
      tmp_path,
      metrics=s,
      clip_ids=[str(i) for i in range(10)],
      labels=LABELS,
      preds=PREDS,
      probs=np.zeros((10, 4)),
      class_names=NAMES,
    )


def test_report_rows_and_table():
  history = [
    {"epoch": 1, "test": {"uar": 30.0, "war": 40.0}, "val": {"uar": 35.0, "war": 45.0}},
    {"epoch": 2, "test": {"uar": 38.0, "war": 55.5}, "val": {"uar": 50.0, "war": 52.0}},
    {"epoch": 3, "test": {"uar": 45.0, "war": 52.0}, "val": {"uar": 41.0, "war": 60.0}},
    {"epoch": 4, "test": {"uar": 44.0, "war": 51.0}, "val": {"uar": 50.0, "war": 50.0}},
  ]
  rows = metrics.report_rows(history)
  assert rows[metrics.ROW_LAST] == {"epoch": 4, "uar": 44.0, "war": 51.0}
  # Paper protocol: best *test WAR* (epoch 2), reporting that epoch's UAR.
  assert rows[metrics.ROW_PAPER] == {"epoch": 2, "uar": 38.0, "war": 55.5}
  # Best validation UAR: epochs 2 and 4 tie at 50, the earlier wins.
  assert rows[metrics.ROW_BEST_VAL] == {"epoch": 2, "uar": 38.0, "war": 55.5, "val_uar": 50.0}
  assert metrics.report_rows(history, val_metric="war")[metrics.ROW_BEST_VAL]["epoch"] == 3

  no_val = [dict(h, val=None) for h in history]
  rows_no_val = metrics.report_rows(no_val)
  assert rows_no_val[metrics.ROW_BEST_VAL] is None

  table = metrics.format_report_table(rows_no_val).splitlines()
  assert table[0].split() == ["result", "UAR", "%", "WAR", "%", "epoch"]
  assert table[2].split() == ["last", "epoch", "44.00", "51.00", "4"]
  assert table[3].split() == ["best", "by", "validation", "n/a", "n/a", "n/a"]
  assert table[4].split() == [
    "paper",
    "protocol",
    "(selected",
    "on",
    "test)",
    "38.00",
    "55.50",
    "2",
  ]
  with pytest.raises(ValueError, match="'last epoch' must be a dict with 'uar' and 'war'"):
    metrics.format_report_table({"last epoch": {"uar": 1.0}})


def test_fold_summary_and_markdown():
  per_fold = [
    {"fold": 1, "uar": 50.0, "war": 61.0},
    {"fold": 2, "uar": 60.0, "war": 62.0},
    {"fold": 3, "uar": 70.0, "war": 66.0},
  ]
  s = metrics.fold_summary(per_fold)
  assert s["num_folds"] == 3
  assert s["uar"] == pytest.approx({"mean": 60.0, "std": 10.0})  # sample std, ddof=1
  assert s["war"]["mean"] == pytest.approx(63.0)
  assert s["war"]["std"] == pytest.approx(np.sqrt(((61 - 63) ** 2 + 1 + 9) / 2))
  md = metrics.fold_table_markdown(s).splitlines()
  assert md[0] == "| fold | UAR % | WAR % |"
  assert md[2] == "| 1 | 50.00 | 61.00 |"
  assert md[-1] == "| mean ± std (3 folds) | 60.00 ± 10.00 | 63.00 ± 2.65 |"
  one = metrics.fold_summary([{"uar": 40.0, "war": 50.0}])
  assert one["uar"]["std"] is None and one["folds"][0]["fold"] == 1
  assert metrics.fold_table_markdown(one).splitlines()[-1] == (
    "| mean ± std (1 fold) | 40.00 | 50.00 |"
  )
  with pytest.raises(ValueError, match="fold entry 0 needs 'uar' and 'war'"):
    metrics.fold_summary([{"uar": 1.0}])
