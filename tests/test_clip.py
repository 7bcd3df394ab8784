"""CLIP towers: parity with transformers' PyTorch CLIPModel, every loading path, strictness."""

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from dfer_clip_jax.conversion import clip_weights
from dfer_clip_jax.conversion.clip_weights import CheckpointMismatchError, load_clip
from dfer_clip_jax.models import clip as clip_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Prime-ish sizes so that a transposed or mis-split axis fails loudly. The projection width (24,
# 20) differs from both tower widths; two patch sizes; both activations.
HF_CASES = {
  "quick_gelu": dict(
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
      max_position_embeddings=13,
    ),
    projection_dim=24,
  ),
  "gelu": dict(
    vision=dict(
      hidden_size=36,
      intermediate_size=60,
      num_hidden_layers=3,
      num_attention_heads=3,
      image_size=35,
      patch_size=7,
    ),
    text=dict(
      hidden_size=44,
      intermediate_size=52,
      num_hidden_layers=2,
      num_attention_heads=4,
      max_position_embeddings=11,
    ),
    projection_dim=20,
  ),
}
VOCAB = 101  # the largest id (100) is the end-of-text token, as in CLIP's vocabulary


def _hf_model(act: str, seed: int = 0):
  case = HF_CASES[act]
  text = transformers.CLIPTextConfig(
    vocab_size=VOCAB,
    hidden_act=act,
    eos_token_id=VOCAB - 1,
    bos_token_id=VOCAB - 2,
    pad_token_id=VOCAB - 1,
    **case["text"],
  )
  vision = transformers.CLIPVisionConfig(hidden_act=act, **case["vision"])
  cfg = transformers.CLIPConfig(
    text_config=text.to_dict(),
    vision_config=vision.to_dict(),
    projection_dim=case["projection_dim"],
  )
  torch.manual_seed(seed)
  model = transformers.CLIPModel(cfg).eval()
  # Random LayerNorm affine parameters and embeddings so none of them can be silently skipped.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if re.search(r"norm|layrnorm|class_embedding|bias", name):
        p.add_(0.1 * torch.randn_like(p))
  return model


def _inputs(model, n=3, seed=1):
  rs = np.random.RandomState(seed)
  size = model.config.vision_config.image_size
  length = model.config.text_config.max_position_embeddings
  pixels = rs.rand(n, size, size, 3).astype(np.float32)
  ids = rs.randint(0, VOCAB - 2, size=(n, length))
  ids[:, 0] = VOCAB - 2
  # End-of-text at different places; pad after it with the eot id (HF) or with 0 (OpenAI).
  ids[0, 4:] = VOCAB - 1
  ids[1, -1] = VOCAB - 1
  ids[2, 6] = VOCAB - 1
  ids[2, 7:] = 0
  return pixels, ids.astype(np.int32)


def _torch_features(model, pixels, ids):
  with torch.no_grad():
    img = model.get_image_features(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2))
    txt = model.get_text_features(input_ids=torch.tensor(ids, dtype=torch.long))
  img = getattr(img, "pooler_output", img)
  txt = getattr(txt, "pooler_output", txt)
  return img.numpy(), txt.numpy()


@pytest.fixture(scope="module", params=sorted(HF_CASES))
def hf_case(request, tmp_path_factory):
  model = _hf_model(request.param)
  folder = tmp_path_factory.mktemp(f"hf_{request.param}")
  model.save_pretrained(folder)
  pixels, ids = _inputs(model)
  return dict(
    act=request.param,
    model=model,
    folder=folder,
    pixels=pixels,
    ids=ids,
    expected=_torch_features(model, pixels, ids),
  )


def test_hf_folder_parity(hf_case):
  model, config = load_clip(hf_case["folder"])
  assert config.vision.act == hf_case["act"] and config.text.act == hf_case["act"]
  assert config.embed_dim == HF_CASES[hf_case["act"]]["projection_dim"]
  img = np.asarray(model.encode_image(jnp.asarray(hf_case["pixels"])))
  txt = np.asarray(model.encode_text(jnp.asarray(hf_case["ids"])))
  exp_img, exp_txt = hf_case["expected"]
  assert img.shape == exp_img.shape and txt.shape == exp_txt.shape
  np.testing.assert_allclose(img, exp_img, atol=1e-5, rtol=0)
  np.testing.assert_allclose(txt, exp_txt, atol=1e-5, rtol=0)


def test_hf_pytorch_bin_folder(hf_case, tmp_path):
  """A folder with `pytorch_model.bin` (older HF layout) loads through torch_io, without torch."""
  (tmp_path / "config.json").write_text((hf_case["folder"] / "config.json").read_text())
  torch.save(hf_case["model"].state_dict(), tmp_path / "pytorch_model.bin")
  model, _ = load_clip(tmp_path)
  img = np.asarray(model.encode_image(jnp.asarray(hf_case["pixels"])))
  np.testing.assert_allclose(img, hf_case["expected"][0], atol=1e-5, rtol=0)


def _hf_to_openai_names(sd):
  """The HF -> OpenAI renaming written independently of the library (for the round trip)."""
  out = {}
  for k, v in sd.items():
    v = v.numpy()
    if k.endswith("position_ids"):
      continue
    m = re.match(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.*)", k)
    if m:
      tower, i, rest = m.groups()
      pre = ("visual." if tower == "vision" else "") + f"transformer.resblocks.{i}."
      if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
        kind = rest.split(".")[-1]
        key = pre + ("attn.in_proj_weight" if kind == "weight" else "attn.in_proj_bias")
        out.setdefault(key, {})[rest.split(".")[1][0]] = v
        continue
      rest = (
        rest.replace("self_attn.out_proj", "attn.out_proj")
        .replace("layer_norm1", "ln_1")
        .replace("layer_norm2", "ln_2")
        .replace("mlp.fc1", "mlp.c_fc")
        .replace("mlp.fc2", "mlp.c_proj")
      )
      out[pre + rest] = v
      continue
    rename = {
      "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
      "vision_model.embeddings.class_embedding": "visual.class_embedding",
      "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
      "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
      "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
      "vision_model.post_layernorm.weight": "visual.ln_post.weight",
      "vision_model.post_layernorm.bias": "visual.ln_post.bias",
      "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
      "text_model.embeddings.position_embedding.weight": "positional_embedding",
      "text_model.final_layer_norm.weight": "ln_final.weight",
      "text_model.final_layer_norm.bias": "ln_final.bias",
      "logit_scale": "logit_scale",
    }
    if k in rename:
      out[rename[k]] = v
    elif k == "visual_projection.weight":
      out["visual.proj"] = v.T
    elif k == "text_projection.weight":
      out["text_projection"] = v.T
    else:
      raise AssertionError(f"test mapping misses {k}")
  for k, v in list(out.items()):
    if isinstance(v, dict):
      out[k] = np.concatenate([v["q"], v["k"], v["v"]], axis=0)
  return out


@pytest.fixture(scope="module")
def openai_case():
  """OpenAI-format weights carry no head count: widths follow OpenAI's rule heads = width // 64."""
  text = transformers.CLIPTextConfig(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=1,
    max_position_embeddings=13,
    hidden_act="quick_gelu",
    eos_token_id=VOCAB - 1,
  )
  vision = transformers.CLIPVisionConfig(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=24,
    patch_size=8,
    hidden_act="quick_gelu",
  )
  cfg = transformers.CLIPConfig(
    text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=48
  )
  torch.manual_seed(3)
  model = transformers.CLIPModel(cfg).eval()
  pixels, ids = _inputs(model)
  return dict(
    model=model,
    state=_hf_to_openai_names(model.state_dict()),
    pixels=pixels,
    ids=ids,
    expected=_torch_features(model, pixels, ids),
  )


def _check(model, case):
  img = np.asarray(model.encode_image(jnp.asarray(case["pixels"])))
  txt = np.asarray(model.encode_text(jnp.asarray(case["ids"])))
  np.testing.assert_allclose(img, case["expected"][0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(txt, case["expected"][1], atol=1e-5, rtol=0)


def test_openai_names_in_memory(openai_case):
  model, config = load_clip(openai_case["state"])
  assert (config.vision.heads, config.text.heads, config.embed_dim) == (2, 1, 48)
  _check(model, openai_case)


def test_openai_torchscript_archive(openai_case, tmp_path):
  """A TorchScript archive (the format of OpenAI's `ViT-B-32.pt`) loads without running its code."""

  class Holder(torch.nn.Module):
    """Holds tensors under OpenAI's dotted names, like OpenAI's jitted CLIP module."""

    def __init__(self, state, prefix=""):
      super().__init__()
      children = {}
      for k, v in state.items():
        head, _, rest = k.partition(".")
        if rest:
          children.setdefault(head, {})[rest] = v
        else:
          self.register_parameter(head, torch.nn.Parameter(torch.tensor(v)))
      for name, sub in children.items():
        self.add_module(name, Holder(sub))

    def forward(self, x):
      return x

  scripted = torch.jit.script(Holder(openai_case["state"]))
  path = tmp_path / "ViT-tiny.pt"
  torch.jit.save(scripted, str(path))
  model, _ = load_clip(path)
  _check(model, openai_case)


def test_state_dict_file_and_safetensors(openai_case, tmp_path):
  torch.save({k: torch.tensor(v) for k, v in openai_case["state"].items()}, tmp_path / "sd.pth")
  _check(load_clip(tmp_path / "sd.pth")[0], openai_case)
  from safetensors.numpy import save_file

  save_file(
    {k: np.array(v, order="C") for k, v in openai_case["state"].items()},
    tmp_path / "sd.safetensors",
  )
  _check(load_clip(tmp_path / "sd.safetensors")[0], openai_case)


def test_strict_errors_name_the_key(openai_case, hf_case):
  state = dict(openai_case["state"])
  missing = {k: v for k, v in state.items() if k != "visual.ln_post.bias"}
  with pytest.raises(CheckpointMismatchError, match=r"visual\.ln_post\.bias"):
    load_clip(missing)
  extra = dict(state, **{"visual.surprise.weight": np.zeros(3, np.float32)})
  with pytest.raises(CheckpointMismatchError, match=r"visual\.surprise\.weight"):
    load_clip(extra)
  bad = dict(state)
  bad["transformer.resblocks.1.mlp.c_fc.bias"] = np.zeros(7, np.float32)
  with pytest.raises(CheckpointMismatchError, match=r"resblocks\.1\.mlp\.c_fc\.bias"):
    load_clip(bad)
  hf_state = {k: v.numpy() for k, v in hf_case["model"].state_dict().items()}
  hf_state["vision_model.encoder.layers.0.self_attn.extra.weight"] = np.zeros(2, np.float32)
  cfg_json = json.loads((hf_case["folder"] / "config.json").read_text())
  with pytest.raises(CheckpointMismatchError, match=r"layers\.0\.self_attn\.extra\.weight"):
    load_clip(hf_state, config_json=cfg_json)


def test_missing_files_are_reported(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_clip(tmp_path / "nope.pt")
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    load_clip(tmp_path)


def test_bfloat16_matches_float32(hf_case):
  m32, _ = load_clip(hf_case["folder"])
  m16, _ = load_clip(hf_case["folder"], dtype=jnp.bfloat16)
  assert m16.visual.conv1.kernel[...].dtype == jnp.float32  # parameters stay float32
  for fn in ("encode_image", "encode_text"):
    arg = jnp.asarray(hf_case["pixels"] if fn == "encode_image" else hf_case["ids"])
    a = np.asarray(getattr(m32, fn)(arg), np.float32)
    b = np.asarray(getattr(m16, fn)(arg), np.float32)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() >= 0.999, (fn, cos)


def test_attention_impls_agree(hf_case):
  plain, _ = load_clip(hf_case["folder"], attention_impl="plain")
  xla, _ = load_clip(hf_case["folder"], attention_impl="xla")
  for fn, arg in (("encode_image", hf_case["pixels"]), ("encode_text", hf_case["ids"])):
    np.testing.assert_allclose(
      np.asarray(getattr(plain, fn)(jnp.asarray(arg))),
      np.asarray(getattr(xla, fn)(jnp.asarray(arg))),
      atol=2e-6,
    )


def test_prompt_embedding_path_equals_token_path(hf_case):
  model, _ = load_clip(hf_case["folder"])
  ids = jnp.asarray(hf_case["ids"])
  emb = model.token_embedding[ids]
  eot = clip_lib.end_of_text_positions(ids)
  np.testing.assert_allclose(
    np.asarray(model.encode_text_embeddings(emb, eot)),
    np.asarray(model.encode_text(ids)),
    atol=1e-6,
  )
  feats, inter = model.encode_image(jnp.asarray(hf_case["pixels"]), return_intermediates=True)
  assert {"embeddings", "block_0", "pooled"} <= set(inter)


def test_position_embedding_resampling(hf_case):
  grid = (
    hf_case["model"].config.vision_config.image_size // 6
    if hf_case["act"] == "quick_gelu"
    else hf_case["model"].config.vision_config.image_size // 7
  )
  patch = HF_CASES[hf_case["act"]]["vision"]["patch_size"]
  new_size = (grid + 2) * patch
  model, config = load_clip(hf_case["folder"], image_size=new_size)
  assert config.vision.image_size == new_size
  pos = np.asarray(model.visual.positional_embedding[...])
  assert pos.shape[0] == (grid + 2) ** 2 + 1
  orig = hf_case["model"].vision_model.embeddings.position_embedding.weight.detach().numpy()
  np.testing.assert_array_equal(pos[0], orig[0])  # the class token is kept, not resampled
  out = model.encode_image(jnp.ones((1, new_size, new_size, 3)))
  assert np.isfinite(np.asarray(out)).all()
  # Resampling to the same grid is the identity.
  np.testing.assert_allclose(clip_weights.resample_posemb(orig, grid), orig, atol=1e-6)


@pytest.mark.parametrize("target", [(9, 11), (5, 4), 13])
def test_position_embedding_resampling_matches_torch_bicubic(target):
  """Against PyTorch's own bicubic (align_corners=False), up and down, to non-square grids: a
  transposed grid or another cubic kernel fails."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  grid, width = 7, 6
  posemb = rng.normal(size=(grid * grid + 1, width)).astype(np.float32)
  rows, cols = (target, target) if isinstance(target, int) else target
  got = clip_weights.resample_posemb(posemb, target)
  assert got.shape == (rows * cols + 1, width) and got.dtype == np.float32
  np.testing.assert_array_equal(got[0], posemb[0])
  grid_1xWxGxG = torch.from_numpy(posemb[1:].reshape(grid, grid, width)).permute(2, 0, 1)[None]
  want = torch.nn.functional.interpolate(
    grid_1xWxGxG.double(), size=(rows, cols), mode="bicubic", align_corners=False
  )
  want = want[0].permute(1, 2, 0).reshape(-1, width).numpy()
  np.testing.assert_allclose(got[1:], want, atol=1e-5)


def test_random_init_shapes():
  cfg = clip_lib.tiny_config()
  from flax import nnx

  model = clip_lib.CLIP(cfg, rngs=nnx.Rngs(0))
  out = model.encode_image(jnp.zeros((2, 32, 32, 3)))
  assert out.shape == (2, cfg.embed_dim)
  with pytest.raises(ValueError, match="expects"):
    model.encode_image(jnp.zeros((2, 30, 30, 3)))
  assert clip_lib.CLIPConfig.from_dict(cfg.to_dict()) == cfg


def test_export_to_openai_names_round_trips(openai_case):
  model, _ = load_clip(openai_case["state"])
  exported = clip_weights.params_to_openai(model)
  assert set(exported) == set(openai_case["state"]) - {"input_resolution"}
  for k, v in openai_case["state"].items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_clip_smoke_command(capsys):
  from dfer_clip_jax import clip_smoke

  clip_smoke.main()
  assert "round trip exact" in capsys.readouterr().out
