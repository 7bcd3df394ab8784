"""The dataset registry: one entry per dataset holds its facts.

An entry gives the class names in label order, the number of folds, the dataset-specific train
augmentation op (`augment.DATASET_OPS`), the one naming of its annotation lists (the names the
authors' annotation files carry, e.g. `DFEW_set_1_train.txt`, found in `annotation/`,
`annotations/` or the dataset folder itself) and the name of its packed (TFDS) dataset. Configs,
training (`data.train_list` / `data.test_list` default to these lists under `data.root`), the
fold runner and the TFDS builders read it; adding a dataset is one `register` call here plus one
config file.

The label order of the paper datasets is the reference's (docs/method.md, Data): for MAFW it is
*not* MAFW's native order: the reference remapped MAFW so that its first seven classes coincide
with DFEW's. `custom` is a user's own dataset: its class names come from a file (`classes.txt`,
one name per line, in label order; `data.classes_file`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

DFEW_CLASSES: tuple[str, ...] = (
  "happiness",
  "sadness",
  "neutral",
  "anger",
  "surprise",
  "disgust",
  "fear",
)
MAFW_CLASSES: tuple[str, ...] = DFEW_CLASSES + (
  "contempt",
  "anxiety",
  "helplessness",
  "disappointment",
)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """The facts of one dataset.

  Attributes:
    name: the registry key (`config.dataset`).
    class_names: label order; empty when they come from a classes file (`custom`).
    folds: number of train/test folds (1 = one split).
    augment_op: the dataset-specific train augmentation before the crop ("brightness",
      "rotation" or "" for none; see `augment.DATASET_OPS`).
    list_name: the annotation lists' file name, `{split}` (train, test) and `{fold}` filled in
      (matched case-insensitively, in one of `LIST_FOLDERS`).
    packed_name: the packed dataset's name for `packed.packed_source`, `{fold}` filled in.
  """

  name: str
  class_names: tuple[str, ...]
  folds: int = 1
  augment_op: str = ""
  list_name: str = "{split}.txt"
  packed_name: str = ""

  def classes(self, classes_file: str | os.PathLike = "") -> tuple[str, ...]:
    """The class names in label order (read from `classes_file` when the entry has none)."""
    if self.class_names:
      if classes_file:
        raise ValueError(
          f"dataset {self.name!r} has its own class names; data.classes_file "
          "is for the 'custom' dataset"
        )
      return self.class_names
    if not classes_file:
      raise ValueError(
        f"dataset {self.name!r} takes its class names from a file: set "
        "data.classes_file (one class name per line, in label order)"
      )
    return read_classes_file(classes_file)

  def list_file(self, split: str, fold: int) -> str:
    return self.list_name.format(split=split, fold=fold)

  def find_list(self, folder: str | os.PathLike, split: str, fold: int) -> pathlib.Path | None:
    """The `split` list of `fold` in `folder`'s list folders (`LIST_FOLDERS`), or None."""
    wanted = self.list_file(split, fold).lower()
    for sub in LIST_FOLDERS:
      d = pathlib.Path(folder) / sub
      if d.is_dir():
        for p in sorted(d.iterdir()):
          if p.name.lower() == wanted and p.is_file():
            return p
    return None

  def missing_list(self, folder: str | os.PathLike, split: str, fold: int) -> str:
    """What `find_list` looked for, for an error message."""
    places = ", ".join(str(pathlib.Path(folder) / sub) for sub in LIST_FOLDERS)
    return f"no {self.list_file(split, fold)} (the {self.name} {split} list) in {places}"

  def packed(self, fold: int) -> str:
    if not self.packed_name:
      raise ValueError(f"dataset {self.name!r} has no packed form: set data.packed_name")
    return self.packed_name.format(fold=fold)

  def check_fold(self, fold: int) -> None:
    if not 1 <= fold <= self.folds:
      raise ValueError(f"{self.name} has folds 1..{self.folds}, got fold={fold}")


# Where a dataset folder keeps its annotation lists (the reference's repository: annotation/).
LIST_FOLDERS = ("annotation", "annotations", ".")


def read_classes_file(path: str | os.PathLike) -> tuple[str, ...]:
  """Class names from a text file, one per line in label order (blank lines and `#` comments
  are ignored; names must be distinct)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"classes file {path} does not exist")
  names = []
  for line in path.read_text(encoding="utf-8").splitlines():
    line = line.strip()
    if line and not line.startswith("#"):
      names.append(line)
  if not names:
    raise ValueError(f"classes file {path} names no class")
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ValueError(f"classes file {path} repeats {repeated}")
  return tuple(names)


_REGISTRY: dict[str, Dataset] = {}


def register(dataset: Dataset) -> Dataset:
  if dataset.name in _REGISTRY:
    raise ValueError(f"dataset {dataset.name!r} is registered twice")
  _REGISTRY[dataset.name] = dataset
  return dataset


def get(name: str) -> Dataset:
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown dataset {name!r}: expected one of {names()}") from None


def names() -> list[str]:
  return sorted(_REGISTRY)


register(
  Dataset(
    "dfew",
    DFEW_CLASSES,
    folds=5,
    augment_op="brightness",
    list_name="DFEW_set_{fold}_{split}.txt",
    packed_name="dfew/fold{fold}",
  )
)
register(
  Dataset(
    "ferv39k",
    DFEW_CLASSES,
    augment_op="rotation",
    list_name="FERV39K_{split}.txt",
    packed_name="ferv39k",
  )
)
register(
  Dataset(
    "mafw",
    MAFW_CLASSES,
    folds=5,
    list_name="MAFW_set_{fold}_{split}.txt",
    packed_name="mafw/fold{fold}",
  )
)
# The synthetic dataset reuses the real class names, so that prompts built from them stay
# meaningful; 7 classes by default, 11 with `num_classes=11`.
register(Dataset("synthetic", DFEW_CLASSES, packed_name="synthetic/classes7"))
register(Dataset("synthetic11", MAFW_CLASSES, packed_name="synthetic/classes11"))
register(Dataset("custom", ()))
