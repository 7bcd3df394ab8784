r"""Speed of the real DFER-CLIP training (or evaluation) step, on random weights and random clips.

    python -m dfer_clip_jax.benchmarks.train_step --variant=B/16 --frames=16 --batch=48 \
        --dtype=bfloat16 --remat=none --mode=train --json=out.json \
        [--steps=20 --warmup=3] [--attention=auto] [--find_max_batch]
    python -m dfer_clip_jax.benchmarks.train_step --variant=tiny --config_argument=baseline=cocoop
    python -m dfer_clip_jax.benchmarks.train_step --summarize a.json b.json [--json=all.json]

The step is the trainer's own: `configs/dfew.py` (paper recipe, or one of its rows with
`--config_argument`, the text after the colon of `--config=configs/dfew.py:...`, e.g.
`baseline=coop`) with the named CLIP size (random init), `state.build_model`, `state.build_optimizer`, `train.make_train_step`, jitted as
`train.Trainer` does (model and optimizer state donated, state placed by the `sharding` rules
on a mesh over all local devices). `--mode=eval` times the evaluator's per-batch function
(`evaluate.Evaluator`: frozen text features computed once, softmax probabilities per batch).
The steps cycle through `NUM_BATCHES` random batches of uint8 video (B, T, H, W, 3) and
labels, generated on the devices and sharded on the batch axis, so no host transfer is timed;
the timed loops run under `jax.transfer_guard("disallow")`, which proves that the step makes
no host round trip.

Timing: after compiling (`lower_s`, `compile_s`) and `--warmup` steps, `--steps` steps are
timed one by one, each blocked on all its outputs (`step_ms_p50`, `step_ms_p90`, `step_ms_min`:
these include the host's dispatch of each step), then `--steps` more are dispatched back to back
and blocked once at the end (`step_ms_pipelined`, how the training loop runs them);
`clips_per_s` and `frames_per_s` use the pipelined time.

FLOPs: `model_tflops_per_step` is the analytic count of the model's matrix products (image
tower, temporal transformer, text tower on the C prompts, logits; forward plus the backward the
step really needs: the frozen text tower only propagates activation gradients to the learned
context; recomputation under remat not counted), the usual MFU convention
(`analytic_tflops_breakdown` splits it). `xla_tflops_per_step` is XLA's cost analysis of the
compiled step (it counts what XLA runs: remat recomputation included, fused cuDNN attention
kernels possibly not; summed over the devices, replicated work counted on each) and
`xla_tflops_per_step_unoptimized` that of the lowered program, before partitioning;
`xla_over_analytic` is their cross-check. `achieved_tflops` = model FLOPs / pipelined step time;
`mfu` divides it by the chip's dense peak for the arithmetic used (`PEAK_TFLOPS`: bf16; float32
at `--matmul_precision=highest`, the default for float32, is true fp32; `default`/`high` let
GPUs use TF32, recorded as `tf32`). Unknown chips and CPUs give null.

Memory: `peak_memory_gb` is the largest `peak_bytes_in_use` of the devices' memory stats (GB =
1e9 bytes; null where the backend keeps none, e.g. CPU), `compiled_memory_gb` XLA's own
estimate for the step (arguments + outputs + temporaries - donated aliases). `--find_max_batch`
searches the largest per-device batch whose step compiles within the device's memory and runs:
doubling from `--batch`, then bisection, jumping to the batch that XLA's memory estimate
predicts (a linear fit over the compiled sizes) when it can; bounded by `--max_batch_budget_s`.

Attention: `--attention=auto` (the default) runs cuDNN's fused attention on GPUs in bf16/fp16
(on sequences padded to an even length, `models.clip.padded_attention`) and XLA's elsewhere
(`models.clip.resolve_attention_impl`); if cuDNN refuses while tracing or fails to compile or
run, the call site or the whole run falls back to XLA's and says so: `attention_sites` maps each
call site (sequence length, causal) to what it ran, `attention_used` summarises it (cudnn, xla or
mixed), `attention_fallback_error` gives cuDNN's reason.

A batch that does not fit is a result (`status: "oom"`, exit code 0), not a crash; other
failures give `status: "error"` and exit code 1; the JSON is written in every case.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfer_clip_jax import cli, config_lib, xla_flags
from dfer_clip_jax import sharding as sharding_lib
from dfer_clip_jax import state as state_lib
from dfer_clip_jax.benchmarks import report
from dfer_clip_jax.data import datasets
from dfer_clip_jax.models import clip as clip_lib

VARIANTS = ("B/32", "B/16", "L/14", "tiny")
NUM_BATCHES = 4  # distinct random batches the timed steps cycle through

# Dense peak TFLOP/s per chip, from the vendors' datasheets: (device_kind substrings, name,
# {bf16, tf32, fp32}). The first entry with a substring in `device.device_kind` wins. TPUs
# have no TF32: float32 matmuls at default precision run as one bf16 pass (so "tf32" = bf16
# peak) and at "highest" as six (fp32 = bf16 / 6).
PEAK_TFLOPS: tuple[tuple[tuple[str, ...], str, dict[str, float]], ...] = (
  (("H100 PCIe",), "H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
  (("H100 NVL",), "H100 NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
  (("H200 NVL",), "H200 NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
  (("H100",), "H100 SXM", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
  (("H200",), "H200 SXM", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
  (("A100",), "A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
  (("TPU v5 lite", "TPU v5e"), "TPU v5e", {"bf16": 197.0, "tf32": 197.0, "fp32": 197.0 / 6}),
  (("TPU v6 lite", "TPU v6e"), "TPU v6e", {"bf16": 918.0, "tf32": 918.0, "fp32": 918.0 / 6}),
  (("TPU v5p", "TPU v5"), "TPU v5p", {"bf16": 459.0, "tf32": 459.0, "fp32": 459.0 / 6}),
  (("TPU v4",), "TPU v4", {"bf16": 275.0, "tf32": 275.0, "fp32": 275.0 / 6}),
)

# Substrings of XLA / PJRT errors that mean "does not fit in device memory".
_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM")


def peak_tflops(device_kind: str, arithmetic: str) -> tuple[str | None, float | None]:
  """(chip name, dense peak TFLOP/s) for `arithmetic` in bf16 | tf32 | fp32; (None, None) for
  chips not in `PEAK_TFLOPS` (CPUs among them)."""
  if arithmetic not in ("bf16", "tf32", "fp32"):
    raise ValueError(f"arithmetic must be bf16, tf32 or fp32, got {arithmetic!r}")
  for needles, name, peaks in PEAK_TFLOPS:
    if any(n in device_kind for n in needles):
      return name, peaks[arithmetic]
  return None, None


def arithmetic_of(dtype: str, matmul_precision: str, platform: str) -> str:
  """Which matrix arithmetic the step's big products use: bf16, tf32 or fp32."""
  if dtype == "bfloat16":
    return "bf16"
  if matmul_precision == "highest" or platform == "cpu":
    return "fp32"
  return "tf32"


def is_oom(err: BaseException) -> bool:
  text = f"{type(err).__name__}: {err}"
  return any(m in text for m in _OOM_MARKERS)


# ----------------------------------------------------------------------------------------------
# Analytic FLOPs


def transformer_flops(
  tokens: int, width: int, layers: int, mlp_dim: int, inner: int
) -> tuple[float, float]:
  """Forward FLOPs of `layers` pre-LN transformer blocks on one sequence: (linear layers,
  attention products). Fused q/k/v width -> 3*inner, output inner -> width, MLP width ->
  mlp_dim -> width; attention q.k and p.v, 2 * tokens^2 * inner each (causal masks counted
  whole, as usual)."""
  linear = 2.0 * tokens * (3 * width * inner + inner * width + 2 * width * mlp_dim)
  attn = 4.0 * tokens * tokens * inner
  return layers * linear, layers * attn


def analytic_flops(
  clip_cfg: clip_lib.CLIPConfig, dfer_cfg, batch: int, mode: str, *, image_trained: bool = True
) -> dict[str, float]:
  """Model FLOPs of one step, by part (image, temporal, text, logits) and `total`.

  Training: every trained matrix product costs 3x its forward (forward, input gradient, weight
  gradient), except the patch embedding (no gradient to the pixels: 2x) and the frozen text
  tower, which only propagates activation gradients to the context (linear layers 2x, attention
  products 3x since q, k and v are all activations). Evaluation: forward of image, temporal and
  logits; the text features are computed once per evaluation, not per batch. A frozen image
  tower (`image_trained` False: CoOp, Co-CoOp, linear probe) runs forward only. Conditional
  prompts (Co-CoOp) run B x C prompts through the text tower in every step, evaluation included.
  """
  if mode not in ("train", "eval"):
    raise ValueError(f"mode must be train or eval, got {mode!r}")
  train = mode == "train"
  v, t = clip_cfg.vision, clip_cfg.text
  frames = batch * dfer_cfg.num_frames
  tokens = v.grid * v.grid + 1
  patch = 2.0 * v.grid * v.grid * (v.patch_size * v.patch_size * 3) * v.width
  lin, att = transformer_flops(tokens, v.width, v.layers, v.mlp_dim, v.width)
  proj = 2.0 * v.width * clip_cfg.embed_dim
  if train and image_trained:
    image = frames * (2 * patch + 3 * (lin + att + proj))
  else:
    image = frames * (patch + lin + att + proj)
  out = {"image": image, "temporal": 0.0, "text": 0.0, "logits": 0.0}
  d = clip_cfg.embed_dim
  if dfer_cfg.temporal == "transformer":
    inner = dfer_cfg.temporal_heads * dfer_cfg.temporal_dim_head
    lin, att = transformer_flops(
      dfer_cfg.num_frames + 1, d, dfer_cfg.temporal_depth, dfer_cfg.temporal_mlp_dim, inner
    )
    out["temporal"] = batch * (lin + att) * (3 if train else 1)
  if dfer_cfg.head == "prompt" and (train or dfer_cfg.meta_net):
    lin, att = transformer_flops(t.context_length, t.width, t.layers, t.mlp_dim, t.width)
    tproj = 2.0 * t.width * d
    prompts = dfer_cfg.num_classes * (batch if dfer_cfg.meta_net else 1)
    out["text"] = prompts * ((2 * (lin + tproj) + 3 * att) if train else (lin + tproj + att))
  # Prompt head: video @ text.T; linear head: video @ kernel. Same size either way.
  out["logits"] = 2.0 * batch * d * dfer_cfg.num_classes * (3 if train else 1)
  out["total"] = sum(out.values())
  return out


# ----------------------------------------------------------------------------------------------
# Largest batch that fits


@dataclasses.dataclass
class Trial:
  """One attempted per-device batch: fits = compiled within memory and ran."""

  batch: int
  fits: bool
  predicted_bytes: float | None = None  # XLA's memory estimate of the compiled step
  seconds: float = 0.0
  note: str = ""
  clips_per_s: float | None = None  # back-to-back steps at this batch (fitting trials)


TRIAL_STEPS = 3  # timed steps per fitting trial of the largest-batch search


def fastest_trial(trials: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
  """The fitting trial with the highest throughput (None if none was timed)."""
  timed = [t for t in trials if t.get("fits") and t.get("clips_per_s")]
  return max(timed, key=lambda t: t["clips_per_s"]) if timed else None


def _fit_batch(points: list[tuple[int, float]], target_bytes: float) -> int | None:
  """Largest batch whose linearly fitted memory estimate stays under target_bytes."""
  if len(points) < 2:
    return None
  (b0, m0), (b1, m1) = min(points), max(points)
  if b1 == b0 or m1 <= m0:
    return None
  slope = (m1 - m0) / (b1 - b0)
  return int(math.floor(b0 + (target_bytes - m0) / slope))


def search_max_batch(
  trial: Callable[[int], Trial],
  *,
  start: int,
  limit: int,
  granularity: int,
  budget_s: float,
  bytes_limit: float | None = None,
  clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
  """Largest per-device batch for which `trial` succeeds, to within `granularity`.

  Doubles from `start` until a trial fails (or `limit` is reached; if `start` fails, halves
  down until one fits), then bisects. When the
  trials report XLA's memory estimate and `bytes_limit` is known, the next candidate is the
  batch a linear fit of the estimates predicts to fill 97% of the memory (if it lies inside the
  open bracket), then one `granularity` above a confirmed prediction. Stops before a trial
  that the remaining `budget_s` (by the mean trial time so far) cannot pay for.

  Returns max_batch_per_device (None if even `start` failed), upper_bound (smallest failing
  batch or None), exact (bracket closed to `granularity`, or `limit` reached), trials, seconds.
  """
  if start < 1 or limit < start or granularity < 1:
    raise ValueError(
      f"need 1 <= start <= limit and granularity >= 1, got start={start}, "
      f"limit={limit}, granularity={granularity}"
    )
  t0 = clock()
  lo, hi = 0, None
  trials: list[Trial] = []
  points: list[tuple[int, float]] = []
  confirmed_prediction = False
  b = start
  while True:
    r = trial(b)
    trials.append(r)
    if r.predicted_bytes is not None:
      points.append((b, r.predicted_bytes))
    if r.fits:
      lo = max(lo, b)
    else:
      hi = b if hi is None else min(hi, b)
    if hi is not None and (hi - lo <= granularity or hi == 1):
      break
    if hi is None and lo >= limit:
      break
    guess = None
    if bytes_limit and len(points) >= 2:
      guess = _fit_batch(points, 0.97 * bytes_limit)
      if guess is not None:
        guess = max(granularity, guess // granularity * granularity)
    upper = hi if hi is not None else limit + 1
    if guess is not None and lo < guess < upper and guess not in {x.batch for x in trials}:
      nxt = guess
      confirmed_prediction = False
    elif (
      guess is not None and lo >= guess and not confirmed_prediction and lo + granularity < upper
    ):
      nxt = lo + granularity  # the prediction held: probe just above it
      confirmed_prediction = True
    elif hi is None:
      nxt = min(2 * lo, limit)
    elif lo == 0:  # even `start` failed: halve down
      nxt = hi // 2
    else:
      nxt = (lo + hi) // 2
      if nxt >= granularity:
        nxt = max(lo + 1, nxt // granularity * granularity)
    if nxt <= lo or nxt < 1 or (hi is not None and nxt >= hi):
      break
    spent = clock() - t0
    if spent + spent / len(trials) > budget_s:
      break
    b = nxt
  exact = (hi is not None and hi - lo <= granularity) or (hi is None and lo >= limit)
  return {
    "max_batch_per_device": lo or None,
    "upper_bound": hi,
    "exact": bool(exact),
    "trials": [dataclasses.asdict(x) for x in trials],
    "seconds": clock() - t0,
  }


# ----------------------------------------------------------------------------------------------
# Building the real step


def load_config(
  variant: str,
  *,
  frames: int,
  batch: int,
  dtype: str,
  remat: str,
  attention: str,
  microbatches: int = 1,
  config_argument: str = "",
):
  """`configs/dfew.py` (the paper recipe, or the row `config_argument` names) with the
  benchmark's overrides."""
  arg = ",".join(a for a in (f"variant={variant}", config_argument) if a)
  c = config_lib.paper_config("dfew", arg)
  c.clip.dtype = dtype
  c.clip.remat = remat
  c.clip.attention_impl = attention
  c.train.microbatches = microbatches
  c.model.num_frames = frames
  c.train.batch_size = batch
  c.train.eval_batch_size = batch
  return c


def _memory_bytes(compiled) -> float | None:
  """XLA's estimate of a compiled program's device memory (None where unavailable)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  return float(
    m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  )


def _flops(stage) -> float | None:
  try:
    ca = stage.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(ca, (list, tuple)):  # older jax: one dict per program
    ca = ca[0] if ca else None
  if not ca or ca.get("flops") is None or ca["flops"] < 0:
    return None
  return float(ca["flops"])


def _memory_stats() -> tuple[float | None, float | None]:
  """(peak bytes in use, bytes limit) over the local devices; None where not reported."""
  peaks, limits = [], []
  for d in jax.local_devices():
    try:
      s = d.memory_stats()
    except Exception:  # pylint: disable=broad-except
      s = None
    if s:
      if "peak_bytes_in_use" in s:
        peaks.append(s["peak_bytes_in_use"])
      if "bytes_limit" in s:
        limits.append(s["bytes_limit"])
  return (float(max(peaks)) if peaks else None, float(min(limits)) if limits else None)


class StepBench:
  """The model, its optimizer and the jitted step of one configuration, ready to compile."""

  def __init__(self, args: argparse.Namespace, workdir: pathlib.Path, attention: str):
    from dfer_clip_jax import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
    from dfer_clip_jax import train as train_lib  # pylint: disable=g-import-not-at-top

    self.args = args
    self.mode = args.mode
    self.config = load_config(
      args.variant,
      frames=args.frames,
      batch=args.batch,
      dtype=args.dtype,
      remat=args.remat,
      attention=attention,
      microbatches=args.microbatches,
      config_argument=args.config_argument,
    )
    c = self.config
    self.mesh = sharding_lib.make_mesh(c.mesh.data, c.mesh.fsdp)
    self.n_dev = self.mesh.devices.size
    self.class_names = datasets.DFEW_CLASSES
    model, self.spec, groups = state_lib.build_model(
      c, workdir, self.class_names, rngs=nnx.Rngs(c.seed)
    )
    optimizer = (
      state_lib.build_optimizer(c, model, groups, steps_per_epoch=100)
      if self.mode == "train"
      else None
    )
    self.graphdef, model_state = nnx.split(model)
    self.model_state, self.model_shardings = state_lib.shard_state(
      model_state, self.mesh, c.mesh.fsdp_min_size
    )
    self.opt_state = self.opt_shardings = None
    if optimizer is not None:
      opt_graphdef, opt_state = nnx.split(optimizer)
      self.opt_state, self.opt_shardings = state_lib.shard_state(
        opt_state, self.mesh, c.mesh.fsdp_min_size
      )
      self.fn = jax.jit(
        train_lib.make_train_step(
          self.graphdef,
          opt_graphdef,
          dropout=c.model.temporal_dropout > 0,
          microbatches=c.train.microbatches,
        ),
        donate_argnums=(0, 1),
        out_shardings=(self.model_shardings, self.opt_shardings, None),
      )
    else:
      evaluator = evaluate_lib.Evaluator(self.graphdef, self.mesh)
      # The evaluator's per-batch function and its once-per-evaluation text features.
      self.fn = evaluator._probs  # pylint: disable=protected-access
      self.text_features = evaluator._constants(self.model_state)  # pylint: disable=protected-access
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh)
    self.replicated = sharding_lib.replicated(self.mesh)
    self.text_fn = None
    # Conditional prompts have no text side apart from the videos: nothing to time alone.
    if optimizer is not None and self.spec.model.head == "prompt" and not self.spec.model.meta_net:
      self.text_fn = jax.jit(_text_tower_step(self.graphdef, optimizer.wrt))
    del model, optimizer

  def make_batch(self, batch: int, seed: int = 0) -> dict[str, jax.Array]:
    """A random uint8 batch made on the devices, sharded on the batch axis."""
    c = self.config
    size, frames, classes = c.clip.image_size, c.model.num_frames, len(self.class_names)

    def make(key):
      kv, kl = jax.random.split(key)
      return {
        "video": jax.random.bits(kv, (batch, frames, size, size, 3), jnp.uint8),
        "label": jax.random.randint(kl, (batch,), 0, classes, jnp.int32),
        "index": jnp.arange(batch, dtype=jnp.int32),
        "mask": jnp.ones((batch,), bool),
      }

    return jax.jit(make, out_shardings=self.batch_sharding)(jax.random.key(seed))

  def make_batches(self, batch: int) -> list[dict[str, jax.Array]]:
    """`NUM_BATCHES` different batches, used in turn: random labels of one repeated batch are
    learnt within a few steps, and a step on saturated values is not a typical step."""
    return [self.make_batch(batch, seed=i) for i in range(NUM_BATCHES)]

  def keys(self, n: int) -> list[jax.Array]:
    """Per-step dropout keys, made and placed (replicated) before any timed loop."""
    base = jax.random.key(self.config.seed)
    return [jax.device_put(jax.random.fold_in(base, i), self.replicated) for i in range(n)]

  def args_for(self, batch: dict[str, jax.Array], key: jax.Array) -> tuple:
    if self.mode == "train":
      return (self.model_state, self.opt_state, batch, key)
    return (self.model_state, batch["video"], self.text_features)

  def lower(self, batch: dict[str, jax.Array], key: jax.Array):
    return self.fn.lower(*self.args_for(batch, key))

  def call(self, compiled, batch: dict[str, jax.Array], key: jax.Array):
    """One step; the train step's new state replaces the (donated) old one."""
    if self.mode == "train":
      self.model_state, self.opt_state, metrics = compiled(
        self.model_state, self.opt_state, batch, key
      )
      return metrics
    return compiled(self.model_state, batch["video"], self.text_features)

  def outputs(self, result) -> Any:
    if self.mode == "train":
      return (self.model_state, self.opt_state, result)
    return result


def _text_tower_step(graphdef, wrt):
  """The text side of a training step alone: the C class prompts through the text tower and
  the gradient back to what trains (the context), with a fixed cotangent."""

  def text_step(model_state):
    model = nnx.merge(graphdef, model_state)

    def features(m):
      return jnp.sum(m.text_features()[0] * 0.01)

    return nnx.grad(features, argnums=nnx.DiffState(0, wrt))(model)

  return text_step


def _time_text(bench: StepBench, steps: int) -> dict[str, Any]:
  """Milliseconds of the text tower's share of a step (forward on the prompts and the
  backward to the context), timed alone after the step's own timing."""
  if bench.text_fn is None:
    return {}
  jax.block_until_ready(bench.text_fn(bench.model_state))  # compile and warm up
  t = time.perf_counter()
  for _ in range(steps):
    out = bench.text_fn(bench.model_state)
  jax.block_until_ready(out)
  return {"text_ms": (time.perf_counter() - t) / steps * 1e3}


def _time_steps(
  bench: StepBench,
  compiled,
  batches: Sequence[dict[str, jax.Array]],
  keys: Sequence[jax.Array],
  warmup: int,
  steps: int,
) -> dict[str, Any]:
  k = iter(keys)
  b = iter(batches[i % len(batches)] for i in range(1, len(keys) + 1))
  for _ in range(warmup):
    jax.block_until_ready(bench.outputs(bench.call(compiled, next(b), next(k))))
  times = []
  # Any implicit host <-> device transfer inside the loop (a host round trip) raises here.
  with jax.transfer_guard("disallow"):
    for _ in range(steps):
      t = time.perf_counter()
      result = bench.call(compiled, next(b), next(k))
      jax.block_until_ready(bench.outputs(result))
      times.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(steps):
      result = bench.call(compiled, next(b), next(k))
    jax.block_until_ready(bench.outputs(result))
    pipelined = (time.perf_counter() - t) / steps
  ms = np.asarray(times) * 1e3
  out = {
    "step_ms_p50": float(np.percentile(ms, 50)),
    "step_ms_p90": float(np.percentile(ms, 90)),
    "step_ms_min": float(ms.min()),
    "step_ms_mean": float(ms.mean()),
    "step_ms_pipelined": pipelined * 1e3,
  }
  if bench.mode == "train":
    metrics = {name: float(v) for name, v in jax.device_get(result).items()}
    out["last_metrics"] = metrics
    if not all(math.isfinite(v) for v in metrics.values()):
      raise FloatingPointError(f"non-finite training metrics {metrics}")
  else:
    probs = np.asarray(jax.device_get(result), np.float64)
    out["probs_row_sum_max_err"] = float(np.abs(probs.sum(-1) - 1).max())
  return out


def _versions() -> dict[str, Any]:
  out = {}
  for name in ("jax", "jaxlib", "flax", "optax"):
    try:
      out[f"{name}_version"] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[f"{name}_version"] = None
  out["jax_version"] = jax.__version__  # what was imported (it may differ from the metadata)
  return out


def _config_record(bench: StepBench, args: argparse.Namespace) -> dict[str, Any]:
  clip_cfg, dfer_cfg = bench.spec.clip, bench.spec.model
  return {
    "variant": args.variant,
    "mode": args.mode,
    "frames": args.frames,
    "batch": args.batch,
    "dtype": args.dtype,
    "remat": args.remat,
    "attention": args.attention,
    "matmul_precision": args.matmul_precision,
    "image_size": clip_cfg.vision.image_size,
    "patch_size": clip_cfg.vision.patch_size,
    "vision_width": clip_cfg.vision.width,
    "vision_layers": clip_cfg.vision.layers,
    "text_width": clip_cfg.text.width,
    "text_layers": clip_cfg.text.layers,
    "embed_dim": clip_cfg.embed_dim,
    "num_classes": dfer_cfg.num_classes,
    "n_ctx": dfer_cfg.n_ctx,
    "temporal_depth": dfer_cfg.temporal_depth,
    "optimizer": bench.config.optim.name,
    "mesh": dict(bench.mesh.shape),
    "config_file": "configs/dfew.py",
    "config_argument": args.config_argument,
  }


def _compile_and_first_step(
  bench: StepBench, batch, key, bytes_limit: float | None, record: dict[str, Any]
):
  """Lowers and compiles the step (timings, XLA's FLOP and memory estimates into `record`),
  refuses a step that XLA's estimate says cannot fit, then runs it once (the first warm-up
  step: kernels that fail at run time fail here). Returns the compiled step."""
  t = time.perf_counter()
  lowered = bench.lower(batch, key)
  record["lower_s"] = time.perf_counter() - t
  t = time.perf_counter()
  compiled = lowered.compile()
  record["compile_s"] = time.perf_counter() - t
  analytic = record["analytic_tflops_per_step"] * 1e12
  # A compiled SPMD program's cost analysis is per device: sum it over the devices.
  xla_flops = _flops(compiled)
  xla_flops = None if xla_flops is None else xla_flops * bench.n_dev
  unoptimized = _flops(lowered)
  record["xla_tflops_per_step"] = None if xla_flops is None else xla_flops / 1e12
  record["xla_tflops_per_step_unoptimized"] = None if unoptimized is None else unoptimized / 1e12
  record["xla_over_analytic"] = None if xla_flops is None else xla_flops / analytic
  need = _memory_bytes(compiled)
  record["compiled_memory_gb"] = None if need is None else need / 1e9
  if bytes_limit is not None and need is not None and need > bytes_limit:
    raise MemoryError(
      f"RESOURCE_EXHAUSTED: XLA's estimate for the step, {need / 1e9:.1f} GB, "
      f"exceeds the device memory of {bytes_limit / 1e9:.1f} GB"
    )
  jax.block_until_ready(bench.outputs(bench.call(compiled, batch, key)))
  return compiled


def _find_max_batch(
  args: argparse.Namespace, bench: StepBench, host_state, bytes_limit: float | None
) -> dict[str, Any]:
  limit = args.max_batch_limit
  if limit is None:
    if bytes_limit is None:
      raise ValueError(
        "--find_max_batch on a backend without device memory stats (e.g. CPU) "
        "needs --max_batch_limit (it would otherwise grow until the host swaps)"
      )
    limit = 1 << 14
  per_device = args.batch // bench.n_dev

  def trial(b: int) -> Trial:
    t = time.perf_counter()
    batch = key = compiled = None
    try:
      batch = bench.make_batch(b * bench.n_dev, seed=b)
      key = bench.keys(1)[0]
      if bench.mode == "train":
        bench.model_state, bench.opt_state = jax.device_put(
          host_state, (bench.model_shardings, bench.opt_shardings)
        )
      compiled = bench.lower(batch, key).compile()
      need = _memory_bytes(compiled)
      if bytes_limit is not None and need is not None and need > bytes_limit:
        return Trial(b, False, need, time.perf_counter() - t, "XLA's estimate exceeds memory")
      jax.block_until_ready(bench.outputs(bench.call(compiled, batch, key)))
      # A few back-to-back steps: the fastest batch is not always the largest.
      t_steps = time.perf_counter()
      for _ in range(TRIAL_STEPS):
        result = bench.call(compiled, batch, key)
      jax.block_until_ready(bench.outputs(result))
      step_s = (time.perf_counter() - t_steps) / TRIAL_STEPS
      return Trial(b, True, need, time.perf_counter() - t, clips_per_s=b * bench.n_dev / step_s)
    except Exception as err:  # pylint: disable=broad-except
      if not is_oom(err):
        raise
      return Trial(b, False, None, time.perf_counter() - t, str(err).splitlines()[0][:200])
    finally:
      del batch, key, compiled
      gc.collect()

  return search_max_batch(
    trial,
    start=per_device,
    limit=limit,
    granularity=args.max_batch_granularity,
    budget_s=args.max_batch_budget_s,
    bytes_limit=bytes_limit,
  )


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Builds, compiles and times one configuration; returns the JSON record."""
  if args.variant not in VARIANTS:
    raise ValueError(f"--variant={args.variant!r}: expected one of {VARIANTS}")
  precision = args.matmul_precision or ("highest" if args.dtype == "float32" else "default")
  args.matmul_precision = precision
  # The precision applies while tracing, so the whole run (build, compile, steps) sits inside.
  with (
    jax.default_matmul_precision(precision) if precision != "default" else contextlib.nullcontext()
  ):
    return _run(args, precision)


def _run(args: argparse.Namespace, precision: str) -> dict[str, Any]:
  devices = jax.local_devices()
  platform = devices[0].platform
  kind = devices[0].device_kind
  arithmetic = arithmetic_of(args.dtype, precision, platform)
  chip, peak = peak_tflops(kind, arithmetic)
  record: dict[str, Any] = {
    "benchmark": "dfer_clip_jax.benchmarks.train_step",
    "framework": "jax",
    "status": "ok",
    "device_kind": kind,
    "device_count": len(jax.devices()),
    "platform": platform,
    "process_count": jax.process_count(),
    **_versions(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", ""),
    "compilation_cache_dir": os.environ.get("JAX_COMPILATION_CACHE_DIR", ""),
    "arithmetic": arithmetic,
    "tf32": arithmetic == "tf32" and platform in ("gpu", "cuda"),
    "peak_chip": chip,
    "peak_tflops": peak,
  }
  record.update(
    {
      k: getattr(args, k)
      for k in (
        "variant",
        "mode",
        "frames",
        "batch",
        "dtype",
        "remat",
        "attention",
        "matmul_precision",
        "microbatches",
        "xla_gpu_flags",
      )
    }
  )
  workdir = (
    pathlib.Path(args.workdir)
    if args.workdir
    else pathlib.Path(tempfile.mkdtemp(prefix="dfer_bench_"))
  )
  try:
    if args.batch % len(jax.devices()):
      raise ValueError(
        f"--batch={args.batch} must be a multiple of the {len(jax.devices())} devices"
      )
    record["batch_per_device"] = args.batch // len(jax.devices())
    bench = StepBench(args, workdir, args.attention)
    head_dim = bench.spec.clip.vision.width // bench.spec.clip.vision.heads
    record["attention_used"] = clip_lib.resolve_attention_impl(args.attention, args.dtype, head_dim)
    record["config"] = _config_record(bench, args)
    flops = analytic_flops(
      bench.spec.clip,
      bench.spec.model,
      args.batch,
      args.mode,
      image_trained=bench.config.optim.lr.image > 0,
    )
    record["analytic_tflops_per_step"] = flops["total"] / 1e12
    record["analytic_tflops_breakdown"] = {k: v / 1e12 for k, v in flops.items() if k != "total"}
    record["model_tflops_per_step"] = flops["total"] / 1e12
    _, bytes_limit = _memory_stats()
    record["bytes_limit_gb"] = None if bytes_limit is None else bytes_limit / 1e9
    # The search starts from this state whatever the measurement does to it (donation).
    host_state = (
      jax.device_get((bench.model_state, bench.opt_state))
      if args.find_max_batch and args.mode == "train"
      else None
    )
    try:
      bench = _measure(args, bench, workdir, bytes_limit, peak, record)
    except Exception as err:  # pylint: disable=broad-except
      if not (args.find_max_batch and is_oom(err)):
        raise
      _record_error(record, err)  # --batch does not fit; the search still looks for one
    if args.find_max_batch:
      if args.mode == "train":  # each trial places a fresh copy of the state
        bench.model_state = bench.opt_state = None
      gc.collect()
      record["max_batch_search"] = _find_max_batch(args, bench, host_state, bytes_limit)
      record["max_batch_per_device"] = record["max_batch_search"]["max_batch_per_device"]
      best = fastest_trial(record["max_batch_search"]["trials"])
      record["fastest_batch_per_device"] = None if best is None else best["batch"]
      record["fastest_batch_clips_per_s"] = None if best is None else best["clips_per_s"]
  except Exception as err:  # pylint: disable=broad-except
    _record_error(record, err)
  finally:
    if not args.workdir:
      shutil.rmtree(workdir, ignore_errors=True)
  return record


def _attention_summary(sites: dict[str, str], default: str) -> str:
  """One word for the record's table: the implementation every call site ran, or `mixed`."""
  kinds = {v.split(" ")[0] for v in sites.values()}
  if not kinds:
    return default
  return kinds.pop() if len(kinds) == 1 else "mixed"


def _record_error(record: dict[str, Any], err: BaseException) -> None:
  record["status"] = "oom" if is_oom(err) else "error"
  record["error"] = f"{type(err).__name__}: {str(err)[:2000]}"
  record["traceback"] = traceback.format_exc()[-4000:]
  peak_bytes, _ = _memory_stats()
  record["peak_memory_gb"] = None if peak_bytes is None else peak_bytes / 1e9


def _measure(
  args: argparse.Namespace,
  bench: StepBench,
  workdir: pathlib.Path,
  bytes_limit: float | None,
  peak: float | None,
  record: dict[str, Any],
) -> StepBench:
  """Compiles and times the step at --batch into `record`; returns the bench it used (a new one
  if cuDNN attention had to be replaced by XLA's)."""
  n_keys = max(args.warmup, 1) + 2 * args.steps
  batches, keys = bench.make_batches(args.batch), bench.keys(n_keys)
  try:
    # What this run's tracing records (the process may have traced other models before).
    clip_lib.ATTENTION_SITES.clear()
    clip_lib.CUDNN_FALLBACKS.clear()
    compiled = _compile_and_first_step(bench, batches[0], keys[0], bytes_limit, record)
  except Exception as err:  # pylint: disable=broad-except
    if not (args.attention == "auto" and record["attention_used"] == "cudnn") or is_oom(err):
      raise
    # cuDNN attention passed its trace-time checks but failed to compile or run: use XLA's.
    record["attention_fallback_error"] = f"{type(err).__name__}: {str(err)[:300]}"
    del bench, batches, keys
    gc.collect()
    clip_lib.ATTENTION_SITES.clear()
    bench = StepBench(args, workdir, "xla")
    record["attention_used"] = "xla"
    batches, keys = bench.make_batches(args.batch), bench.keys(n_keys)
    compiled = _compile_and_first_step(bench, batches[0], keys[0], bytes_limit, record)
  record["attention_sites"] = dict(sorted(clip_lib.ATTENTION_SITES.items()))
  record["attention_used"] = _attention_summary(record["attention_sites"], record["attention_used"])
  if clip_lib.CUDNN_FALLBACKS and "attention_fallback_error" not in record:
    record["attention_fallback_error"] = sorted(clip_lib.CUDNN_FALLBACKS)[0][:300]
  record.update(
    _time_steps(bench, compiled, batches, keys[1:], max(args.warmup, 1) - 1, args.steps)
  )
  step_s = record["step_ms_pipelined"] / 1e3
  if args.mode == "train":
    record.update(_time_text(bench, args.steps))
    if "text_ms" in record:
      record["text_share"] = record["text_ms"] / record["step_ms_pipelined"]
  record["clips_per_s"] = args.batch / step_s
  record["frames_per_s"] = args.batch * args.frames / step_s
  record["achieved_tflops"] = record["model_tflops_per_step"] / step_s
  record["mfu"] = None if peak is None else record["achieved_tflops"] / (peak * len(jax.devices()))
  peak_bytes, _ = _memory_stats()
  record["peak_memory_gb"] = None if peak_bytes is None else peak_bytes / 1e9
  return bench


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--variant", default="B/32", choices=VARIANTS, help="CLIP size (random init)")
  p.add_argument(
    "--config_argument",
    default="",
    help="the text after the colon of --config=configs/dfew.py:..., e.g. baseline=cocoop (a "
    "row of the paper's tables); variant comes from --variant",
  )
  p.add_argument("--frames", type=int, default=16, help="frames per clip (T)")
  p.add_argument("--batch", type=int, default=48, help="global batch of clips")
  p.add_argument(
    "--dtype",
    default="float32",
    choices=("float32", "bfloat16"),
    help="compute dtype (parameters and optimizer state stay float32)",
  )
  p.add_argument(
    "--remat",
    default="none",
    choices=clip_lib.REMAT_MODES,
    help="image-tower activations recomputed in the backward pass (models.clip.remat_mode)",
  )
  p.add_argument(
    "--microbatches",
    type=int,
    default=1,
    help="gradient accumulation: the batch runs as this many sequential slices",
  )
  p.add_argument(
    "--xla_gpu_flags",
    default="none",
    choices=sorted(xla_flags.PRESETS),
    help="XLA GPU option preset (dfer_clip_jax/xla_flags.py), as the trainer's train.xla_gpu_flags",
  )
  p.add_argument("--mode", default="train", choices=("train", "eval"))
  p.add_argument(
    "--attention",
    default="auto",
    choices=clip_lib.ATTENTION_IMPLS,
    help="attention implementation; auto = cuDNN on GPUs in bf16, else XLA",
  )
  p.add_argument(
    "--matmul_precision",
    default=None,
    choices=("default", "high", "highest"),
    help="jax_default_matmul_precision; default: highest for float32 (true fp32, "
    "as the reference), default for bfloat16",
  )
  p.add_argument("--steps", type=int, default=20, help="timed steps (each of the two loops)")
  p.add_argument(
    "--warmup",
    type=int,
    default=3,
    help="untimed steps after compiling (at least 1: the first step also checks "
    "that the compiled kernels run)",
  )
  p.add_argument(
    "--json", default="", type=cli.absolute, help="write the record (or the summary's records) here"
  )
  p.add_argument(
    "--workdir",
    default="",
    help="folder for the demo tokenizer (reused across runs); default: a temp dir",
  )
  p.add_argument(
    "--find_max_batch",
    action="store_true",
    help="also search the largest per-device batch that fits",
  )
  p.add_argument(
    "--max_batch_budget_s", type=float, default=300.0, help="time budget of the search"
  )
  p.add_argument(
    "--max_batch_limit",
    type=int,
    default=None,
    help="largest per-device batch to try (required without device memory stats)",
  )
  p.add_argument(
    "--max_batch_granularity",
    type=int,
    default=8,
    help="the search stops when the bracket is this narrow",
  )
  p.add_argument(
    "--summarize",
    nargs="*",
    default=None,
    metavar="JSON",
    help="print a markdown table of these records (files or folders of *.json)",
  )
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if args.summarize is not None:
    records = report.read_records(args.summarize)
    print(report.summarize(records))
    if args.json:
      pathlib.Path(args.json).write_text(json.dumps(records, indent=2))
    return 0
  if args.steps < 1 or args.warmup < 0:
    raise SystemExit("--steps must be >= 1 and --warmup >= 0")
  # Before the backend starts (XLA reads its flags once), as the trainer's main does.
  xla_flags.apply(args.xla_gpu_flags)
  return report.emit(run(args), args.json)


if __name__ == "__main__":
  sys.exit(main())
