"""Read and write PyTorch `.bin` checkpoints (torch.save zip and legacy formats) without torch or running their code."""

from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
  "CheckpointFormatError",
  "UnsafeCheckpointError",
  "load",
  "load_state_dict",
  "save_state_dict",
]


class UnsafeCheckpointError(ValueError):
  """The checkpoint's pickle references a global that a plain state dict never needs; nothing was executed."""


class CheckpointFormatError(ValueError):
  """The checkpoint is truncated, corrupted, or not a torch.save state dict."""


# torch.save writes one "<Type>Storage" global per tensor dtype (the legacy typed-storage names, kept by torch for
# compatibility). Newer dtypes (uint16, float8, ...) are written as torch.storage.UntypedStorage (bytes) plus a
# torch.<dtype> global passed to _rebuild_tensor_v3.
_STORAGE_DTYPES: dict[str, np.dtype] = {
  "DoubleStorage": np.dtype(np.float64),
  "FloatStorage": np.dtype(np.float32),
  "HalfStorage": np.dtype(np.float16),
  "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
  "LongStorage": np.dtype(np.int64),
  "IntStorage": np.dtype(np.int32),
  "ShortStorage": np.dtype(np.int16),
  "CharStorage": np.dtype(np.int8),
  "ByteStorage": np.dtype(np.uint8),
  "BoolStorage": np.dtype(np.bool_),
  "ComplexFloatStorage": np.dtype(np.complex64),
  "ComplexDoubleStorage": np.dtype(np.complex128),
}
_STORAGE_NAME_OF_DTYPE: dict[np.dtype, str] = {dtype: name for name, dtype in _STORAGE_DTYPES.items()}

# torch.dtype objects pickle as the global `torch.<name>`; aliases are listed too because the name is whatever
# `dtype.__reduce__` returned in the torch version that wrote the file.
_TORCH_DTYPES: dict[str, np.dtype] = {
  "float64": np.dtype(np.float64),
  "double": np.dtype(np.float64),
  "float32": np.dtype(np.float32),
  "float": np.dtype(np.float32),
  "float16": np.dtype(np.float16),
  "half": np.dtype(np.float16),
  "bfloat16": np.dtype(ml_dtypes.bfloat16),
  "int64": np.dtype(np.int64),
  "long": np.dtype(np.int64),
  "int32": np.dtype(np.int32),
  "int": np.dtype(np.int32),
  "int16": np.dtype(np.int16),
  "short": np.dtype(np.int16),
  "int8": np.dtype(np.int8),
  "uint8": np.dtype(np.uint8),
  "uint16": np.dtype(np.uint16),
  "uint32": np.dtype(np.uint32),
  "uint64": np.dtype(np.uint64),
  "bool": np.dtype(np.bool_),
  "complex64": np.dtype(np.complex64),
  "cfloat": np.dtype(np.complex64),
  "complex128": np.dtype(np.complex128),
  "cdouble": np.dtype(np.complex128),
  "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
  "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
  "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
  "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
}

# First bytes of `pickle.dumps(MAGIC_NUMBER, protocol=2)`, which opens every legacy (pre-1.6) torch.save file.
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001
_ZIP_MAGIC = b"PK\x03\x04"
_ZIP_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # signature ... filename length, extra length (30 bytes)
_ALIGNMENT = 64  # torch.save aligns storage data to 64 bytes (.storage_alignment), which makes mmap views aligned
_WRITE_CHUNK = 16 << 20


# ---------------------------------------------------------------------------------------------------------------------
# Stand-ins for the few torch globals a state dict pickle references. Unpickling produces these inert objects; real
# arrays are made only after the whole pickle has been read and every storage is located and size-checked.


class _Frozen:
  """Base of every object the pickle can reach: immutable, so a BUILD opcode cannot retarget or poison one (for
  example change a shared storage type's dtype, or a tensor's offset after its bounds were validated)."""

  __slots__ = ()

  def __init__(self, **fields: Any):
    for name, value in fields.items():
      object.__setattr__(self, name, value)

  def __setattr__(self, name: str, value: Any) -> None:
    raise CheckpointFormatError(f"the pickle tried to set attribute {name!r} on {self!r}")

  def __delattr__(self, name: str) -> None:
    raise CheckpointFormatError(f"the pickle tried to delete attribute {name!r} of {self!r}")


class _StorageType(_Frozen):
  """Stand-in for `torch.FloatStorage` and friends: only carries the element dtype."""

  __slots__ = ("name", "dtype")

  def __repr__(self) -> str:
    return f"torch.{self.name}"


class _DType(_Frozen):
  """Stand-in for a `torch.<dtype>` object."""

  __slots__ = ("name", "dtype")

  def __repr__(self) -> str:
    return f"torch.{self.name}"


class _Function(_Frozen):
  """Stand-in for an allowed torch function (a plain function object would accept new attributes from BUILD)."""

  __slots__ = ("name", "fn")

  def __call__(self, *args: Any) -> Any:
    return self.fn(*args)

  def __repr__(self) -> str:
    return f"torch._utils.{self.name}"


class _Storage(_Frozen):
  """One storage record (`data/<key>` in a zip, or a raw block in a legacy file), located after unpickling."""

  __slots__ = ("key", "dtype", "numel", "raw")

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    super().__init__(key=key, dtype=dtype, numel=numel, raw=None)

  def locate(self, raw: np.ndarray) -> None:
    """Sets the uint8 bytes of the whole storage (found by the format-specific reader)."""
    object.__setattr__(self, "raw", raw)

  def __repr__(self) -> str:
    return f"storage '{self.key}'"


class _StorageView(_Frozen):
  """A legacy-format view into a root storage (`view_metadata` in the persistent id)."""

  __slots__ = ("root", "offset", "numel")

  def __repr__(self) -> str:
    return f"view of {self.root!r}"


class _TensorRef(_Frozen):
  """A tensor described by the pickle: storage, element offset, size and stride. Materialised lazily."""

  __slots__ = ("storage", "offset", "size", "stride", "dtype")

  def __init__(self, storage: _Storage | _StorageView, offset: Any, size: Any, stride: Any, dtype: np.dtype | None):
    if not isinstance(storage, _Storage | _StorageView):
      raise CheckpointFormatError(f"tensor rebuilt from {type(storage).__name__}, expected a storage")
    size, stride = _check_int_tuple(size, "size"), _check_int_tuple(stride, "stride")
    if len(size) != len(stride):
      raise CheckpointFormatError(f"tensor size {size} and stride {stride} have different lengths")
    super().__init__(
      storage=storage, offset=_check_int(offset, "storage offset"), size=size, stride=stride, dtype=dtype
    )

  def __repr__(self) -> str:
    return f"tensor{self.size} in {self.storage!r}"


def _check_int(value: Any, what: str) -> int:
  if type(value) is not int or value < 0:
    raise CheckpointFormatError(f"invalid tensor {what}: {value!r}")
  return value


def _check_int_tuple(value: Any, what: str) -> tuple[int, ...]:
  # torch.Size pickles as a plain tuple inside _rebuild_tensor_v2's arguments.
  if not isinstance(value, tuple | list):
    raise CheckpointFormatError(f"invalid tensor {what}: {value!r}")
  return tuple(_check_int(v, what) for v in value)


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _TensorRef(storage, storage_offset, size, stride, None)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata  # autograd state means nothing for a numpy array
  return _TensorRef(storage, storage_offset, size, stride, None)


def _rebuild_tensor_v3(
  storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, dtype=None, metadata=None
):
  del requires_grad, backward_hooks, metadata
  if not isinstance(dtype, _DType):
    raise CheckpointFormatError(f"_rebuild_tensor_v3 got dtype {dtype!r}, expected a torch dtype")
  return _TensorRef(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  # An nn.Parameter is just its data here; used for both _rebuild_parameter and _rebuild_parameter_with_state.
  del requires_grad, backward_hooks, state
  if not isinstance(data, _TensorRef):
    raise CheckpointFormatError(f"parameter rebuilt from {type(data).__name__}, expected a tensor")
  return data


def _allowed_globals() -> dict[tuple[str, str], Any]:
  allowed: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.storage", "UntypedStorage"): _StorageType(name="UntypedStorage", dtype=np.dtype(np.uint8)),
    ("torch", "UntypedStorage"): _StorageType(name="UntypedStorage", dtype=np.dtype(np.uint8)),
  }
  functions = {
    "_rebuild_tensor": _rebuild_tensor,
    "_rebuild_tensor_v2": _rebuild_tensor_v2,
    "_rebuild_tensor_v3": _rebuild_tensor_v3,
    "_rebuild_parameter": _rebuild_parameter,
    "_rebuild_parameter_with_state": _rebuild_parameter,
  }
  for name, fn in functions.items():
    allowed["torch._utils", name] = _Function(name=name, fn=fn)
  for name, dtype in _STORAGE_DTYPES.items():
    allowed["torch", name] = _StorageType(name=name, dtype=dtype)
  for name, dtype in _TORCH_DTYPES.items():
    allowed["torch", name] = _DType(name=name, dtype=dtype)
  return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only the state-dict globals above, to inert stand-ins; anything else is refused.

  `find_class` is the single place where pickle turns a name into a callable (GLOBAL, STACK_GLOBAL, INST, OBJ and
  the EXT opcodes all go through it), so refusing here means no code named by the file can ever run.
  """

  def __init__(self, file, path: Path, persistent_load):
    super().__init__(file)
    self._path = path
    self._persistent_load = persistent_load

  def find_class(self, module: str, name: str) -> Any:
    # Python 2-era names (protocol < 3 pickles, e.g. `__builtin__.eval`) are shown under their Python 3 names, as
    # the default find_class would map them.
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    obj = _ALLOWED_GLOBALS.get((module, name))
    if obj is None:
      raise UnsafeCheckpointError(
        f"{self._path}: refusing to load: the pickle references the global '{module}.{name}', which a plain "
        "state dict never needs; nothing from the file was executed. Load it only if you trust its source "
        "(re-save it as a plain state dict or as safetensors)"
      )
    return obj

  def persistent_load(self, pid: Any) -> Any:
    return self._persistent_load(pid)


def _unpickle(file, path: Path, persistent_load, what: str) -> Any:
  try:
    return _RestrictedUnpickler(file, path, persistent_load).load()
  except (UnsafeCheckpointError, CheckpointFormatError):
    raise
  except Exception as e:  # any other failure inside the pickle machinery means a damaged or foreign file
    raise CheckpointFormatError(
      f"{path}: cannot read {what} ({type(e).__name__}: {e}); the file is corrupted or not a torch.save state dict"
    ) from e


def _parse_storage_pid(pid: Any, path: Path) -> tuple[_StorageType, str, int, Any]:
  """Validates a persistent id ('storage', storage_type, key, location, numel[, view_metadata])."""
  if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] not in ("storage", b"storage"):
    raise CheckpointFormatError(f"{path}: unexpected persistent id {pid!r} in the pickle (expected a storage)")
  storage_type, key, numel = pid[1], pid[2], pid[4]
  if isinstance(key, bytes):
    key = key.decode("ascii", "replace")
  if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:
    raise CheckpointFormatError(f"{path}: malformed storage record {pid!r} in the pickle")
  return storage_type, key, numel, pid[5] if len(pid) == 6 else None


# ---------------------------------------------------------------------------------------------------------------------
# Materialising arrays


def _swap_bytes(raw: np.ndarray, dtype: np.dtype) -> np.ndarray:
  """Big-endian storage bytes -> native little-endian bytes (a copy; big-endian checkpoints are rare)."""
  unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize  # complex: swap each component separately
  if unit <= 1:
    return raw
  usable = raw[: raw.size - raw.size % unit]
  return np.ascontiguousarray(usable.reshape(-1, unit)[:, ::-1]).reshape(-1)


def _materialize(ref: _TensorRef, path: Path, big_endian: bool) -> np.ndarray:
  storage = ref.storage
  view = storage if isinstance(storage, _StorageView) else None
  if view is not None:
    storage = view.root
  dtype = ref.dtype if ref.dtype is not None else storage.dtype
  raw = storage.raw
  assert raw is not None, "storage was not located"
  if view is not None:  # legacy storage views: a slice of the root storage, in root elements
    itemsize = storage.dtype.itemsize
    raw = raw[view.offset * itemsize : (view.offset + view.numel) * itemsize]
  if big_endian:
    raw = _swap_bytes(raw, dtype)
  numel = raw.size // dtype.itemsize
  count = math.prod(ref.size)
  if count == 0:
    return np.zeros(ref.size, dtype)
  last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
  if last >= numel:
    # Never build a view past the storage: as_strided would read arbitrary memory.
    raise CheckpointFormatError(
      f"{path}: tensor (offset {ref.offset}, size {ref.size}, stride {ref.stride}) reaches element {last} of storage "
      f"'{storage.key}', which holds only {numel}; the file is truncated or corrupted"
    )
  typed = raw[: numel * dtype.itemsize].view(dtype)
  contiguous, expected = True, 1
  for n, s in zip(reversed(ref.size), reversed(ref.stride), strict=True):
    if n != 1 and s != expected:
      contiguous = False
      break
    expected *= n
  if contiguous:
    return np.asarray(typed[ref.offset : ref.offset + count]).reshape(ref.size)
  # Non-contiguous tensors (transposed views, every other row, ...) are copied into a normal C-ordered array.
  strided = np.lib.stride_tricks.as_strided(
    typed[ref.offset :], shape=ref.size, strides=tuple(s * dtype.itemsize for s in ref.stride), writeable=False
  )
  return np.ascontiguousarray(strided)


def _replace_refs(obj: Any, path: Path, big_endian: bool, done: dict[int, np.ndarray]) -> Any:
  """Replaces every _TensorRef in the unpickled structure by an array; a ref seen twice gives the same array."""
  if isinstance(obj, _TensorRef):
    if id(obj) not in done:
      done[id(obj)] = _materialize(obj, path, big_endian)
    return done[id(obj)]
  if isinstance(obj, dict):
    out = type(obj)() if type(obj) in (dict, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _replace_refs(v, path, big_endian, done)
    return out
  if isinstance(obj, list):
    return [_replace_refs(v, path, big_endian, done) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_replace_refs(v, path, big_endian, done) for v in obj)
  if isinstance(obj, _Frozen):  # a bare storage, dtype or function: not something a state dict holds
    raise CheckpointFormatError(f"{path}: the checkpoint holds a bare {obj!r}; only tensors are supported")
  return obj


# ---------------------------------------------------------------------------------------------------------------------
# Zip format (torch >= 1.6)


def _member_data_offset(fh, info: zipfile.ZipInfo, path: Path, file_size: int) -> int:
  """Offset of a member's bytes: past the local header, whose extra field (alignment padding) differs from the
  central directory's, so it must be read from the local header itself."""
  fh.seek(info.header_offset)
  header = fh.read(_ZIP_LOCAL_HEADER.size)
  if len(header) != _ZIP_LOCAL_HEADER.size or header[:4] != _ZIP_MAGIC:
    raise CheckpointFormatError(f"{path}: bad zip local header for '{info.filename}'; the file is corrupted")
  name_len, extra_len = _ZIP_LOCAL_HEADER.unpack(header)[-2:]
  offset = info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len
  if offset + info.compress_size > file_size:
    raise CheckpointFormatError(
      f"{path}: record '{info.filename}' runs past the end of the file; the file is truncated: download it again"
    )
  return offset


def _load_zip(path: Path) -> Any:
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise CheckpointFormatError(
      f"{path}: not a readable zip archive ({e}); the file is truncated or corrupted: download or save it again"
    ) from e
  with zf:
    infos = {info.filename: info for info in zf.infolist()}
    pickles = [name for name in infos if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
      raise CheckpointFormatError(f"{path}: zip archive without a unique '<archive>/data.pkl'; not a torch.save file")
    prefix = pickles[0][: -len("data.pkl")]
    if f"{prefix}constants.pkl" in infos or any(name.startswith(f"{prefix}code/") for name in infos):
      raise CheckpointFormatError(f"{path}: this is a TorchScript archive (torch.jit.save), not a state dict")
    big_endian = False
    if f"{prefix}byteorder" in infos:
      order = zf.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
      if order not in ("little", "big"):
        raise CheckpointFormatError(f"{path}: unknown byteorder record {order!r}")
      big_endian = order == "big"

    storages: dict[str, _Storage] = {}

    def persistent_load(pid: Any) -> _Storage:
      storage_type, key, numel, _ = _parse_storage_pid(pid, path)
      if key not in storages:
        storages[key] = _Storage(key, storage_type.dtype, numel)
      return storages[key]

    try:
      pickle_bytes = zf.read(pickles[0])
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise CheckpointFormatError(
        f"{path}: cannot read data.pkl ({e}); the file is corrupted: download it again"
      ) from e
    obj = _unpickle(io.BytesIO(pickle_bytes), path, persistent_load, "data.pkl")

    file_size = path.stat().st_size
    mapped = np.memmap(path, dtype=np.uint8, mode="r") if file_size else np.zeros(0, np.uint8)
    with open(path, "rb") as fh:
      for key, storage in storages.items():
        info = infos.get(f"{prefix}data/{key}")
        if info is None:
          raise CheckpointFormatError(
            f"{path}: storage record '{prefix}data/{key}' referenced by data.pkl is missing; the file is truncated "
            "or corrupted: download or save it again"
          )
        needed = storage.numel * storage.dtype.itemsize
        if info.file_size < needed:
          raise CheckpointFormatError(
            f"{path}: storage record '{info.filename}' has {info.file_size} bytes, data.pkl needs {needed}; the "
            "file is corrupted: download or save it again"
          )
        if info.compress_type == zipfile.ZIP_STORED:
          offset = _member_data_offset(fh, info, path, file_size)
          storage.locate(mapped[offset : offset + needed])  # a lazy view: pages are read when the caller touches them
        else:
          # torch never compresses storages, but a re-zipped file might be: then the record must be inflated.
          storage.locate(np.frombuffer(zf.read(info), dtype=np.uint8)[:needed])
    return _replace_refs(obj, path, big_endian, {})


# ---------------------------------------------------------------------------------------------------------------------
# Legacy format (torch < 1.6, or _use_new_zipfile_serialization=False): four pickles, then the raw storages.


def _load_legacy(path: Path) -> Any:
  def no_persistent_ids(pid: Any) -> Any:
    raise CheckpointFormatError(f"{path}: unexpected persistent id {pid!r} in the legacy header")

  storages: dict[str, _Storage] = {}
  views: dict[str, _StorageView] = {}

  def persistent_load(pid: Any) -> _Storage | _StorageView:
    storage_type, key, numel, view_metadata = _parse_storage_pid(pid, path)
    storage = storages.setdefault(key, _Storage(key, storage_type.dtype, numel))
    if view_metadata is None:
      return storage
    if not isinstance(view_metadata, tuple) or len(view_metadata) != 3:
      raise CheckpointFormatError(f"{path}: malformed storage view {view_metadata!r}")
    view_key, offset, view_numel = view_metadata
    view = _StorageView(
      root=storage, offset=_check_int(offset, "view offset"), numel=_check_int(view_numel, "view size")
    )
    return views.setdefault(str(view_key), view)

  with open(path, "rb") as fh:
    magic = _unpickle(fh, path, no_persistent_ids, "the legacy header")
    if magic != _LEGACY_MAGIC_NUMBER:
      raise CheckpointFormatError(f"{path}: not a torch.save file (bad magic number)")
    version = _unpickle(fh, path, no_persistent_ids, "the legacy header")
    if version != _LEGACY_PROTOCOL_VERSION:
      raise CheckpointFormatError(f"{path}: unsupported legacy torch.save protocol version {version!r}")
    sys_info = _unpickle(fh, path, no_persistent_ids, "the legacy header")
    big_endian = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
    obj = _unpickle(fh, path, persistent_load, "the pickled object")
    keys = _unpickle(fh, path, no_persistent_ids, "the storage key list")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
      raise CheckpointFormatError(f"{path}: malformed storage key list in the legacy file")
    offset = fh.tell()  # the C unpickler peeks instead of over-reading, so this is exactly past the last pickle
  file_size = path.stat().st_size
  mapped = np.memmap(path, dtype=np.uint8, mode="r") if file_size else np.zeros(0, np.uint8)
  for key in keys:
    # Each storage is an int64 element count (in the writer's byte order) followed by the raw elements.
    if offset + 8 > file_size:
      raise CheckpointFormatError(f"{path}: storage '{key}' is missing; the file is truncated: download it again")
    (count,) = struct.unpack(">q" if big_endian else "<q", bytes(mapped[offset : offset + 8]))
    storage = storages.get(key)
    if storage is None:
      raise CheckpointFormatError(f"{path}: storage '{key}' is not referenced by the pickle; the file is corrupted")
    nbytes = count * storage.dtype.itemsize
    if count < storage.numel or offset + 8 + nbytes > file_size:
      raise CheckpointFormatError(
        f"{path}: storage '{key}' is shorter than recorded; the file is truncated: download or save it again"
      )
    storage.locate(mapped[offset + 8 : offset + 8 + storage.numel * storage.dtype.itemsize])
    offset += 8 + nbytes
  missing = [key for key, storage in storages.items() if storage.raw is None]
  if missing:
    raise CheckpointFormatError(f"{path}: storages {missing} referenced by the pickle are missing; file corrupted")
  return _replace_refs(obj, path, big_endian, {})


# ---------------------------------------------------------------------------------------------------------------------
# Public reading API


def load(path: str | os.PathLike) -> Any:
  """Loads whatever structure of tensors a torch.save file holds, with tensors as numpy arrays.

  Contiguous tensors are read-only views over a memory map of the file (nothing is read until used, and tensors
  sharing a storage, such as tied embeddings, share memory); non-contiguous tensors are copied. Only the globals a
  state dict needs are accepted; anything else raises `UnsafeCheckpointError` before any of it could run.

  Args:
    path: a `.bin`/`.pt` file written by `torch.save` (zip format, or the legacy pre-1.6 format).

  Returns:
    The unpickled object, with every tensor replaced by a `numpy.ndarray` (bfloat16 as `ml_dtypes.bfloat16`).

  Raises:
    UnsafeCheckpointError: the pickle names a global outside the state-dict allow list.
    CheckpointFormatError: the file is truncated, corrupted or not a torch.save file.
    FileNotFoundError: `path` does not exist.
  """
  path = Path(path)
  with open(path, "rb") as fh:
    head = fh.read(512)
  try:
    if head[:4] == _ZIP_MAGIC:
      return _load_zip(path)
    if head[:4] == b"\x80\x02\x8a\x0a":  # protocol 2, then a 10-byte LONG1: the legacy magic number
      return _load_legacy(path)
  except RecursionError as e:  # absurdly nested containers in the pickle
    raise CheckpointFormatError(f"{path}: the pickle nests containers too deeply; not a state dict") from e
  if len(head) >= 262 and head[257:262] == b"ustar":
    raise CheckpointFormatError(
      f"{path}: this is the tar-based torch.save format of PyTorch < 0.4, which is not supported: re-save it with a "
      "recent PyTorch (torch.save(torch.load(path), path))"
    )
  raise CheckpointFormatError(
    f"{path}: not a torch.save checkpoint (neither the zip nor the legacy format); the file is corrupted or truncated"
  )


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Loads a flat state dict (`{name: tensor}`) from a torch.save file without torch and without running its code.

  Args:
    path: a `pytorch_model.bin`-style file written by `torch.save(model.state_dict(), path)`.

  Returns:
    `{name: numpy array}` in file order; contiguous arrays are read-only views over a memory map of the file.

  Raises:
    UnsafeCheckpointError: the pickle names a global outside the state-dict allow list (nothing was executed).
    CheckpointFormatError: the file is truncated, corrupted, or does not hold a flat dict of tensors.
  """
  obj = load(path)
  if not isinstance(obj, dict):
    raise CheckpointFormatError(f"{path}: holds a {type(obj).__name__}, expected a state dict of tensors")
  bad = [
    f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)
  ]
  if bad:
    listed = ", ".join(bad[:5]) + (f", ... ({len(bad) - 5} more)" if len(bad) > 5 else "")
    raise CheckpointFormatError(f"{path}: not a flat state dict of tensors; non-tensor entries: {listed}")
  return dict(obj)


# ---------------------------------------------------------------------------------------------------------------------
# Writing (zip format) without torch: the pickle is emitted opcode by opcode, because the pickle module would import
# `torch` to check the GLOBALs it writes.


class _PickleWriter:
  """Emits the protocol-2 pickle of an OrderedDict of `_rebuild_tensor_v2(...)` calls, exactly as torch.save does."""

  def __init__(self):
    self.out = io.BytesIO()
    self.out.write(pickle.PROTO + bytes([2]))
    self._memo: dict[tuple[str, str], int] = {}

  def global_(self, module: str, name: str) -> None:
    index = self._memo.get((module, name))
    if index is not None:  # re-use a memoised global instead of repeating its name
      self.out.write(pickle.BINGET + bytes([index]) if index < 256 else pickle.LONG_BINGET + struct.pack("<I", index))
      return
    self.out.write(pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii"))
    index = self._memo[(module, name)] = len(self._memo)
    self.out.write(pickle.BINPUT + bytes([index]) if index < 256 else pickle.LONG_BINPUT + struct.pack("<I", index))

  def str_(self, value: str) -> None:
    data = value.encode("utf-8")
    self.out.write(pickle.BINUNICODE + struct.pack("<I", len(data)) + data)

  def int_(self, value: int) -> None:
    if 0 <= value < 1 << 8:
      self.out.write(pickle.BININT1 + bytes([value]))
    elif 0 <= value < 1 << 16:
      self.out.write(pickle.BININT2 + struct.pack("<H", value))
    elif -(1 << 31) <= value < 1 << 31:
      self.out.write(pickle.BININT + struct.pack("<i", value))
    else:
      data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
      self.out.write(pickle.LONG1 + bytes([len(data)]) + data)

  def int_tuple(self, values: tuple[int, ...]) -> None:
    self.out.write(pickle.MARK)
    for v in values:
      self.int_(v)
    self.out.write(pickle.TUPLE)

  def empty_ordered_dict(self) -> None:
    self.global_("collections", "OrderedDict")
    self.out.write(pickle.EMPTY_TUPLE + pickle.REDUCE)

  def tensor(self, storage_name: str, key: str, numel: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> None:
    # _rebuild_tensor_v2(persistent_id(('storage', torch.<X>Storage, key, 'cpu', numel)), 0, size, stride, False,
    # OrderedDict())
    self.global_("torch._utils", "_rebuild_tensor_v2")
    self.out.write(pickle.MARK + pickle.MARK)
    self.str_("storage")
    self.global_("torch", storage_name)
    self.str_(key)
    self.str_("cpu")
    self.int_(numel)
    self.out.write(pickle.TUPLE + pickle.BINPERSID)
    self.int_(0)
    self.int_tuple(shape)
    self.int_tuple(stride)
    self.out.write(pickle.NEWFALSE)
    self.empty_ordered_dict()
    self.out.write(pickle.TUPLE + pickle.REDUCE)


def _c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
  strides, step = [], 1
  for n in reversed(shape):
    strides.append(step)
    step *= max(n, 1)
  return tuple(reversed(strides))


def _memory_key(arr: np.ndarray) -> tuple:
  """Identifies arrays that are the same view of the same buffer (tied weights), which are then stored once."""
  root = arr
  while isinstance(root.base, np.ndarray):
    root = root.base
  return (id(root), arr.__array_interface__["data"][0], arr.shape, arr.strides, arr.dtype)


def _write_member(zf: zipfile.ZipFile, fh, name: str, nbytes: int, chunks) -> None:
  """Writes one uncompressed member whose data starts on a 64-byte boundary, like torch.save (allows mmap)."""
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  info.file_size = nbytes
  # Must match zipfile's own rule in ZipFile.open(mode="w"), which sizes the local header.
  zip64 = nbytes * 1.05 > zipfile.ZIP64_LIMIT
  header = _ZIP_LOCAL_HEADER.size + len(name.encode("ascii")) + (20 if zip64 else 0)
  pad = -(fh.tell() + header + 4) % _ALIGNMENT
  info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad  # the padding field id torch's writer uses as well
  with zf.open(info, mode="w", force_zip64=zip64) as dst:
    for chunk in chunks:
      dst.write(chunk)


def _array_chunks(arr: np.ndarray):
  flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)  # copies only non-contiguous inputs
  for start in range(0, flat.size, _WRITE_CHUNK):
    yield memoryview(flat[start : start + _WRITE_CHUNK])


def save_state_dict(tensors: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Writes `{name: array}` as a torch.save zip checkpoint that `torch.load` reads, without importing torch.

  Arrays that are the same view of the same buffer (e.g. tied embedding and head) are stored once and load back as
  tensors sharing one storage. The file is written to a temporary sibling and renamed at the end, so a failure
  never leaves a partial file at `path`.

  Args:
    tensors: names to arrays (anything `numpy.asarray` accepts) of dtype float32, float16, bfloat16, float64, int64,
      int32, int16, int8, uint8, bool, complex64 or complex128.
    path: output file, e.g. `pytorch_model.bin`.

  Raises:
    TypeError: a key is not a string or a dtype has no torch storage type.
  """
  path = Path(path)
  arrays: dict[str, np.ndarray] = {}
  for name, value in tensors.items():
    if not isinstance(name, str):
      raise TypeError(f"state dict keys must be strings, got {name!r}")
    arr = np.asarray(value)
    if arr.dtype.byteorder == ">":  # torch.load expects the byte order recorded below: little-endian
      arr = arr.astype(arr.dtype.newbyteorder("<"))
    if arr.dtype not in _STORAGE_NAME_OF_DTYPE:
      raise TypeError(f"{name}: dtype {arr.dtype} cannot be saved as a torch storage")
    arrays[name] = arr

  # One storage per distinct memory view; storage keys are "0", "1", ... like torch.save.
  storage_of: dict[tuple, str] = {}
  storages: list[np.ndarray] = []
  writer = _PickleWriter()
  writer.empty_ordered_dict()
  items = list(arrays.items())
  for start in range(0, len(items), 1000):  # SETITEMS in batches of 1000, as pickle does
    writer.out.write(pickle.MARK)
    for name, arr in items[start : start + 1000]:
      key = storage_of.get(_memory_key(arr))
      if key is None:
        key = storage_of[_memory_key(arr)] = str(len(storages))
        storages.append(arr)
      writer.str_(name)
      writer.tensor(_STORAGE_NAME_OF_DTYPE[arr.dtype], key, arr.size, arr.shape, _c_strides(arr.shape))
    writer.out.write(pickle.SETITEMS)
  writer.out.write(pickle.STOP)

  archive = path.stem if path.stem.isascii() and path.stem.replace("_", "").replace("-", "").isalnum() else "archive"
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    with open(tmp, "wb") as fh:
      with zipfile.ZipFile(fh, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:

        def record(name: str, data: bytes) -> None:
          _write_member(zf, fh, f"{archive}/{name}", len(data), [data])

        record("data.pkl", writer.out.getvalue())
        record(".format_version", b"1")
        record(".storage_alignment", str(_ALIGNMENT).encode())
        record("byteorder", b"little")
        for key, arr in enumerate(storages):
          _write_member(zf, fh, f"{archive}/data/{key}", arr.nbytes, _array_chunks(arr))
        record("version", b"3\n")
      fh.flush()
      os.fsync(fh.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
