"""The optimizer: regex groups, PyTorch-form SGD / AdamW (checked against torch), frozen params."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dfer_clip_jax import config_lib, optim
from dfer_clip_jax.models import clip as clip_lib
from dfer_clip_jax.models import dfer_clip as dc
from dfer_clip_jax.models import prompts as prompts_lib


class Toy(nnx.Module):
  def __init__(self, rngs):
    self.enc = nnx.Linear(3, 5, rngs=rngs)
    self.norm = nnx.LayerNorm(5, rngs=rngs)
    self.head = nnx.Linear(5, 2, rngs=rngs)
    self.frozen = nnx.Linear(2, 2, rngs=rngs)

  def __call__(self, x):
    return self.frozen(self.head(jnp.tanh(self.norm(self.enc(x)))))


GROUPS = [
  {"name": "enc", "regex": r"enc\..*", "lr": 0.1},
  {"name": "rest", "regex": r"(norm|head)\..*", "lr": 0.03},
  {"name": "frozen", "regex": r".*", "trainable": False},
]
X = jax.random.normal(jax.random.key(1), (7, 3))
Y = jax.random.normal(jax.random.key(2), (7, 2))


def loss_fn(model):
  return jnp.mean((model(X) - Y) ** 2)


@nnx.jit
def train_step(model, optimizer):
  grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, optimizer.wrt))(model)
  optimizer.update(model, grads)
  return grads


def arrays(state):
  return {optim.path_name(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def run_against_torch(make_torch_opt, steps=4, schedule=None, clip=None, **kwargs):
  """Runs our optimizer and torch's on the same gradients; returns the worst relative gap."""
  torch = pytest.importorskip("torch")
  model = Toy(nnx.Rngs(0))
  opt = optim.make_optimizer(model, GROUPS, schedule=schedule, clip_grad_norm=clip, **kwargs)
  params = arrays(nnx.state(model, nnx.Param))
  assignment = optim.partition(model, GROUPS)
  tparams = {
    k: torch.tensor(v, requires_grad=True) for k, v in params.items() if assignment[k].trainable
  }
  groups = [
    {
      "params": [tparams[k] for k in tparams if assignment[k].name == g["name"]],
      "lr": g["lr"],
      "name": g["name"],
    }
    for g in GROUPS
    if g.get("trainable", True)
  ]
  topt = make_torch_opt(groups)
  worst = 0.0
  for step in range(steps):
    grads = arrays(train_step(model, opt))
    assert set(grads) == set(tparams)
    for k, p in tparams.items():
      p.grad = torch.tensor(grads[k])
    if clip is not None:
      torch.nn.utils.clip_grad_norm_(list(tparams.values()), clip)
    for g in topt.param_groups:
      g["lr"] = dict((x["name"], x["lr"]) for x in GROUPS if "lr" in x)[g["name"]] * (
        1.0 if schedule is None else float(schedule(step))
      )
    topt.step()
    ours = arrays(nnx.state(model, nnx.Param))
    for k, p in tparams.items():
      ref = p.detach().numpy()
      worst = max(worst, float(np.linalg.norm(ours[k] - ref) / np.linalg.norm(ref)))
    np.testing.assert_array_equal(ours["frozen.kernel"], params["frozen.kernel"])
  return worst, model, opt, topt, tparams


def test_sgd_matches_torch_with_coupled_decay_and_schedule():
  torch = pytest.importorskip("torch")
  schedule = optax.piecewise_constant_schedule(1.0, {2: 0.1})
  worst, _, opt, topt, tparams = run_against_torch(
    lambda g: torch.optim.SGD(g, lr=1.0, momentum=0.9, weight_decay=0.05),
    schedule=schedule,
    momentum=0.9,
    weight_decay=0.05,
  )
  assert worst < 1e-6
  buffers = optim.momentum_buffers(opt)
  assert set(buffers) == set(tparams)
  for k, p in tparams.items():
    np.testing.assert_allclose(
      buffers[k], topt.state[p]["momentum_buffer"].numpy(), rtol=1e-5, atol=1e-7
    )


def test_sgd_weight_decay_is_coupled_not_decoupled():
  """One step from a zero-gradient point: the update is exactly -lr * wd * p."""
  model = Toy(nnx.Rngs(0))
  opt = optim.make_optimizer(model, GROUPS, weight_decay=0.5, momentum=0.9)
  before = arrays(nnx.state(model, nnx.Param))
  zero = jax.tree.map(jnp.zeros_like, nnx.state(model, opt.wrt))
  opt.update(model, zero)
  after = arrays(nnx.state(model, nnx.Param))
  np.testing.assert_allclose(after["enc.kernel"], before["enc.kernel"] * (1 - 0.1 * 0.5), rtol=1e-6)
  np.testing.assert_allclose(
    after["norm.scale"], before["norm.scale"] * (1 - 0.03 * 0.5), rtol=1e-6
  )
  np.testing.assert_array_equal(after["frozen.bias"], before["frozen.bias"])


def test_adamw_and_grad_clipping_match_torch():
  torch = pytest.importorskip("torch")
  worst, *_ = run_against_torch(
    lambda g: torch.optim.AdamW(g, lr=1.0, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    optimizer="adamw",
    b1=0.8,
    b2=0.99,
    eps=1e-6,
    weight_decay=0.1,
  )
  assert worst < 1e-5
  worst, *_ = run_against_torch(
    lambda g: torch.optim.SGD(g, lr=1.0, momentum=0.9, weight_decay=1e-4),
    clip=0.05,
    momentum=0.9,
    weight_decay=1e-4,
  )
  assert worst < 1e-5


def test_frozen_parameters_have_no_optimizer_state():
  model = Toy(nnx.Rngs(0))
  opt = optim.make_optimizer(model, GROUPS)
  assert opt.wrt.names == {
    "enc.kernel",
    "enc.bias",
    "norm.scale",
    "norm.bias",
    "head.kernel",
    "head.bias",
  }
  leaves = jax.tree_util.tree_flatten_with_path(nnx.as_pure(opt.opt_state))[0]
  paths = [optim.path_name(p) for p, _ in leaves]
  assert not any("frozen" in p for p in paths), paths
  n_trainable = sum(
    np.size(v) for k, v in arrays(nnx.state(model, nnx.Param)).items() if k in opt.wrt.names
  )
  # One momentum buffer per trained value, plus one step counter per group schedule.
  assert sum(np.size(x) for _, x in leaves) == n_trainable + 2


def test_per_group_schedules_and_logged_rates():
  sched = {
    "enc": optax.piecewise_constant_schedule(1.0, {10: 0.1, 20: 0.1}),
    "rest": lambda step: 1.0,
  }
  assert optim.group_learning_rates(GROUPS, 15, sched) == pytest.approx({"enc": 0.01, "rest": 0.03})
  assert optim.group_learning_rates(GROUPS, 25, sched)["enc"] == pytest.approx(0.001)
  model = Toy(nnx.Rngs(0))
  with pytest.raises(ValueError, match="no entry for group 'rest'"):
    optim.make_optimizer(model, GROUPS, schedule={"enc": sched["enc"]})


def test_group_errors():
  model = Toy(nnx.Rngs(0))
  with pytest.raises(ValueError, match="match no group regex .*: frozen.bias, frozen.kernel;"):
    optim.partition(model, GROUPS[:2])
  with pytest.raises(ValueError, match=r"groups \['typo'\] match no parameter"):
    optim.partition(model, [{"name": "typo", "regex": r"encoder\..*", "lr": 1.0}] + GROUPS)
  with pytest.raises(ValueError, match="invalid regex"):
    optim.partition(model, [{"name": "bad", "regex": "(", "lr": 1.0}])
  with pytest.raises(ValueError, match="trainable but has lr=0"):
    optim.partition(model, [{"name": "all", "regex": ".*"}])
  with pytest.raises(ValueError, match="unknown keys"):
    optim.partition(model, [{"name": "all", "regex": ".*", "lr": 1.0, "decay": 0.0}])
  with pytest.raises(ValueError, match="repeat"):
    optim.partition(model, [GROUPS[0], GROUPS[0], GROUPS[2]])
  with pytest.raises(ValueError, match="no trainable parameters"):
    optim.make_optimizer(model, GROUPS[2:])
  with pytest.raises(ValueError, match="unknown optimizer"):
    optim.make_optimizer(model, GROUPS, optimizer="lion")


def test_dfer_clip_default_groups_follow_the_reference():
  """Temporal 1e-2, image tower 1e-5, context 1e-3; text tower, token embedding, logit scale
  and the prompt buffers frozen."""
  cfg = dc.DFERCLIPConfig(
    class_names=("a", "b", "c"),
    num_frames=2,
    temporal_heads=2,
    temporal_dim_head=4,
    temporal_mlp_dim=8,
    n_ctx=2,
  )
  model = nnx.eval_shape(
    lambda: dc.DFERCLIP(
      cfg,
      clip_lib.CLIP(clip_lib.tiny_config(), rngs=nnx.Rngs(0)),
      prompt_buffers=prompts_lib.PromptBuffers.zeros(3, 2, 77, 64),
      rngs=nnx.Rngs(0),
    )
  )
  groups = optim.present_groups(model, optim.groups_from_config(config_lib.base_config().optim))
  part = {k: (g.name, g.lr) for k, g in optim.partition(model, groups).items()}
  assert part["temporal_net.cls_token"] == ("temporal", 1e-2)
  assert part["temporal_net.temporal_transformer.layers.0.ff.fc2.bias"] == ("temporal", 1e-2)
  assert part["clip.visual.conv1.kernel"] == ("image", 1e-5)
  assert part["clip.visual.ln_post.norm.scale"] == ("image", 1e-5)
  assert part["prompt_learner.ctx"] == ("prompt", 1e-3)
  for frozen in (
    "clip.text.token_embedding.embedding",
    "clip.text.positional_embedding",
    "clip.text.ln_final.norm.bias",
    "clip.text.text_projection",
    "clip.logit_scale",
    "clip.text.transformer.resblocks.1.attn.in_proj.kernel",
  ):
    assert part[frozen][0] == "frozen", frozen
  assert not any(k.startswith("prompt_learner.token") for k in part)  # buffers are no Params


@pytest.mark.parametrize("warmup_epochs", [0.0, 1.0, 0.5])
def test_schedule_milestones_stay_at_their_epochs_whatever_the_warmup(warmup_epochs):
  """Milestones (3, 4) epochs of 10 steps, gamma 0.1: the multiplier drops at steps 30 and 40
  exactly, with or without a warm-up, and the warm-up ramps linearly to 1 over its steps."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  from dfer_clip_jax import state as state_lib  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(
    {"optim": {"milestones": (3, 4), "gamma": 0.1, "warmup_epochs": warmup_epochs}}
  )
  schedule = state_lib.make_schedule(config, steps_per_epoch=10)
  warmup = int(round(warmup_epochs * 10))
  for step in range(60):
    decay = 1.0 if step < 30 else 0.1 if step < 40 else 0.01
    ramp = 1.0 if step >= warmup else 1.0 / warmup + (1 - 1.0 / warmup) * step / warmup
    np.testing.assert_allclose(float(schedule(step)), ramp * decay, rtol=1e-6, err_msg=step)
