"""benchmarks/torch_step.py (the PyTorch DFER-CLIP step timed beside ours) does the same work.

One tiny Hugging Face CLIP folder (prime-ish sizes, so a transposed or mis-split axis fails) is
loaded into both implementations: ours through the normal config path (`clip.checkpoint`,
`state.build_model`, the trainer's `make_train_step`), torch's through `CLIPModel.
from_pretrained`; our temporal weights and prompt context are copied into the torch model. Then:
the same loss on the same uint8 batch, the same losses after SGD steps, the same parameter
updates per learning-rate group (momentum, weight decay, frozen text tower), the same analytic
FLOP count; and the script itself runs on the CPU and writes train_step's record fields.
"""

import copy
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# pylint: disable=g-import-not-at-top,wrong-import-position
from dfer_clip_jax import config_lib, demo_tokenizer, optim
from dfer_clip_jax import state as state_lib
from dfer_clip_jax import train as train_lib
from dfer_clip_jax.benchmarks import train_step as ts
from dfer_clip_jax.conversion import clip_weights
from dfer_clip_jax.data import datasets
from dfer_clip_jax.models import clip as clip_lib
from dfer_clip_jax.models import dfer_clip as dfer_lib

# pylint: enable=g-import-not-at-top,wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCRIPT = REPO / "benchmarks" / "torch_step.py"


def _load_script():
  spec = importlib.util.spec_from_file_location("torch_step", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules["torch_step"] = module
  spec.loader.exec_module(module)
  return module


tstep = _load_script()

BATCH, FRAMES, STEPS = 3, 3, 3
TEMPORAL = dict(temporal_heads=3, temporal_dim_head=5, temporal_mlp_dim=20)  # inner 15, D 24
VOCAB = state_lib.DEMO_VOCAB  # the demo tokenizer's: its end-of-text id is VOCAB - 1
HF_SIZES = dict(
  vision=dict(
    hidden_size=40,
    intermediate_size=72,
    num_hidden_layers=2,
    num_attention_heads=5,
    image_size=30,
    patch_size=6,
  ),
  text=dict(
    hidden_size=48,
    intermediate_size=88,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
  ),
  projection_dim=24,
)


def _texts():
  return dfer_lib.DFERCLIPConfig(class_names=datasets.DFEW_CLASSES).texts()


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
  """A tiny HF CLIP folder with its own vocabulary (the demo tokenizer of the DFEW texts)."""
  text = transformers.CLIPTextConfig(
    vocab_size=VOCAB,
    eos_token_id=VOCAB - 1,
    bos_token_id=VOCAB - 2,
    pad_token_id=VOCAB - 1,
    **HF_SIZES["text"],
  )
  vision = transformers.CLIPVisionConfig(**HF_SIZES["vision"])
  cfg = transformers.CLIPConfig(
    text_config=text.to_dict(),
    vision_config=vision.to_dict(),
    projection_dim=HF_SIZES["projection_dim"],
  )
  torch.manual_seed(0)
  model = transformers.CLIPModel(cfg)
  # Random LayerNorm affine parameters, biases and class embedding, so none can be skipped.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if re.search(r"norm|layrnorm|class_embedding|bias", name):
        p.add_(0.1 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp("hf_clip")
  model.save_pretrained(folder)
  demo_tokenizer.build_demo_tokenizer(folder, _texts(), vocab_size=VOCAB)
  return folder


def _our_config(clip_folder=None, variant="tiny", frames=FRAMES, batch=BATCH):
  """Our benchmark's config (configs/dfew.py, the paper recipe), in float32, XLA attention."""
  c = config_lib.paper_config("dfew", f"variant={variant}")
  c.clip.dtype, c.clip.attention_impl = "float32", "xla"
  c.model.num_frames, c.train.batch_size = frames, batch
  if clip_folder is not None:
    c.clip.checkpoint = str(clip_folder)
    c.clip.image_size = HF_SIZES["vision"]["image_size"]
    for key, value in TEMPORAL.items():
      c.model[key] = value
  return c


def _flat(module, kind=nnx.Param):
  return {
    ".".join(str(p) for p in path): np.asarray(v.get_value())
    for path, v in nnx.to_flat_state(nnx.state(module, kind))
  }


def _rel_err(a, b):
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def copy_ours_into_torch(ours: dfer_lib.DFERCLIP, theirs) -> None:
  """Our temporal transformer and prompt context into the torch model (renaming: `scale` and
  `kernel` -> `weight`, kernels transposed to torch's (out, in)); strict on names and shapes."""
  src = _flat(ours.temporal_net)
  dst = dict(theirs.temporal_net.named_parameters())
  names = {re.sub(r"\.(scale|kernel)$", ".weight", k): k for k in src}
  assert set(names) == set(dst), (sorted(names), sorted(dst))
  with torch.no_grad():
    for name, p in dst.items():
      x = src[names[name]]
      if names[name].endswith(".kernel"):
        x = x.T
      assert tuple(x.shape) == tuple(p.shape), name
      p.copy_(torch.from_numpy(np.array(x)))
    theirs.prompt_learner.ctx.copy_(torch.from_numpy(np.array(ours.prompt_learner.ctx[...])))


@pytest.fixture(scope="module")
def pair(clip_folder, tmp_path_factory):
  """Both models from the same folder; ours with its optimizer, torch's with our weights."""
  c = _our_config(clip_folder)
  ours, spec, groups = state_lib.build_model(
    c, tmp_path_factory.mktemp("ours"), datasets.DFEW_CLASSES, rngs=nnx.Rngs(c.seed)
  )
  optimizer = state_lib.build_optimizer(c, ours, groups, steps_per_epoch=100)
  # The torch model of our model's config (temporal sizes, prompts, logit scale).
  theirs = tstep.build(
    clip_dir=str(clip_folder), frames=FRAMES, device="cpu", seed=1, config=spec.model
  )
  # It tokenized the same prompts into the same buffers as our model.
  pl = theirs.prompt_learner
  for name in ("token_prefix", "token_suffix"):
    np.testing.assert_array_equal(
      getattr(pl, name).numpy(), np.asarray(getattr(ours.prompt_learner, name)[...]), name
    )
  np.testing.assert_array_equal(pl.eot.numpy(), np.asarray(ours.prompt_learner.eot))
  copy_ours_into_torch(ours, theirs)
  return dict(config=c, ours=ours, optimizer=optimizer, spec=spec, theirs=theirs)


def _batches(n, seed=0):
  rs = np.random.RandomState(seed)
  size = HF_SIZES["vision"]["image_size"]
  return [
    (
      rs.randint(0, 256, (BATCH, FRAMES, size, size, 3)).astype(np.uint8),
      rs.randint(0, 7, (BATCH,)).astype(np.int32),
    )
    for _ in range(n)
  ]


def _clip_params(ours_clip=None, theirs_clip=None):
  """CLIP parameters under OpenAI names, float64, from either implementation."""
  if ours_clip is not None:
    flat = clip_weights.params_to_openai(ours_clip)
  else:
    flat = clip_weights.hf_to_openai(
      {k: v.detach().numpy() for k, v in theirs_clip.state_dict().items()}
    )
  return {k: np.asarray(v, np.float64) for k, v in flat.items()}


def test_same_features(pair):
  """Frame, video and text features of the same batch (the losses alone are not sensitive
  enough: the temporal class token and positions, N(0, 1), dwarf the frame features)."""
  video, _ = _batches(1)[0]
  # Jitted: one compile costs less than running the model op by op.
  aux = nnx.jit(lambda m, x: m(m.preprocess(x), train=True)[1])(pair["ours"], jnp.asarray(video))
  theirs = pair["theirs"]
  with torch.no_grad():
    frames = theirs.encode_frames(torch.from_numpy(video))
    got = {
      "frame_features": frames,
      "video_features_raw": theirs.temporal_net(frames),
      "text_features_raw": theirs.encode_prompts(),
    }
  for name, value in got.items():
    assert _rel_err(value.numpy().astype(np.float64), np.asarray(aux[name], np.float64)) < 1e-5, (
      name
    )


@pytest.fixture(scope="module")
def trained(pair):
  """STEPS training steps of each on the same batches: losses and parameter changes. (Of a copy
  of the torch model: the other tests see `pair` as built.)"""
  ours, optimizer = pair["ours"], pair["optimizer"]
  theirs = copy.deepcopy(pair["theirs"])
  graphdef, model_state = nnx.split(ours)
  opt_graphdef, opt_state = nnx.split(optimizer)
  step = jax.jit(train_lib.make_train_step(graphdef, opt_graphdef, dropout=False))
  torch_step = tstep.make_train_step(theirs, tstep.make_optimizer(theirs), "fp32")
  before = dict(
    ours_clip=_clip_params(ours_clip=ours.clip),
    theirs_clip=_clip_params(theirs_clip=theirs.clip),
    ours_temporal=_flat(ours.temporal_net),
    theirs_temporal={
      k: v.detach().numpy().copy() for k, v in theirs.temporal_net.named_parameters()
    },
    ours_ctx=np.asarray(ours.prompt_learner.ctx[...]),
    theirs_ctx=theirs.prompt_learner.ctx.detach().numpy().copy(),
  )
  losses = []
  for video, labels in _batches(STEPS):
    batch = {
      "video": jnp.asarray(video),
      "label": jnp.asarray(labels),
      "index": jnp.arange(BATCH, dtype=jnp.int32),
      "mask": jnp.ones((BATCH,), bool),
    }
    model_state, opt_state, metrics = step(model_state, opt_state, batch, jax.random.key(0))
    loss, _ = torch_step(torch.from_numpy(video), torch.from_numpy(labels).long())
    losses.append((float(metrics["loss"]), float(loss)))
  after = nnx.merge(graphdef, model_state)
  return dict(losses=losses, before=before, ours=after, theirs=theirs)


def test_same_loss_on_the_same_batch(trained):
  ours, theirs = trained["losses"][0]
  assert theirs == pytest.approx(ours, rel=1e-4)


def test_same_losses_after_sgd_steps(trained):
  """Steps 2 and 3 see the parameters after 1 and 2 updates (step 3: momentum included)."""
  for ours, theirs in trained["losses"][1:]:
    assert theirs == pytest.approx(ours, rel=1e-4)


def test_same_updates_per_group(trained):
  """The parameter changes over the steps, per group: temporal (lr 1e-2), image tower (1e-5),
  context (1e-3), all with momentum 0.9 and coupled weight decay; the text tower unchanged. (The
  losses alone could not see a wrong image-tower lr: its updates are too small.) The changes are
  differences of float32 parameters (the image tower's, lr 1e-5, lose digits to rounding)."""
  b, ours, theirs = trained["before"], trained["ours"], trained["theirs"]
  d_ours = {k: v - b["ours_clip"][k] for k, v in _clip_params(ours_clip=ours.clip).items()}
  d_theirs = {k: v - b["theirs_clip"][k] for k, v in _clip_params(theirs_clip=theirs.clip).items()}
  assert set(d_ours) == set(d_theirs)
  image = [k for k in d_ours if k.startswith("visual.")]
  text = [k for k in d_ours if not k.startswith("visual.")]
  assert len(image) > 20 and len(text) > 20
  for k in text:  # frozen in both (logit_scale included)
    assert not d_ours[k].any() and not d_theirs[k].any(), k
  cat = lambda d, keys: np.concatenate([d[k].ravel() for k in keys])  # noqa: E731
  assert np.abs(cat(d_ours, image)).max() > 0
  assert _rel_err(cat(d_theirs, image), cat(d_ours, image)) < 1e-3  # measured: 4e-6
  t_ours = _flat(ours.temporal_net)
  t_theirs = {k: v.detach().numpy() for k, v in theirs.temporal_net.named_parameters()}
  for name, new in t_ours.items():
    tname = re.sub(r"\.(scale|kernel)$", ".weight", name)
    d_o = new.astype(np.float64) - b["ours_temporal"][name]
    d_t = t_theirs[tname].astype(np.float64) - b["theirs_temporal"][tname]
    if name.endswith(".kernel"):
      d_t = d_t.T
    assert _rel_err(d_t, d_o) < 1e-4, name  # measured: < 4e-6
  d_o = np.asarray(ours.prompt_learner.ctx[...], np.float64) - b["ours_ctx"]
  d_t = theirs.prompt_learner.ctx.detach().numpy().astype(np.float64) - b["theirs_ctx"]
  assert _rel_err(d_t, d_o) < 1e-4  # measured: 6e-7


def test_same_analytic_flops(pair):
  """The count the torch record reports equals ours for the same model: the loaded folder here;
  the random-init variants in `test_random_init_variants_match_ours`."""
  spec, theirs = pair["spec"], pair["theirs"]
  assert tstep.flops(theirs, BATCH) == ts.analytic_flops(spec.clip, spec.model, BATCH, "train")
  assert tstep.clip_config_of(theirs.clip.config) == spec.clip


def _ours_random_init(variant, frames, batch):
  """Our benchmark's model config for a random-init `variant` (what `state.build_model` makes of
  configs/dfew.py), without building the model."""
  c = _our_config(variant=variant, frames=frames, batch=batch)
  clip_cfg = clip_lib.preset(variant)
  clip_cfg = clip_cfg.replace(
    vision=dataclasses.replace(clip_cfg.vision, image_size=c.clip.image_size),
    text=dataclasses.replace(clip_cfg.text, vocab_size=VOCAB),
  )
  dfer_cfg = state_lib.model_config(c, datasets.DFEW_CLASSES)
  groups = optim.groups_from_config(c.optim)
  return c, clip_cfg, dfer_cfg, groups


def test_random_init_variants_match_ours():
  """The torch benchmark's random-init models are our benchmark's (configs/dfew.py + random-init
  CLIP of the variant): the same CLIP sizes, the same DFER-CLIP config, hence the same FLOPs;
  and the same optimizer numbers."""
  for variant in ("B/32", "B/16", "tiny"):
    c, clip_cfg, dfer_cfg, groups = _ours_random_init(variant, 16, 48)
    assert tstep.clip_config_of(tstep.hf_clip_config(variant)) == clip_cfg, variant
    assert tstep.paper_config(16) == dfer_cfg
  lrs = {g.name: g.lr for g in groups if g.trainable and g.lr > 0 and g.name != "head"}
  assert lrs == {"temporal": tstep.LR_TEMPORAL, "image": tstep.LR_IMAGE, "prompt": tstep.LR_PROMPT}
  assert (tstep.MOMENTUM, tstep.WEIGHT_DECAY, c.optim.name) == (
    c.optim.momentum,
    c.optim.weight_decay,
    "sgd",
  )


def test_groups_and_frozen_parameters(pair):
  """SGD sees exactly the parameters that require gradients: the temporal transformer, the
  image tower (with its projection) and the context, at their learning rates."""
  theirs = pair["theirs"]
  groups = {g["name"]: g for g in tstep.make_optimizer(theirs).param_groups}
  assert {k: g["lr"] for k, g in groups.items()} == {
    "temporal": 1e-2,
    "image": 1e-5,
    "prompt": 1e-3,
  }
  assert all(g["momentum"] == 0.9 and g["weight_decay"] == 1e-4 for g in groups.values())
  trained_ids = {id(p) for g in groups.values() for p in g["params"]}
  for name, p in theirs.named_parameters():
    assert (id(p) in trained_ids) == p.requires_grad, name
    assert p.requires_grad == (not name.startswith(("clip.text_", "clip.logit_scale"))), name


def test_prompt_path_is_hfs_text_tower(pair):
  """Fed the prompts' own token embeddings, the prompt path (inputs_embeds, causal SDPA, pooling
  at 1 + M + name_len) gives HF's text features for the token ids."""
  err = tstep.check_text_path(pair["theirs"])
  assert err is not None and err < 1e-5


# ---------------------------------------------------------------------------------------------
# The script on the CPU

TINY = ["--variant=tiny", "--frames=2", "--batch=2", "--steps=1", "--warmup=1", "--device=cpu"]
REQUIRED = (
  "compile_s",
  "step_ms_p50",
  "step_ms_p90",
  "step_ms_min",
  "step_ms_pipelined",
  "clips_per_s",
  "frames_per_s",
  "model_tflops_per_step",
  "analytic_tflops_per_step",
  "analytic_tflops_breakdown",
  "achieved_tflops",
  "mfu",
  "peak_memory_gb",
  "device_kind",
  "device_count",
  "platform",
  "torch_version",
  "transformers_version",
  "arithmetic",
  "peak_tflops",
  "config",
  "last_metrics",
  "status",
  "framework",
  "impl",
)


def _check_record(record, impl):
  assert record["status"] == "ok", record.get("traceback")
  for key in REQUIRED:
    assert key in record, key
  assert record["framework"] == "torch" and record["impl"] == impl
  assert record["config"]["impl"] == impl and record["config"]["framework"] == "torch"
  assert record["dtype"] == ("float32" if impl == "fp32" else "bfloat16")
  assert record["arithmetic"] == ("fp32" if impl == "fp32" else "bf16")
  assert record["mfu"] is None and record["peak_memory_gb"] is None  # CPU: no peak, no stats
  assert 0 < record["step_ms_min"] <= record["step_ms_p50"] <= record["step_ms_p90"]
  step_s = record["step_ms_pipelined"] / 1e3
  assert record["clips_per_s"] == pytest.approx(2 / step_s)
  assert record["frames_per_s"] == pytest.approx(4 / step_s)
  assert record["achieved_tflops"] == pytest.approx(record["model_tflops_per_step"] / step_s)
  assert record["compile_s"] > 0 and np.isfinite(record["last_metrics"]["loss"])
  assert record["text_path_check_max_abs_err"] < 1e-4
  # The FLOP count our benchmark reports for the same model (tiny, 2 frames, batch 2).
  _, clip_cfg, dfer_cfg, _ = _ours_random_init("tiny", 2, 2)
  ours = ts.analytic_flops(clip_cfg, dfer_cfg, 2, "train")
  assert record["model_tflops_per_step"] == ours["total"] / 1e12
  assert record["analytic_tflops_breakdown"] == {
    k: v / 1e12 for k, v in ours.items() if k != "total"
  }


def _table_row(text, impl):
  """The record's row in the printed table (framework, variant and impl in its cells)."""
  rows = [
    ln
    for ln in text.splitlines()
    if ln.startswith("|") and {"torch", "tiny", impl} <= {c.strip() for c in ln.split("|")}
  ]
  return rows


def test_script_runs_on_the_cpu(tmp_path, capsys):
  """`python benchmarks/torch_step.py --impl=fp32` as a subprocess and, meanwhile, `main` with
  --impl=bf16 in this process (same code; saves a second start of torch, transformers and jax)."""
  # One tokenizer for both runs (each would otherwise build it into the shared workdir at once).
  demo_tokenizer.build_demo_tokenizer(tmp_path / "tokenizer", _texts(), vocab_size=VOCAB)
  fp32 = tmp_path / "fp32.json"
  proc = subprocess.Popen(
    [sys.executable, str(SCRIPT), *TINY, "--impl=fp32", f"--json={fp32}", f"--workdir={tmp_path}"],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=str(REPO)),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  try:
    bf16 = tmp_path / "bf16.json"
    assert tstep.main(TINY + ["--impl=bf16", f"--json={bf16}", f"--workdir={tmp_path}"]) == 0
    _check_record(json.loads(bf16.read_text()), "bf16")
    assert _table_row(capsys.readouterr().out, "bf16")
  finally:
    log, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, log[-3000:]
  _check_record(json.loads(fp32.read_text()), "fp32")
  assert _table_row(log, "fp32")


@pytest.mark.skipif(
  not os.environ.get("TORCH_STEP_TEST_COMPILE"),
  reason="torch.compile (Dynamo + Inductor's C++ kernels) of the tiny step took over 300 s on "
  "this 2-core CPU; set TORCH_STEP_TEST_COMPILE=1 to run it (gpu_check.sh runs it on "
  "the GPU)",
)
def test_compile_variant_on_the_cpu(tmp_path):
  out = tmp_path / "compile.json"
  proc = subprocess.run(
    [sys.executable, str(SCRIPT), *TINY, "--impl=bf16-compile", f"--json={out}"],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=str(REPO)),
    capture_output=True,
    text=True,
    timeout=3600,
    check=False,
  )
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  _check_record(json.loads(out.read_text()), "bf16-compile")


def test_oom_is_a_result_and_errors_are_recorded(tmp_path, monkeypatch, capsys):
  def oom(**_):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

  monkeypatch.setattr(tstep, "build", oom)
  out = tmp_path / "oom.json"
  assert tstep.main(TINY + ["--impl=bf16", f"--json={out}"]) == 0
  record = json.loads(out.read_text())
  assert record["status"] == "oom" and "out of memory" in record["error"]
  assert record["framework"] == "torch" and record["batch"] == 2

  def broken(**_):
    raise ValueError("something else")

  monkeypatch.setattr(tstep, "build", broken)
  assert tstep.main(TINY + ["--impl=fp32", f"--json={out}"]) == 1
  assert json.loads(out.read_text())["status"] == "error"
  assert _table_row(capsys.readouterr().out, "fp32")
