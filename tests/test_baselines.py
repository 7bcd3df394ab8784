"""The paper's rows as config presets: each preset's definition, one update of every preset that
trains (which parameters moved, which did not); every preset and config argument builds a model."""

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
  # Initialised in one jitted call: eager initialisation dispatches op by op (seconds).
  graphdef, state = nnx.split(nnx.eval_shape(lambda: clip_lib.CLIP(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, jax.jit(lambda: nnx.split(clip_lib.CLIP(cfg, rngs=nnx.Rngs(0)))[1])())


@pytest.fixture(scope="module")
def video():
  size = clip_lib.tiny_config().vision.image_size
  return jax.random.uniform(jax.random.key(2), (B, TINY["model.num_frames"], size, size, 3))


def step_shapes(name):
  """Overrides that give the presets which differ only in context length or temporal depth one
  shape (one compile each for the update test): 3 context tokens (unless the context starts from
  a text, whose length it must keep), depth 1. The presets' own values: test_preset_rows."""
  model = config_lib.base_config().model.to_dict()
  model.update(
    {k[6:]: v for k, v in config_lib.BASELINES.get(name, {}).items() if k[:6] == "model."}
  )
  out = {"model.temporal_depth": 1}
  if model["n_ctx"] and not model["ctx_init"]:
    out["model.n_ctx"] = 3
  return out


def build(name, clip, **overrides):
  """(model config, parameter groups present, model) of a baseline preset ("" = DFER-CLIP)."""
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


# Which parameter groups each preset trains; every other parameter must stay untouched.
DFER_CLIP = {"prompt", "image", "temporal"}
TRAINED = {
  "dfer_clip": DFER_CLIP,
  "dfer_clip_depth2": DFER_CLIP,
  "dfer_clip_depth3": DFER_CLIP,
  "dfer_clip_no_tm": {"prompt", "image"},
  "dfer_clip_no_tm_ctx4": {"prompt", "image"},
  "dfer_clip_no_tm_ctx16": {"prompt", "image"},
  "zeroshot": set(),
  "zeroshot_farl": set(),
  "linear_probe": {"head"},
  "finetune": {"head", "image"},
  "finetune_tm": {"head", "image", "temporal"},
  "coop": {"prompt"},
  "cocoop": {"prompt"},
  "manual_photo": {"image"},
  "manual_expression": {"image"},
  "ctx_class": {"prompt", "image"},
  "ctx_class_tm": DFER_CLIP,
}
# Each preset's row: (temporal model, context tokens, class-specific, text, meta-network).
ROWS = {
  "dfer_clip": ("transformer", 8, True, "descriptor", False),
  "dfer_clip_depth2": ("transformer", 8, True, "descriptor", False),
  "dfer_clip_depth3": ("transformer", 8, True, "descriptor", False),
  "dfer_clip_no_tm": ("mean", 8, True, "descriptor", False),
  "dfer_clip_no_tm_ctx4": ("mean", 4, True, "descriptor", False),
  "dfer_clip_no_tm_ctx16": ("mean", 16, True, "descriptor", False),
  "zeroshot": ("mean", 0, True, "template", False),
  "zeroshot_farl": ("mean", 0, True, "template", False),
  "linear_probe": ("mean", 8, True, "descriptor", False),
  "finetune": ("mean", 8, True, "descriptor", False),
  "finetune_tm": ("transformer", 8, True, "descriptor", False),
  "coop": ("mean", 16, False, "class_name", False),
  "cocoop": ("mean", 4, False, "class_name", True),
  "manual_photo": ("mean", 0, True, "template", False),
  "manual_expression": ("mean", 0, True, "template", False),
  "ctx_class": ("mean", 8, True, "class_name", False),
  "ctx_class_tm": ("transformer", 8, True, "class_name", False),
}


def test_preset_rows():
  """Every preset is listed here, with its row's model as the paper describes it."""
  assert set(config_lib.BASELINES) == set(TRAINED) == set(ROWS)
  for name, (temporal, n_ctx, class_specific, text, meta_net) in ROWS.items():
    c = dfew.get_config(f"baseline={name}")
    m = c.model
    assert (m.temporal, m.n_ctx, m.class_specific, m.text_type, m.meta_net) == (
      temporal,
      n_ctx,
      class_specific,
      text,
      meta_net,
    ), name
    assert m.temporal_depth == {"dfer_clip_depth2": 2, "dfer_clip_depth3": 3}.get(name, 1), name
    assert m.head == ("linear" if name.startswith(("linear", "finetune")) else "prompt"), name
    # CoOp, Co-CoOp and the zero-shot rows score with CLIP's own logit scale, as CLIP does.
    assert (m.logit_scale == "clip") == (name in ("coop", "cocoop", "zeroshot", "zeroshot_farl"))
    assert m.ctx_init == ("a photo of a" if name == "cocoop" else ""), name
  assert dfew.get_config("baseline=zeroshot_farl").clip.variant == "B/16"
  assert dfew.get_config("baseline=manual_photo").model.template == "a photo of {}."
  assert dfew.get_config("baseline=manual_expression").model.template == "an expression of {}."


def step_groups():
  """Trained presets grouped by the update they compile to: the same model after `step_shapes`
  up to its class texts (buffer values, not shapes) and the same learning rates. One update per
  group (compiles dominate the test time); every member's groups are checked."""
  groups = {}
  for name in sorted(n for n, g in TRAINED.items() if g):
    c = config_lib.base_config()
    config_lib.apply_preset(c, {**config_lib.BASELINES[name], **step_shapes(name)})
    model = {k: v for k, v in c.model.to_dict().items() if k not in ("text_type", "template")}
    key = repr((sorted(model.items()), sorted(c.optim.lr.to_dict().items())))
    groups.setdefault(key, []).append(name)
  return {names[0]: names for names in groups.values()}


STEP_GROUPS = step_groups()


def test_step_groups_share_one_update():
  """The grouping covers every trained preset and joins only rows that differ in texts, context
  length or depth."""
  assert STEP_GROUPS == {
    "cocoop": ["cocoop"],
    "coop": ["coop"],
    "ctx_class": ["ctx_class", "dfer_clip_no_tm", "dfer_clip_no_tm_ctx16", "dfer_clip_no_tm_ctx4"],
    "ctx_class_tm": ["ctx_class_tm", "dfer_clip", "dfer_clip_depth2", "dfer_clip_depth3"],
    "finetune": ["finetune"],
    "finetune_tm": ["finetune_tm"],
    "linear_probe": ["linear_probe"],
    "manual_expression": ["manual_expression", "manual_photo"],
  }


# Co-CoOp's update (the trainer's step, one pass and micro-batched): test_cocoop.py.
@pytest.mark.parametrize("name", sorted(n for n in STEP_GROUPS if n != "cocoop"))
def test_trained_baseline_forward_backward_update(name, clip, video):
  for member in STEP_GROUPS[name]:  # each builds, with its own trained groups
    _, member_groups, member_model = build(member, clip, **step_shapes(member))
    part = optim.partition(member_model, member_groups)
    assert {g.name for g in part.values() if g.trainable} == TRAINED[member], member
  _, groups, model = build(name, clip, **step_shapes(name))
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
  if name == "cocoop":  # the meta-network trains with the context
    assert any(k.startswith("prompt_learner.meta_net.") and part[k].trainable for k in before)
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
  config, groups, model = build("coop", clip)
  assert not config.class_specific and config.texts()[0] == "happiness."
  assert model.prompt_learner.ctx.shape == (16, 64) and model.prompt_learner.meta_net is None
  assert isinstance(model.temporal_net, temporal_lib.FrameMean)
  assert [g.name for g in groups if g.trainable] == ["prompt"]
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
  assert build("coop", clip, **{"model.n_ctx": 5})[0].n_ctx == 5
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
  expected = TRAINED.get(arg[9:], DFER_CLIP) if arg.startswith("baseline=") else DFER_CLIP
  if arg in ("depth=0",):
    expected = {"image", "prompt"}
  if arg == "text=template":
    expected = {"image", "temporal"}
  assert trained == expected
  assert (config.temporal == "mean") == (
    arg == "depth=0" or (arg.startswith("baseline=") and ROWS[arg[9:]][0] == "mean")
  )
