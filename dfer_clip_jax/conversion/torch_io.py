"""Reads PyTorch checkpoints into numpy arrays without torch and without running code from the file.

Supported inputs (recognised by their content, not their suffix):
  * zip-format `torch.save` files (`.pt`, `.pth`, `.bin`): `<prefix>/data.pkl` plus one
    `<prefix>/data/<key>` entry per storage;
  * TorchScript archives from `torch.jit.save` (e.g. OpenAI's `ViT-B-32.pt`): the same layout
    plus `<prefix>/code/` and `constants.pkl`; the module tree in `data.pkl` is walked and its
    parameters and buffers are returned under the names `torch.jit.load(p).state_dict()` gives;
  * legacy (pre-1.6, non-zip) `torch.save` pickles;
  * `.safetensors` files and `.npz` files.

Pickles are read by `_RestrictedUnpickler`, whose `find_class` resolves only the few globals
needed to rebuild tensors and containers, each implemented here. Every other global (a module
class such as `utils.RecorderMeter`, `__torch__.*` TorchScript classes, or `os.system` in a
malicious file) becomes an inert stub class that records its arguments and state; nothing from
the file is imported or called.

Dtypes are kept exactly: bfloat16 tensors come back as `ml_dtypes.bfloat16` arrays (not upcast;
call `.astype(np.float32)` if needed), float8 tensors as the matching `ml_dtypes` float8 type.
All returned arrays are C-contiguous, writable copies in native byte order.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import io
import os
import pathlib
import pickle
import re
import struct
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO, Literal

import ml_dtypes
import numpy as np
import safetensors

Format = Literal["torch_zip", "torchscript", "torch_legacy", "safetensors", "npz"]

# Top-level dict keys that hold the model weights in training checkpoints, tried in this order.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")

# `pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2)`: the magic number that opens a legacy
# (non-zip) `torch.save` file, followed by the protocol version 1001.
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

_RESAVE_HINT = (
  "re-save it with a current PyTorch, where the zip format is the default: "
  "torch.save(torch.load(path, weights_only=True), new_path)"
)


class CheckpointFormatError(ValueError):
  """The file is missing, corrupt, or not a checkpoint this module can read safely."""


@dataclasses.dataclass
class LoadReport:
  """What `load_state_dict` found besides the returned tensors.

  Attributes:
    format: the detected container format.
    stubbed_classes: every global of the pickle that was replaced by an inert stub
      (`module.qualname`, first-seen order), e.g. `utils.RecorderMeter`, `__torch__.Foo`.
    metadata: scalar values stored next to the weights (e.g. `epoch`, `best_acc`; 0-d tensors and
      numpy scalars become Python scalars), or a safetensors file's `__metadata__`.
    ignored_keys: dotted names of entries present in the file but not returned: the other
      top-level keys of a training checkpoint (`optimizer`, `recorder`, `epoch`, ...), non-tensor
      values inside a state dict, non-persistent buffers of a pickled `nn.Module`, and tensor
      attributes of TorchScript modules that are neither parameters nor buffers.
  """

  format: Format
  stubbed_classes: list[str] = dataclasses.field(default_factory=list)
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
  ignored_keys: list[str] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# dtypes

# torch dtype name (as pickled: `torch.<name>`) -> numpy dtype.
_TORCH_DTYPES: dict[str, np.dtype] = {
  "float64": np.dtype(np.float64),
  "float32": np.dtype(np.float32),
  "float16": np.dtype(np.float16),
  "bfloat16": np.dtype(ml_dtypes.bfloat16),
  "complex128": np.dtype(np.complex128),
  "complex64": np.dtype(np.complex64),
  "int64": np.dtype(np.int64),
  "int32": np.dtype(np.int32),
  "int16": np.dtype(np.int16),
  "int8": np.dtype(np.int8),
  "uint64": np.dtype(np.uint64),
  "uint32": np.dtype(np.uint32),
  "uint16": np.dtype(np.uint16),
  "uint8": np.dtype(np.uint8),
  "bool": np.dtype(np.bool_),
  "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
  "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
  "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
  "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
}

# Typed storage class name (`torch.<Name>Storage`) -> element dtype. `UntypedStorage` holds bytes.
_STORAGE_DTYPES: dict[str, np.dtype] = {
  "DoubleStorage": _TORCH_DTYPES["float64"],
  "FloatStorage": _TORCH_DTYPES["float32"],
  "HalfStorage": _TORCH_DTYPES["float16"],
  "BFloat16Storage": _TORCH_DTYPES["bfloat16"],
  "ComplexDoubleStorage": _TORCH_DTYPES["complex128"],
  "ComplexFloatStorage": _TORCH_DTYPES["complex64"],
  "LongStorage": _TORCH_DTYPES["int64"],
  "IntStorage": _TORCH_DTYPES["int32"],
  "ShortStorage": _TORCH_DTYPES["int16"],
  "CharStorage": _TORCH_DTYPES["int8"],
  "ByteStorage": _TORCH_DTYPES["uint8"],
  "BoolStorage": _TORCH_DTYPES["bool"],
  "UntypedStorage": _TORCH_DTYPES["uint8"],
}

# safetensors dtype tag -> numpy dtype (safetensors.numpy itself cannot build bfloat16 / float8).
_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
  "F64": _TORCH_DTYPES["float64"],
  "F32": _TORCH_DTYPES["float32"],
  "F16": _TORCH_DTYPES["float16"],
  "BF16": _TORCH_DTYPES["bfloat16"],
  "C64": _TORCH_DTYPES["complex64"],
  "I64": _TORCH_DTYPES["int64"],
  "I32": _TORCH_DTYPES["int32"],
  "I16": _TORCH_DTYPES["int16"],
  "I8": _TORCH_DTYPES["int8"],
  "U64": _TORCH_DTYPES["uint64"],
  "U32": _TORCH_DTYPES["uint32"],
  "U16": _TORCH_DTYPES["uint16"],
  "U8": _TORCH_DTYPES["uint8"],
  "BOOL": _TORCH_DTYPES["bool"],
  "F8_E4M3": _TORCH_DTYPES["float8_e4m3fn"],
  "F8_E5M2": _TORCH_DTYPES["float8_e5m2"],
}


def _to_native(
  data: bytes | bytearray | memoryview, dtype: np.dtype, little_endian: bool
) -> np.ndarray:
  """Views raw bytes as a 1-D array of `dtype` in native byte order."""
  flat = np.frombuffer(data, dtype=dtype)
  if little_endian == np.little_endian or dtype.itemsize == 1:
    return flat
  # Swap per scalar component: a complex64 is two float32 words, not one 8-byte word.
  unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
  return flat.view(np.dtype(f"u{unit}")).byteswap().view(dtype)


# ----------------------------------------------------------------------------------------------
# Objects the unpickler builds


class _UnsupportedRecord(ValueError):
  """A record inside a pickle is malformed; re-raised with the file and entry name."""


@dataclasses.dataclass(frozen=True)
class _TorchDType:
  """A pickled `torch.<dtype>` global."""

  name: str

  @property
  def numpy(self) -> np.dtype:
    return _TORCH_DTYPES[self.name]


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """A pickled `torch.<Name>Storage` global."""

  name: str

  @property
  def numpy(self) -> np.dtype:
    return _STORAGE_DTYPES[self.name]


class _StorageSource:
  """Reads storage blobs by key, caching the decoded arrays so shared storages are read once."""

  def __init__(
    self,
    path: str,
    read: Callable[[str], bytes],
    little_endian: bool,
    describe: Callable[[str], str],
  ):
    self.path = path
    self._read = read
    self._little_endian = little_endian
    self._describe = describe
    self._cache: dict[tuple[str, np.dtype], np.ndarray] = {}

  def array(self, key: str, dtype: np.dtype, nbytes: int) -> np.ndarray:
    """Returns the storage `key` as a native-order 1-D array of `dtype` covering `nbytes` bytes."""
    cached = self._cache.get((key, dtype))
    if cached is None:
      raw = self._read(key)
      if len(raw) < nbytes:
        raise CheckpointFormatError(
          f"{self.path}: {self._describe(key)} holds {len(raw)} bytes, but its record says "
          f"{nbytes} bytes ({dtype}); the file is truncated or corrupt"
        )
      cached = _to_native(memoryview(raw)[:nbytes], dtype, self._little_endian)
      self._cache[(key, dtype)] = cached
    return cached


@dataclasses.dataclass(frozen=True)
class _Storage:
  """One persistent storage record: `('storage', type, key, location, numel)`."""

  source: _StorageSource
  key: str
  dtype: np.dtype  # element type of the storage; uint8 for an untyped storage
  numel: int


@dataclasses.dataclass(frozen=True)
class _TensorRef:
  """A tensor as (storage, offset, size, stride, dtype); materialised only when collected."""

  storage: _Storage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]
  dtype: np.dtype

  def to_numpy(self) -> np.ndarray:
    """Builds the strided view over the storage and returns a contiguous copy."""
    nbytes = self.storage.numel * self.storage.dtype.itemsize
    where = f"{self.storage.source.path}: tensor on storage {self.storage.key!r}"
    if nbytes % self.dtype.itemsize:
      raise CheckpointFormatError(
        f"{where}: {nbytes} storage bytes are not a whole number of {self.dtype}"
      )
    flat = self.storage.source.array(self.storage.key, self.dtype, nbytes)
    if 0 in self.size:
      return np.zeros(self.size, self.dtype)
    # A hostile file could otherwise make as_strided read memory outside the storage.
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
    if last >= flat.size:
      raise CheckpointFormatError(
        f"{where}: size {self.size}, stride {self.stride}, offset {self.offset} reach element "
        f"{last}, but the storage has {flat.size} elements of {self.dtype}"
      )
    strides = [s * self.dtype.itemsize for s in self.stride]
    view = np.lib.stride_tricks.as_strided(
      flat[self.offset :], shape=self.size, strides=strides, writeable=False
    )
    return np.array(view, order="C", copy=True)


class _Stub:
  """Instance of a class the loader refused to import: records how the pickle built it."""

  _stub_qualname = "?"

  def __new__(cls, *args: Any, **kwargs: Any) -> _Stub:
    obj = super().__new__(cls)
    obj._stub_args = args
    obj._stub_kwargs = kwargs
    obj._stub_state = None
    obj._stub_items = []
    obj._stub_dictitems = {}
    return obj

  def __init__(self, *args: Any, **kwargs: Any):
    # Called when the pickle invokes the stubbed global as a function (REDUCE).
    self._stub_args = args
    self._stub_kwargs = kwargs

  def __setstate__(self, state: Any) -> None:
    self._stub_state = state

  def append(self, item: Any) -> None:
    self._stub_items.append(item)

  def extend(self, items: Any) -> None:
    self._stub_items.extend(items)

  def __setitem__(self, key: Any, value: Any) -> None:
    self._stub_dictitems[key] = value

  def __repr__(self) -> str:
    return f"<stub {self._stub_qualname}>"


def _check_ints(name: str, values: Any, *, scalar: bool = False) -> Any:
  """Validates a size / stride tuple (or one offset) taken from the pickle."""
  items = (values,) if scalar else values
  if not isinstance(items, tuple | list) or not all(
    isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in items
  ):
    expected = "a non-negative int" if scalar else "a tuple of non-negative ints"
    raise _UnsupportedRecord(f"tensor {name} must be {expected}, got {values!r}")
  return values if scalar else tuple(values)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _TensorRef:
  if not isinstance(storage, _Storage):
    raise _UnsupportedRecord(f"tensor storage must be a persistent storage record, got {storage!r}")
  size, stride = _check_ints("size", size), _check_ints("stride", stride)
  if len(size) != len(stride):
    raise _UnsupportedRecord(f"tensor size {size} and stride {stride} differ in length")
  offset = _check_ints("offset", storage_offset, scalar=True)
  return _TensorRef(storage, offset, size, stride, storage.dtype)


# The functions below stand in for `torch._utils` / `torch._tensor` functions of the same name
# and signature; the pickle calls them with its own arguments (REDUCE).


def _rebuild_tensor_v2(
  storage: Any,
  storage_offset: Any,
  size: Any,
  stride: Any,
  requires_grad: Any,
  backward_hooks: Any,
  metadata: Any = None,
) -> _TensorRef:
  del requires_grad, backward_hooks, metadata  # autograd flags and hooks do not affect values
  return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
  storage: Any,
  storage_offset: Any,
  size: Any,
  stride: Any,
  requires_grad: Any,
  backward_hooks: Any,
  dtype: Any,
  metadata: Any = None,
) -> _TensorRef:
  # Dtypes without a typed storage (uint16, float8, ...) sit on an untyped byte storage.
  del requires_grad, backward_hooks, metadata
  if not isinstance(dtype, _TorchDType):
    raise _UnsupportedRecord(f"tensor dtype must be a torch dtype, got {dtype!r}")
  tensor = _rebuild_tensor(storage, storage_offset, size, stride)
  return dataclasses.replace(tensor, dtype=dtype.numpy)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> Any:
  del requires_grad, backward_hooks
  return data


def _rebuild_parameter_with_state(
  data: Any, requires_grad: Any, backward_hooks: Any, state: Any
) -> Any:
  del requires_grad, backward_hooks, state  # Python attributes set on the Parameter object
  return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
  # Tensor subclasses (and plain tensors carrying Python attributes): keep the tensor data.
  del new_type, state
  if func not in (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_tensor, _rebuild_parameter):
    raise _UnsupportedRecord(f"tensor subclass rebuilt by {func!r}, not a tensor rebuild function")
  return func(*args)


def _rebuild_device_tensor_from_cpu_tensor(
  data: Any, dtype: Any, device: Any, requires_grad: Any
) -> Any:
  # XLA / MTIA tensors are pickled as their CPU copy.
  del device, requires_grad
  if isinstance(data, _TensorRef) and isinstance(dtype, _TorchDType) and data.dtype != dtype.numpy:
    raise _UnsupportedRecord(
      f"device tensor of dtype {dtype.name} wraps CPU data of dtype {data.dtype}"
    )
  return data


def _identity(value: Any, *unused: Any) -> Any:
  # torch.jit._pickle.build_intlist / restore_type_tag ...: type tags Python does not need.
  return value


def _torch_device(*args: Any) -> str:
  return ":".join(str(a) for a in args)


def _codecs_encode(text: str, encoding: str = "utf-8") -> bytes:
  # Protocol-2 pickles store `bytes` as _codecs.encode(str, 'latin1').
  if encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
    raise _UnsupportedRecord(f"_codecs.encode with encoding {encoding!r}")
  return text.encode(encoding)


class _NumpyDType:
  """A pickled `numpy.dtype`, kept inert; only numeric dtypes are ever turned into real ones."""

  def __init__(self, spec: Any, align: Any = False, copy: Any = False):
    del align, copy
    self.spec = spec
    self.byteorder = "="

  def __setstate__(self, state: Any) -> None:
    if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
      self.byteorder = state[1]


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
  """`numpy.core.multiarray.scalar` for numeric dtypes only (e.g. `best_acc` as np.float64)."""
  if not (
    isinstance(dtype, _NumpyDType) and isinstance(dtype.spec, str) and isinstance(data, bytes)
  ):
    raise _UnsupportedRecord(f"numpy scalar of dtype {getattr(dtype, 'spec', dtype)!r}")
  try:
    np_dtype = np.dtype(dtype.spec)
  except TypeError as err:
    raise _UnsupportedRecord(f"numpy scalar of unknown dtype {dtype.spec!r}") from err
  if np_dtype.kind not in "biufc" or len(data) != np_dtype.itemsize:
    raise _UnsupportedRecord(f"numpy scalar of dtype {np_dtype} with {len(data)} bytes")
  return _to_native(data, np_dtype, dtype.byteorder != ">")[0]


_TORCH_UTILS_REBUILDERS = {
  "_rebuild_tensor": _rebuild_tensor,
  "_rebuild_tensor_v2": _rebuild_tensor_v2,
  "_rebuild_tensor_v3": _rebuild_tensor_v3,
  "_rebuild_parameter": _rebuild_parameter,
  "_rebuild_parameter_with_state": _rebuild_parameter_with_state,
  "_rebuild_device_tensor_from_cpu_tensor": _rebuild_device_tensor_from_cpu_tensor,
}

# The complete list of globals a pickle may resolve to something other than a stub.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
  **{("torch._utils", name): fn for name, fn in _TORCH_UTILS_REBUILDERS.items()},
  ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
  ("torch", "Tensor"): "torch.Tensor",
  ("torch.nn.parameter", "Parameter"): "torch.nn.Parameter",
  ("torch", "Size"): tuple,
  ("torch", "device"): _torch_device,
  ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage"),
  **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
  **{("torch", name): _TorchDType(name) for name in _TORCH_DTYPES},
  **{
    ("torch.jit._pickle", name): _identity
    for name in (
      "build_intlist",
      "build_tensorlist",
      "build_doublelist",
      "build_boollist",
      "restore_type_tag",
    )
  },
  ("collections", "OrderedDict"): collections.OrderedDict,
  **{
    ("builtins", cls.__name__): cls
    for cls in (set, frozenset, bytearray, complex, dict, list, tuple)
  },
  ("_codecs", "encode"): _codecs_encode,
  ("numpy", "dtype"): _NumpyDType,
  ("numpy.core.multiarray", "scalar"): _numpy_scalar,
  ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only `_ALLOWED_GLOBALS`; every other global becomes a stub class."""

  def __init__(
    self,
    file: BinaryIO,
    *,
    where: str,
    strict_classes: bool,
    storage_record: Callable[[Any], Any],
    stubbed: list[str],
    expected_classes: frozenset[str] = frozenset(),
  ):
    super().__init__(file)
    self._where = where
    self._strict = strict_classes
    self._storage_record = storage_record
    self._expected = expected_classes
    self._stubbed = stubbed
    self._stub_types: dict[str, type[_Stub]] = {}

  def find_class(self, module: str, name: str) -> Any:
    if module == "__builtin__":  # protocol-2 pickles use the Python 2 name
      module = "builtins"
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    qualname = f"{module}.{name}"
    if module == "torch._utils" and name.startswith("_rebuild"):
      raise CheckpointFormatError(
        f"{self._where}: tensors rebuilt by {qualname} (sparse, quantized, nested or "
        "meta tensors) are not supported; convert them to dense CPU tensors before saving"
      )
    if self._strict and qualname not in self._expected:
      raise CheckpointFormatError(
        f"{self._where}: the pickle references class {qualname!r}, which is not needed to "
        "rebuild tensors; with strict_classes=True it is refused (strict_classes=False "
        "replaces it by an inert stub)"
      )
    stub = self._stub_types.get(qualname)
    if stub is None:
      stub = type(name, (_Stub,), {"_stub_qualname": qualname, "__module__": __name__})
      self._stub_types[qualname] = stub
      if qualname not in self._stubbed:
        self._stubbed.append(qualname)
    return stub

  def persistent_load(self, pid: Any) -> Any:
    return self._storage_record(pid)


def _unpickle(data: bytes | BinaryIO, *, where: str, **kwargs: Any) -> Any:
  """Runs the restricted unpickler, turning every failure into a `CheckpointFormatError`."""
  stream = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
  try:
    return _RestrictedUnpickler(stream, where=where, **kwargs).load()
  except CheckpointFormatError:
    raise
  except _UnsupportedRecord as err:
    raise CheckpointFormatError(f"{where}: {err}") from err
  except Exception as err:  # pickle raises many types on corrupt input (EOFError, KeyError, ...)
    raise CheckpointFormatError(f"{where}: cannot unpickle ({type(err).__name__}: {err})") from err


def _storage_records(source: _StorageSource, *, legacy: bool) -> Callable[[Any], _Storage]:
  """`persistent_load` for `('storage', type, key, location, numel)` (legacy: `+ view`)."""
  seen: dict[str, _Storage] = {}

  def load(pid: Any) -> _Storage:
    expected_len = 6 if legacy else 5
    if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
      raise _UnsupportedRecord(f"persistent id {pid!r} is not a storage record")
    if len(pid) != expected_len:
      raise _UnsupportedRecord(
        f"storage record {pid!r} has {len(pid)} fields, expected {expected_len}"
      )
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if legacy and pid[5] is not None:
      raise _UnsupportedRecord(
        f"storage views (files from PyTorch < 0.4) are not supported; {_RESAVE_HINT}"
      )
    if not isinstance(storage_type, _StorageType):
      name = getattr(storage_type, "_stub_qualname", storage_type)
      raise _UnsupportedRecord(f"storage type {name!r} is not supported (quantized or unknown)")
    key = key.decode("ascii") if isinstance(key, bytes) else str(key)
    storage = seen.get(key)
    if storage is None:
      storage = _Storage(source, key, storage_type.numpy, _check_ints("numel", numel, scalar=True))
      seen[key] = storage
    return storage

  return load


# ----------------------------------------------------------------------------------------------
# Flattening the unpickled object into dotted names


def _is_module_state(state: Any) -> bool:
  return isinstance(state, dict) and "_parameters" in state and "_modules" in state


@dataclasses.dataclass(frozen=True)
class _ScriptClass:
  is_module: bool
  parameters: frozenset[str]
  buffers: frozenset[str]


_MAX_VISITS = 10_000_000


class _Collector:
  """Walks an unpickled object, materialising tensors under dotted names."""

  def __init__(self, path: str, script_classes: Mapping[str, _ScriptClass] | None = None):
    self.path = path
    self.script_classes = script_classes or {}
    self.tensors: dict[str, np.ndarray] = {}
    self.ignored: list[str] = []
    self._active: set[int] = set()
    # Shared sub-objects are legitimately walked once per name (tied weights, a submodule
    # registered twice), so a hostile pickle could nest sharing to blow up the walk: cap it.
    self._visits_left = _MAX_VISITS

  def add(self, name: str, ref: _TensorRef) -> None:
    if name in self.tensors:
      raise CheckpointFormatError(f"{self.path}: two tensors map to the name {name!r}")
    self.tensors[name] = ref.to_numpy()

  def collect(self, obj: Any, prefix: str) -> None:
    """Adds the tensors reachable from `obj` under `prefix`; records the rest as ignored."""
    self._visits_left -= 1
    if self._visits_left < 0:
      raise CheckpointFormatError(
        f"{self.path}: the pickled object graph has more than {_MAX_VISITS} paths to walk"
      )
    if isinstance(obj, _TensorRef):
      self.add(prefix, obj)
      return
    if isinstance(obj, Mapping | list | tuple | _Stub):
      if id(obj) in self._active:  # a reference cycle in the pickle
        self.ignored.append(prefix)
        return
      self._active.add(id(obj))
      try:
        self._collect_container(obj, prefix)
      finally:
        self._active.discard(id(obj))
      return
    self.ignored.append(prefix)  # a non-tensor value where weights were expected

  def _collect_container(self, obj: Any, prefix: str) -> None:
    if isinstance(obj, Mapping):
      for key, value in obj.items():
        self.collect(value, _join(prefix, key))
    elif isinstance(obj, list | tuple):
      for index, value in enumerate(obj):
        self.collect(value, _join(prefix, index))
    elif obj._stub_qualname in self.script_classes:
      self._collect_script_module(obj, prefix)
    elif _is_module_state(obj._stub_state):
      self._collect_eager_module(obj._stub_state, prefix)
    elif obj._stub_dictitems:  # e.g. an OrderedDict subclass holding a state dict
      self._collect_container(obj._stub_dictitems, prefix)
    else:
      self.ignored.append(prefix)

  def _collect_eager_module(self, state: dict[str, Any], prefix: str) -> None:
    """A whole pickled `nn.Module`: the same names and order as `module.state_dict()`."""
    non_persistent = state.get("_non_persistent_buffers_set") or ()
    for name, param in (state.get("_parameters") or {}).items():
      if param is not None:
        self.collect(param, _join(prefix, name))
    for name, buf in (state.get("_buffers") or {}).items():
      if buf is None:
        continue
      if name in non_persistent:
        self.ignored.append(_join(prefix, name))
      else:
        self.collect(buf, _join(prefix, name))
    for name, child in (state.get("_modules") or {}).items():
      if child is not None:
        self.collect(child, _join(prefix, name))

  def _collect_script_module(self, obj: _Stub, prefix: str) -> None:
    """A TorchScript object: parameters, then buffers, then submodules, in slot order.

    This is the order of `torch.jit.load(p).state_dict()`; which attributes are parameters or
    buffers is declared by the class's `__parameters__` / `__buffers__` in the archive's code/.
    """
    info = self.script_classes[obj._stub_qualname]
    state = obj._stub_state
    if not info.is_module:
      self.ignored.append(prefix)  # a scripted class instance: not part of a state dict
      return
    if not isinstance(state, dict):
      raise CheckpointFormatError(
        f"{self.path}: TorchScript module {obj._stub_qualname} at {prefix or '<root>'!r} was "
        f"pickled with custom state ({type(state).__name__}), expected its attribute dict"
      )
    for name, value in state.items():
      if name in info.parameters and isinstance(value, _TensorRef):
        self.add(_join(prefix, name), value)
    for name, value in state.items():
      if name in info.buffers and isinstance(value, _TensorRef):
        self.add(_join(prefix, name), value)
    for name, value in state.items():
      child = isinstance(value, _Stub) and self.script_classes.get(value._stub_qualname)
      if child and child.is_module:
        self._collect_script_module(value, _join(prefix, name))
      elif isinstance(value, _TensorRef) and name not in info.parameters | info.buffers:
        self.ignored.append(_join(prefix, name))


def _join(prefix: str, key: Any) -> str:
  return f"{prefix}.{key}" if prefix else str(key)


def _contains_tensor(obj: Any) -> bool:
  """Whether any tensor is reachable from `obj` (each object visited once: pickles may share)."""
  pending, seen = [obj], set()
  while pending:
    item = pending.pop()
    if isinstance(item, _TensorRef):
      return True
    if id(item) in seen:
      continue
    seen.add(id(item))
    if isinstance(item, Mapping):
      pending.extend(item.values())
    elif isinstance(item, list | tuple):
      pending.extend(item)
    elif isinstance(item, _Stub):
      pending.extend((item._stub_state, item._stub_dictitems, item._stub_items))
  return False


def _is_scalar(value: Any) -> bool:
  if isinstance(value, _TensorRef):
    return not value.size
  return value is None or isinstance(value, bool | int | float | complex | str | bytes | np.generic)


def _python_scalar(value: Any) -> Any:
  """Metadata value for a scalar: 0-d tensors and numpy scalars become Python scalars."""
  if isinstance(value, _TensorRef):
    value = value.to_numpy()[()]
  return value.item() if isinstance(value, np.generic) else value


def _flatten_checkpoint(obj: Any, collector: _Collector, report: LoadReport) -> None:
  """Chooses what holds the weights and records the rest in `report`."""
  if not isinstance(obj, Mapping):
    collector.collect(obj, "")
    return
  wrapper = next((k for k in _WRAPPER_KEYS if k in obj and _contains_tensor(obj[k])), None)
  if wrapper is not None:
    collector.collect(obj[wrapper], "")
    others = [k for k in obj if k != wrapper]
  else:
    # A plain state dict (possibly with a few non-tensor entries).
    others = []
    for key, value in obj.items():
      if isinstance(value, _TensorRef) or (not _is_scalar(value) and _contains_tensor(value)):
        collector.collect(value, str(key))
      else:
        others.append(key)
  for key in others:
    report.ignored_keys.append(str(key))
    if _is_scalar(obj[key]):
      report.metadata[str(key)] = _python_scalar(obj[key])


# ----------------------------------------------------------------------------------------------
# Containers


def _zip_prefix(zf: zipfile.ZipFile, path: str) -> str:
  """The archive's top-level folder, which holds `data.pkl` (`ViT-B-32/`, `archive/`, ...)."""
  prefixes = sorted(
    {n[: -len("data.pkl")] for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1}
    | ({""} if "data.pkl" in zf.namelist() else set())
  )
  if len(prefixes) != 1:
    found = ", ".join(repr(p + "data.pkl") for p in prefixes) or "none"
    raise CheckpointFormatError(
      f"{path}: expected exactly one '<prefix>/data.pkl' entry in a torch.save / "
      f"torch.jit.save zip archive, found {found}"
    )
  return prefixes[0]


_CLASS_RE = re.compile(r"^class\s+(\w+)\s*(?:\(([^)]*)\))?\s*:", re.M)
_DECL_RE = re.compile(r"^[ \t]+(__parameters__|__buffers__)\s*=\s*(\[[^\]]*\])", re.M)


def _script_classes(zf: zipfile.ZipFile, prefix: str, path: str) -> dict[str, _ScriptClass]:
  """Parses `code/**.py` of a TorchScript archive for each class's parameter and buffer names.

  The file `code/__torch__/a/b.py` declares the classes `__torch__.a.b.<Name>`; module classes
  list `__parameters__ = [...]` and `__buffers__ = [...]`. The code is only scanned, never run.
  """
  classes: dict[str, _ScriptClass] = {}
  code_dir = f"{prefix}code/"
  for entry in zf.namelist():
    if not (entry.startswith(code_dir) and entry.endswith(".py")):
      continue
    module = entry[len(code_dir) : -len(".py")].replace("/", ".")
    try:
      text = zf.read(entry).decode("utf-8")
    except (UnicodeDecodeError, zipfile.BadZipFile, OSError) as err:
      raise CheckpointFormatError(
        f"{path}: cannot read TorchScript code entry {entry!r}: {err}"
      ) from err
    matches = list(_CLASS_RE.finditer(text))
    for i, match in enumerate(matches):
      body = text[match.end() : matches[i + 1].start() if i + 1 < len(matches) else len(text)]
      declared = {"__parameters__": frozenset(), "__buffers__": frozenset()}
      for decl in _DECL_RE.finditer(body):
        try:
          names = ast.literal_eval(decl.group(2))
        except (ValueError, SyntaxError) as err:
          line = text.count("\n", 0, match.end() + decl.start()) + 1
          raise CheckpointFormatError(
            f"{path}: {entry} line {line}: {decl.group(1)} is not a list of names"
          ) from err
        declared[decl.group(1)] = frozenset(str(n) for n in names)
      bases = match.group(2) or ""
      classes[f"{module}.{match.group(1)}"] = _ScriptClass(
        is_module="Module" in bases,
        parameters=declared["__parameters__"],
        buffers=declared["__buffers__"],
      )
  return classes


def _load_torch_zip(
  path: str, zf: zipfile.ZipFile, strict_classes: bool
) -> tuple[dict[str, np.ndarray], LoadReport]:
  """A `torch.save` zip or a `torch.jit.save` archive (recognised by its `code/` folder)."""
  prefix = _zip_prefix(zf, path)
  names = set(zf.namelist())
  is_script = f"{prefix}constants.pkl" in names or any(
    n.startswith(f"{prefix}code/") for n in names
  )
  report = LoadReport(format="torchscript" if is_script else "torch_zip")

  byteorder = "little"
  if f"{prefix}byteorder" in names:
    byteorder = zf.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
    if byteorder not in ("little", "big"):
      raise CheckpointFormatError(
        f"{path}: {prefix}byteorder says {byteorder!r}, expected 'little' or 'big'"
      )

  def read(key: str) -> bytes:
    entry = f"{prefix}data/{key}"
    if entry not in names:
      raise CheckpointFormatError(
        f"{path}: the pickle references storage {key!r}, but the archive has no entry {entry!r}"
      )
    try:
      return zf.read(entry)
    except (zipfile.BadZipFile, OSError, EOFError) as err:  # CRC mismatch, truncated member
      raise CheckpointFormatError(f"{path}: cannot read entry {entry!r}: {err}") from err

  source = _StorageSource(
    path, read, byteorder == "little", lambda key: f"entry {prefix}data/{key}"
  )
  script_classes = _script_classes(zf, prefix, path) if is_script else {}
  try:
    data = zf.read(f"{prefix}data.pkl")
  except (zipfile.BadZipFile, OSError, EOFError) as err:
    raise CheckpointFormatError(f"{path}: cannot read entry {prefix}data.pkl: {err}") from err
  obj = _unpickle(
    data,
    where=f"{path} (entry {prefix}data.pkl)",
    strict_classes=strict_classes,
    storage_record=_storage_records(source, legacy=False),
    expected_classes=frozenset(script_classes),
    stubbed=report.stubbed_classes,
  )
  collector = _Collector(path, script_classes)
  if is_script:
    collector.collect(obj, "")
  else:
    _flatten_checkpoint(obj, collector, report)
  report.ignored_keys.extend(collector.ignored)
  return collector.tensors, report


def _no_storage(pid: Any) -> Any:
  raise _UnsupportedRecord(f"unexpected persistent id {pid!r} outside the main pickle")


def _load_torch_legacy(
  path: str, f: BinaryIO, strict_classes: bool
) -> tuple[dict[str, np.ndarray], LoadReport]:
  """Pre-1.6 `torch.save`: magic, version, sys_info, main pickle, storage keys, then the blobs.

  Each blob is an int64 element count followed by the storage's bytes, in storage-key order.
  """
  report = LoadReport(format="torch_legacy")

  def header(what: str) -> Any:  # plain ints, lists and dicts: no globals are allowed
    return _unpickle(
      f,
      where=f"{path} (legacy {what})",
      strict_classes=True,
      storage_record=_no_storage,
      stubbed=[],
    )

  magic, version, sys_info = header("magic"), header("version"), header("sys_info")
  if (
    magic != _LEGACY_MAGIC_NUMBER
    or version != _LEGACY_PROTOCOL_VERSION
    or not isinstance(sys_info, dict)
  ):
    raise CheckpointFormatError(
      f"{path}: legacy torch.save header is corrupt (protocol {version!r}); {_RESAVE_HINT}"
    )
  little_endian = bool(sys_info.get("little_endian", True))

  dtypes: dict[str, np.dtype] = {}  # storage key -> element dtype, from the main pickle
  blobs: dict[str, tuple[int, int]] = {}  # storage key -> (file offset of the data, numel)

  def read(key: str) -> bytes:
    offset, numel = blobs[key]
    f.seek(offset)
    return f.read(numel * dtypes[key].itemsize)

  source = _StorageSource(path, read, little_endian, lambda key: f"legacy storage {key!r}")
  records = _storage_records(source, legacy=True)

  def record(pid: Any) -> _Storage:
    storage = records(pid)
    dtypes[storage.key] = storage.dtype
    return storage

  obj = _unpickle(
    f,
    where=f"{path} (legacy pickle)",
    strict_classes=strict_classes,
    storage_record=record,
    stubbed=report.stubbed_classes,
  )
  keys = header("storage list")
  if not isinstance(keys, list) or set(map(str, keys)) != set(dtypes):
    raise CheckpointFormatError(
      f"{path}: the legacy storage list does not match the storages the pickle uses"
    )
  for key in map(str, keys):
    head = f.read(8)
    if len(head) != 8:
      raise CheckpointFormatError(f"{path}: legacy storage {key!r} is missing (file truncated)")
    (numel,) = struct.unpack("<q" if little_endian else ">q", head)
    blobs[key] = (f.tell(), numel)
    f.seek(numel * dtypes[key].itemsize, os.SEEK_CUR)

  collector = _Collector(path)
  _flatten_checkpoint(obj, collector, report)
  report.ignored_keys.extend(collector.ignored)
  return collector.tensors, report


def _load_safetensors(path: str) -> tuple[dict[str, np.ndarray], LoadReport]:
  report = LoadReport(format="safetensors")
  try:
    with safetensors.safe_open(path, framework="np") as f:  # validates the header
      report.metadata.update(f.metadata() or {})
    with open(path, "rb") as f:
      entries = safetensors.deserialize(f.read())
  except safetensors.SafetensorError as err:
    raise CheckpointFormatError(f"{path}: not a valid safetensors file: {err}") from err
  tensors = {}
  for name, entry in entries:
    dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
      raise CheckpointFormatError(
        f"{path}: tensor {name!r} has unsupported safetensors dtype {entry['dtype']}"
      )
    # `data` is a fresh bytearray per tensor, so the array owns writable memory without a copy.
    tensors[name] = np.frombuffer(entry["data"], dtype=dtype).reshape(entry["shape"])
  return tensors, report


def _load_npz(path: str) -> tuple[dict[str, np.ndarray], LoadReport]:
  try:
    with np.load(path, allow_pickle=False) as npz:
      tensors = {name: npz[name] for name in npz.files}
  except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
    # Object arrays would need pickle: refused by allow_pickle=False.
    raise CheckpointFormatError(f"{path}: cannot read as an .npz of numeric arrays: {err}") from err
  return tensors, LoadReport(format="npz")


def _is_safetensors(head: bytes, size: int) -> bool:
  if len(head) < 9:
    return False
  (header_len,) = struct.unpack("<Q", head[:8])
  return 8 + header_len <= size and head[8:9] == b"{"


def load_state_dict(
  path: str | os.PathLike, *, strict_classes: bool = False
) -> tuple[dict[str, np.ndarray], LoadReport]:
  """Reads a checkpoint's tensors as numpy arrays without importing torch or running its code.

  Args:
    path: a zip `torch.save` file, a TorchScript archive, a legacy `torch.save` pickle, a
      `.safetensors` file or an `.npz` file; the format is recognised from the content.
    strict_classes: raise instead of stubbing when a pickle references a class outside the
      tensor-rebuilding allow-list (TorchScript module classes declared in the archive's own
      `code/` are always accepted).

  Returns:
    (tensors, report): dotted name -> array, in file order. For a training checkpoint
    (`{'state_dict': ..., 'epoch': ..., ...}`, or the `model_state_dict` / `model` keys) the
    weights entry is returned and the rest is described in `report`; for a TorchScript archive
    the names and values equal `torch.jit.load(path).state_dict()`.

  Raises:
    CheckpointFormatError: the file is missing, truncated, corrupt or of an unsupported kind, or
      (with `strict_classes`) references a non-allowed class.
  """
  path = os.fspath(path)
  file = pathlib.Path(path)
  if not file.is_file():
    raise CheckpointFormatError(f"{path}: no such checkpoint file")
  size = file.stat().st_size
  with open(path, "rb") as f:
    head = f.read(64)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
      try:
        zf = zipfile.ZipFile(f)
      except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CheckpointFormatError(
          f"{path}: zip archive is truncated or corrupt ({err}); expected a torch.save / "
          "torch.jit.save archive or an .npz"
        ) from err
      with zf:
        names = zf.namelist()
        if all(n.endswith(".npy") for n in names):  # np.savez output (possibly empty)
          return _load_npz(path)
        return _load_torch_zip(path, zf, strict_classes)
    if head.startswith(_LEGACY_MAGIC):
      f.seek(0)
      return _load_torch_legacy(path, f, strict_classes)
    if _is_safetensors(head, size):
      return _load_safetensors(path)
  if file.suffix == ".npz":  # np.savez output is always a zip; anything else is corrupt
    raise CheckpointFormatError(f"{path}: an .npz must be a zip archive of .npy files")
  raise CheckpointFormatError(
    f"{path}: not a recognised checkpoint: expected a zip torch.save / torch.jit.save archive "
    "(starts with 'PK'), a legacy torch.save pickle, a safetensors file (8-byte header length "
    "then JSON) or an .npz"
  )
