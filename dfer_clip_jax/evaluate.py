"""The evaluator: one pass over a split -> UAR / WAR / confusion matrix / per-clip predictions.

Used by the trainer each epoch and by `--mode=eval` (`evaluate_checkpoint`), which restores a
model (`latest`, `best`, a step, or a folder, e.g. one written by the conversion CLI) and writes
`<workdir>/eval/<name>/{metrics.json, predictions.csv, confusion_matrix.png}`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from dfer_clip_jax import cli, config_lib, distributed, restore
from dfer_clip_jax import metrics as metrics_lib
from dfer_clip_jax import sharding as sharding_lib
from dfer_clip_jax.data import pipeline
from dfer_clip_jax.data import sources as sources_lib
from dfer_clip_jax.models import dfer_clip as dfer_lib


@dataclasses.dataclass
class EvalResult:
  summary: dict[str, Any]  # metrics.summarize output: uar, war, per-class recall, confusion
  clip_ids: list[str]
  labels: np.ndarray  # (N,)
  preds: np.ndarray  # (N,)
  probs: np.ndarray  # (N, C)


class Evaluator:
  """Jitted evaluation of a model state on batches from `pipeline.make_eval_dataset`."""

  def __init__(self, graphdef, mesh):
    self.graphdef = graphdef
    self.mesh = mesh
    self._constants, self._probs = dfer_lib.eval_functions(graphdef)

  def run(self, model_state, dataset, source, class_names) -> EvalResult:
    """Evaluates every clip of `source` exactly once (padded rows are masked out).

    Collective in multi-process runs: every process iterates its own rows of the same global
    batches and gets the full result (all processes' rows, gathered).
    """
    constants = self._constants(model_state)  # once per evaluation (e.g. text features)
    chunks = []
    for batch in dataset:
      g = pipeline.to_global_batch(batch, self.mesh)
      p = self._probs(model_state, g["video"], constants)
      chunks.append((p, g["label"], g["index"], g["mask"]))
    # Each process loaded its own clips (nothing synchronises that loop): they meet on the
    # coordination service, which waits as long as a slow file system needs, before the
    # collective that gathers the results.
    distributed.barrier("evaluating")
    probs, labels, index, mask = (
      np.concatenate(
        [np.asarray(multihost_utils.process_allgather(c[i], tiled=True)) for c in chunks]
      )
      for i in range(4)
    )
    # Rows of every process, gathered: each clip of the source must appear exactly once (index
    # -1 marks padding; a clip masked out as unreadable still counts as visited).
    visited = np.sort(index[index >= 0])
    if not np.array_equal(visited, np.arange(len(source))):
      distinct = len(np.unique(visited))
      raise RuntimeError(
        f"the evaluation visited {distinct} distinct clips of {len(source)} with "
        f"{len(visited) - distinct} repeats over {jax.process_count()} processes: every clip "
        "must be evaluated exactly once (the evaluation plan or the batch layout is broken)"
      )
    keep = mask.astype(bool)
    probs, labels, index = probs[keep], labels[keep], index[keep]
    order = np.argsort(index, kind="stable")
    probs, labels, index = probs[order], labels[order], index[order]
    preds = probs.argmax(-1)
    conf = metrics_lib.confusion_matrix(labels, preds, len(class_names))
    summary = metrics_lib.summarize(conf, class_names)
    # Only process 0 writes the predictions, so only it needs the ids.
    clip_ids = [pipeline.clip_id(source, int(i)) for i in index] if jax.process_index() == 0 else []
    return EvalResult(summary=summary, clip_ids=clip_ids, labels=labels, preds=preds, probs=probs)


def write(result: EvalResult, out_dir: str | pathlib.Path, class_names) -> dict[str, pathlib.Path]:
  """metrics.json, predictions.csv and confusion_matrix.png (process 0 only)."""
  if jax.process_index() != 0:
    return {}
  paths = metrics_lib.write_eval_outputs(
    out_dir,
    metrics=result.summary,
    clip_ids=result.clip_ids,
    labels=result.labels,
    preds=result.preds,
    probs=result.probs,
    class_names=list(class_names),
  )
  logging.info("evaluation outputs in %s", out_dir)
  return paths


def check_batch(global_batch: int, mesh, what: str) -> int:
  """The per-process batch of a global batch, which must split evenly over devices and
  processes."""
  n_dev, n_proc = mesh.devices.size, jax.process_count()
  if global_batch % n_dev or global_batch % n_proc:
    raise ValueError(
      f"{what}={global_batch} must be a multiple of the {n_dev} devices and {n_proc} processes"
    )
  return global_batch // n_proc


def evaluate_checkpoint(
  config, workdir: str | pathlib.Path, which: str = "latest"
) -> dict[str, Any]:
  """Restores a model (`latest`, `best`, a step of `<workdir>/checkpoints`, or a checkpoint or
  export folder) and evaluates the config's test split; writes `<workdir>/eval/<name>/`."""
  config = config_lib.resolve_paths(config)
  workdir = pathlib.Path(cli.absolute(workdir))
  path = pathlib.Path(cli.absolute(which))
  mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
  model, spec, ref = restore.load_model(
    path if path.is_dir() else workdir, which, mesh=mesh, min_size=config.mesh.fsdp_min_size
  )
  # Only the split it evaluates is read and validated (not the training list).
  sources = sources_lib.build_sources(config, workdir, splits=("test",))
  if tuple(sources.class_names) != spec.class_names:
    raise ValueError(
      f"the checkpoint's classes {spec.class_names} differ from the dataset's {sources.class_names}"
    )
  eval_batch = check_batch(config.train.eval_batch_size, mesh, "train.eval_batch_size")
  dataset = pipeline.make_eval_dataset(
    sources.test,
    batch_size=eval_batch,
    num_frames=spec.num_frames,
    image_size=spec.image_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    worker_count=config.data.worker_count,
    bad_clip_policy=config.data.bad_clip_policy,
    fast_decode=config.data.fast_decode,
  )
  graphdef, model_state = nnx.split(model)
  result = Evaluator(graphdef, mesh).run(model_state, dataset, sources.test, spec.class_names)
  step = ref.step if ref.kind == restore.WORKDIR else None
  name = (
    path.name if path.is_dir() else (f"step_{step}" if which not in ("latest", "best") else which)
  )
  out = workdir / "eval" / name
  write(result, out, spec.class_names)
  if distributed.is_primary():
    s = result.summary
    print(
      f"Checkpoint {ref.describe()}: test UAR {s['uar']:.2f} "
      f"WAR {s['war']:.2f} ({s['counts']['total']} clips) -> {out}",
      flush=True,
    )
  return {"step": step, **result.summary}
