"""The trainer's speed switches compute what the default step computes: remat modes (none,
block, dots), gradient accumulation over micro-batches, and the XLA GPU flag presets; a GPU run
then only has to time them."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from dfer_clip_jax import sharding as sharding_lib
from dfer_clip_jax import state as state_lib
from dfer_clip_jax import train as train_lib
from dfer_clip_jax import xla_flags
from dfer_clip_jax.benchmarks import train_step as ts
from dfer_clip_jax.data import datasets
from dfer_clip_jax.models import clip as clip_lib

BATCH, FRAMES = 16, 2  # 8 fake devices: 2 clips each, so 2 micro-batches of one clip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return tmp_path_factory.mktemp("switches")  # the demo tokenizer, built once


def _one_step(workdir, *, remat="none", microbatches=1, dtype="float32"):
  """One real training step (paper recipe, tiny CLIP, 8 devices) without weight decay and with
  learning rates of 1, so the updates are the gradients, far above float32 rounding of the
  parameters: (metrics, trained-parameter updates)."""
  c = ts.load_config(
    "tiny",
    frames=FRAMES,
    batch=BATCH,
    dtype=dtype,
    remat=remat,
    attention="xla",
    microbatches=microbatches,
  )
  c.optim.weight_decay = 0.0
  c.optim.lr.image = c.optim.lr.temporal = c.optim.lr.prompt = 1.0
  mesh = sharding_lib.make_mesh(c.mesh.data, c.mesh.fsdp)
  model, _, groups = state_lib.build_model(c, workdir, datasets.DFEW_CLASSES, rngs=nnx.Rngs(c.seed))
  optimizer = state_lib.build_optimizer(c, model, groups, steps_per_epoch=10)
  graphdef, model_state = nnx.split(model)
  opt_graphdef, opt_state = nnx.split(optimizer)
  before = jax.device_get(nnx.state(model, optimizer.wrt))
  model_state, _ = state_lib.shard_state(model_state, mesh, c.mesh.fsdp_min_size)
  step = jax.jit(
    train_lib.make_train_step(graphdef, opt_graphdef, dropout=False, microbatches=microbatches)
  )
  rng = np.random.default_rng(0)
  batch = {
    "video": rng.integers(0, 256, (BATCH, FRAMES, 32, 32, 3), np.uint8),
    "label": rng.integers(0, 7, (BATCH,)).astype(np.int32),
    "index": np.arange(BATCH, dtype=np.int32),
    "mask": np.ones((BATCH,), bool),
  }
  batch["mask"][-3:] = False  # padded rows count nowhere, whichever micro-batch holds them
  batch = jax.device_put(batch, sharding_lib.batch_sharding(mesh))
  new_state, _, metrics = step(model_state, opt_state, batch, jax.random.key(0))
  after = jax.device_get(nnx.merge(graphdef, new_state))
  after = nnx.state(after, optimizer.wrt)
  updates = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), after, before)
  flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(updates)}
  return jax.device_get(metrics), flat


@pytest.fixture(scope="module")
def default_step(workdir):
  return _one_step(workdir)


def _assert_same(got, want, *, rtol):
  (m_got, u_got), (m_want, u_want) = got, want
  for key in ("loss", "accuracy", "grad_norm", "param_norm"):
    np.testing.assert_allclose(m_got[key], m_want[key], rtol=rtol, err_msg=key)
  assert u_got.keys() == u_want.keys()
  groups = {"temporal_net": 0, "clip/visual": 0, "prompt_learner": 0}
  for name, want in u_want.items():
    scale = np.abs(want).max()
    assert scale > 0, name  # every trained tensor moved
    np.testing.assert_allclose(u_got[name], want, atol=rtol * scale, err_msg=name)
    for g in groups:
      groups[g] += name.startswith(g)
  assert all(groups.values()), groups  # all three trained groups were compared


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_modes_compute_the_default_step(workdir, default_step, remat):
  _assert_same(_one_step(workdir, remat=remat), default_step, rtol=1e-5)


def test_microbatches_compute_the_one_pass_step(workdir, default_step):
  """Two micro-batches (rows 0, 2, 4, ... and 1, 3, 5, ...; three padded rows masked out):
  the same loss, accuracy, gradient norm and updates as one pass over the batch."""
  _assert_same(_one_step(workdir, microbatches=2), default_step, rtol=1e-5)


def test_microbatches_must_divide_each_device_share(workdir):
  with pytest.raises(ValueError, match="does not split into 3 microbatches"):
    _one_step(workdir, microbatches=3)


def test_remat_mode_names():
  assert clip_lib.remat_mode(True) == "block" and clip_lib.remat_mode(False) == "none"
  assert clip_lib.remat_mode("dots") == "dots" and clip_lib.remat_mode("True") == "block"
  with pytest.raises(ValueError, match="unknown remat mode 'full'"):
    clip_lib.remat_mode("full")


def test_xla_flag_presets(monkeypatch):
  # The user's own setting of a flag wins; the preset adds the rest; unknown presets fail.
  mine = "--xla_force_host_platform_device_count=8 --xla_gpu_enable_triton_gemm=true"
  merged = xla_flags.merged("cublas", mine)
  assert merged == mine + " --xla_gpu_enable_latency_hiding_scheduler=true"
  assert xla_flags.merged("none", mine) == mine
  assert xla_flags.merged("nographs", "").split() == list(xla_flags.PRESETS["nographs"])
  with pytest.raises(ValueError, match="train.xla_gpu_flags='fast'"):
    xla_flags.merged("fast", "")
  # Applied only where a CUDA backend can start (never on this CPU-only test machine), or
  # when forced; the environment variable is what XLA reads.
  monkeypatch.setenv("XLA_FLAGS", mine)
  assert not xla_flags.cuda_plugin_installed()
  assert xla_flags.apply("cublas") == mine and os.environ["XLA_FLAGS"] == mine
  assert xla_flags.apply("cublas", force=True) == merged and os.environ["XLA_FLAGS"] == merged


def test_every_preset_flag_is_known_to_xla(tmp_path):
  """XLA aborts on an unknown flag: start a backend with every preset flag set."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  flags = sorted({f for p in xla_flags.PRESETS.values() for f in p})
  env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", "import jax; print(jax.numpy.ones(2).sum())"],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert out.returncode == 0 and out.stdout.strip() == "2.0", out.stderr[-2000:]
