"""Tests for dfer_clip_jax.conversion.torch_io: torch-free, code-free checkpoint reading."""

import os
import pickletools
import sys
import textwrap
import zipfile

import ml_dtypes
import numpy as np
import pytest

from dfer_clip_jax.conversion import torch_io

torch = pytest.importorskip("torch")
nn = torch.nn


def _numpy(t: "torch.Tensor") -> np.ndarray:
  t = t.detach()
  if t.dtype == torch.bfloat16:  # numpy has no bfloat16: compare through its bit pattern
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _assert_same(arrays: dict, tensors: dict) -> None:
  assert list(arrays) == list(tensors)
  for name, t in tensors.items():
    expected = _numpy(t)
    assert arrays[name].dtype == expected.dtype, name
    assert arrays[name].shape == expected.shape, name
    np.testing.assert_array_equal(arrays[name], expected, err_msg=name)


def _rewrite_zip(src, dst, replace: dict) -> None:
  """Copies a zip, replacing (bytes) or dropping (None) the entries named in `replace`."""
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
    for info in zin.infolist():
      data = replace.get(info.filename, zin.read(info.filename))
      if data is not None:
        zout.writestr(info.filename, data)


class _Tower(nn.Module):
  """Linear / Conv / LayerNorm / MultiheadAttention with prime-ish sizes and mixed dtypes."""

  def __init__(self):
    super().__init__()
    self.conv = nn.Conv2d(3, 5, kernel_size=3, bias=False)
    self.ln = nn.LayerNorm(7)
    self.attn = nn.MultiheadAttention(7, 1)
    self.proj = nn.Linear(7, 11)
    self.half_weight = nn.Parameter(torch.randn(5, 3).half())
    self.register_buffer("step", torch.tensor([3, -2, 2**40], dtype=torch.int64))
    self.register_buffer("bf", torch.randn(2, 3).bfloat16())
    self.register_buffer("scratch", torch.ones(4), persistent=False)

  def forward(self, x):
    x = self.ln(x)
    return self.proj(self.attn(x, x, x)[0]) + self.scratch.sum()


def test_plain_state_dict_round_trip(tmp_path):
  torch.manual_seed(0)
  state = _Tower().state_dict()
  path = tmp_path / "model.pth"
  torch.save(state, path)
  arrays, report = torch_io.load_state_dict(path)
  _assert_same(arrays, state)
  assert report.format == "torch_zip"
  assert report.stubbed_classes == [] and report.ignored_keys == [] and report.metadata == {}
  assert arrays["half_weight"].dtype == np.float16
  assert arrays["bf"].dtype == ml_dtypes.bfloat16
  assert arrays["step"].tolist() == [3, -2, 2**40]


def test_strided_views_offsets_and_shared_storage(tmp_path):
  base = torch.arange(35, dtype=torch.float32).reshape(5, 7)
  tensors = {
    "base": base,
    "transposed": base.t(),
    "slice": base[1:4, 2:6],
    "tail": base.view(-1)[9:],
    "every_other_col": base[:, ::2],
    "expanded": torch.arange(3, dtype=torch.int32).expand(4, 3),  # stride 0
    "empty": base[:, :0],
  }
  path = tmp_path / "views.pt"
  torch.save(tensors, path)
  with zipfile.ZipFile(path) as zf:  # the views really share one storage in the file
    assert sorted(n.rsplit("/", 1)[1] for n in zf.namelist() if "/data/" in n) == ["0", "1"]
  arrays, _ = torch_io.load_state_dict(path)
  _assert_same(arrays, tensors)
  assert all(a.flags.c_contiguous and a.flags.writeable for a in arrays.values())
  arrays["base"][0, 0] = -1.0  # copies, not views of one another
  assert arrays["transposed"][0, 0] == 0.0


_REFERENCE_UTILS = """
import os
import builtins
import numpy as np


class RecorderMeter:
  # Stands in for the reference's plotting helper pickled into its checkpoints.
  def __init__(self, total_epoch=3):
    self.total_epoch = total_epoch
    self.epoch_losses = np.zeros((total_epoch, 2), dtype=np.float32)
    self.epoch_accuracy = np.ones((total_epoch, 2), dtype=np.float32)


class ShellPayload:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, ("touch " + self.marker,))


class ExecPayload:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (builtins.exec, ("open(%r, 'w').write('pwned')" % self.marker,))
"""


@pytest.fixture()
def reference_like_checkpoint(tmp_path):
  """A DFER-CLIP-style training checkpoint whose helper classes cannot be imported at load time."""
  module_name = "dferclip_throwaway_utils"
  (tmp_path / f"{module_name}.py").write_text(textwrap.dedent(_REFERENCE_UTILS))
  markers = {"shell": tmp_path / "shell_ran", "exec": tmp_path / "exec_ran"}
  sys.path.insert(0, str(tmp_path))
  try:
    helpers = __import__(module_name)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    state = {"module.x": torch.randn(2, 3), "module.y": torch.arange(4, dtype=torch.int64)}
    checkpoint = {
      "state_dict": state,
      "epoch": 5,
      "best_acc": 71.2,
      "best_uar": torch.tensor(59.5),
      "lr": np.float64(1e-3),
      "optimizer": opt.state_dict(),
      "recorder": helpers.RecorderMeter(),
      "shell": helpers.ShellPayload(str(markers["shell"])),
      "exec": helpers.ExecPayload(str(markers["exec"])),
    }
    path = tmp_path / "model_best.pth"
    torch.save(checkpoint, path)
  finally:
    sys.path.remove(str(tmp_path))
    sys.modules.pop(module_name, None)
  (tmp_path / f"{module_name}.py").unlink()
  return path, state, markers


def test_training_checkpoint_stubs_unknown_classes_and_runs_no_code(reference_like_checkpoint):
  path, state, markers = reference_like_checkpoint
  with zipfile.ZipFile(path) as zf:  # the payloads are really in the pickle
    globals_in_pickle = {
      arg
      for op, arg, _ in pickletools.genops(zf.read("model_best/data.pkl"))
      if op.name == "GLOBAL"
    }
  assert f"{os.system.__module__} system" in globals_in_pickle
  assert "__builtin__ exec" in globals_in_pickle

  arrays, report = torch_io.load_state_dict(path)
  _assert_same(arrays, state)
  assert report.format == "torch_zip"
  assert report.metadata == {"epoch": 5, "best_acc": 71.2, "best_uar": 59.5, "lr": 1e-3}
  assert report.ignored_keys == [
    "epoch",
    "best_acc",
    "best_uar",
    "lr",
    "optimizer",
    "recorder",
    "shell",
    "exec",
  ]
  assert "dferclip_throwaway_utils.RecorderMeter" in report.stubbed_classes
  assert f"{os.system.__module__}.system" in report.stubbed_classes
  assert "builtins.exec" in report.stubbed_classes
  assert not markers["shell"].exists() and not markers["exec"].exists()

  with pytest.raises(
    torch_io.CheckpointFormatError, match=r"dferclip_throwaway_utils\.RecorderMeter"
  ):
    torch_io.load_state_dict(path, strict_classes=True)


class _Block(nn.Module):
  def __init__(self):
    super().__init__()
    self.ln = nn.LayerNorm(7)
    self.attn = nn.MultiheadAttention(7, 1)
    self.mlp = nn.Sequential(nn.Linear(7, 11), nn.GELU(), nn.Linear(11, 7))
    self.register_buffer("count", torch.zeros((), dtype=torch.int64))
    self.register_buffer("scratch", torch.ones(3), persistent=False)
    self.mask = torch.full((2, 2), float("-inf")).triu(1)  # plain attribute, not a buffer

  def forward(self, x):
    y = self.ln(x)
    x = x + self.attn(y, y, y, need_weights=False)[0]
    return x + self.mlp(x) + self.scratch.sum() + self.mask.sum().clamp(min=0)


class _TinyClip(nn.Module):
  def __init__(self):
    super().__init__()
    self.logit_scale = nn.Parameter(torch.tensor(4.6052))
    self.positional_embedding = nn.Parameter(torch.randn(2, 7))
    self.token_embedding = nn.Embedding(13, 7)
    self.blocks = nn.ModuleList([_Block(), _Block()])
    self.flag = 3

  def forward(self, tokens):
    x = self.token_embedding(tokens) + self.positional_embedding
    for block in self.blocks:
      x = block(x)
    return x * self.logit_scale.exp()


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_archive_matches_jit_state_dict(tmp_path, how):
  torch.manual_seed(1)
  model = _TinyClip().eval()
  tokens = torch.tensor([[1, 2], [3, 4], [5, 6]])
  scripted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, tokens)
  path = tmp_path / f"{how}.pt"
  torch.jit.save(scripted, path)
  expected = torch.jit.load(path).state_dict()

  arrays, report = torch_io.load_state_dict(path)
  _assert_same(arrays, expected)
  assert report.format == "torchscript"
  assert "blocks.0.attn.in_proj_weight" in arrays and "token_embedding.weight" in arrays
  assert any(name.startswith("__torch__.") for name in report.stubbed_classes)
  if how == "script":  # tracing does not keep unused tensor attributes
    assert {"blocks.0.mask", "blocks.1.mask"} <= set(report.ignored_keys)
  # Classes declared in the archive's own code/ are expected, even in strict mode.
  strict_arrays, _ = torch_io.load_state_dict(path, strict_classes=True)
  assert list(strict_arrays) == list(arrays)


def test_whole_pickled_module(tmp_path):
  torch.manual_seed(2)
  model = nn.Sequential(nn.Linear(3, 5, bias=False), nn.BatchNorm1d(5), _Tower())
  path = tmp_path / "whole.pt"
  torch.save(model, path)
  arrays, report = torch_io.load_state_dict(path)
  _assert_same(arrays, model.state_dict())
  assert "2.scratch" in report.ignored_keys  # non-persistent buffer
  assert "torch.nn.modules.batchnorm.BatchNorm1d" in report.stubbed_classes
  with pytest.raises(
    torch_io.CheckpointFormatError, match=r"torch\.nn\.modules\.container\.Sequential"
  ):
    torch_io.load_state_dict(path, strict_classes=True)


def test_legacy_torch_save(tmp_path):
  base = torch.arange(12, dtype=torch.float64).reshape(3, 4)
  tensors = {
    "w": base.t(),
    "p": nn.Parameter(torch.randn(2, 3)),
    "i": torch.tensor([7, 8], dtype=torch.int16),
  }
  path = tmp_path / "legacy.pt"
  torch.save(tensors, path, _use_new_zipfile_serialization=False)
  arrays, report = torch_io.load_state_dict(path)
  _assert_same(arrays, tensors)
  assert report.format == "torch_legacy"


def test_dtypes_without_typed_storage_and_tensor_attributes(tmp_path):
  tagged = torch.randn(3)
  tagged.note = "a Python attribute: pickled via _rebuild_from_type_v2"
  param = nn.Parameter(torch.randn(2))
  param.note = "pickled via _rebuild_parameter_with_state"
  tensors = {
    "u16": torch.tensor([1, 2**16 - 1], dtype=torch.uint16),
    "f8": torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn),
    "tagged": tagged,
    "param": param,
  }
  path = tmp_path / "v3.pt"
  torch.save(tensors, path)
  arrays, report = torch_io.load_state_dict(path, strict_classes=True)
  assert arrays["u16"].dtype == np.uint16 and arrays["u16"].tolist() == [1, 2**16 - 1]
  assert arrays["f8"].dtype == ml_dtypes.float8_e4m3fn
  assert arrays["f8"].astype(np.float32).tolist() == [0.5, -2.0, 448.0]
  np.testing.assert_array_equal(arrays["tagged"], tagged.numpy())
  np.testing.assert_array_equal(arrays["param"], param.detach().numpy())
  assert report.stubbed_classes == []


@pytest.mark.parametrize("wrapper", ["state_dict", "model_state_dict", "model", None])
def test_checkpoint_wrappers(tmp_path, wrapper):
  state = {"enc.w": torch.randn(2, 3), "enc.steps": torch.tensor(7)}
  extra = {"step": 12, "note": "fold 1", "loss": torch.tensor(0.25)}
  checkpoint = {wrapper: state, **extra} if wrapper else {**state, **extra}
  path = tmp_path / "ckpt.pt"
  torch.save(checkpoint, path)
  arrays, report = torch_io.load_state_dict(path)
  expected = state if wrapper else {**state, "loss": extra["loss"]}  # unwrapped: 0-d is a tensor
  _assert_same(arrays, expected)
  if wrapper:
    assert report.metadata == {"step": 12, "note": "fold 1", "loss": 0.25}
  else:
    assert report.metadata == {"step": 12, "note": "fold 1"}


def test_big_endian_archive(tmp_path):
  tensors = {
    "f": torch.randn(2, 3),
    "i": torch.tensor([1, -2, 3**30]),
    "c": torch.randn(3, dtype=torch.complex64),
  }
  little = tmp_path / "little.pt"
  torch.save(tensors, little)
  swapped = {"little/byteorder": b"big"}
  # Storages are keyed in save order; complex64 swaps per float32 component.
  for key, (unit, count) in enumerate([(4, 6), (8, 3), (4, 6)]):
    with zipfile.ZipFile(little) as zf:
      raw = np.frombuffer(zf.read(f"little/data/{key}"), dtype=f"<u{unit}")
    assert raw.size == count
    swapped[f"little/data/{key}"] = raw.astype(f">u{unit}").tobytes()
  big = tmp_path / "big.pt"
  _rewrite_zip(little, big, swapped)
  arrays, _ = torch_io.load_state_dict(big)
  _assert_same(arrays, tensors)
  _assert_same(arrays, torch.load(big, weights_only=True))  # torch reads the file the same way


def test_safetensors_and_npz_round_trips(tmp_path):
  safetensors_torch = pytest.importorskip("safetensors.torch")
  tensors = {
    "a.weight": torch.randn(3, 5),
    "b": torch.randn(4).bfloat16(),
    "c": torch.arange(6).reshape(2, 3),
  }
  st_path = tmp_path / "w.safetensors"
  safetensors_torch.save_file(tensors, st_path, metadata={"format": "pt"})
  arrays, report = torch_io.load_state_dict(st_path)
  assert report.format == "safetensors" and report.metadata == {"format": "pt"}
  _assert_same({k: arrays[k] for k in tensors}, tensors)

  npz_path = tmp_path / "w.npz"
  expected = {
    "x": np.arange(6, dtype=np.float32).reshape(2, 3),
    "y/z": np.array([1, 2], dtype=np.int64),
  }
  np.savez(npz_path, **expected)
  arrays, report = torch_io.load_state_dict(npz_path)
  assert report.format == "npz" and list(arrays) == list(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(arrays[name], value)
    assert arrays[name].dtype == value.dtype

  object_npz = tmp_path / "objects.npz"
  np.savez(object_npz, x=np.array([{"a": 1}], dtype=object))
  with pytest.raises(torch_io.CheckpointFormatError, match="objects.npz"):
    torch_io.load_state_dict(object_npz)


@pytest.fixture()
def small_checkpoint(tmp_path):
  path = tmp_path / "small.pt"
  torch.save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, path)
  return path


def test_missing_truncated_and_random_files(tmp_path, small_checkpoint):
  missing = tmp_path / "nope.pt"
  with pytest.raises(torch_io.CheckpointFormatError, match="nope.pt: no such checkpoint file"):
    torch_io.load_state_dict(missing)

  truncated = tmp_path / "truncated.pt"
  data = small_checkpoint.read_bytes()
  truncated.write_bytes(data[: len(data) // 2])
  with pytest.raises(
    torch_io.CheckpointFormatError, match="truncated.pt: zip archive is truncated"
  ):
    torch_io.load_state_dict(truncated)

  noise = tmp_path / "noise.pth"
  noise.write_bytes(np.random.default_rng(0).bytes(4096))
  with pytest.raises(
    torch_io.CheckpointFormatError, match="noise.pth: not a recognised checkpoint"
  ):
    torch_io.load_state_dict(noise)


def test_damaged_archive_entries(tmp_path, small_checkpoint):
  no_data = tmp_path / "no_data.pt"
  _rewrite_zip(small_checkpoint, no_data, {"small/data/0": None})
  with pytest.raises(
    torch_io.CheckpointFormatError, match=r"no_data.pt: .*no entry 'small/data/0'"
  ):
    torch_io.load_state_dict(no_data)

  short = tmp_path / "short.pt"
  _rewrite_zip(small_checkpoint, short, {"small/data/0": b"\0" * 8})
  with pytest.raises(
    torch_io.CheckpointFormatError, match="short.pt: entry small/data/0 holds 8 bytes"
  ):
    torch_io.load_state_dict(short)

  # A stride that walks past the storage must be refused, not read out of bounds.
  with zipfile.ZipFile(small_checkpoint) as zf:
    pickled = zf.read("small/data.pkl")
  stride_3_1 = b"K\x03K\x01\x86"  # BININT1 3, BININT1 1, TUPLE2
  assert pickled.count(stride_3_1) == 1
  bad_stride = tmp_path / "bad_stride.pt"
  _rewrite_zip(
    small_checkpoint, bad_stride, {"small/data.pkl": pickled.replace(stride_3_1, b"K\x09K\x01\x86")}
  )
  with pytest.raises(torch_io.CheckpointFormatError, match="bad_stride.pt: .*reach element 11"):
    torch_io.load_state_dict(bad_stride)

  no_pickle = tmp_path / "no_pickle.pt"
  _rewrite_zip(small_checkpoint, no_pickle, {"small/data.pkl": None})
  with pytest.raises(torch_io.CheckpointFormatError, match="no_pickle.pt: expected exactly one"):
    torch_io.load_state_dict(no_pickle)
