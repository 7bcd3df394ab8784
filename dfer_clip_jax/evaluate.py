"""The evaluator: one pass over a split -> UAR / WAR / confusion matrix / per-clip predictions.

Used by the trainer each epoch and by `--mode=eval`, which restores a checkpoint (`latest`,
`best`, a step, or a folder written by the conversion CLI) and writes
`<workdir>/eval/<name>/{metrics.json, predictions.csv, confusion_matrix.png}`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from dfer_clip_jax import distributed
from dfer_clip_jax import metrics as metrics_lib
from dfer_clip_jax.data import augment
from dfer_clip_jax.data import pipeline


@dataclasses.dataclass
class EvalResult:
  summary: dict[str, Any]  # metrics.summarize output: uar, war, per-class recall, confusion
  clip_ids: list[str]
  labels: np.ndarray  # (N,)
  preds: np.ndarray  # (N,)
  probs: np.ndarray  # (N, C)


class Evaluator:
  """Jitted evaluation of a model state on batches from `pipeline.make_eval_dataset`."""

  def __init__(self, graphdef, mesh, *, normalize: bool):
    self.graphdef = graphdef
    self.mesh = mesh

    def text_features(model_state):
      model = nnx.merge(graphdef, model_state)
      if model.prompt_learner is None:
        return None
      return model.text_features()[0]

    def probs(model_state, video_uint8, text_feats):
      model = nnx.merge(graphdef, model_state)
      video = augment.to_model_input(video_uint8, normalize=normalize)
      logits, _ = model(video, train=False, text_features=text_feats)
      return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    self._text = jax.jit(text_features)
    self._probs = jax.jit(probs)

  def run(self, model_state, dataset, source, class_names) -> EvalResult:
    """Evaluates every clip of `source` exactly once (padded rows are masked out).

    Collective in multi-process runs: every process iterates its own rows of the same global
    batches and gets the full result (all processes' rows, gathered).
    """
    text_feats = self._text(model_state)  # once per evaluation: it doesn't depend on the video
    chunks = []
    for batch in dataset:
      g = pipeline.to_global_batch(batch, self.mesh)
      p = self._probs(model_state, g["video"], text_feats)
      chunks.append((p, g["label"], g["index"], g["mask"]))
    # Each process loaded its own clips (nothing synchronises that loop): they meet on the
    # coordination service, which waits as long as a slow file system needs, before the
    # collective that gathers the results.
    distributed.barrier("evaluating")
    probs, labels, index, mask = (
        np.concatenate([np.asarray(multihost_utils.process_allgather(c[i], tiled=True))
                        for c in chunks]) for i in range(4))
    # Rows of every process, gathered: each clip of the source must appear exactly once (index
    # -1 marks padding; a clip masked out as unreadable still counts as visited).
    visited = np.sort(index[index >= 0])
    if not np.array_equal(visited, np.arange(len(source))):
      distinct = len(np.unique(visited))
      raise RuntimeError(
          f"the evaluation visited {distinct} distinct clips of {len(source)} with "
          f"{len(visited) - distinct} repeats over {jax.process_count()} processes: every clip "
          "must be evaluated exactly once (the evaluation plan or the batch layout is broken)")
    keep = mask.astype(bool)
    probs, labels, index = probs[keep], labels[keep], index[keep]
    order = np.argsort(index, kind="stable")
    probs, labels, index = probs[order], labels[order], index[order]
    preds = probs.argmax(-1)
    conf = metrics_lib.confusion_matrix(labels, preds, len(class_names))
    summary = metrics_lib.summarize(conf, class_names)
    # Only process 0 writes the predictions, so only it needs the ids.
    clip_ids = ([pipeline.clip_id(source, int(i)) for i in index]
                if jax.process_index() == 0 else [])
    return EvalResult(summary=summary, clip_ids=clip_ids, labels=labels, preds=preds, probs=probs)


def write(result: EvalResult, out_dir: str | pathlib.Path, class_names) -> dict[str, pathlib.Path]:
  """metrics.json, predictions.csv and confusion_matrix.png (process 0 only)."""
  if jax.process_index() != 0:
    return {}
  paths = metrics_lib.write_eval_outputs(
      out_dir, metrics=result.summary, clip_ids=result.clip_ids, labels=result.labels,
      preds=result.preds, probs=result.probs, class_names=list(class_names))
  logging.info("evaluation outputs in %s", out_dir)
  return paths
