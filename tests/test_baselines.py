"""The paper's baselines as config presets: forward, backward and one update each; every preset
and config argument builds a model."""

import dataclasses
import pathlib
import re
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dfer_clip_jax import config_lib, optim
from dfer_clip_jax import state as state_lib
from dfer_clip_jax import tokenizer as tokenizer_lib
from dfer_clip_jax.data.datasets import MAFW_CLASSES
from dfer_clip_jax.models import clip as clip_lib
from dfer_clip_jax.models import dfer_clip as dc
from dfer_clip_jax.models import temporal as temporal_lib
from dfer_clip_jax.tokenizer import END_OF_TEXT, START_OF_TEXT


class FakeTokenizer:
  """Word-level stand-in for CLIP's BPE tokenizer: ids below 49406, start/end tokens as CLIP."""

  eos_token_id = END_OF_TEXT

  def __call__(self, text, add_special_tokens=True):
    ids = [1 + zlib.crc32(w.encode()) % 49000 for w in re.findall(r"\w+|[^\w\s]", text.lower())]
    return {"input_ids": [START_OF_TEXT] + ids + [END_OF_TEXT] if add_special_tokens else ids}


# The same tiny sizes as test_dfer_clip.py, so that initialisation compiles are shared.
NAMES = MAFW_CLASSES[:5]
TINY = {
  "model.num_frames": 3,
  "model.temporal_heads": 3,
  "model.temporal_dim_head": 5,
  "model.temporal_mlp_dim": 28,
}
B = 2


@pytest.fixture(scope="module")
def clip():
  # One block per tower halves the compile time of the eight graphs below.
  cfg = clip_lib.tiny_config()
  cfg = cfg.replace(
    vision=dataclasses.replace(cfg.vision, layers=1), text=dataclasses.replace(cfg.text, layers=1)
  )
  return clip_lib.CLIP(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def video():
  size = clip_lib.tiny_config().vision.image_size
  return jax.random.uniform(jax.random.key(2), (B, TINY["model.num_frames"], size, size, 3))


def build(name, clip, **overrides):
  """(model config, parameter groups present, model) of a baseline preset ("" = DFER-CLIP)."""
  if name in ("", "coop"):  # the presets with learnable context
    overrides.setdefault("model.n_ctx", 3)
  c = config_lib.base_config()
  if name:
    config_lib.apply_preset(c, config_lib.BASELINES[name])
  config_lib.apply_preset(c, {**TINY, **overrides})
  config = state_lib.model_config(c, NAMES)
  # A copy of the shared CLIP so that one baseline's update cannot leak into another's.
  model = dc.create_dfer_clip(config, nnx.clone(clip), FakeTokenizer(), rngs=nnx.Rngs(5))
  return config, optim.present_groups(model, optim.groups_from_config(c.optim)), model


@nnx.jit
def train_step(model, optimizer, video, labels):
  def loss_fn(model):
    logits, aux = model(video, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), (logits, aux)

  (loss, (logits, aux)), grads = nnx.value_and_grad(
    loss_fn, has_aux=True, argnums=nnx.DiffState(0, optimizer.wrt)
  )(model)
  optimizer.update(model, grads)
  return loss, logits, aux, grads


def arrays(state):
  return {optim.path_name(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


# Which parameters each trained baseline updates (by group) and which must stay untouched.
TRAINED = {
  "linear_probe": {"head"},
  "finetune": {"head", "image"},
  "finetune_tm": {"head", "image", "temporal"},
  "coop": {"prompt", "image", "temporal"},
  # manual_expression differs from manual_photo only in its texts (checked below).
  "manual_photo": {"image", "temporal"},
}


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_trained_baseline_forward_backward_update(name, clip, video):
  _, groups, model = build(name, clip)
  assert state_lib.is_trained(groups)
  optimizer = optim.make_optimizer(model, groups)
  part = optim.partition(model, groups)
  assert {g.name for g in part.values() if g.trainable} == TRAINED[name]
  before = arrays(nnx.state(model, nnx.Param))
  loss, logits, aux, grads = train_step(model, optimizer, video, jnp.array([1, 4]))
  assert logits.shape == (B, 5) and np.isfinite(float(loss))
  assert aux["video_features"].shape == (B, 64)
  grads = arrays(grads)
  assert set(grads) == set(optimizer.wrt.names)
  for group in TRAINED[name]:
    norm = sum(float(np.sum(g**2)) for k, g in grads.items() if part[k].name == group)
    assert np.isfinite(norm) and norm > 0, group
  after = arrays(nnx.state(model, nnx.Param))
  for k in before:
    if part[k].trainable:
      assert not np.array_equal(after[k], before[k]), f"{k} did not train"
    else:
      np.testing.assert_array_equal(after[k], before[k], err_msg=f"frozen {k} changed")


def test_linear_heads_read_raw_video_features(clip, video):
  _, _, probe = build("linear_probe", clip)
  assert isinstance(probe.temporal_net, temporal_lib.FrameMean) and probe.prompt_learner is None
  logits, aux = nnx.jit(lambda m, v: m(v, train=False))(probe, video)
  mean = aux["frame_features"].mean(axis=1)
  np.testing.assert_allclose(aux["video_features_raw"], mean, rtol=1e-6)
  np.testing.assert_allclose(
    logits, mean @ probe.head.kernel[...] + probe.head.bias[...], rtol=1e-5, atol=1e-6
  )
  assert "text_features" not in aux
  _, _, with_tm = build("finetune_tm", clip)
  assert isinstance(with_tm.temporal_net, temporal_lib.TemporalTransformer)
  assert with_tm.head is not None


def test_coop_uses_shared_context_and_class_names(clip):
  config, _, model = build("coop", clip)
  assert not config.class_specific and config.texts()[0] == "happiness."
  assert model.prompt_learner.ctx.shape == (3, 64)
  np.testing.assert_array_equal(model.prompt_learner.name_lens[...], [2] * 5)


@pytest.fixture(scope="module")
def encode_text():
  return nnx.jit(lambda m, ids: m.encode_text(ids))


@pytest.mark.parametrize(
  "name,template",
  [("manual_photo", "a photo of {}."), ("manual_expression", "an expression of {}.")],
)
def test_manual_prompts_are_the_template_texts(name, template, clip, encode_text):
  config, _, model = build(name, clip)
  assert model.prompt_learner.ctx is None and config.n_ctx == 0
  texts = [template.format(n) for n in config.class_names]
  ids, _ = tokenizer_lib.tokenize(FakeTokenizer(), texts)
  expected = encode_text(model.clip, jnp.asarray(ids))
  text, raw, _ = nnx.jit(lambda m: m.text_features())(model)
  np.testing.assert_allclose(raw, expected, rtol=1e-5, atol=1e-6)


def test_zero_shot_is_clip_as_is(clip, video, encode_text):
  config, groups, model = build("zeroshot", clip)
  assert not state_lib.is_trained(groups) and config.logit_scale == "clip"
  with pytest.raises(ValueError, match="no trainable parameters"):
    optim.make_optimizer(model, groups)
  assert isinstance(model.temporal_net, temporal_lib.FrameMean)
  assert model.prompt_learner.ctx is None
  logits, aux = nnx.jit(lambda m, v: m(v, train=False))(model, video)
  texts = [f"an expression of {n}." for n in config.class_names]
  ids, _ = tokenizer_lib.tokenize(FakeTokenizer(), texts)
  t = encode_text(clip, jnp.asarray(ids))
  t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
  v = aux["frame_features"].mean(1)  # the frame features themselves: test_dfer_clip.py
  v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
  np.testing.assert_allclose(logits, jnp.exp(clip.logit_scale[...]) * v @ t.T, rtol=1e-4, atol=1e-4)


def test_paper_model_preset_and_unknown_names(clip):
  config, groups, _ = build("", clip, **{"model.n_ctx": 8})
  assert config == dc.DFERCLIPConfig(
    class_names=NAMES, num_frames=3, temporal_heads=3, temporal_dim_head=5, temporal_mlp_dim=28
  )
  assert [(g.name, g.lr, g.trainable) for g in groups] == [
    ("image", 1e-5, True),
    ("prompt", 1e-3, True),
    ("temporal", 1e-2, True),
    ("frozen", 0.0, False),
  ]
  assert build("coop", clip, **{"model.n_ctx": 16})[0].n_ctx == 16
  with pytest.raises(ValueError, match="baseline='clip'"):
    config_lib.paper_config("dfew", "baseline=clip")


REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import dfew  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

CONFIG_ARGS = [
  "",
  "variant=B/16",
  "variant=L/14",
  "ctx=4",
  "ctx=16",
  "depth=0",
  "depth=3",
  "text=class_name",
  "text=name_with_context",
  "text=descriptor",
  "text=template",
  "protocol=paper",
] + [f"baseline={b}" for b in config_lib.BASELINES]


@pytest.mark.parametrize("arg", CONFIG_ARGS)
def test_every_config_argument_builds_its_model(arg, clip):
  """The DFEW config with each argument builds a model (abstract, on the tiny CLIP) and its
  parameter groups."""
  c = dfew.get_config(arg)
  config = state_lib.model_config(c, NAMES)
  spec = state_lib.ModelSpec(clip=clip.config, model=config)
  model = nnx.eval_shape(lambda: state_lib.model_from_spec(spec, rngs=nnx.Rngs(0)))
  groups = optim.present_groups(model, optim.groups_from_config(c.optim))
  trained = {g.name for g in groups if g.trainable}
  expected = {"image", "temporal", "prompt"}
  if arg.startswith("baseline="):
    expected = {
      "zeroshot": set(),
      "linear_probe": {"head"},
      "finetune": {"head", "image"},
      "finetune_tm": {"head", "image", "temporal"},
    }.get(arg[9:], {"image", "temporal", "prompt"})
    if arg[9:].startswith("manual"):
      expected = {"image", "temporal"}
  if arg in ("depth=0",):
    expected = {"image", "prompt"}
  if arg == "text=template":
    expected = {"image", "temporal"}
  assert trained == expected
  assert (config.temporal == "mean") == (
    arg in ("depth=0", "baseline=zeroshot", "baseline=linear_probe", "baseline=finetune")
  )
