"""The DFER-CLIP model: prompt assembly, temporal transformer, forward pass, config, class texts."""

import json
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfer_clip_jax.data.datasets import MAFW_CLASSES
from dfer_clip_jax.models import class_texts
from dfer_clip_jax.models import clip as clip_lib
from dfer_clip_jax.models import dfer_clip as dc
from dfer_clip_jax.models import prompts as prompts_lib
from dfer_clip_jax.models import temporal as temporal_lib
from dfer_clip_jax.tokenizer import END_OF_TEXT, START_OF_TEXT, load_tokenizer


class FakeTokenizer:
  """Word-level stand-in for CLIP's BPE tokenizer: ids below 49406, start/end tokens as CLIP."""

  eos_token_id = END_OF_TEXT

  def __call__(self, text, add_special_tokens=True):
    ids = [1 + zlib.crc32(w.encode()) % 49000 for w in re.findall(r"\w+|[^\w\s]", text.lower())]
    return {"input_ids": [START_OF_TEXT] + ids + [END_OF_TEXT] if add_special_tokens else ids}


def np_prompts(prefix, suffix, ctx, name_lens, position):
  """CoOp's per-class prompt assembly loop (what the reference runs)."""
  if ctx.ndim == 2:
    ctx = np.broadcast_to(ctx[None], (prefix.shape[0],) + ctx.shape)
  m, out = ctx.shape[1], []
  for i, nl in enumerate(name_lens):
    if position == "end":
      parts = [prefix[i], ctx[i], suffix[i]]
    elif position == "middle":
      parts = [prefix[i], ctx[i, : m // 2], suffix[i, :nl], ctx[i, m // 2 :], suffix[i, nl:]]
    else:
      parts = [prefix[i], suffix[i, :nl], ctx[i], suffix[i, nl:]]
    out.append(np.concatenate(parts, axis=0))
  return np.stack(out)


# Prime-ish sizes so that a swapped axis cannot go unnoticed. The CLIP is the shared tiny one
# (its initialisation compiles once per test session).
CFG = dc.DFERCLIPConfig(
  class_names=MAFW_CLASSES[:5],
  num_frames=3,
  temporal_heads=3,
  temporal_dim_head=5,
  temporal_mlp_dim=28,
  n_ctx=3,
)
B = 2
D = 64  # tiny CLIP embedding width


@pytest.fixture(scope="module")
def clip():
  return clip_lib.CLIP(clip_lib.tiny_config(), rngs=nnx.Rngs(0))


def temporal_net(dropout=0.0, seed=0):
  return temporal_lib.TemporalTransformer(
    D,
    CFG.num_frames,
    1,
    CFG.temporal_heads,
    CFG.temporal_dim_head,
    CFG.temporal_mlp_dim,
    dropout,
    rngs=nnx.Rngs(seed),
  )


@pytest.fixture(scope="module")
def model(clip):
  return dc.create_dfer_clip(CFG, clip, FakeTokenizer(), rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def forward():
  return nnx.jit(lambda m, v: m(v, train=False))


@pytest.fixture(scope="module")
def video():
  size = clip_lib.tiny_config().vision.image_size
  return jax.random.uniform(jax.random.key(2), (B, CFG.num_frames, size, size, 3))


# ---------------------------------------------------------------------------------------------
# Prompt learner


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("class_specific", [True, False])
def test_prompt_assembly_matches_coop_loop(position, class_specific):
  c, m, length, w = 4, 5, 19, 3
  rng = np.random.default_rng(0)
  name_lens = np.array([1, 4, 2, 7], np.int32)
  buffers = prompts_lib.PromptBuffers(
    rng.standard_normal((c, 1, w)).astype(np.float32),
    rng.standard_normal((c, length - 1 - m, w)).astype(np.float32),
    name_lens,
  )
  learner = prompts_lib.PromptLearner(
    buffers, n_ctx=m, class_specific=class_specific, position=position, rngs=nnx.Rngs(0)
  )
  prompts = np.asarray(learner())
  expected = np_prompts(
    buffers.token_prefix, buffers.token_suffix, np.asarray(learner.ctx[...]), name_lens, position
  )
  np.testing.assert_array_equal(prompts, expected)
  eot = np.asarray(learner.eot)
  np.testing.assert_array_equal(eot, 1 + m + name_lens)
  # The end-of-text row (suffix row name_len) lands at 1 + M + name_len in every mode.
  np.testing.assert_array_equal(
    prompts[np.arange(c), eot], buffers.token_suffix[np.arange(c), name_lens]
  )
  assert learner.ctx.shape == ((c, m, w) if class_specific else (m, w))


def test_prompt_buffers_come_from_the_frozen_token_embedding(clip, model):
  texts = CFG.texts()
  ids, eot, name_lens = prompts_lib.prompt_token_ids(FakeTokenizer(), texts, CFG.n_ctx)
  emb = np.asarray(clip.token_embedding)
  learner = model.prompt_learner
  np.testing.assert_array_equal(learner.token_prefix[...], emb[ids[:, :1]])
  np.testing.assert_array_equal(learner.token_suffix[...], emb[ids[:, 1 + CFG.n_ctx :]])
  np.testing.assert_array_equal(learner.name_lens[...], name_lens)
  np.testing.assert_array_equal(learner.eot, eot)
  assert (ids[np.arange(len(texts)), eot] == END_OF_TEXT).all()
  # Buffers are not parameters: nothing trains or decays them.
  params = nnx.state(model, nnx.Param)
  assert "token_prefix" not in params["prompt_learner"]
  assert "ctx" in params["prompt_learner"]
  assert isinstance(learner.token_suffix, prompts_lib.PromptBuffer)
  assert float(jnp.std(learner.ctx[...])) == pytest.approx(0.02, rel=0.3)


def test_prompt_ids_match_the_reference_tokens(reference_dir, tokenizer_dir):
  """Our prompt strings tokenize exactly as the reference's (class names, with context)."""
  tok = load_tokenizer(tokenizer_dir)
  tokens = json.loads((reference_dir / "sampling_and_tokens.json").read_text())["tokens"]
  for dataset, n_classes in (("DFEW", 7), ("MAFW", 11)):
    names = MAFW_CLASSES[:n_classes]
    for ref_type, ours in (
      ("class_names", "class_name"),
      ("class_names_with_context", "name_with_context"),
    ):
      for n_ctx in ("4", "8", "16"):
        ref = tokens[dataset][ref_type][n_ctx]
        ids, eot, name_lens = prompts_lib.prompt_token_ids(
          tok, class_texts.class_texts(names, ours), int(n_ctx)
        )
        np.testing.assert_array_equal(eot, ref["eot_index"])
        np.testing.assert_array_equal(name_lens, ref["name_lens"])
        ref_ids = np.asarray(ref["ids"])
        for i, e in enumerate(eot):  # the reference pads with 0, we with 49407
          np.testing.assert_array_equal(ids[i, : e + 1], ref_ids[i, : e + 1])


def test_descriptions_fit_the_context(tokenizer_dir):
  tok = load_tokenizer(tokenizer_dir)
  names = MAFW_CLASSES
  assert tuple(class_texts.DESCRIPTIONS) == names
  texts = class_texts.class_texts(names, "descriptor")
  assert len(set(texts)) == 11
  _, eot, _ = prompts_lib.prompt_token_ids(
    tok, texts, 16
  )  # raises if a prompt does not fit 77 tokens
  assert eot.max() < 77


# ---------------------------------------------------------------------------------------------
# Temporal transformer


def test_temporal_transformer_init_follows_the_reference(model):
  net = model.temporal_net
  assert float(jnp.std(net.cls_token[...])) == pytest.approx(1.0, abs=0.3)
  assert float(jnp.std(net.pos_embedding[...])) == pytest.approx(1.0, abs=0.15)
  block = net.temporal_transformer.layers[0]
  assert block.attn.to_qkv.bias is None
  inner = CFG.temporal_heads * CFG.temporal_dim_head
  for linear, fan_in in (
    (block.attn.to_qkv, D),
    (block.attn.to_out, inner),
    (block.ff.fc1, D),
    (block.ff.fc2, CFG.temporal_mlp_dim),
  ):
    bound = fan_in**-0.5
    for p in (linear.kernel, linear.bias):
      if p is not None:  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as PyTorch's nn.Linear
        a = np.abs(np.asarray(p[...]))
        assert a.max() <= bound and a.max() > (0.9 if a.size > 100 else 0.5) * bound
  np.testing.assert_array_equal(block.ff.norm.scale[...], 1.0)
  np.testing.assert_array_equal(block.attn.norm.bias[...], 0.0)


@nnx.jit
def _temporal_and_by_hand(net, frames):
  """The module's output and the formula of docs/method.md (Video) spelled out (tanh GELU, no final norm)."""
  video, tokens = net(frames)
  block = net.temporal_transformer.layers[0]
  b = frames.shape[0]
  x = jnp.concatenate([jnp.broadcast_to(net.cls_token[...], (b, 1, D)), frames], 1)
  x = x + net.pos_embedding[...]
  h = block.attn.norm(x)
  q, k, v = jnp.split(h @ block.attn.to_qkv.kernel[...], 3, axis=-1)
  heads = lambda y: y.reshape(b, -1, CFG.temporal_heads, CFG.temporal_dim_head)
  att = jax.nn.softmax(
    jnp.einsum("bqhd,bkhd->bhqk", heads(q), heads(k)) * CFG.temporal_dim_head**-0.5, axis=-1
  )
  o = jnp.einsum("bhqk,bkhd->bqhd", att, heads(v)).reshape(b, -1, q.shape[-1])
  x = x + o @ block.attn.to_out.kernel[...] + block.attn.to_out.bias[...]
  h = block.ff.norm(x)
  h = jax.nn.gelu(h @ block.ff.fc1.kernel[...] + block.ff.fc1.bias[...], approximate=True)
  x = x + h @ block.ff.fc2.kernel[...] + block.ff.fc2.bias[...]
  return video, tokens, x


def test_temporal_transformer_formula(model):
  frames = jax.random.normal(jax.random.key(1), (B, CFG.num_frames, D))
  video, tokens, expected = _temporal_and_by_hand(model.temporal_net, frames)
  np.testing.assert_allclose(tokens, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(video, expected[:, 0], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="depth >= 1"):
    temporal_lib.TemporalTransformer(D, 2, 0, heads=2, dim_head=3, mlp_dim=5, rngs=nnx.Rngs(0))


def test_temporal_dropout_needs_rngs_in_training(clip):
  net = temporal_net(dropout=0.5)
  frames = jax.random.normal(jax.random.key(1), (B, CFG.num_frames, D))
  run = nnx.jit(lambda n, x, r: (n(x, train=True, rngs=r)[0], n(x, train=False)[0]))
  (train_a, eval_a), (train_b, eval_b) = (
    run(net, frames, nnx.Rngs(dropout=1)),
    run(net, frames, nnx.Rngs(dropout=2)),
  )
  np.testing.assert_array_equal(eval_a, eval_b)
  assert not np.allclose(train_a, eval_a) and not np.allclose(train_a, train_b)
  np.testing.assert_array_equal(train_a, run(net, frames, nnx.Rngs(dropout=1))[0])
  with pytest.raises(ValueError, match="rngs"):
    net(frames, train=True)
  cfg = CFG.replace(temporal_dropout=0.5)
  model = dc.DFERCLIP(
    cfg, clip, prompt_buffers=prompts_lib.PromptBuffers.zeros(5, 3, 77, 64), rngs=nnx.Rngs(0)
  )
  with pytest.raises(ValueError, match="rngs=nnx.Rngs"):
    model(jnp.zeros((1, 3, 32, 32, 3)), train=True)


# ---------------------------------------------------------------------------------------------
# The model


@pytest.fixture(scope="module")
def forward_twice():
  """The forward pass, and again with the text features precomputed (one compile for both)."""

  def run(model, video):
    logits, aux = model(video, train=False)
    text = model.text_features()[0]
    return logits, aux, model(video, train=False, text_features=text)[0]

  return nnx.jit(run)


def test_forward_shapes_and_frame_order(model, forward_twice, video):
  logits, aux, logits_pre = forward_twice(model, video)
  np.testing.assert_allclose(logits_pre, logits, rtol=1e-6, atol=1e-5)
  d = model.width
  assert logits.shape == (B, CFG.num_classes)
  assert aux["frame_features"].shape == (B, CFG.num_frames, d)
  assert aux["video_features"].shape == aux["video_features_raw"].shape == (B, d)
  assert aux["text_features"].shape == (CFG.num_classes, d)
  assert aux["prompts"].shape == (CFG.num_classes, 77, 64)
  np.testing.assert_allclose(jnp.linalg.norm(aux["video_features"], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(
    logits, 100 * aux["video_features"] @ aux["text_features"].T, rtol=1e-5, atol=1e-4
  )
  # Frames are b-major: clip 1 = clip 0 played backwards gives its frame features reversed.
  twin = jnp.stack([video[0], video[0, ::-1]])
  _, twin_aux, _ = forward_twice(model, twin)
  np.testing.assert_allclose(
    twin_aux["frame_features"][1], twin_aux["frame_features"][0, ::-1], rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    twin_aux["frame_features"][0], aux["frame_features"][0], rtol=1e-5, atol=1e-6
  )
  # Order matters to the temporal transformer (position embeddings).
  assert not np.allclose(twin_aux["video_features"][0], twin_aux["video_features"][1])
  with pytest.raises(ValueError, match="3 frames"):
    model(video[:, :2], train=False)


def test_mean_pooling_shared_middle_context_and_clip_scale(clip, forward, video):
  cfg = CFG.replace(
    temporal_depth=0,
    class_specific=False,
    position="middle",
    logit_scale="clip",
    text_type="name_with_context",
  )
  model = dc.create_dfer_clip(cfg, clip, FakeTokenizer(), rngs=nnx.Rngs(3))
  assert isinstance(model.temporal_net, temporal_lib.FrameMean) and cfg.temporal == "mean"
  assert model.prompt_learner.ctx.shape == (3, 64)
  logits, aux = forward(model, video)
  np.testing.assert_allclose(aux["video_features_raw"], aux["frame_features"].mean(1), rtol=1e-6)
  pl = model.prompt_learner
  np.testing.assert_array_equal(
    aux["prompts"],
    np_prompts(
      np.asarray(pl.token_prefix[...]),
      np.asarray(pl.token_suffix[...]),
      np.asarray(pl.ctx[...]),
      np.asarray(pl.name_lens[...]),
      "middle",
    ),
  )
  scale = float(jnp.exp(clip.logit_scale[...]))
  np.testing.assert_allclose(
    logits, scale * aux["video_features"] @ aux["text_features"].T, rtol=1e-5, atol=1e-5
  )


def test_class_texts_file_and_text_count(clip, tmp_path):
  path = tmp_path / "texts.txt"
  path.write_text("# my texts\n" + "\n".join(f"a face number {i}." for i in range(5)) + "\n")
  cfg = CFG.replace(class_texts_file=str(path))
  model = dc.create_dfer_clip(cfg, clip, FakeTokenizer(), rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(model.prompt_learner.name_lens[...], [5] * 5)
  with pytest.raises(ValueError, match="4 class texts for 5 classes"):
    dc.create_dfer_clip(CFG, clip, FakeTokenizer(), texts=["a."] * 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="tokenizer"):
    dc.create_dfer_clip(CFG, clip, None, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------------------------
# Config and class texts


def test_config_round_trip_and_validation():
  cfg = dc.DFERCLIPConfig(
    class_names=("calm", "upset"), text_type="template", template="a photo of {}.", n_ctx=0
  )
  d = json.loads(json.dumps(cfg.to_dict()))
  assert dc.DFERCLIPConfig.from_dict(d) == cfg
  assert cfg.texts() == ["a photo of calm.", "a photo of upset."]
  with pytest.raises(ValueError, match="unknown keys.*n_ctxx"):
    dc.DFERCLIPConfig.from_dict({**d, "n_ctxx": 4})
  for bad, match in (
    (dict(position="left"), "position"),
    (dict(temporal_depth=-1), "depth"),
    (dict(template="a {}."), "template must be set"),
    (dict(text_type="template"), "template must be set"),
    (dict(text_type="template", template="a photo."), "no '{}'"),
    (dict(class_names=()), "class_names"),
    (dict(class_names="ab"), "class_names"),
    (dict(temporal="lstm"), "temporal"),
    (dict(logit_scale="learned"), "logit_scale"),
  ):
    with pytest.raises(ValueError, match=match):
      dc.DFERCLIPConfig(**{"class_names": ("a", "b"), **bad})
  assert dc.DFERCLIPConfig(class_names=("a",), temporal_depth=0).temporal == "mean"  # an alias
  assert dc.DFERCLIPConfig(class_names=("a",), template=None).template == ""  # older exports


def test_class_text_types():
  names = ("happiness", "fear")
  assert class_texts.class_texts(names, "class_name") == ["happiness.", "fear."]
  assert class_texts.class_texts(names, "name_with_context") == [
    "an expression of happiness.",
    "an expression of fear.",
  ]
  assert class_texts.class_texts(names, "descriptor")[1] == class_texts.DESCRIPTIONS["fear"]
  with pytest.raises(ValueError, match="no built-in description"):
    class_texts.class_texts(("calm",), "descriptor")


def test_load_class_texts_formats_and_errors(tmp_path):
  names = ("happiness", "sadness", "neutral")
  p = tmp_path / "t.json"
  p.write_text(json.dumps(["smile.", "tears.", "calm."]))
  assert class_texts.load_class_texts(p, names) == ["smile.", "tears.", "calm."]
  p.write_text(
    json.dumps({"sadness": ["tears", "frown."], "neutral": "calm.", "happiness": "smile."})
  )
  assert class_texts.load_class_texts(p, names) == ["smile.", "tears, frown.", "calm."]
  p.write_text(json.dumps({"sadness": "a", "neutral": "b", "joy": "c"}))
  with pytest.raises(ValueError, match=r"missing \['happiness'\], unexpected \['joy'\]"):
    class_texts.load_class_texts(p, names)
  p.write_text(json.dumps(["a", "b"]))
  with pytest.raises(ValueError, match="holds 2 class texts, expected 3"):
    class_texts.load_class_texts(p, names)
  p.write_text(json.dumps(["a", 3, "c"]))
  with pytest.raises(ValueError, match="entry 1 .sadness."):
    class_texts.load_class_texts(p, names)
  p.write_text('["a", ')
  with pytest.raises(ValueError, match="invalid JSON at line 1"):
    class_texts.load_class_texts(p, names)
  t = tmp_path / "t.txt"
  t.write_text("smile.\n\n# comment\ntears.\n")
  with pytest.raises(ValueError, match=r"holds 2 class texts \(non-blank lines \[1, 4\]\)"):
    class_texts.load_class_texts(t, names)
  t.write_text("smile.\ntears.\ncalm.\n")
  assert class_texts.load_class_texts(t, names)[2] == "calm."
  with pytest.raises(FileNotFoundError):
    class_texts.load_class_texts(tmp_path / "none.txt", names)


def test_pixels_become_float_in_the_model():
  video = np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(1, 2, 3, 3, 3) * 4
  x = dc.to_model_input(video, normalize=False)
  assert x.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(x), video.astype(np.float32) / np.float32(255), rtol=1e-6)
  normed = jax.jit(lambda v: dc.to_model_input(v, normalize=True))(video)
  np.testing.assert_allclose(
    np.asarray(normed),
    (video / 255.0 - np.array(dc.CLIP_MEAN)) / np.array(dc.CLIP_STD),
    rtol=1e-5,
    atol=1e-5,
  )
  with pytest.raises(TypeError, match="uint8"):
    dc.to_model_input(video.astype(np.float32), normalize=False)


def test_evaluation_forward_with_and_without_constants(model, video):
  """`probabilities` takes uint8 clips; the once-per-evaluation constants (text features) are an
  optimisation only: without them (a model whose text features depend on the video returns
  None from `eval_constants`) the text features are computed in the forward pass."""
  clips_uint8 = (np.asarray(video) * 255).astype(np.uint8)
  both = nnx.jit(lambda m, v: (m.probabilities(v), m.probabilities(v, m.eval_constants())))
  without, with_constants = both(model, clips_uint8)
  assert without.shape == (B, CFG.num_classes)
  np.testing.assert_allclose(without, with_constants, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(without).sum(-1), 1.0, atol=1e-5)
