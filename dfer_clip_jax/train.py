"""The trainer: `train_and_evaluate(config, workdir)`.

One jitted train step (state donated, batch sharded over the mesh), epoch-end evaluation on the
validation split (carved from train) and the test split, Orbax checkpoints that resume exactly
(parameters, optimizer state, data iterator position, evaluation history), and a final report:
last epoch, best by validation, and the paper's protocol (best test WAR, labelled as selected on
test).

Multi-process runs (one process per TPU host or GPU; see `distributed` and launch/): every
process builds the same Trainer and runs the same jitted step on global arrays; each reads only
its own rows of every global batch. Only process 0 writes logs, reports, TensorBoard events and
evaluation outputs; every process takes part in the Orbax saves and restores, and all resume
from the step process 0 names among those every process finds usable. The workdir must be one
folder that all processes see (a shared or mounted file system).
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from dfer_clip_jax import (
  checkpointing,
  cli,
  config_lib,
  distributed,
  metric_writer,
  optim,
  preemption,
)
from dfer_clip_jax import evaluate as evaluate_lib
from dfer_clip_jax import metrics as metrics_lib
from dfer_clip_jax import restore as restore_lib
from dfer_clip_jax import sharding as sharding_lib
from dfer_clip_jax import state as state_lib
from dfer_clip_jax.data import loading, pipeline
from dfer_clip_jax.data import sources as sources_lib

CHECKPOINT_FORMAT = "dfer_clip_jax.train/1"


class NonFiniteError(FloatingPointError):
  """The loss or a norm became NaN/Inf; the run stops and the last good checkpoint stays."""


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def local_workdir(workdir: str | pathlib.Path) -> pathlib.Path:
  """`workdir` as a Path; a URL (gs://, s3://) is refused with what to do instead."""
  text = str(workdir)
  if _URL.match(text):
    raise ValueError(
      f"workdir {text!r} is a URL, but the workdir is written through the local file system "
      "(the checkpoint integrity records, metrics.jsonl, TensorBoard events, the report and "
      "the demo tokenizer use file paths; pathlib would turn 'gs://b/x' into 'gs:/b/x'). "
      "Mount the bucket on every host (e.g. `gcsfuse --implicit-dirs BUCKET /mnt/gcs`, as "
      "launch/tpu_pod.sh does) and pass the mounted path, e.g. --workdir=/mnt/gcs/runs/dfew"
    )
  return pathlib.Path(cli.absolute(text))


def _mesh(config):
  return sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp)


def make_train_step(graphdef, opt_graphdef, *, dropout: bool, microbatches: int = 1):
  """The jitted-to-be step: (model state, optimizer state, batch, rng) -> new states, metrics.

  `microbatches` > 1 accumulates the gradient over that many sequential slices of the batch
  (`_microbatched_grads`): the same update as one pass over the whole batch, with the image
  tower's activations of one slice in memory at a time.
  """
  if microbatches < 1:
    raise ValueError(f"microbatches must be >= 1, got {microbatches}")

  def step(model_state, opt_state, batch, rng):
    model = nnx.merge(graphdef, model_state)
    optimizer = nnx.merge(opt_graphdef, opt_state)
    video = model.preprocess(batch["video"])
    labels, mask = batch["label"], batch["mask"].astype(jnp.float32)

    if microbatches == 1:

      def loss_fn(m):
        logits, _ = m(video, train=True, rngs=nnx.Rngs(dropout=rng) if dropout else None)
        loss = _masked_nll(logits, labels, mask).sum() / jnp.maximum(mask.sum(), 1.0)
        return loss, logits

      grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, optimizer.wrt), has_aux=True)
      (loss, logits), grads = grad_fn(model)
    else:
      loss, logits, grads = _microbatched_grads(
        model, optimizer.wrt, video, labels, mask, rng, microbatches=microbatches, dropout=dropout
      )
    optimizer.update(model, grads)
    correct = (logits.argmax(-1) == labels).astype(jnp.float32)
    metrics = {
      "loss": loss,
      "accuracy": (correct * mask).sum() / jnp.maximum(mask.sum(), 1.0),
      "grad_norm": optax.global_norm(grads),
      "param_norm": optax.global_norm(nnx.state(model, optimizer.wrt)),
    }
    return nnx.state(model), nnx.state(optimizer), metrics

  return step


def _masked_nll(logits_BxC, labels_B, mask_B):
  """Per-clip negative log-likelihood (B,), zero where the mask is 0; loss in float32."""
  logp_BxC = jax.nn.log_softmax(logits_BxC.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp_BxC, labels_B[:, None], axis=-1)[:, 0] * mask_B


def _microbatched_grads(model, wrt, video, labels, mask, rng, *, microbatches: int, dropout: bool):
  """(loss, logits (B, C), gradients) of the masked mean loss, accumulated over slices.

  Slice i holds rows i, i + k, i + 2k, ... (k = microbatches): each device's contiguous block
  of the batch-sharded arrays splits evenly into the slices, so no row moves between devices.
  What the model computes once for all videos (`eval_constants`: the class prompts' text
  features) is computed once here too, the slices' gradients with respect to it are summed, and
  the text tower is differentiated once at the end, as in the one-pass step; a model without
  such constants (linear head, text features per video) computes everything per slice. Dropout
  draws per slice (`fold_in(rng, i)`).
  """
  b = video.shape[0]
  if b % microbatches:
    raise ValueError(f"the batch of {b} clips does not split into {microbatches} microbatches")
  g, trainable, rest = nnx.split(model, wrt, ...)

  def shared_of(tr):
    return nnx.merge(g, tr, rest, copy=True).eval_constants()

  shared, shared_vjp = jax.vjp(shared_of, trainable)  # shared: (C, D) or None

  def slices(x):  # (B, ...) -> (k, B / k, ...), slice i = rows i, i + k, ...
    return jnp.swapaxes(x.reshape((b // microbatches, microbatches) + x.shape[1:]), 0, 1)

  def slice_loss(tr, shared, video_i, labels_i, mask_i, i):
    m = nnx.merge(g, tr, rest, copy=True)
    rngs = nnx.Rngs(dropout=jax.random.fold_in(rng, i)) if dropout else None
    logits, _ = m(video_i, train=True, rngs=rngs, text_features=shared)
    return _masked_nll(logits, labels_i, mask_i).sum(), logits

  grad_fn = jax.value_and_grad(slice_loss, argnums=(0, 1), has_aux=True)

  def body(carry, xs):
    g_tr, g_shared, total = carry
    (nll_sum, logits), (d_tr, d_shared) = grad_fn(trainable, shared, *xs)
    add = lambda x, y: jax.tree.map(jnp.add, x, y)
    return (add(g_tr, d_tr), add(g_shared, d_shared), total + nll_sum), logits

  zeros = jax.tree.map(jnp.zeros_like, (trainable, shared, jnp.zeros((), jnp.float32)))
  xs = (slices(video), slices(labels), slices(mask), jnp.arange(microbatches))
  (g_tr, g_shared, total), logits_KxMxC = jax.lax.scan(body, zeros, xs)
  if shared is not None:
    g_tr = jax.tree.map(jnp.add, g_tr, shared_vjp(g_shared)[0])
  count = jnp.maximum(mask.sum(), 1.0)
  grads = jax.tree.map(lambda x: x / count, g_tr)
  logits_BxC = jnp.swapaxes(logits_KxMxC, 0, 1).reshape(b, -1)
  return total / count, logits_BxC, grads


@contextlib.contextmanager
def _explain_attention_failure(attention_impl: str):
  """cuDNN's fused attention passes its checks while tracing but can still fail when XLA
  compiles or runs it (library version, GPU generation): say which setting avoids it."""
  try:
    yield
  except Exception as err:  # pylint: disable=broad-except
    if attention_impl in ("auto", "cudnn") and "cudnn" in str(err).lower():
      raise RuntimeError(
        f"the training step failed in cuDNN ({type(err).__name__}: "
        f"{str(err).splitlines()[0][:300]}); clip.attention_impl={attention_impl!r} runs "
        "cuDNN's fused attention on this GPU: rerun with "
        "--config.clip.attention_impl=xla (same values, XLA's attention)"
      ) from err
    raise


class Trainer:
  """Everything a run builds from its config; `fit()` trains (evaluating every epoch) and
  reports, `evaluate_split()` evaluates the model on one split."""

  def __init__(self, config, workdir: str | pathlib.Path):
    self.config = config = config_lib.resolve_paths(config)
    self.workdir = local_workdir(workdir)
    self.primary = distributed.is_primary()
    if self.primary:
      self.workdir.mkdir(parents=True, exist_ok=True)
    self.mesh = _mesh(config)
    self.sources = sources_lib.build_sources(config, self.workdir)
    self.class_names = self.sources.class_names
    t = config.train
    # Per-process batch sizes: each process loads its own rows of every global batch.
    self.process_batch = evaluate_lib.check_batch(t.batch_size, self.mesh, "train.batch_size")
    self.process_eval_batch = evaluate_lib.check_batch(
      t.eval_batch_size, self.mesh, "train.eval_batch_size"
    )
    per_device = t.batch_size // self.mesh.devices.size
    if t.microbatches < 1 or per_device % t.microbatches:
      raise ValueError(
        f"train.microbatches={t.microbatches} must divide the {per_device} clips "
        "each device gets per step (train.batch_size / devices)"
      )
    self.steps_per_epoch = loading.steps_per_epoch(len(self.sources.train), t.batch_size)
    if self.steps_per_epoch == 0:
      raise ValueError(
        f"the train split has {len(self.sources.train)} clips, fewer than one "
        f"batch of {t.batch_size}"
      )
    rngs = nnx.Rngs(config.seed)
    # Building the model may write into the workdir (the demo tokenizer): process 0 goes first.
    with distributed.primary_first("building the model"):
      model, self.spec, self.groups = state_lib.build_model(
        config, self.workdir, self.class_names, rngs=rngs, mesh=self.mesh
      )
    self.trained = state_lib.is_trained(self.groups)
    self.epochs = t.epochs if self.trained else 0
    self.total_steps = self.epochs * self.steps_per_epoch
    optimizer = (
      state_lib.build_optimizer(config, model, self.groups, self.steps_per_epoch)
      if self.trained
      else None
    )
    self.counts = state_lib.log_parameter_counts(model, optimizer) if optimizer is not None else {}
    self.graphdef, model_state = nnx.split(model)
    self.model_state, self.model_shardings = state_lib.shard_state(
      model_state, self.mesh, config.mesh.fsdp_min_size
    )
    if optimizer is not None:
      self.opt_graphdef, opt_state = nnx.split(optimizer)
      self.opt_state, self.opt_shardings = state_lib.shard_state(
        opt_state, self.mesh, config.mesh.fsdp_min_size
      )
    else:
      self.opt_graphdef, self.opt_state, self.opt_shardings = None, None, None
    self.evaluator = evaluate_lib.Evaluator(self.graphdef, self.mesh)
    self.checkpointer = checkpointing.Checkpointer(
      self.workdir / "checkpoints",
      keep_last=t.keep_checkpoints,
      keep_best=True,
      best_metric=restore_lib.BEST_METRIC,
      best_mode="max",
      async_save=True,
      save_interval_steps=1,
    )
    self.history: list[dict[str, Any]] = []

  # -- checkpoint contents -------------------------------------------------------------------

  def checkpoint_config(self) -> dict[str, Any]:
    return {
      "format": CHECKPOINT_FORMAT,
      "has_optimizer": self.opt_state is not None,
      "model": self.spec.to_dict(),
      "config": json.loads(self.config.to_json()),
    }

  def _state(self) -> dict[str, Any]:
    state = {"model": self.model_state}
    if self.opt_state is not None:
      state["optimizer"] = self.opt_state
    return state

  def _abstract_state(self) -> dict[str, Any]:
    out = {"model": state_lib.abstract_with_shardings(self.model_state, self.model_shardings)}
    if self.opt_state is not None:
      out["optimizer"] = state_lib.abstract_with_shardings(self.opt_state, self.opt_shardings)
    return out

  def restore_latest(self) -> tuple[int, dict[str, Any] | None]:
    """Resumes from the newest usable checkpoint, if any: (step, data state)."""
    if jax.process_count() > 1:
      which = checkpointing.agreed_latest_step(self.checkpointer)
    else:
      # `restore("latest")` checks the steps itself (and reports each broken one, once): a
      # check here first would report every broken step twice.
      which = "latest" if self.checkpointer.all_steps() else None
    if which is None:
      return 0, None
    step, state, data_state, _, _ = self.checkpointer.restore(
      which, abstract_state=self._abstract_state()
    )
    self.model_state = state["model"]
    if self.opt_state is not None:
      self.opt_state = state["optimizer"]
    self.history = list((data_state or {}).get("history", []))
    if self.primary:
      print(f"Resumed from checkpoint step {step} in {self.workdir / 'checkpoints'}", flush=True)
    return int(step), data_state

  # -- evaluation ------------------------------------------------------------------------------

  def _eval_dataset(self, source):
    d = self.config.data
    return pipeline.make_eval_dataset(
      source,
      batch_size=self.process_eval_batch,
      num_frames=self.spec.num_frames,
      image_size=self.config.clip.image_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      worker_count=d.worker_count,
      bad_clip_policy=d.bad_clip_policy,
      fast_decode=d.fast_decode,
    )

  def evaluate_split(self, split: str) -> evaluate_lib.EvalResult:
    source = getattr(self.sources, split)
    return self.evaluator.run(
      self.model_state, self._eval_dataset(source), source, self.class_names
    )

  def _epoch_eval(self, epoch: int, step: int, writer) -> dict[str, Any]:
    entry: dict[str, Any] = {"epoch": epoch, "step": step, "val": None}
    for split in ("val", "test"):
      if getattr(self.sources, split) is None:
        continue
      s = self.evaluate_split(split).summary
      entry[split] = {"uar": s["uar"], "war": s["war"]}
      writer.write(step, {f"{split}/uar": s["uar"], f"{split}/war": s["war"]})
    if self.primary:
      val = entry["val"]
      print(
        f"epoch {epoch}: test UAR {entry['test']['uar']:.2f} WAR {entry['test']['war']:.2f}"
        + (f" | val UAR {val['uar']:.2f} WAR {val['war']:.2f}" if val else ""),
        flush=True,
      )
    return entry

  # -- training --------------------------------------------------------------------------------

  def fit(self) -> dict[str, Any]:
    """Trains (resuming if a checkpoint exists), evaluates each epoch, writes the report."""
    start_step, data_state = self.restore_latest()
    writer = metric_writer.MetricWriter(self.workdir)
    try:  # a preempted or failed run still flushes what it logged
      if self.trained and start_step < self.total_steps:
        self._train_loop(start_step, data_state, writer)
      elif not self.history:
        self.history.append(self._epoch_eval(0, 0, writer))  # untrained model (zero-shot)
    finally:
      writer.close()
    self.checkpointer.wait()
    return self.report()

  def _train_loop(self, start_step: int, data_state, writer) -> None:
    config, t, d = self.config, self.config.train, self.config.data
    dataset = pipeline.make_train_dataset(
      self.sources.train,
      seed=config.seed,
      num_frames=self.spec.num_frames,
      image_size=config.clip.image_size,
      augmentation=sources_lib.train_augmentation(config),
      batch_size=self.process_batch,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      worker_count=d.worker_count,
      bad_clip_policy=d.bad_clip_policy,
      num_epochs=self.epochs,
      fast_decode=d.fast_decode,
    )
    it = iter(dataset)
    if data_state is not None and data_state.get("iterator") is not None:
      it.set_state(data_state["iterator"])
    if it.step != start_step:
      raise RuntimeError(f"data iterator at step {it.step} but the train state at {start_step}")
    dropout = config.model.temporal_dropout > 0
    step_fn = jax.jit(
      make_train_step(
        self.graphdef, self.opt_graphdef, dropout=dropout, microbatches=t.microbatches
      ),
      donate_argnums=(0, 1),
      out_shardings=(self.model_shardings, self.opt_shardings, None),
    )
    schedule = state_lib.make_schedule(config, self.steps_per_epoch)
    progress = metric_writer.Progress(self.total_steps, self.steps_per_epoch, start_step)
    base_key = jax.random.key(config.seed)
    pending: tuple[int, Any] | None = None  # metrics of the last dispatched step
    window: list[dict[str, float]] = []
    t_window = time.perf_counter()
    last_saved = start_step

    def fetch(item) -> dict[str, float]:
      """Reads one step's metrics to the host; stops on a non-finite loss or norm."""
      step_no, m = item
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      bad = [k for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(m[k])]
      if bad:
        raise NonFiniteError(
          f"non-finite {', '.join(bad)} at step {step_no} (loss={m['loss']}, grad_norm="
          f"{m['grad_norm']}, param_norm={m['param_norm']}); training stopped, the last good "
          f"checkpoint (step {last_saved}) is kept in {self.workdir / 'checkpoints'}"
        )
      m["step"] = step_no
      return m

    def flush() -> None:
      """Checks and logs the pending step's metrics (before a log line, an evaluation or a
      save: a state whose loss was not checked is never saved)."""
      nonlocal pending
      if pending is not None:
        window.append(fetch(pending))
        pending = None

    batches = pipeline.prefetch_to_device(it, self.mesh, size=d.device_prefetch)
    with preemption.PreemptionWatch() as watch:
      for step in range(start_step, self.total_steps):
        batch = next(batches)
        # Only dropout consumes randomness; without it skip the per-step host-side fold_in.
        rng = jax.random.fold_in(base_key, step) if dropout else base_key
        with _explain_attention_failure(config.clip.attention_impl):
          self.model_state, self.opt_state, m = step_fn(
            self.model_state, self.opt_state, batch, rng
          )
        # Metrics of the previous step are fetched after this one is dispatched: no stall.
        flush()
        pending = (step + 1, m)  # the metrics belong to the update that made step + 1
        done = step + 1
        epoch_end = done % self.steps_per_epoch == 0
        if done % t.log_every_steps == 0 or epoch_end or done == self.total_steps:
          flush()
          self._log(done, window, time.perf_counter() - t_window, schedule, writer, progress)
          window, t_window = [], time.perf_counter()
        if epoch_end:
          epoch = done // self.steps_per_epoch
          flush()
          entry = None
          if epoch % t.eval_every_epochs == 0 or done == self.total_steps:
            entry = self._epoch_eval(epoch, done, writer)
            self.history.append(entry)
          self._save(done, it, entry)
          last_saved = done
          t_window = time.perf_counter()
        elif done % t.checkpoint_every_steps == 0:
          flush()
          self._save(done, it, None)
          last_saved = done
        # A preemption notice: every process saves the step they agree on, then stops.
        if watch.reached(done) and done < self.total_steps:
          flush()
          if last_saved != done:
            self._save(done, it, None)
            last_saved = done
          self.checkpointer.wait()
          message = (
            f"preempted: checkpoint of step {done} saved in "
            f"{self.workdir / 'checkpoints'}; run the same command again to resume"
          )
          if self.primary:
            print(message, flush=True)
          self._record_skipped(dataset.skipped)
          raise preemption.Preempted(message)
    self._record_skipped(dataset.skipped)

  def _record_skipped(self, skipped) -> None:
    """Adds the clips found unreadable while training (bad_clip_policy=skip; beside those
    validation left out) to `<workdir>/skipped_clips.txt`, once per clip, with why."""
    if not skipped or not self.primary:
      return
    logging.warning(
      "%d clips were skipped during training (bad_clip_policy=skip): %s", len(skipped), skipped[:20]
    )
    path = self.workdir / "skipped_clips.txt"
    listed = path.read_text().splitlines() if path.is_file() else []
    seen = {line.split(": ", 1)[0] for line in listed}
    with open(path, "a") as f:
      for s in skipped:
        where = f"{s.origin} {s.clip_id}" if s.origin else s.clip_id
        if where not in seen:
          seen.add(where)
          f.write(f"{where}: {s.reason} (first skipped at training step {s.step})\n")

  def _save(self, step: int, it, entry) -> None:
    metrics = None
    if entry is not None:
      metrics = {
        # The one selection rule (`metrics.selection_key`), stored so that the checkpoint kept
        # as best and `--checkpoint=best` are the report's best epoch.
        restore_lib.BEST_METRIC: list(
          metrics_lib.selection_key(entry, self.config.train.select_metric)
        ),
        "epoch": entry["epoch"],
        "test": entry["test"],
        "val": entry["val"],
      }
    self.checkpointer.save(
      step,
      state=self._state(),
      data_state={"iterator": pipeline.iterator_state_at(it, step), "history": self.history},
      config=self.checkpoint_config(),
      metrics=metrics,
      force=True,
    )

  def _log(self, step, window, seconds, schedule, writer, progress) -> None:
    mean = {k: float(np.mean([w[k] for w in window])) for k in window[0] if k != "step"}
    clips_per_s = len(window) * self.config.train.batch_size / max(seconds, 1e-9)
    lrs = optim.group_learning_rates(self.groups, step - 1, schedule)
    scalars = {f"train/{k}": v for k, v in mean.items()}
    scalars.update({f"lr/{k}": v for k, v in lrs.items()})
    scalars["train/clips_per_s"] = clips_per_s
    scalars["train/step_time_s"] = seconds / len(window)
    writer.write(step, scalars)
    progress.print(step, mean["loss"], mean["accuracy"], clips_per_s)

  # -- reporting -------------------------------------------------------------------------------

  def report(self) -> dict[str, Any]:
    rows = metrics_lib.report_rows(self.history, val_metric=self.config.train.select_metric)
    report = {
      "rows": rows,
      "history": self.history,
      "class_names": list(self.class_names),
      "skipped_clips": self.sources.skipped,
      **self.counts,
    }
    # Full outputs (per-class recall, confusion matrix, predictions) of the final model.
    result = self.evaluate_split("test")
    evaluate_lib.write(result, self.workdir / "eval" / "last", self.class_names)
    report["last_test"] = result.summary
    if self.primary:
      (self.workdir / "report.json").write_text(json.dumps(report, indent=2))
      print(metrics_lib.format_report_table(rows), flush=True)
      print(
        f"Report: {self.workdir / 'report.json'}; predictions and confusion matrix: "
        f"{self.workdir / 'eval' / 'last'}; TensorBoard: tensorboard --logdir "
        f"{self.workdir / 'tensorboard'}",
        flush=True,
      )
    return report


def train_and_evaluate(config, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Trains the configured model in `workdir` (resuming automatically) and returns the report."""
  trainer = Trainer(config, workdir)
  try:
    return trainer.fit()
  finally:
    trainer.checkpointer.close()
