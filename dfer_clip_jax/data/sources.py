"""From a config to the train / validation / test clip sources of a run.

`config.data.source` picks frame folders + annotation lists (the reference format), packed TFDS
datasets, or the synthetic dataset (generated into the workdir when absent). Frame folders are
validated before training (`config.data.validate`): with `bad_clip_policy='error'` any problem
stops the run with the full report; with `'skip'` the bad clips are left out and every one is
listed, with why, in the log and in `<workdir>/skipped_clips.txt` (one line per clip:
`<list>:<line> <frame folder>: [kind] what is wrong`; clips found unreadable only while training
are added by the trainer).

Multi-process runs: process 0 alone generates the synthetic dataset, the others wait for it;
each process validates its own share of the frame folders and all of them get the whole report;
then every process checks that all of them built the same clip lists
(`check_same_on_all_processes`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Any

import jax
from absl import logging

from dfer_clip_jax import distributed
from dfer_clip_jax.data import annotations as annotations_lib
from dfer_clip_jax.data import augment as augment_lib
from dfer_clip_jax.data import datasets, loading, pipeline
from dfer_clip_jax.data import validate as validate_lib


@dataclasses.dataclass
class Sources:
  train: Any  # random-access clip source (record interface); None when not asked for
  val: Any | None  # carved from train (None when val_fraction is 0)
  test: Any
  class_names: tuple[str, ...]
  skipped: list[str] = dataclasses.field(default_factory=list)  # clips left out by validation


def class_names(config) -> tuple[str, ...]:
  """The run's class names in label order (the registry's, or the classes file's)."""
  return datasets.get(config.dataset).classes(config.data.classes_file)


def train_augmentation(config) -> augment_lib.Augmentation:
  """The run's train augmentation: the dataset's op (or `data.augment`) and its settings."""
  d = config.data
  op = datasets.get(config.dataset).augment_op if d.augment == "dataset" else d.augment
  return augment_lib.Augmentation(
    op="" if op == "none" else op,
    crop_min_area=d.crop_min_area,
    fix_short_sampling=d.fix_short_sampling,
  )


def _synthetic_lists(
  data, workdir: pathlib.Path, num_classes: int
) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
  from dfer_clip_jax.data import synthetic  # pylint: disable=g-import-not-at-top

  root = pathlib.Path(data.synthetic_dir) if data.synthetic_dir else workdir / "synthetic"
  train, test = root / "train.txt", root / "test.txt"

  def generate_once() -> None:
    if train.is_file() and test.is_file():
      return
    logging.info("generating the synthetic dataset (%d clips) into %s", data.synthetic_clips, root)
    print(f"Generating {data.synthetic_clips} synthetic clips into {root} ...", flush=True)
    synthetic.generate(
      root,
      num_classes=num_classes,
      num_clips=data.synthetic_clips,
      seed=0,
      image_size=data.synthetic_size,
      max_frames=data.synthetic_max_frames,
      overwrite=True,
    )

  # Every process would race to write the same files: process 0 alone decides and generates,
  # the others wait for it (and fail with its error if it fails).
  distributed.run_on_primary("generating the synthetic dataset", generate_once)
  return root, train, test


def _folder_source(
  path: pathlib.Path, root: pathlib.Path | None, class_names, data, skipped: list[str]
):
  anns = annotations_lib.read_annotations(path, data_root=root, num_classes=len(class_names))
  if data.validate:

    def validate_part() -> dict[str, Any]:
      return validate_lib.validate_clips(
        anns,
        class_names=class_names,
        progress=distributed.is_primary(),
        shard=(jax.process_index(), jax.process_count()),
      ).to_json()

    # Each process reads the frames of its own share of the clips; all get the whole report,
    # so they leave out the same clips (or stop with the same error).
    report = validate_lib.ValidationReport.merge(
      distributed.run_on_every_process(f"validating {path}", validate_part)
    )
    if report.warnings and distributed.is_primary():
      logging.warning("%s: %d warnings\n%s", path, len(report.warnings), report.format())
    if not report.ok and data.bad_clip_policy == "error":
      raise validate_lib.ValidationError(
        f"{path}: {len(report.errors)} problems (set data.bad_clip_policy=skip to leave the "
        f"bad clips out)\n{report.format()}"
      )
    bad = report.bad_lines
    if bad:
      why: dict[int, list[str]] = {}
      for p in report.errors:
        why.setdefault(p.line, []).append(f"[{p.kind}] {p.message}")
      for a in anns:
        if a.line_no in bad:
          skipped.append(f"{a.origin} {a.frame_dir}: {'; '.join(why[a.line_no])}")
      logging.warning("%s: leaving out %d bad clips:\n%s", path, len(bad), report.format())
      anns = [a for a in anns if a.line_no not in bad]
  return annotations_lib.FrameFolderSource(anns)


def _digest(sources: Sources) -> str:
  """What every process must agree on: class names, and each split's clips and labels."""
  h = hashlib.sha256(json.dumps(list(sources.class_names)).encode())
  for name in ("train", "val", "test"):
    source = getattr(sources, name)
    h.update(f"|{name}:{-1 if source is None else len(source)}".encode())
    if source is None:
      continue
    annotations = getattr(source, "annotations", None)
    if annotations is not None:
      rows = [(a.clip_id, a.num_frames, a.label) for a in annotations]
    else:
      rows = list(source.labels)
    h.update(json.dumps(rows).encode())
  return h.hexdigest()


def check_same_on_all_processes(sources: Sources) -> None:
  """Raises on every process if any process built different sources (e.g. per-host copies of
  the annotation lists that differ); a silent mismatch would train on a mix of datasets."""
  digests = distributed.gather_json(_digest(sources))
  if len(set(digests)) > 1:
    differ = [i for i, d in enumerate(digests) if d != digests[0]]
    raise ValueError(
      f"processes {differ} built different train/val/test clip lists than process 0 (clip "
      "ids, frame counts or labels differ): every process must read the same annotation "
      "lists / packed dataset (check data.root, data.train_list, data.test_list and "
      "data.packed_dir on every host)"
    )


def _list_path(dataset, given: str, root: pathlib.Path | None, split: str, fold: int):
  """The annotation list of `split`: `given` (`{fold}` = the fold number: one command line for
  every fold; made absolute by `config_lib.resolve_paths`), else the dataset's own list in
  `data.root` (the registry's naming)."""
  if given:
    return pathlib.Path(given.format(fold=fold))
  if root is None:
    raise ValueError(
      f"data.source=folders needs data.root (the {dataset.name} folder holding its lists: "
      f"{dataset.list_file(split, fold)}) or data.{split}_list (annotation lists: "
      "'<frame_dir> <num_frames> <label>' per line)"
    )
  found = dataset.find_list(root, split, fold)
  if found is None:
    raise FileNotFoundError(
      f"data.{split}_list is not set and {dataset.missing_list(root, split, fold)}; give it "
      f"with --config.data.{split}_list=PATH"
    )
  return found


def build_sources(
  config, workdir: str | pathlib.Path, splits: tuple[str, ...] = ("train", "test")
) -> Sources:
  """The run's sources from `config.data` (see `config_lib.base_config`).

  `splits` names the lists to read and validate: ("test",) for an evaluation, which then does
  not read (or validate) a training list it does not use; train and val are None then.
  """
  unknown = sorted(set(splits) - {"train", "test"})
  if unknown or not splits:
    raise ValueError(f"splits={splits!r}: expected a non-empty subset of ('train', 'test')")
  data = config.data
  workdir = pathlib.Path(workdir)
  dataset = datasets.get(config.dataset)
  dataset.check_fold(config.fold)
  names = dataset.classes(data.classes_file)
  skipped: list[str] = []
  if data.source == "packed":
    from dfer_clip_jax.data import packed  # pylint: disable=g-import-not-at-top

    name = data.packed_name.format(fold=config.fold) or dataset.packed(config.fold)
    train, test = (
      packed.packed_source(data.packed_dir, name, split) if split in splits else None
      for split in ("train", "test")
    )
  elif data.source in ("folders", "synthetic"):
    if data.source == "synthetic":
      root, train_list, test_list = _synthetic_lists(data, workdir, len(names))
      train_list = train_list if "train" in splits else None
      test_list = test_list if "test" in splits else None
    else:
      root = pathlib.Path(data.root) if data.root else None
      train_list, test_list = (
        _list_path(dataset, given, root, split, config.fold) if split in splits else None
        for given, split in ((data.train_list, "train"), (data.test_list, "test"))
      )
    train, test = (
      _folder_source(path, root, names, data, skipped) if path is not None else None
      for path in (train_list, test_list)
    )
  else:
    raise ValueError(f"data.source={data.source!r}: expected folders, packed or synthetic")
  val = None
  if data.val_fraction > 0 and train is not None:
    train_idx, val_idx = pipeline.split_train_val(
      list(train.labels), data.val_fraction, data.val_seed
    )
    train, val = loading.SubsetSource(train, train_idx), loading.SubsetSource(train, val_idx)
  sources = Sources(train=train, val=val, test=test, class_names=names, skipped=skipped)
  if jax.process_count() > 1:
    check_same_on_all_processes(sources)
  # The run's record of what training left out (an evaluation reports its own in its metrics).
  if skipped and train is not None and distributed.is_primary():
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "skipped_clips.txt").write_text("\n".join(skipped) + "\n")
  return sources
