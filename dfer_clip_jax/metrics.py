"""Classification metrics (UAR, WAR, per-class recall, confusion matrix) and their outputs.

WAR (weighted average recall) is plain accuracy over the counted clips; UAR (unweighted average
recall) is the mean of the per-class recalls, i.e. the mean of the diagonal of the row-normalised
confusion matrix (docs/method.md, Evaluation). Both are reported in percent.

Also here: the files an evaluation writes (`metrics.json`, `predictions.csv`,
`confusion_matrix.png`, the image drawn with PIL only), the final report's rows (last epoch, best
by validation, the paper's protocol of selecting on test) and the mean +- std over folds.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dfer_clip_jax.plotting import load_font, text_size

ROW_LAST = "last epoch"
ROW_BEST_VAL = "best by validation"
ROW_PAPER = "paper protocol (selected on test)"


def confusion_matrix(labels, preds, num_classes: int, mask=None) -> np.ndarray:
  """Counts (C, C) int64; row = true class, column = predicted class.

  Args:
    labels: true class ids, any shape (flattened).
    preds: predicted class ids, same shape as `labels`.
    num_classes: C.
    mask: optional booleans of the same shape; only clips where it is True are counted (e.g. to
      drop the padding of the last, partial batch).
  """
  labels_N = np.asarray(labels).reshape(-1)
  preds_N = np.asarray(preds).reshape(-1)
  if labels_N.shape != preds_N.shape:
    raise ValueError(f"labels has {labels_N.size} entries but preds has {preds_N.size}")
  if mask is not None:
    mask_N = np.asarray(mask).reshape(-1)
    if mask_N.shape != labels_N.shape:
      raise ValueError(f"mask has {mask_N.size} entries but labels has {labels_N.size}")
    if mask_N.dtype != np.bool_:
      raise ValueError(f"mask must be boolean, got dtype {mask_N.dtype}")
    labels_N, preds_N = labels_N[mask_N], preds_N[mask_N]
  for name, ids in (("labels", labels_N), ("preds", preds_N)):
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"{name} must be integer class ids, got dtype {ids.dtype}")
    bad = np.flatnonzero((ids < 0) | (ids >= num_classes))
    if bad.size:
      raise ValueError(
        f"{name} has {bad.size} ids outside [0, {num_classes}), e.g. "
        f"{int(ids[bad[0]])} at counted position {int(bad[0])}"
      )
  flat = labels_N.astype(np.int64) * num_classes + preds_N.astype(np.int64)
  return (
    np.bincount(flat, minlength=num_classes * num_classes)
    .reshape(num_classes, num_classes)
    .astype(np.int64)
  )


def summarize(confusion: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
  """UAR, WAR, per-class recall, confusion matrix and counts, JSON-ready.

  Returns a dict with
    war: accuracy in % over all counted clips.
    uar: mean, over the classes *present in the labels* (support > 0), of the per-class recall
      in %. A class absent from the labels has no recall (it is reported as None and excluded
      from the mean, not counted as 0); a class present in the labels but never predicted has
      recall 0 and counts.
    per_class_recall: {class name: recall in % or None when the class has no clips}.
    confusion_matrix: the counts as a list of lists (row = true class).
    counts: {"per_class": {name: clips with that label}, "predicted": {name: clips predicted as
      it}, "total": clips counted}.
    classes_absent_from_labels: names of the classes with no clips.
  """
  cm_CxC = np.asarray(confusion)
  c = len(class_names)
  if cm_CxC.shape != (c, c):
    raise ValueError(
      f"confusion matrix has shape {cm_CxC.shape}, expected ({c}, {c}) for {c} class names"
    )
  total = int(cm_CxC.sum())
  if total == 0:
    raise ValueError("the confusion matrix is empty: no clip was counted")
  support_C = cm_CxC.sum(axis=1)
  correct_C = np.diag(cm_CxC)
  recall = {}
  for i, name in enumerate(class_names):
    recall[name] = (100.0 * float(correct_C[i]) / float(support_C[i])) if support_C[i] else None
  present = [r for r in recall.values() if r is not None]
  return {
    "uar": float(np.mean(present)),
    "war": 100.0 * float(correct_C.sum()) / total,
    "per_class_recall": recall,
    "confusion_matrix": cm_CxC.astype(int).tolist(),
    "counts": {
      "per_class": {n: int(s) for n, s in zip(class_names, support_C)},
      "predicted": {n: int(s) for n, s in zip(class_names, cm_CxC.sum(axis=0))},
      "total": total,
    },
    "classes_absent_from_labels": [n for n, s in zip(class_names, support_C) if s == 0],
    "class_names": list(class_names),
  }


# ----------------------------------------------------------------------------------------------
# Evaluation outputs.


def write_eval_outputs(
  out_dir: str | os.PathLike,
  *,
  metrics: Mapping[str, Any],
  clip_ids: Sequence[str],
  labels,
  preds,
  probs,
  class_names: Sequence[str],
) -> dict[str, pathlib.Path]:
  """Writes `metrics.json`, `predictions.csv` and `confusion_matrix.png` into `out_dir`.

  Args:
    out_dir: created if absent.
    metrics: what `summarize` returned (plus anything else JSON-serialisable); its
      `confusion_matrix`, `uar` and `war` are drawn in the image.
    clip_ids: (N,) clip identifiers (e.g. frame folder paths).
    labels, preds: (N,) class ids.
    probs: (N, C) class probabilities.
    class_names: C names in label order.

  Returns:
    {"metrics": path, "predictions": path, "confusion_matrix": path}.
  """
  c = len(class_names)
  labels_N, preds_N = np.asarray(labels).reshape(-1), np.asarray(preds).reshape(-1)
  probs_NxC = np.asarray(probs)
  n = len(clip_ids)
  if labels_N.shape != (n,) or preds_N.shape != (n,):
    raise ValueError(f"{n} clip ids but {labels_N.size} labels and {preds_N.size} predictions")
  if probs_NxC.shape != (n, c):
    raise ValueError(f"probs has shape {probs_NxC.shape}, expected ({n}, {c})")
  for name, ids in (("labels", labels_N), ("preds", preds_N)):
    if n and (ids.min() < 0 or ids.max() >= c):
      raise ValueError(f"{name} holds ids outside [0, {c})")
  if "confusion_matrix" not in metrics:
    raise ValueError("metrics has no 'confusion_matrix': pass what metrics.summarize returned")

  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = {
    "metrics": out / "metrics.json",
    "predictions": out / "predictions.csv",
    "confusion_matrix": out / "confusion_matrix.png",
  }
  paths["metrics"].write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")

  with open(paths["predictions"], "w", newline="", encoding="utf-8") as fh:
    writer = csv.writer(fh)
    writer.writerow(
      ["clip_id", "label", "label_name", "prediction", "prediction_name"]
      + [f"prob_{name}" for name in class_names]
    )
    for i in range(n):
      y, p = int(labels_N[i]), int(preds_N[i])
      # 9 significant digits round-trip float32 exactly, so two runs' files compare bit for bit.
      writer.writerow(
        [clip_ids[i], y, class_names[y], p, class_names[p]]
        + [f"{float(v):.9g}" for v in probs_NxC[i]]
      )

  title = f"UAR {metrics['uar']:.2f}%   WAR {metrics['war']:.2f}%   (row-normalised %)"
  image = render_confusion_matrix(np.asarray(metrics["confusion_matrix"]), class_names, title=title)
  image.save(paths["confusion_matrix"], format="PNG")
  return paths


def _colour(fraction: float) -> tuple[int, int, int]:
  """White (0) to dark blue (1)."""
  lo, hi = np.array([247, 251, 255]), np.array([8, 48, 107])
  return tuple(int(round(v)) for v in lo + (hi - lo) * min(max(fraction, 0.0), 1.0))


def render_confusion_matrix(
  confusion: np.ndarray, class_names: Sequence[str], *, title: str = "", cell: int = 64
) -> Image.Image:
  """The row-normalised confusion matrix (% of each true class) as an RGB image.

  Class names label both axes (columns rotated), each cell shows its percentage, rows of classes
  without clips are grey and marked "n/a". Drawn with PIL only.
  """
  cm_CxC = np.asarray(confusion, dtype=np.float64)
  c = len(class_names)
  if cm_CxC.shape != (c, c):
    raise ValueError(f"confusion matrix has shape {cm_CxC.shape}, expected ({c}, {c})")
  support_C = cm_CxC.sum(axis=1)
  pct_CxC = np.divide(
    100.0 * cm_CxC, support_C[:, None], out=np.zeros_like(cm_CxC), where=support_C[:, None] > 0
  )

  label_font, cell_font, title_font = load_font(15), load_font(14), load_font(18)
  pad = 10
  name_w = max(text_size(label_font, n)[0] for n in class_names)
  name_h = max(text_size(label_font, n)[1] for n in class_names)
  axis_h = text_size(label_font, "predicted")[1]
  title_h = text_size(title_font, title or "Ag")[1]
  # Left: rotated "true" axis title + row names; top: title, "predicted", rotated column names.
  grid_x0 = pad + axis_h + pad + name_w + pad
  grid_y0 = 2 * pad + title_h + pad + axis_h + pad + name_w + pad
  title_w = text_size(title_font, title)[0]
  width = max(grid_x0 + c * cell + pad, title_w + 2 * pad)
  height = grid_y0 + c * cell + pad
  img = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(img)

  draw.text((max(pad, (width - title_w) // 2), pad), title, fill="black", font=title_font)
  pred_w = text_size(label_font, "predicted")[0]
  draw.text(
    (grid_x0 + (c * cell - pred_w) // 2, 2 * pad + title_h + pad // 2),
    "predicted",
    fill="black",
    font=label_font,
  )
  true_w = text_size(label_font, "true")[0]
  _paste_rotated(img, "true", label_font, (pad, grid_y0 + (c * cell - true_w) // 2))

  for i, name in enumerate(class_names):
    w, _ = text_size(label_font, name)
    # Row names right-aligned against the grid; column names rotated, bottom-aligned.
    draw.text(
      (grid_x0 - pad - w, grid_y0 + i * cell + (cell - name_h) // 2),
      name,
      fill="black",
      font=label_font,
    )
    _paste_rotated(
      img, name, label_font, (grid_x0 + i * cell + (cell - name_h) // 2, grid_y0 - pad - w)
    )

  for i in range(c):
    for j in range(c):
      x0, y0 = grid_x0 + j * cell, grid_y0 + i * cell
      if support_C[i] == 0:
        fill, text, ink = (200, 200, 200), "n/a", "black"
      else:
        frac = pct_CxC[i, j] / 100.0
        fill, text = _colour(frac), f"{pct_CxC[i, j]:.1f}"
        ink = "white" if frac > 0.5 else "black"
      draw.rectangle([x0, y0, x0 + cell, y0 + cell], fill=fill, outline=(160, 160, 160))
      tw, th = text_size(cell_font, text)
      draw.text((x0 + (cell - tw) // 2, y0 + (cell - th) // 2), text, fill=ink, font=cell_font)
  return img


def _paste_rotated(img: Image.Image, text: str, font, xy: tuple[int, int]) -> None:
  """Draws `text` rotated 90 degrees counter-clockwise with its top-left corner at `xy`."""
  left, top, right, bottom = font.getbbox(text)
  tile = Image.new("L", (right - left + 2, bottom - top + 2), 0)
  ImageDraw.Draw(tile).text((-left + 1, -top + 1), text, fill=255, font=font)
  tile = tile.rotate(90, expand=True)
  img.paste(Image.new("RGB", tile.size, "black"), xy, mask=tile)


# ----------------------------------------------------------------------------------------------
# Final report and folds.


def selection_key(entry: Mapping[str, Any], metric: str = "uar") -> tuple[float, float]:
  """The one rule that picks "the best" epoch; higher keys are better.

  `entry` is one evaluated epoch ({"epoch", "test", "val"}, as in the trainer's history). With
  a validation split the epoch is ranked by its validation `metric`; without one (the paper
  protocol) by its test WAR, as the reference does. Ties go to the earlier epoch (the reference
  only replaces its best on a strictly better value). The report's "best by validation" row,
  the checkpoint kept as best, `--checkpoint=best`, predict's `--which=best` and the folds
  table all rank with this key.
  """
  if entry.get("val") is not None:
    value = entry["val"][metric]
  else:
    value = entry["test"]["war"]
  return (float(value), -float(entry["epoch"]))


def report_rows(
  history: Sequence[Mapping[str, Any]], *, val_metric: str = "uar"
) -> dict[str, dict[str, Any] | None]:
  """The report's three rows from per-epoch results.

  Args:
    history: one dict per evaluated epoch, in order: {"epoch": int, "step": int, "test": {"uar",
      "war", ...}, "val": {"uar", "war", ...} or None}.
    val_metric: validation metric that selects the "best by validation" epoch (higher is better).

  Returns:
    {ROW_LAST: row, ROW_BEST_VAL: row or None (no validation results), ROW_PAPER: row}, each row
    {"epoch", "step", "uar", "war"} of the *test* split at the selected epoch. Both selections
    rank with `selection_key`: best by validation on the validation metric, the paper protocol
    (docs/method.md, Evaluation) on test WAR, ties to the earliest epoch.
  """
  if not history:
    raise ValueError("no evaluated epochs: cannot build a report")
  for k, h in enumerate(history):
    if "epoch" not in h or not isinstance(h.get("test"), Mapping):
      raise ValueError(f"history entry {k} needs 'epoch' and a 'test' dict, got keys {sorted(h)}")

  def row(h):
    out = {"epoch": int(h["epoch"])}
    if h.get("step") is not None:
      out["step"] = int(h["step"])
    return out | {"uar": float(h["test"]["uar"]), "war": float(h["test"]["war"])}

  paper = max(history, key=lambda h: selection_key({**h, "val": None}))
  with_val = [h for h in history if h.get("val") is not None]
  best_val = None
  if with_val:
    best = max(with_val, key=lambda h: selection_key(h, val_metric))
    best_val = row(best) | {"val_" + val_metric: float(best["val"][val_metric])}
  return {ROW_LAST: row(history[-1]), ROW_BEST_VAL: best_val, ROW_PAPER: row(paper)}


def _fmt(value: Any, spec: str = ".2f") -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "n/a"
  return format(value, spec) if isinstance(value, float) else str(value)


def format_report_table(report: Mapping[str, Mapping[str, Any] | None]) -> str:
  """A console table, one line per row: `{row name: {"uar", "war", "epoch"} or None}`.

  A None row (e.g. no validation split) prints as n/a. Percentages with two decimals.
  """
  header = ("result", "UAR %", "WAR %", "epoch")
  lines = []
  for name, row in report.items():
    if row is None:
      lines.append((name, "n/a", "n/a", "n/a"))
      continue
    if not isinstance(row, Mapping) or not {"uar", "war"} <= set(row):
      raise ValueError(f"report row {name!r} must be a dict with 'uar' and 'war', got {row!r}")
    lines.append((name, _fmt(float(row["uar"])), _fmt(float(row["war"])), _fmt(row.get("epoch"))))
  widths = [max(len(r[i]) for r in [header, *lines]) for i in range(4)]

  def fmt_line(r):
    return "  ".join([r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in (1, 2, 3)])

  rule = "-" * (sum(widths) + 6)
  return "\n".join([fmt_line(header), rule, *[fmt_line(r) for r in lines]])


def fold_summary(per_fold: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Mean and sample standard deviation (ddof=1) of per-fold UAR and WAR.

  Args:
    per_fold: one dict per fold with "uar" and "war" (%) and optionally "fold" (its id; the
      position + 1 otherwise).

  Returns:
    {"num_folds", "folds": [{"fold", "uar", "war"}], "uar": {"mean", "std"}, "war": {"mean",
    "std"}}; std is None for a single fold.
  """
  if not per_fold:
    raise ValueError("no folds to summarise")
  folds = []
  for k, f in enumerate(per_fold):
    if "uar" not in f or "war" not in f:
      raise ValueError(f"fold entry {k} needs 'uar' and 'war', got keys {sorted(f)}")
    folds.append({"fold": f.get("fold", k + 1), "uar": float(f["uar"]), "war": float(f["war"])})
  out: dict[str, Any] = {"num_folds": len(folds), "folds": folds}
  for key in ("uar", "war"):
    values = np.array([f[key] for f in folds])
    out[key] = {
      "mean": float(values.mean()),
      "std": float(values.std(ddof=1)) if len(values) > 1 else None,
    }
  return out


def fold_table_markdown(summary: Mapping[str, Any]) -> str:
  """A markdown table: one line per fold, then `mean ± std`."""

  def mean_std(stat):
    return (
      f"{stat['mean']:.2f} ± {stat['std']:.2f}"
      if stat["std"] is not None
      else f"{stat['mean']:.2f}"
    )

  lines = ["| fold | UAR % | WAR % |", "|---|---:|---:|"]
  lines += [f"| {f['fold']} | {f['uar']:.2f} | {f['war']:.2f} |" for f in summary["folds"]]
  n = summary["num_folds"]
  lines.append(
    f"| mean ± std ({n} fold{'s' if n != 1 else ''}) | {mean_std(summary['uar'])} | "
    f"{mean_std(summary['war'])} |"
  )
  return "\n".join(lines) + "\n"
