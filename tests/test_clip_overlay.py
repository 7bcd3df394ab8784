"""CLIP overlays: a FaRL-like file (OpenAI-named CLIP tensors under `state_dict`, keys of its own,
some CLIP keys absent) over an OpenAI-named checkpoint, read without torch; the zero-shot FaRL
preset builds on it."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from dfer_clip_jax import config_lib, optim
from dfer_clip_jax import state as state_lib
from dfer_clip_jax.conversion import torch_io
from dfer_clip_jax.conversion.clip_weights import (
  CheckpointMismatchError,
  load_clip,
  overlay_state,
  params_to_openai,
)
from dfer_clip_jax.data.datasets import DFEW_CLASSES
from dfer_clip_jax.models import clip as clip_lib

ABSENT = ("text_projection", "visual.proj")  # CLIP tensors the overlay leaves to the base
EXTRA = ("mim_head.weight", "mask_token")  # the overlay's own keys (not CLIP tensors)


def random_openai(cfg, seed):
  """OpenAI-named tensors of a CLIP of `cfg`, random numbers (no initialisation run)."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: clip_lib.CLIP(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(a.dtype), abstract)
  return params_to_openai(nnx.merge(graphdef, state))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  torch = pytest.importorskip("torch")  # only to write the FaRL-like file
  cfg = clip_lib.tiny_config()
  # CLIP's vocabulary size, so that the real tokenizer's ids fit (the preset test below).
  cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=49408, layers=1))
  cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, layers=1))
  base, other = random_openai(cfg, 0), random_openai(cfg, 1)
  farl = {k: v for k, v in other.items() if k not in ABSENT}
  farl.update({EXTRA[0]: np.ones((3, 5), np.float32), EXTRA[1]: np.zeros((1, 1, 64), np.float32)})
  folder = tmp_path_factory.mktemp("overlay")
  np.savez(folder / "base.npz", **base)
  state_dict = {k: torch.tensor(np.array(v)) for k, v in farl.items()}
  torch.save({"state_dict": state_dict, "epoch": 64}, folder / "farl.pth")
  return folder, base, other, cfg


def test_overlay_replaces_ignores_and_keeps(files):
  folder, base, other, _ = files
  tensors, _ = torch_io.load_state_dict(folder / "farl.pth")  # unwraps `state_dict`, no torch
  merged, report = overlay_state(base, tensors)
  assert set(report.kept) == set(ABSENT) and set(report.ignored) == set(EXTRA)
  assert len(report.replaced) == len(base) - len(ABSENT) and set(merged) == set(base)
  assert report.summary().startswith(f"{len(base) - 2} tensors replaced, 2 overlay keys ignored")
  model, _ = load_clip(folder / "base.npz", overlay=folder / "farl.pth")
  loaded = params_to_openai(model)
  for k, v in loaded.items():
    np.testing.assert_array_equal(v, base[k] if k in ABSENT else other[k], err_msg=k)


def test_overlay_errors_name_the_tensor(files):
  folder, base, other, _ = files
  bad = dict(other, **{"visual.conv1.weight": np.zeros((1, 2, 3, 4), np.float32)})
  with pytest.raises(
    CheckpointMismatchError, match=r"visual\.conv1\.weight: overlay \(1, 2, 3, 4\)"
  ):
    overlay_state(base, bad, where="overlay farl.pth")
  with pytest.raises(CheckpointMismatchError, match="none of its .* keys names a tensor"):
    overlay_state(base, {f"module.{k}": v for k, v in other.items()})


def test_zero_shot_farl_preset_builds_on_the_overlay(files, tmp_path, tokenizer_dir):
  folder, _, other, cfg = files
  c = config_lib.paper_config("dfew", "baseline=zeroshot_farl")
  with c.unlocked():
    c.clip.checkpoint = str(folder / "base.npz")
    c.clip.overlay = str(folder / "farl.pth")
    c.clip.tokenizer = str(tokenizer_dir)
    c.clip.image_size = cfg.vision.image_size
  model, spec, groups = state_lib.build_model(c, tmp_path, DFEW_CLASSES, rngs=nnx.Rngs(0))
  assert not state_lib.is_trained(groups) and spec.model.logit_scale == "clip"
  np.testing.assert_array_equal(
    params_to_openai(model.clip)["visual.conv1.weight"], other["visual.conv1.weight"]
  )
  assert model.prompt_learner.ctx is None and optim.param_names(model)
  c.clip.checkpoint = ""
  with pytest.raises(ValueError, match="clip.overlay=.* set clip.checkpoint"):
    state_lib.build_model(c, tmp_path, DFEW_CLASSES, rngs=nnx.Rngs(0))
