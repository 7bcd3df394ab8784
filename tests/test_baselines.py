"""The paper's baselines (SPEC 5) as config options: forward, backward and one update each."""

import dataclasses
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dfer_clip_jax import optim
from dfer_clip_jax import tokenizer as tokenizer_lib
from dfer_clip_jax.models import clip as clip_lib
from dfer_clip_jax.models import dfer_clip as dc
from dfer_clip_jax.tokenizer import END_OF_TEXT, START_OF_TEXT


class FakeTokenizer:
  """Word-level stand-in for CLIP's BPE tokenizer: ids below 49406, start/end tokens as CLIP."""

  eos_token_id = END_OF_TEXT

  def __call__(self, text, add_special_tokens=True):
    ids = [1 + zlib.crc32(w.encode()) % 49000 for w in re.findall(r"\w+|[^\w\s]", text.lower())]
    return {"input_ids": [START_OF_TEXT] + ids + [END_OF_TEXT] if add_special_tokens else ids}


# The same tiny sizes as test_dfer_clip.py, so that initialisation compiles are shared.
TINY = dict(num_classes=5, num_frames=3, temporal_heads=3, temporal_dim_head=5,
            temporal_mlp_dim=28)
B = 2


@pytest.fixture(scope="module")
def clip():
  # One block per tower halves the compile time of the eight graphs below.
  cfg = clip_lib.tiny_config()
  cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, layers=1),
                    text=dataclasses.replace(cfg.text, layers=1))
  return clip_lib.CLIP(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def video():
  size = clip_lib.tiny_config().vision.image_size
  return jax.random.uniform(jax.random.key(2), (B, TINY["num_frames"], size, size, 3))


def build(name, clip, **overrides):
  if name in ("dfer_clip", "coop"):  # the presets with learnable context
    overrides.setdefault("n_ctx", 3)
  spec = dc.baseline(name, **{**TINY, **overrides})
  # A copy of the shared CLIP so that one baseline's update cannot leak into another's.
  model = dc.create_dfer_clip(spec.config, nnx.clone(clip), FakeTokenizer(), rngs=nnx.Rngs(5))
  return spec, model


@nnx.jit
def train_step(model, optimizer, video, labels):
  def loss_fn(model):
    logits, aux = model(video, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), (logits, aux)
  (loss, (logits, aux)), grads = nnx.value_and_grad(
      loss_fn, has_aux=True, argnums=nnx.DiffState(0, optimizer.wrt))(model)
  optimizer.update(model, grads)
  return loss, logits, aux, grads


def arrays(state):
  return {optim.path_name(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


# Which parameters each trained baseline updates (by group) and which must stay untouched.
TRAINED = {
    "linear_probe": {"head"},
    "finetune_linear": {"head", "image"},
    "finetune_linear_temporal": {"head", "image", "temporal"},
    "coop": {"prompt", "image", "temporal"},
    # manual_expression differs from manual_photo only in its texts (checked below).
    "manual_photo": {"image", "temporal"},
}


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_trained_baseline_forward_backward_update(name, clip, video):
  spec, model = build(name, clip)
  assert spec.trained
  optimizer = optim.make_optimizer(model, spec.groups)
  part = optim.partition(model, spec.groups)
  assert {g.name for g in part.values() if g.trainable} == TRAINED[name]
  before = arrays(nnx.state(model, nnx.Param))
  loss, logits, aux, grads = train_step(model, optimizer, video, jnp.array([1, 4]))
  assert logits.shape == (B, 5) and np.isfinite(float(loss))
  assert aux["video_features"].shape == (B, 64)
  grads = arrays(grads)
  assert set(grads) == set(optimizer.wrt.names)
  for group in TRAINED[name]:
    norm = sum(float(np.sum(g ** 2)) for k, g in grads.items() if part[k].name == group)
    assert np.isfinite(norm) and norm > 0, group
  after = arrays(nnx.state(model, nnx.Param))
  for k in before:
    if part[k].trainable:
      assert not np.array_equal(after[k], before[k]), f"{k} did not train"
    else:
      np.testing.assert_array_equal(after[k], before[k], err_msg=f"frozen {k} changed")


def test_linear_heads_read_raw_video_features(clip, video):
  _, probe = build("linear_probe", clip)
  assert probe.temporal_net is None and probe.prompt_learner is None
  logits, aux = nnx.jit(lambda m, v: m(v, train=False))(probe, video)
  mean = aux["frame_features"].mean(axis=1)
  np.testing.assert_allclose(aux["video_features_raw"], mean, rtol=1e-6)
  np.testing.assert_allclose(logits, mean @ probe.head.kernel[...] + probe.head.bias[...],
                             rtol=1e-5, atol=1e-6)
  assert "text_features" not in aux
  _, with_tm = build("finetune_linear_temporal", clip)
  assert with_tm.temporal_net is not None and with_tm.head is not None


def test_coop_uses_shared_context_and_class_names(clip):
  spec, model = build("coop", clip)
  assert not spec.config.class_specific and spec.config.texts()[0] == "happiness."
  assert model.prompt_learner.ctx.shape == (3, 64)
  np.testing.assert_array_equal(model.prompt_learner.name_lens[...], [2] * 5)


@pytest.fixture(scope="module")
def encode_text():
  return nnx.jit(lambda m, ids: m.encode_text(ids))


@pytest.mark.parametrize("name,template", [("manual_photo", "a photo of {}."),
                                           ("manual_expression", "an expression of {}.")])
def test_manual_prompts_are_the_template_texts(name, template, clip, encode_text):
  spec, model = build(name, clip)
  assert model.prompt_learner.ctx is None and spec.config.n_ctx == 0
  texts = [template.format(n) for n in spec.config.names]
  ids, _ = tokenizer_lib.tokenize(FakeTokenizer(), texts)
  expected = encode_text(model.clip, jnp.asarray(ids))
  text, raw, _ = nnx.jit(lambda m: m.text_features())(model)
  np.testing.assert_allclose(raw, expected, rtol=1e-5, atol=1e-6)


def test_zero_shot_is_clip_as_is(clip, video, encode_text):
  spec, model = build("zero_shot", clip)
  assert not spec.trained and spec.config.logit_scale == "clip"
  with pytest.raises(ValueError, match="no trainable parameters"):
    optim.make_optimizer(model, spec.groups)
  assert model.temporal_net is None and model.prompt_learner.ctx is None
  logits, aux = nnx.jit(lambda m, v: m(v, train=False))(model, video)
  texts = [f"an expression of {n}." for n in spec.config.names]
  ids, _ = tokenizer_lib.tokenize(FakeTokenizer(), texts)
  t = encode_text(clip, jnp.asarray(ids))
  t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
  v = aux["frame_features"].mean(1)  # the frame features themselves: test_dfer_clip.py
  v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
  np.testing.assert_allclose(logits, jnp.exp(clip.logit_scale[...]) * v @ t.T, rtol=1e-4,
                             atol=1e-4)


def test_paper_model_preset_and_unknown_names():
  spec = dc.baseline("dfer_clip")
  assert spec.config == dc.DFERCLIPConfig()
  assert [(g["name"], g.get("lr")) for g in spec.groups] == [
      ("temporal", 1e-2), ("image", 1e-5), ("prompt", 1e-3), ("frozen", None)]
  assert dc.baseline("coop", n_ctx=16).config.n_ctx == 16
  with pytest.raises(ValueError, match="unknown baseline 'clip'"):
    dc.baseline("clip")
