"""The train-step benchmark (schema of its record on a tiny CPU run, FLOP counts, peak table,
max-batch search) and the attention implementations it picks (causal parity, `auto`)."""

import functools
import json
import math
import re
import unittest.mock
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfer_clip_jax.benchmarks import train_step as ts
from dfer_clip_jax.data.datasets import DFEW_CLASSES
from dfer_clip_jax.models import clip as clip_lib
from dfer_clip_jax.models import dfer_clip as dc
from dfer_clip_jax.tokenizer import END_OF_TEXT, START_OF_TEXT

TINY = ["--variant=tiny", "--frames=2", "--batch=8", "--steps=2", "--warmup=1"]
REQUIRED = (
  "compile_s",
  "step_ms_p50",
  "step_ms_p90",
  "clips_per_s",
  "frames_per_s",
  "model_tflops_per_step",
  "xla_tflops_per_step",
  "analytic_tflops_per_step",
  "achieved_tflops",
  "mfu",
  "peak_memory_gb",
  "device_kind",
  "device_count",
  "jax_version",
  "jaxlib_version",
  "config",
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """Shared by the runs so that the offline demo tokenizer is built once."""
  return tmp_path_factory.mktemp("bench")


def _run(workdir, tmp_path, *extra):
  out = tmp_path / "record.json"
  code = ts.main(TINY + [f"--workdir={workdir}", f"--json={out}", *extra])
  record = json.loads(out.read_text())
  assert code == 0, record.get("traceback")
  return record


def _check_common(record, mode):
  assert record["status"] == "ok"
  for key in REQUIRED:
    assert key in record, key
  assert record["mode"] == mode and record["config"]["variant"] == "tiny"
  assert record["device_count"] == len(jax.devices()) and record["batch_per_device"] == 1
  assert record["mfu"] is None and record["peak_chip"] is None  # a CPU has no peak entry
  assert record["peak_memory_gb"] is None  # the CPU keeps no memory stats
  assert 0 < record["step_ms_min"] <= record["step_ms_p50"] <= record["step_ms_p90"]
  step_s = record["step_ms_pipelined"] / 1e3
  assert record["clips_per_s"] == pytest.approx(8 / step_s)
  assert record["frames_per_s"] == pytest.approx(16 / step_s)
  assert record["achieved_tflops"] == pytest.approx(record["model_tflops_per_step"] / step_s)
  # The analytic count and XLA's count of the program before partitioning agree: XLA adds
  # elementwise work and the normalisations, a few percent at these sizes.
  ratio = record["xla_tflops_per_step_unoptimized"] / record["analytic_tflops_per_step"]
  assert 0.95 < ratio < 1.25, ratio
  assert record["compile_s"] > 0 and record["compiled_memory_gb"] > 0


def test_train_step_record(workdir, tmp_path, capsys):
  # The largest-batch search, capped at the measured batch (its one trial reuses the compiled
  # step): exercises the trial on a fresh copy of the state.
  record = _run(
    workdir,
    tmp_path,
    "--dtype=bfloat16",
    "--remat=block",
    "--find_max_batch",
    "--max_batch_limit=1",
  )
  _check_common(record, "train")
  search = record["max_batch_search"]
  assert record["max_batch_per_device"] == 1 and search["exact"] and len(search["trials"]) == 1
  # Each fitting trial is timed: the fastest batch is reported beside the largest.
  assert search["trials"][0]["clips_per_s"] > 0 and record["fastest_batch_per_device"] == 1
  # The text tower's share of the step (the prompts forward, the backward to the context).
  assert 0 < record["text_ms"] and 0 < record["text_share"] < 1
  # The frozen text tower only propagates activation gradients to the context: XLA's count of
  # the step is the analytic one plus remat's recomputed image blocks (plus elementwise work),
  # far below what the text tower's weight gradients would add.
  v, t = clip_lib.preset("tiny").vision, clip_lib.preset("tiny").text
  lin, att = ts.transformer_flops(v.grid**2 + 1, v.width, v.layers, v.mlp_dim, v.width)
  recomputed = 8 * 2 * (lin + att) / 1e12  # 8 clips of 2 frames
  text_lin, _ = ts.transformer_flops(t.context_length, t.width, t.layers, t.mlp_dim, t.width)
  text_weight_grads = 7 * text_lin / 1e12  # 7 class prompts
  expected = record["analytic_tflops_per_step"] + recomputed
  assert expected <= record["xla_tflops_per_step_unoptimized"] < expected + text_weight_grads / 2
  assert record["matmul_precision"] == "default" and record["arithmetic"] == "bf16"
  assert not record["tf32"] and record["attention_used"] == "xla"  # no cuDNN on a CPU
  # Image tower (16 patches + class token), temporal transformer (2 frames + class token), text.
  assert record["attention_sites"] == {"L=17": "xla", "L=3": "xla", "L=77 causal": "xla"}
  metrics = record["last_metrics"]
  assert set(metrics) == {"loss", "accuracy", "grad_norm", "param_norm"}
  assert all(math.isfinite(v) for v in metrics.values())
  parts = record["analytic_tflops_breakdown"]
  assert sum(parts.values()) == pytest.approx(record["analytic_tflops_per_step"])
  assert parts["text"] > 0 and parts["temporal"] > 0
  assert "| jax | tiny | train | bfloat16 |" in capsys.readouterr().out
  # The summary CLI reads records back.
  assert ts.main(["--summarize", str(tmp_path / "record.json")]) == 0
  assert "| jax | tiny | train | bfloat16 | block | xla | none | 8 | 1 |" in capsys.readouterr().out


def test_eval_step_record(workdir, tmp_path):
  # Same model as the train test (its initialisation is compiled once per process).
  record = _run(workdir, tmp_path, "--mode=eval", "--dtype=bfloat16", "--remat=block")
  _check_common(record, "eval")
  assert record["arithmetic"] == "bf16" and record["probs_row_sum_max_err"] < 1e-2
  # Evaluation has no text tower per batch (its features are computed once per evaluation).
  assert record["analytic_tflops_breakdown"]["text"] == 0


def test_analytic_flops_of_vit_b16():
  """ViT-B/16 at 224: the well-known 17.6 G multiply-adds per image forward, 35.1 GFLOPs."""
  cfg = clip_lib.preset("B/16")
  dcfg = dc.DFERCLIPConfig(class_names=DFEW_CLASSES, num_frames=16)
  fwd = ts.analytic_flops(cfg, dcfg, 1, "eval")["image"] / 16
  assert fwd == pytest.approx(2 * 17.6e9, rel=0.01)
  train = ts.analytic_flops(cfg, dcfg, 1, "train")
  # Training the tower: ~3x its forward (the patch embedding 2x: no gradient to pixels).
  assert train["image"] / 16 == pytest.approx(3 * fwd, rel=0.01)
  with pytest.raises(ValueError, match="mode"):
    ts.analytic_flops(cfg, dcfg, 1, "predict")


def test_peak_table():
  assert ts.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == ("H100 SXM", 989.4)
  assert ts.peak_tflops("NVIDIA H100 PCIe", "tf32") == ("H100 PCIe", 378.0)
  assert ts.peak_tflops("NVIDIA H200", "fp32") == ("H200 SXM", 66.9)
  assert ts.peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == ("A100", 312.0)
  assert ts.peak_tflops("TPU v5 lite", "bf16") == ("TPU v5e", 197.0)
  assert ts.peak_tflops("TPU v5p", "bf16") == ("TPU v5p", 459.0)
  assert ts.peak_tflops("TPU v4", "bf16") == ("TPU v4", 275.0)
  assert ts.peak_tflops("cpu", "fp32") == (None, None)
  assert ts.arithmetic_of("bfloat16", "default", "gpu") == "bf16"
  assert ts.arithmetic_of("float32", "default", "gpu") == "tf32"
  assert ts.arithmetic_of("float32", "highest", "gpu") == "fp32"
  with pytest.raises(ValueError, match="arithmetic"):
    ts.peak_tflops("NVIDIA H100", "fp8")


def _fake_trial(max_fit, bytes_per_clip=None, base=1000.0):
  calls = []

  def trial(b):
    calls.append(b)
    need = None if bytes_per_clip is None else base + bytes_per_clip * b
    return ts.Trial(b, b <= max_fit, need, 1.0)

  return trial, calls


@pytest.mark.parametrize("max_fit", [5, 37, 200])
def test_search_max_batch_brackets_the_boundary(max_fit):
  trial, calls = _fake_trial(max_fit)
  out = ts.search_max_batch(trial, start=4, limit=1000, granularity=2, budget_s=1e9)
  assert out["exact"] and out["upper_bound"] - out["max_batch_per_device"] <= 2
  assert out["max_batch_per_device"] <= max_fit < out["upper_bound"]
  assert len(calls) == len(set(calls))  # never the same batch twice


def test_search_max_batch_uses_the_memory_estimate():
  # Memory 1000 + 100 * b against a limit that fits b <= 300 at 97%: the fit jumps there.
  limit = (1000 + 100 * 300) / 0.97
  trial, calls = _fake_trial(300, bytes_per_clip=100.0)
  out = ts.search_max_batch(
    trial, start=48, limit=10_000, granularity=8, budget_s=1e9, bytes_limit=limit
  )
  assert out["exact"] and out["max_batch_per_device"] == 296 and out["upper_bound"] == 304
  assert calls == [48, 96, 296, 304]


def test_search_max_batch_limits():
  trial, _ = _fake_trial(10**6)
  out = ts.search_max_batch(trial, start=4, limit=20, granularity=1, budget_s=1e9)
  assert out["max_batch_per_device"] == 20 and out["exact"]
  trial, calls = _fake_trial(0)
  out = ts.search_max_batch(trial, start=4, limit=20, granularity=1, budget_s=1e9)
  assert out["max_batch_per_device"] is None and out["upper_bound"] == 1 and calls == [4, 2, 1]
  trial, calls = _fake_trial(5)  # --batch does not fit: halve, then bisect up
  out = ts.search_max_batch(trial, start=24, limit=100, granularity=1, budget_s=1e9)
  assert out["max_batch_per_device"] == 5 and out["upper_bound"] == 6 and out["exact"]
  # Each trial "takes" 10 s of a 25 s budget: the search stops before overrunning it.
  now = [0.0]

  def slow(b):
    now[0] += 10.0
    return ts.Trial(b, True, None, 10.0)

  out = ts.search_max_batch(
    slow, start=1, limit=10**6, granularity=1, budget_s=25.0, clock=lambda: now[0]
  )
  assert len(out["trials"]) == 2 and not out["exact"]


# ---------------------------------------------------------------------------------------------
# Attention


@functools.partial(jax.jit, static_argnames=("causal", "impl"))
def _attention(q, k, v, *, causal, impl):
  return clip_lib.attention(q, k, v, causal=causal, impl=impl)


def _qkv(dtype, length=13):
  keys = jax.random.split(jax.random.key(0), 3)
  return [jax.random.normal(k, (2, length, 3, 8), jnp.float32).astype(dtype) for k in keys]


@pytest.mark.parametrize("causal", [True, False])
def test_attention_implementations_agree(causal):
  q, k, v = _qkv(jnp.float32)
  plain = _attention(q, k, v, causal=causal, impl="plain")
  np.testing.assert_allclose(
    np.asarray(_attention(q, k, v, causal=causal, impl="xla")), np.asarray(plain), atol=2e-6
  )
  qb, kb, vb = _qkv(jnp.bfloat16)
  plain_bf16 = _attention(qb, kb, vb, causal=causal, impl="plain")
  auto_bf16 = _attention(qb, kb, vb, causal=causal, impl="auto")
  assert auto_bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(auto_bf16, np.float32), np.asarray(plain, np.float32), atol=5e-2
  )
  np.testing.assert_allclose(
    np.asarray(auto_bf16, np.float32), np.asarray(plain_bf16, np.float32), atol=2e-2
  )


def test_causal_attention_ignores_the_future():
  q, k, v = _qkv(jnp.float32)
  cut = 6
  k2 = k.at[:, cut:].set(k[:, cut:] * 3.0 + 1.0)
  v2 = v.at[:, cut:].set(-v[:, cut:])
  for impl in ("plain", "xla", "auto"):
    a = _attention(q, k, v, causal=True, impl=impl)
    b = _attention(q, k2, v2, causal=True, impl=impl)
    np.testing.assert_array_equal(np.asarray(a[:, :cut]), np.asarray(b[:, :cut]))
    assert np.abs(np.asarray(a[:, cut:] - b[:, cut:])).max() > 1e-3


def test_auto_attention_choice_and_fallback(monkeypatch):
  # A fresh record of fallbacks: what the call below adds is then all it holds.
  monkeypatch.setattr(clip_lib, "CUDNN_FALLBACKS", set())
  assert clip_lib.resolve_attention_impl("auto", jnp.bfloat16, 64) == "xla"  # on the CPU
  assert clip_lib.resolve_attention_impl("plain", jnp.bfloat16, 64) == "plain"
  with pytest.raises(ValueError, match="attention implementation"):
    clip_lib.resolve_attention_impl("flash", jnp.float32, 64)
  with unittest.mock.patch.object(jax, "default_backend", lambda: "gpu"):
    assert clip_lib.resolve_attention_impl("auto", jnp.bfloat16, 64) == "cudnn"
    assert clip_lib.resolve_attention_impl("auto", jnp.float16, 128) == "cudnn"
    assert clip_lib.resolve_attention_impl("auto", jnp.float32, 64) == "xla"
    assert clip_lib.resolve_attention_impl("auto", jnp.bfloat16, 12) == "xla"
    assert clip_lib.resolve_attention_impl("auto", jnp.bfloat16, 256) == "xla"
    # This CPU has no cuDNN: `auto` hears cuDNN refuse while tracing and runs XLA's attention.
    q, k, v = _qkv(jnp.bfloat16)
    out = clip_lib.attention(q, k, v, causal=True, impl="auto")
  assert len(clip_lib.CUDNN_FALLBACKS) == 1  # this call's refusal, logged once
  np.testing.assert_array_equal(
    np.asarray(out, np.float32),
    np.asarray(clip_lib.attention(q, k, v, causal=True, impl="xla"), np.float32),
  )
  with pytest.raises(ValueError, match="attention implementation"):
    clip_lib.MultiheadAttention(
      8, 1, dtype=jnp.float32, attention_impl="flash", in_std=0.1, out_std=0.1, rngs=nnx.Rngs(0)
    )


def _cudnn_refusing_odd_lengths(lengths: list[int]):
  """A stand-in for `jax.nn.dot_product_attention` on a GPU whose cuDNN path, like jax 0.11's in
  training, refuses odd sequence lengths; it runs XLA's attention for what it accepts and
  appends every length handed to cuDNN to `lengths`."""
  real = jax.nn.dot_product_attention

  def fake(q, k, v, *args, implementation=None, **kw):
    if implementation == "cudnn":
      lengths.append(q.shape[1])
      if q.shape[1] % 2:
        raise NotImplementedError(f"Unsupported sequence length Q {q.shape[1]}")
      implementation = "xla"
    return real(q, k, v, *args, implementation=implementation, **kw)

  return fake


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("multiple", [2, 8])
def test_padded_attention_equals_unpadded_values_and_gradients(causal, multiple):
  """The padding that lets cuDNN take odd lengths changes nothing: values and the gradients of
  q, k, v equal unpadded attention (13 tokens padded to 14 or 16; XLA's implementation with the
  same `key_value_seq_lengths` mask cuDNN gets)."""
  q, k, v = _qkv(jnp.float32)
  cot = jax.random.normal(jax.random.key(1), q.shape)

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) * cot)

  plain = functools.partial(clip_lib.attention, causal=causal, impl="plain")
  padded = functools.partial(
    clip_lib.padded_attention, causal=causal, multiple=multiple, implementation="xla"
  )
  out_plain, out_padded = plain(q, k, v), jax.jit(padded)(q, k, v)
  assert out_padded.shape == q.shape
  np.testing.assert_allclose(np.asarray(out_padded), np.asarray(out_plain), atol=2e-6)
  grads_plain = jax.grad(functools.partial(loss, plain), argnums=(0, 1, 2))(q, k, v)
  grads_padded = jax.jit(jax.grad(functools.partial(loss, padded), argnums=(0, 1, 2)))(q, k, v)
  for gp, gq in zip(grads_padded, grads_plain):
    np.testing.assert_allclose(np.asarray(gp), np.asarray(gq), atol=1e-5)


def test_cudnn_route_pads_odd_lengths_even_under_remat(monkeypatch):
  """On a GPU, `auto` hands cuDNN even lengths only: a stand-in for jax's cuDNN path that, like
  jax 0.11 in training, refuses odd lengths, sees 14 for 13 tokens, also when the backward is
  traced late (remat), and the values and gradients match XLA's."""
  lengths = []
  monkeypatch.setattr(jax.nn, "dot_product_attention", _cudnn_refusing_odd_lengths(lengths))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(clip_lib, "ATTENTION_SITES", {})
  q, k, v = _qkv(jnp.bfloat16)

  def loss(impl, q, k, v):
    attend = jax.checkpoint(functools.partial(clip_lib.attention, causal=False, impl=impl))
    return jnp.sum(attend(q, k, v).astype(jnp.float32))

  g_auto = jax.jit(jax.grad(functools.partial(loss, "auto"), argnums=(0, 1, 2)))(q, k, v)
  assert lengths and set(lengths) == {14}
  assert clip_lib.ATTENTION_SITES["L=13"] == "cudnn (padded to 14)"
  g_xla = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_auto, g_xla):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=3e-2)
  out = clip_lib.attention(q, k, v, causal=True, impl="cudnn")
  assert clip_lib.ATTENTION_SITES["L=13 causal"] == "cudnn (padded to 14)"
  np.testing.assert_allclose(
    np.asarray(out, np.float32),
    np.asarray(clip_lib.attention(q, k, v, causal=True, impl="xla"), np.float32),
    atol=2e-2,
  )


def test_whole_train_step_on_the_padded_cudnn_route(workdir, tmp_path, monkeypatch):
  """The real DFER-CLIP training step with remat, `auto` attention on a (simulated) GPU whose
  cuDNN refuses odd lengths in training as jax 0.11's does: every call site (image 17 tokens,
  temporal 3, text 77 causal) runs the padded cuDNN route and the step's metrics equal the
  XLA-attention step's."""
  common = ["--dtype=bfloat16", "--remat=block"]
  xla = _run(workdir, tmp_path, "--attention=xla", *common)
  monkeypatch.setattr(jax.nn, "dot_product_attention", _cudnn_refusing_odd_lengths([]))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  auto = _run(workdir, tmp_path, "--attention=auto", *common)
  assert auto["attention_used"] == "cudnn" and "attention_fallback_error" not in auto
  assert auto["attention_sites"] == {
    "L=17": "cudnn (padded to 18)",
    "L=3": "cudnn (padded to 4)",
    "L=77 causal": "cudnn (padded to 78)",
  }
  for key in ("loss", "accuracy", "grad_norm", "param_norm"):
    assert auto["last_metrics"][key] == pytest.approx(xla["last_metrics"][key], rel=2e-2), key


# ---------------------------------------------------------------------------------------------
# Mixed precision: what runs in bfloat16 and what in float32


class _Tokenizer:
  eos_token_id = END_OF_TEXT

  def __call__(self, text, add_special_tokens=True):
    ids = [1 + zlib.crc32(w.encode()) % 900 for w in re.findall(r"\w+|[^\w\s]", text.lower())]
    return {"input_ids": [START_OF_TEXT] + ids + [END_OF_TEXT] if add_special_tokens else ids}


def _products(jaxpr, out):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      out.append(eqn)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if hasattr(sub, "eqns"):
          _products(sub, out)
        elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          _products(sub.jaxpr, out)
  return out


def test_bfloat16_model_runs_its_products_in_bfloat16():
  """In a bf16 model every matrix product of the training gradient (image, temporal and text
  towers, forward and backward) takes bf16 operands, except the float32 logits
  (video @ text.T, and its two backward products) and XLA attention's backward products, which
  carry a bf16 x bf16 -> f32 dot algorithm; the loss sees float32 logits."""
  cfg = dc.DFERCLIPConfig(class_names=DFEW_CLASSES, num_frames=2)  # the benchmark test's sizes
  clip = clip_lib.CLIP(clip_lib.tiny_config(), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  model = dc.create_dfer_clip(cfg, clip, _Tokenizer(), dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
  graphdef, state = nnx.split(model)
  trained = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("text")))
  video = jnp.zeros((2, 2, 32, 32, 3), jnp.float32)

  def grads(state):
    def loss(m):
      logits, _ = m(video, train=True)
      assert logits.dtype == jnp.float32
      return jax.nn.log_softmax(logits).sum()

    return nnx.grad(loss, argnums=nnx.DiffState(0, trained))(nnx.merge(graphdef, state))

  products = _products(jax.make_jaxpr(grads)(state).jaxpr, [])
  assert len(products) > 50
  fp32 = [e for e in products if any(v.aval.dtype == jnp.float32 for v in e.invars)]
  logits = [e for e in fp32 if all(v.aval.dtype == jnp.float32 for v in e.invars)]
  assert len(logits) == 3 and all(
    cfg.num_classes in e.outvars[0].aval.shape
    or e.outvars[0].aval.shape[-1] == 64
    and e.outvars[0].aval.shape[0] in (2, cfg.num_classes)
    for e in logits
  )
  for e in fp32:
    if e not in logits:
      assert "BF16_BF16_F32" in str(e.params.get("precision")), e
  assert sum(e.primitive.name == "conv_general_dilated" for e in products) == 2
