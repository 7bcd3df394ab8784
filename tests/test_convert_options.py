"""`python -m dfer_clip_jax.convert`: every accepted input form and every option, checked by what
the converted model computes on the reference fixture's video (not only by shapes)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from dfer_clip_jax import convert
from dfer_clip_jax.conversion import reference

# Max abs error of a port on the fixture's logits (see the fixture's README).
LOGITS_ATOL = 5e-4


@pytest.fixture(scope="module")
def logits_of(fwd, eval_forward):
  """Converted export folder -> (logits of the fixture's video, model config, CLIP config)."""
  video = jnp.asarray(fwd["_video"].transpose(0, 1, 3, 4, 2))

  def run(export):
    model, cfg, clip_cfg = reference.load_exported_model(export)
    return np.asarray(eval_forward(model, video)[0]), cfg, clip_cfg

  return run


def save_pth(weights, path, *, as_reference=True):
  """Writes `weights` with torch: as the reference's training script saves its checkpoints
  (`module.` names inside a dict with the epoch), or as a plain state dict."""
  import torch  # pylint: disable=g-import-not-at-top

  state = {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}
  if as_reference:
    state = {"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}
  torch.save(state, path)
  return path


def _convert(tmp_path, source, name, *flags):
  out = tmp_path / name
  assert convert.main([f"--reference={source}", f"--out={out}", *flags]) == 0
  return out


@pytest.mark.parametrize("form", ["reference_pth", "state_dict_pth", "safetensors"])
def test_converted_checkpoint_computes_the_reference_logits(
  form, weights, fwd, logits_of, tmp_path
):
  """As the reference saves it (`module.` prefix inside a dict), a plain torch state dict, and
  safetensors: each export evaluates to the reference's logits."""
  if form == "safetensors":
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

    source = tmp_path / "weights.safetensors"
    save_file({k: np.array(v, order="C") for k, v in weights.items()}, str(source))
  else:
    pytest.importorskip("torch")
    source = save_pth(weights, tmp_path / "weights.pth", as_reference=form == "reference_pth")
  logits, cfg, clip_cfg = logits_of(_convert(tmp_path, source, "export"))
  assert (cfg.num_classes, clip_cfg.vision.act) == (7, "quick_gelu")
  np.testing.assert_allclose(logits, fwd["_logits"], atol=LOGITS_ATOL, rtol=0)


def test_clip_act_and_temporal_dim_head_change_the_model(weights, fwd, logits_of, tmp_path, capsys):
  """--clip_act=gelu runs exact GELU in both CLIP towers; --temporal_dim_head=32 splits the
  temporal attention into 16 heads of 32. Both are recorded in the export and change the
  logits (the fixture was made with quick_gelu and 8 heads of 64)."""
  source = tmp_path / "weights.npz"
  np.savez(source, **weights)
  logits, _, clip_cfg = logits_of(_convert(tmp_path, source, "gelu", "--clip_act=gelu"))
  assert (clip_cfg.vision.act, clip_cfg.text.act) == ("gelu", "gelu")
  assert np.abs(logits - fwd["_logits"]).max() > 100 * LOGITS_ATOL

  out = _convert(tmp_path, source, "heads", "--temporal_dim_head=32")
  logits, cfg, _ = logits_of(out)
  assert (cfg.temporal_heads, cfg.temporal_dim_head) == (16, 32)
  assert (
    json.loads((out / reference.EXPORT_CONFIG).read_text())["dfer_clip"]["temporal_heads"] == 16
  )
  assert np.abs(logits - fwd["_logits"]).max() > 100 * LOGITS_ATOL
  # A width that does not divide the checkpoint's: a usage error (exit 2) naming the option.
  with pytest.raises(SystemExit) as exit_info:
    convert.main([f"--reference={source}", f"--out={tmp_path / 'bad'}", "--temporal_dim_head=48"])
  assert exit_info.value.code == 2
  assert "temporal_dim_head=48" in capsys.readouterr().err
  assert not (tmp_path / "bad").exists()


def test_home_relative_paths(weights, tmp_path, monkeypatch):
  """`~` on the command line is the user's home folder, for the input and the output alike; no
  folder literally named `~` appears in the current one."""
  home, here = tmp_path / "home", tmp_path / "here"
  home.mkdir()
  here.mkdir()
  np.savez(home / "weights.npz", **weights)
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.chdir(here)
  assert convert.main(["--reference=~/weights.npz", "--out=~/exports/mine"]) == 0
  assert reference.EXPORT_CONFIG in {p.name for p in (home / "exports" / "mine").iterdir()}
  assert not (here / "~").exists()
