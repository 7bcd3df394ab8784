"""Parity with the reference PyTorch DFER-CLIP (fixtures in ../shared/reference, see its README)."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

# The reference's prompt assembly loop, written once for both test files.
from test_dfer_clip import np_prompts  # pylint: disable=g-bad-import-order

from dfer_clip_jax import config_lib, convert, train
from dfer_clip_jax import state as state_lib
from dfer_clip_jax.conversion import clip_weights, reference
from dfer_clip_jax.conversion.clip_weights import CheckpointMismatchError
from dfer_clip_jax.models import dfer_clip as dfer_lib
from dfer_clip_jax.optim import (
  groups_from_config,
  momentum_buffers,
  path_name,
  present_groups,
)

LAYERS = "temporal_net.temporal_transformer.layers."


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def to_bthwc(video_BxTxCxHxW: np.ndarray) -> jax.Array:
  return jnp.asarray(video_BxTxCxHxW.transpose(0, 1, 3, 4, 2))


@pytest.fixture(scope="module")
def imported(reference_dir):
  return reference.load_reference_checkpoint(reference_dir / "tiny_forward.npz")


@pytest.fixture(scope="module")
def forward_fn(eval_forward):
  return eval_forward


def test_inferred_config(imported, fwd):
  cfg, clip_cfg = imported.config, imported.clip_config
  assert (cfg.num_classes, cfg.n_ctx, cfg.class_specific, cfg.position) == (7, 8, True, "end")
  assert (
    cfg.temporal_depth,
    cfg.temporal_heads,
    cfg.temporal_dim_head,
    cfg.temporal_mlp_dim,
    cfg.num_frames,
  ) == (1, 8, 64, 1024, 16)
  assert (
    clip_cfg.vision.image_size,
    clip_cfg.vision.patch_size,
    clip_cfg.vision.width,
    clip_cfg.vision.layers,
    clip_cfg.vision.heads,
  ) == (64, 16, 128, 2, 2)
  assert (clip_cfg.text.width, clip_cfg.text.layers, clip_cfg.embed_dim) == (128, 2, 512)
  np.testing.assert_array_equal(imported.model.prompt_learner.name_lens[...], fwd["_name_lens"])
  report = imported.report
  assert not report.warnings
  # Every clip_model_ tensor except the two only stored there is a checked duplicate.
  dup = [k for k in fwd if k.startswith("clip_model_.")]
  assert len(dup) == 2 + sum(1 for k in report.ignored if k.startswith("clip_model_."))
  assert all(
    why.startswith("duplicate of")
    for k, why in report.ignored.items()
    if k.startswith("clip_model_.")
  )


def test_forward_matches_reference(imported, fwd, forward_fn):
  logits, aux = forward_fn(imported.model, to_bthwc(fwd["_video"]))
  assert np.abs(np.asarray(logits) - fwd["_logits"]).max() < 5e-4
  assert rel(aux["frame_features"].reshape(32, -1), fwd["_image_features"]) < 1e-4
  assert rel(aux["video_features_raw"], fwd["_video_features_raw"]) < 1e-4
  assert rel(aux["video_features"], fwd["_video_features"]) < 1e-4
  assert rel(aux["text_features_raw"], fwd["_text_features_raw"]) < 1e-4
  assert rel(aux["text_features"], fwd["_text_features"]) < 1e-4
  assert rel(aux["prompts"], fwd["_prompts"]) < 1e-4


def test_clip_from_clip_model_keys_encodes_images(fwd):
  """The CLIP kept under `clip_model_.` is an OpenAI-named checkpoint (issue 2's check)."""
  state = {k[len("clip_model_.") :]: v for k, v in fwd.items() if k.startswith("clip_model_.")}
  clip, _ = clip_weights.load_clip(state)
  frames = to_bthwc(fwd["_video"]).reshape(32, 64, 64, 3)
  feats = nnx.jit(lambda m, x: m.encode_image(x))(clip, frames)
  assert rel(feats, fwd["_image_features"]) < 1e-5


def test_token_ids_give_the_same_end_positions(weights, fwd):
  cfg, _, name_lens, _ = reference.infer_reference_config(
    weights, token_ids=fwd["_tokenized_prompts"]
  )
  np.testing.assert_array_equal(name_lens, fwd["_name_lens"])
  wrong = fwd["_tokenized_prompts"].copy()
  wrong[0, 12] += 1
  with pytest.raises(CheckpointMismatchError, match="token_ids"):
    reference.infer_reference_config(weights, token_ids=wrong)


# ---------------------------------------------------------------------------------------------
# Other configurations, checked against an independent numpy version of the reference's forward.


def _np_temporal(state, frames_BxTxD, depth, heads, dim_head):
  x = np.concatenate(
    [
      np.broadcast_to(
        state["temporal_net.cls_token"], (frames_BxTxD.shape[0], 1, frames_BxTxD.shape[2])
      ),
      frames_BxTxD,
    ],
    axis=1,
  ).astype(np.float64)
  x = x + state["temporal_net.pos_embedding"]

  def ln(y, p):
    mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
    return (y - mu) / np.sqrt(var + 1e-5) * state[p + ".weight"] + state[p + ".bias"]

  for i in range(depth):
    p = f"{LAYERS}{i}"
    b, n, _ = x.shape
    qkv = ln(x, f"{p}.0.fn.norm") @ state[f"{p}.0.fn.fn.to_qkv.weight"].T
    q, k, v = (
      t.reshape(b, n, heads, dim_head).transpose(0, 2, 1, 3) for t in np.split(qkv, 3, axis=-1)
    )
    att = q @ k.transpose(0, 1, 3, 2) * dim_head**-0.5
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    o = (att @ v).transpose(0, 2, 1, 3).reshape(b, n, heads * dim_head)
    x = x + o @ state[f"{p}.0.fn.fn.to_out.0.weight"].T + state[f"{p}.0.fn.fn.to_out.0.bias"]
    h = ln(x, f"{p}.1.fn.norm") @ state[f"{p}.1.fn.fn.net.0.weight"].T
    h = h + state[f"{p}.1.fn.fn.net.0.bias"]
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
    x = x + h @ state[f"{p}.1.fn.fn.net.3.weight"].T + state[f"{p}.1.fn.fn.net.3.bias"]
  return x[:, 0]


def _variant(weights, *, shared: bool, classes: list[int], depth: int):
  """A reference state dict with other prompt / temporal shapes built from the fixture's."""
  rng = np.random.default_rng(depth)
  state = {k: v for k, v in weights.items() if not k.startswith(LAYERS)}
  for key in ("prompt_learner.token_prefix", "prompt_learner.token_suffix"):
    state[key] = weights[key][classes]
  ctx = weights["prompt_learner.ctx"][classes] + 0.02 * rng.standard_normal(
    (len(classes),) + weights["prompt_learner.ctx"].shape[1:]
  ).astype(np.float32)
  state["prompt_learner.ctx"] = ctx[0] if shared else ctx
  for i in range(depth):  # layer i: layer 0's tensors, perturbed so that the layers differ
    for k, v in weights.items():
      if k.startswith(f"{LAYERS}0."):
        noise = rng.standard_normal(v.shape).astype(np.float32) * 0.3 * v.std()
        state[f"{LAYERS}{i}." + k[len(f"{LAYERS}0.") :]] = v + noise * (i > 0)
  return state


@pytest.mark.parametrize(
  "shared,position,classes,depth",
  [
    (True, "middle", list(range(7)), 2),
    (False, "front", list(range(7)) + [1, 2, 5, 6], 3),
  ],
  ids=["shared-middle-depth2", "11classes-front-depth3"],
)
def test_other_configurations(weights, fwd, forward_fn, shared, position, classes, depth):
  state = _variant(weights, shared=shared, classes=classes, depth=depth)
  model, cfg, _, report = reference.load_reference_checkpoint(state, position=position)
  assert (cfg.num_classes, cfg.class_specific, cfg.position, cfg.temporal_depth) == (
    len(classes),
    not shared,
    position,
    depth,
  )
  name_lens = fwd["_name_lens"][classes]
  np.testing.assert_array_equal(model.prompt_learner.name_lens[...], name_lens)
  assert not report.warnings

  logits, aux = forward_fn(model, to_bthwc(fwd["_video"]))
  assert logits.shape == (2, len(classes))
  prompts = np_prompts(
    state["prompt_learner.token_prefix"],
    state["prompt_learner.token_suffix"],
    state["prompt_learner.ctx"],
    name_lens,
    position,
  )
  np.testing.assert_array_equal(aux["prompts"], prompts)
  eot = 1 + cfg.n_ctx + name_lens
  # The end-of-text row is the end token's embedding in every mode.
  end_emb = weights["clip_model_.token_embedding.weight"][49407]
  np.testing.assert_array_equal(
    prompts[np.arange(len(classes)), eot],
    np.broadcast_to(end_emb, (len(classes), end_emb.shape[0])),
  )
  video_raw = _np_temporal(state, fwd["_image_features"].reshape(2, 16, -1), depth, 8, 64)
  assert rel(aux["video_features_raw"], video_raw) < 1e-4
  v = video_raw / np.linalg.norm(video_raw, axis=-1, keepdims=True)
  # The text tower itself is checked by test_forward_matches_reference.
  t = np.asarray(aux["text_features"], np.float64)
  assert np.abs(np.asarray(logits) - 100 * v @ t.T).max() < 5e-4


def test_degenerate_depth0_reference_is_imported_as_frame_mean(weights):
  state = {k: v for k, v in weights.items() if not k.startswith(LAYERS)}
  with pytest.warns(UserWarning, match="depth 0"):
    model, cfg, _, report = reference.load_reference_checkpoint(state)
  assert cfg.temporal == "mean" and not nnx.state(model.temporal_net)  # no parameters
  assert "temporal_net.cls_token" in report.ignored


def test_strict_about_unknown_missing_and_stale_tensors(weights):
  with pytest.raises(CheckpointMismatchError, match="unexpected tensors: extra.weight"):
    reference.load_reference_checkpoint({**weights, "extra.weight": np.zeros(3)})
  missing = dict(weights)
  del missing[f"{LAYERS}0.1.fn.fn.net.3.bias"]
  with pytest.raises(CheckpointMismatchError, match="missing tensors:.*net.3.bias"):
    reference.load_reference_checkpoint(missing)
  stale = dict(weights)
  stale["clip_model_.visual.proj"] = weights["clip_model_.visual.proj"] + 1.0
  with pytest.raises(CheckpointMismatchError, match="allow_stale_duplicates"):
    reference.load_reference_checkpoint(stale)
  with pytest.warns(UserWarning, match="differ"):
    model = reference.load_reference_checkpoint(stale, allow_stale_duplicates=True).model
  np.testing.assert_array_equal(model.clip.visual.proj[...], weights["image_encoder.proj"])
  with pytest.raises(ValueError, match="cannot be overridden"):
    reference.load_reference_checkpoint(weights, n_ctx=4)


class RecorderMeter:
  """Stands in for the reference's pickled plotting helper (`utils.RecorderMeter`)."""

  def __init__(self):
    self.epoch_losses = np.zeros((3, 2))


def test_reference_pth_checkpoint_and_cli_export(weights, tmp_path, capsys):
  torch = pytest.importorskip("torch")
  ckpt = {
    "state_dict": {"module." + k: torch.from_numpy(np.array(v)) for k, v in weights.items()},
    "epoch": 7,
    "best_acc": 61.5,
    "optimizer": {"state": {}, "param_groups": []},
    "recorder": RecorderMeter(),
  }
  path = tmp_path / "model_best.pth"
  torch.save(ckpt, path)

  out = tmp_path / "export"
  assert convert.main([f"--reference={path}", f"--out={out}"]) == 0
  printed = capsys.readouterr().out
  assert "RecorderMeter" in printed and "classes 7" in printed
  meta = json.loads((out / reference.EXPORT_CONFIG).read_text())
  assert meta["extra"]["metadata"] == {"epoch": 7, "best_acc": 61.5}

  restored, cfg, clip_cfg = reference.load_exported_model(out)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    direct = reference.load_reference_checkpoint(weights)
  assert cfg == direct.config and clip_cfg == direct.clip_config
  a, b = reference.model_arrays(restored), reference.model_arrays(direct.model)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------------------------------------
# Five training steps of the reference recipe.


def test_train_steps_match_reference(reference_dir, imported, monkeypatch):
  """The trainer's own step (`train.make_train_step`: masked loss, gradients of the optimizer's
  parameters, update) with the optimizer the paper config builds (`state.build_optimizer`:
  groups, learning rates, schedule, coupled weight decay), five steps against the reference.
  Only the uint8 -> float conversion is bypassed: the fixture's pixels are floats in [0, 1]."""
  with np.load(reference_dir / "tiny_train_steps.npz") as f:
    ref = {k: f[k] for k in f.files}
  # A fresh copy: the module-scoped model stays untouched for the other tests.
  model = reference.load_reference_checkpoint(reference_dir / "tiny_forward.npz").model
  key_map = reference.reference_key_map(imported.config, imported.clip_config)
  ours_to_ref = {ours: (name, how) for name, (ours, how) in key_map.items()}

  def arrays(state):
    return {path_name(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}

  init = arrays(nnx.state(model, nnx.Param))
  trained = sorted(k[len("init/") :] for k in ref if k.startswith("init/"))
  for name in trained:
    ours, how = key_map[name]
    np.testing.assert_array_equal(
      reference.to_reference_layout(init[ours], how), ref[f"init/{name}"]
    )

  config = config_lib.paper_config("dfew")
  groups = present_groups(model, groups_from_config(config.optim))
  optimizer = state_lib.build_optimizer(config, model, groups, steps_per_epoch=5)
  assert sorted(ours_to_ref[n][0] for n in optimizer.wrt.names) == trained
  frozen_before = reference.model_arrays(model)
  frozen_before = {k: v for k, v in frozen_before.items() if k not in optimizer.wrt.names}

  monkeypatch.setattr(dfer_lib.DFERCLIP, "preprocess", lambda self, video: video)
  graphdef, model_state = nnx.split(model)
  opt_graphdef, opt_state = nnx.split(optimizer)
  step_fn = jax.jit(train.make_train_step(graphdef, opt_graphdef, dropout=False))
  losses = []
  for step in range(5):
    batch = {
      "video": to_bthwc(ref["_videos"][step]),
      "label": jnp.asarray(ref["_labels"][step], jnp.int32),
      "mask": jnp.ones(len(ref["_labels"][step]), bool),
    }
    model_state, opt_state, metrics = step_fn(model_state, opt_state, batch, jax.random.key(0))
    losses.append(float(metrics["loss"]))
    if step == 0:
      # SGD's first momentum buffer is the gradient plus the coupled weight decay.
      first = momentum_buffers(nnx.merge(opt_graphdef, opt_state))
      grad0 = {k: v - config.optim.weight_decay * init[k] for k, v in first.items()}
  np.testing.assert_allclose(losses, ref["_losses"], rtol=1e-4)

  model, optimizer = nnx.merge(graphdef, model_state), nnx.merge(opt_graphdef, opt_state)
  final = arrays(nnx.state(model, nnx.Param))
  momentum = momentum_buffers(optimizer)
  assert grad0.keys() == momentum.keys() == set(optimizer.wrt.names)
  for ours in grad0:
    name, how = ours_to_ref[ours]

    def back(x, how=how):
      return reference.to_reference_layout(x, how)

    assert rel(back(grad0[ours]), ref[f"grad0/{name}"]) < 1e-4, name
    assert rel(back(final[ours]), ref[f"final/{name}"]) < 1e-4, name
    if name.startswith("image_encoder."):
      update_tol = 5e-3  # lr 1e-5: the update is a small difference of float32 weights
    elif name.startswith("prompt_learner."):
      update_tol = 1e-3
    else:
      update_tol = 1e-4
    assert (
      rel(back(final[ours] - init[ours]), ref[f"final/{name}"] - ref[f"init/{name}"]) < update_tol
    ), name
    assert rel(back(momentum[ours]), ref[f"momentum/{name}"]) < 1e-4, name

  after = reference.model_arrays(model)
  for k, v in frozen_before.items():
    np.testing.assert_array_equal(after[k], v, err_msg=f"frozen {k} changed")
