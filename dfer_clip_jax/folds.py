r"""Runs (or resumes) every fold of a dataset and writes the mean ± std table over folds.

  python -m dfer_clip_jax.folds --config=configs/dfew.py --workdir=runs/dfew \
    --config.clip.checkpoint=clip-vit-base-patch32 --config.data.root=/data/DFEW

Each fold reads the dataset's own lists in data.root (DFEW_set_<fold>_train.txt, ...: the
registry's naming, `data/datasets.py`) unless data.train_list / data.test_list are given.

`{fold}` in data.train_list / data.test_list / data.packed_name is replaced by the fold number.
Each fold trains in `<workdir>/fold<k>` (rerunning resumes unfinished folds and skips finished
ones); the summary goes to `<workdir>/folds.md` and `<workdir>/folds.json`, with one table per
selection rule (last epoch, best by validation, paper protocol selected on test).
"""

import json
import pathlib

import jax
from absl import app, flags
from ml_collections import config_flags

from dfer_clip_jax import cli, config_lib, distributed, train
from dfer_clip_jax import metrics as metrics_lib
from dfer_clip_jax.data import datasets

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (configs/*.py[:args]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder holding one run folder per fold.")
_FOLDS = flags.DEFINE_list("folds", None, "Folds to run (default: all folds of the dataset).")
flags.mark_flags_as_required(["config", "workdir"])


def run_folds(config, workdir, folds=None) -> dict:
  """Trains/resumes each fold, then summarises; returns {row name: fold_summary}."""
  workdir = pathlib.Path(cli.absolute(workdir))
  folds = [int(f) for f in (folds or range(1, datasets.get(config.dataset).folds + 1))]
  per_fold = {}
  for fold in folds:
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.fold = fold
    c.lock()
    fold_dir = workdir / f"fold{fold}"
    if (fold_dir / "report.json").is_file():
      report = json.loads((fold_dir / "report.json").read_text())
      print(f"fold {fold}: finished earlier ({fold_dir / 'report.json'})", flush=True)
    else:
      print(f"fold {fold}: training in {fold_dir}", flush=True)
      report = train.train_and_evaluate(c, fold_dir)
    per_fold[fold] = report["rows"]
  summary = {}
  for row in (metrics_lib.ROW_LAST, metrics_lib.ROW_BEST_VAL, metrics_lib.ROW_PAPER):
    results = [{"fold": f, **rows[row]} for f, rows in per_fold.items() if rows.get(row)]
    if results:
      summary[row] = metrics_lib.fold_summary(results)
  if jax.process_index() == 0:
    md = [f"# {config.dataset}: {len(per_fold)} folds\n"]
    for row, s in summary.items():
      md.append(f"## {row}\n\n{metrics_lib.fold_table_markdown(s)}\n")
    (workdir / "folds.md").write_text("\n".join(md))
    (workdir / "folds.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(md), flush=True)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize(_CONFIG.value.distributed)
  run_folds(config_lib.resolve_paths(_CONFIG.value), cli.absolute(_WORKDIR.value), _FOLDS.value)


if __name__ == "__main__":
  app.run(main)
