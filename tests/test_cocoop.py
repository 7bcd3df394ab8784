"""Co-CoOp: each video's own prompts through the model's one forward, in training, evaluation,
micro-batched steps and a stopped-and-resumed run; the context's start ("a photo of a") is model
state. Tiny shapes and the CLIP of test_baselines.py."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_baselines import B, FakeTokenizer, build, clip, video  # noqa: F401 (fixtures)
from test_train import synth, tiny_config  # noqa: F401 (fixture)

from dfer_clip_jax import config_lib, optim, train


@pytest.fixture(scope="module")
def cocoop(clip):  # noqa: F811
  return build("cocoop", clip)[2]


@pytest.fixture(scope="module")
def logits_of():
  return nnx.jit(lambda m, v: m(v, train=False)[0])


def test_context_starts_from_a_photo_of_a(cocoop, clip):  # noqa: F811
  ids = FakeTokenizer()("a photo of a", add_special_tokens=False)["input_ids"]
  np.testing.assert_array_equal(cocoop.prompt_learner.ctx[...], clip.token_embedding[np.array(ids)])
  assert cocoop.prompt_learner.conditional and cocoop.eval_constants() is None
  with pytest.raises(ValueError, match="ctx_init 'a photo of a' is 4 tokens, but n_ctx is 5"):
    build("cocoop", clip, **{"model.n_ctx": 5})
  random_start = build("cocoop", clip, **{"model.ctx_init": ""})[2].prompt_learner.ctx[...]
  assert np.abs(random_start - cocoop.prompt_learner.ctx[...]).max() > 1e-3


def test_meta_net_output_zero_gives_coop_logits(cocoop, clip, video, logits_of):  # noqa: F811
  zeroed = nnx.clone(cocoop)
  last = zeroed.prompt_learner.meta_net.linear2
  last.kernel.value = jnp.zeros_like(last.kernel[...])
  last.bias.value = jnp.zeros_like(last.bias[...])
  _, _, coop = build("coop", clip, **{"model.n_ctx": 4})
  coop.prompt_learner.ctx.value = zeroed.prompt_learner.ctx[...]
  expected = logits_of(coop, video)
  np.testing.assert_allclose(logits_of(zeroed, video), expected, rtol=1e-5, atol=1e-5)
  # With its own (non-zero) output the meta-network moves each video's logits.
  assert np.abs(logits_of(cocoop, video) - expected).max() > 1e-3


def test_batched_logits_equal_a_per_video_loop(cocoop, video, logits_of):  # noqa: F811
  """Each clip's logits (so its probabilities) are those of the clip alone, whichever clips
  share its batch; an evaluation computes nothing once for all videos (evaluate and predict run
  `probabilities(video, eval_constants())`, the same forward)."""
  assert cocoop.eval_constants() is None
  # A louder meta-network whose D/16 = 4 hidden units are all alive (the tiny random one's are
  # shut by the ReLU for these clips) and two unlike clips: the two videos' prompts really differ.
  model = nnx.clone(cocoop)
  first, last = model.prompt_learner.meta_net.linear1, model.prompt_learner.meta_net.linear2
  first.bias.value = jnp.ones_like(first.bias[...])
  last.kernel.value = 30.0 * last.kernel[...]
  clips = jnp.stack([video[0], jnp.full_like(video[1], 0.8)])
  text = nnx.jit(lambda m, v: m(v, train=False)[1]["text_features"])(model, clips)
  assert text.shape == (B, 5, 64) and np.abs(text[0] - text[1]).max() > 5e-4
  batched = logits_of(model, clips)
  for i in range(B):
    np.testing.assert_allclose(
      batched[i], logits_of(model, clips[i : i + 1])[0], rtol=1e-5, atol=1e-6
    )
  other = jnp.stack([clips[0], video[1]])
  np.testing.assert_allclose(logits_of(model, other)[0], batched[0], rtol=1e-6, atol=1e-6)


def test_microbatched_step_equals_one_pass(cocoop, video):  # noqa: F811
  """The preset's update by the trainer's step (test_baselines.py's update test leaves Co-CoOp
  to this one): per-video text features per slice give the one-pass update, and the
  meta-network trains."""
  c = config_lib.base_config()
  config_lib.apply_preset(c, config_lib.BASELINES["cocoop"])
  model = nnx.clone(cocoop)
  groups = optim.present_groups(model, optim.groups_from_config(c.optim))
  optimizer = optim.make_optimizer(model, groups)
  graphdef, model_state = nnx.split(model)
  opt_graphdef, opt_state = nnx.split(optimizer)
  batch = {
    "video": (np.asarray(video) * 255).astype(np.uint8),
    "label": jnp.array([1, 4]),
    "mask": jnp.ones((B,), bool),
  }
  out = {}
  for k in (1, 2):
    step = jax.jit(train.make_train_step(graphdef, opt_graphdef, dropout=False, microbatches=k))
    new_state, _, metrics = step(model_state, opt_state, batch, jax.random.key(0))
    out[k] = (new_state, metrics)
  for a, b in zip(jax.tree.leaves(out[1][0]), jax.tree.leaves(out[2][0])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[1][1]["loss"], out[2][1]["loss"], rtol=1e-6)
  part = optim.partition(cocoop, groups)
  after = {
    optim.path_name(p): np.asarray(v[...])
    for p, v in nnx.to_flat_state(nnx.state(nnx.merge(graphdef, out[1][0]), nnx.Param))
  }
  before = {
    optim.path_name(p): np.asarray(v[...])
    for p, v in nnx.to_flat_state(nnx.state(cocoop, nnx.Param))
  }
  trained = {k for k in before if not np.array_equal(after[k], before[k])}
  assert trained == {k for k in before if part[k].trainable}
  assert {k for k in trained if "meta_net" in k} and "prompt_learner.ctx" in trained


def test_killed_and_resumed_run_equals_an_uninterrupted_one(synth, tmp_path):  # noqa: F811
  """The trainer on a tiny Co-CoOp, 1 epoch of 4 steps. A copy of the finished run cut back to its
  step-2 checkpoint is what a kill right after that checkpoint leaves; rerun, it resumes there
  (the model rebuilt from its spec, no tokenizer: the context's start is a saved parameter, and
  so are the meta-network and its momenta) and ends with the uninterrupted run's predictions."""
  preset = dict(config_lib.BASELINES["cocoop"], **{"train.epochs": 1, "train.keep_checkpoints": 5})
  ref = tmp_path / "ref"
  train.train_and_evaluate(tiny_config(synth, **preset), ref)
  killed = tmp_path / "killed"
  shutil.copytree(ref, killed)
  steps = [p for p in (killed / "checkpoints").iterdir() if p.name.isdigit()]
  assert 2 in {int(p.name) for p in steps}
  for p in steps:
    if int(p.name) > 2:
      shutil.rmtree(p)
  for name in ("report.json", "eval"):
    (killed / name).unlink() if (killed / name).is_file() else shutil.rmtree(killed / name)
  report = train.train_and_evaluate(tiny_config(synth, **preset), killed)
  assert report["rows"] and (killed / "report.json").exists()
  assert (killed / "eval/last/predictions.csv").read_text() == (
    ref / "eval/last/predictions.csv"
  ).read_text()
