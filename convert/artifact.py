"""The converted directory: writing it (atomically, tensor by tensor) and reading its parameters back.

Layout of a converted directory:
  config.json          this project's normalized config (`MambaConfig.to_dict()`, strict JSON)
  params/              Orbax checkpoint of the nested parameter dict (default format), or
  params.safetensors   flat parameters keyed by '/'-joined Flax paths (`--format safetensors`)
  manifest.json        source, revision, dtype, parameter count, format, sha256 of every file, converter version
  tokenizer files      copied from the source when present
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import hashlib
import json
import math
import os
import shutil
import struct
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mamba_jax.config import MambaConfig

MANIFEST = "manifest.json"
CONFIG = "config.json"
ORBAX_DIR = "params"
SAFETENSORS_FILE = "params.safetensors"
FORMATS = ("orbax", "safetensors")
ARTIFACT_VERSION = 1
CONVERTER_VERSION = "0.1.0"
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "vocab.json",
  "merges.txt",
  "tokenizer.model",
  "tokenizer.model.v3",
)
_SAFETENSORS_DTYPE = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_HASH_CHUNK = 16 << 20


class DiskFullError(OSError):
  """The disk filled up while writing; the partial output has been removed."""


def is_disk_full(error: BaseException) -> bool:
  """True for ENOSPC/EDQUOT, also when a library (tensorstore) re-raised it as another exception type."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


# ---------------------------------------------------------------------------------------------------------------------
# Paths and dtypes


def path_str(path: tuple) -> str:
  return "/".join(map(str, path))


def path_tuple(name: str) -> tuple:
  """Inverse of `path_str`: layer indices come back as ints, as in `nnx` state paths."""
  return tuple(int(p) if p.isdigit() else p for p in name.split("/"))


def output_dtype(path: tuple, stored: np.dtype, dtype: str) -> np.dtype:
  """The dtype a parameter is written in: float32 for the leaves every reference computes in float32, else
  `dtype` ("keep": as stored)."""
  from mamba_jax.loading import leaf_dtype  # noqa: PLC0415

  return np.dtype(leaf_dtype(path, stored if dtype == "keep" else dtype))


def contiguous(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
  """A C-contiguous copy of `array` in `dtype` (no copy when it already is one).

  Transposed Linear weights are the bulk of a checkpoint. numpy's plain transpose copy walks one side with a large
  stride and is ~4x slower than copying a few source rows at a time into output columns, which stays in cache.
  """
  if array.flags.c_contiguous and array.dtype == dtype:
    return array
  if array.ndim == 2 and array.T.flags.c_contiguous and min(array.shape) > 64:
    source = array.T  # (out, in) rows in memory order
    out = np.empty(array.shape, dtype)
    for i in range(0, source.shape[0], 8):
      out[:, i : i + 8] = source[i : i + 8].T
    return out
  return np.ascontiguousarray(array, dtype=dtype)


def nonfinite_count(array: np.ndarray) -> int:
  """Number of NaN/Inf entries, checked on the exponent bits for 16-bit floats (3x faster than np.isfinite)."""
  masks = {"float16": 0x7C00, "bfloat16": 0x7F80}  # all-ones exponent: Inf or NaN
  if array.dtype.name in masks:
    mask = masks[array.dtype.name]
    return int(np.count_nonzero((array.view(np.uint16) & mask) == mask))
  return int(array.size - np.count_nonzero(np.isfinite(array)))


# ---------------------------------------------------------------------------------------------------------------------
# Writing


@contextlib.contextmanager
def staging(out: Path, force: bool) -> Iterator[Path]:
  """A temporary sibling of `out` to write into; renamed to `out` on success, removed on any failure.

  Args:
    out: the final directory.
    force: replace an existing `out` (only once the new one is complete).
  """
  out = Path(out).absolute()
  if (out.exists() or out.is_symlink()) and not force:
    raise FileExistsError(f"{out} already exists: pass --force to replace it, or choose another --out")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    yield tmp
    if out.exists() or out.is_symlink():
      old = out.with_name(f".{out.name}.old-{os.getpid()}")
      os.replace(out, old)
      os.replace(tmp, out)
      shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    else:
      os.replace(tmp, out)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if is_disk_full(e):
      raise DiskFullError(
        errno.ENOSPC,
        f"no space left on the device while writing {out}: free some space (the output needs about the size of "
        "the checkpoint) and run again; nothing was written",
      ) from e
    raise


def _strict_json(value: Any) -> Any:
  # json.dump would write `Infinity` (not JSON); use the {"__float__": ...} form that MambaConfig reads back.
  if isinstance(value, float) and not math.isfinite(value):
    return {"__float__": "Infinity" if value > 0 else ("-Infinity" if value < 0 else "NaN")}
  if isinstance(value, list | tuple):
    return [_strict_json(v) for v in value]
  if isinstance(value, dict):
    return {k: _strict_json(v) for k, v in value.items()}
  return value


def write_json(path: Path, value: Any) -> None:
  with open(path, "w") as f:
    json.dump(_strict_json(value), f, indent=2, allow_nan=False)
    f.write("\n")


def write_safetensors(
  path: Path,
  items: list[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
  metadata: Mapping[str, str] | None = None,
  progress: Callable[[int], None] | None = None,
) -> None:
  """Writes a safetensors file one tensor at a time, so that only one tensor is ever in memory.

  (`safetensors.numpy.save_file` needs every array at once.) The layout follows the format spec: an 8-byte
  little-endian header length, a JSON header padded with spaces to 8 bytes, then the tensors back to back.

  Args:
    path: the file to write.
    items: (name, shape, dtype, make) in file order; `make()` returns the C-contiguous array.
    metadata: string pairs for the header's `__metadata__`.
    progress: called with the number of bytes after each tensor.
  """
  header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
  offset = 0
  for name, shape, dtype, _ in items:
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {
      "dtype": _SAFETENSORS_DTYPE[np.dtype(dtype).name],
      "shape": list(shape),
      "data_offsets": [offset, offset + size],
    }
    offset += size
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for name, shape, dtype, make in items:
      array = make()
      if array.shape != tuple(shape) or array.dtype != dtype or not array.flags.c_contiguous:
        raise AssertionError(f"{name}: made {array.shape} {array.dtype}, header says {tuple(shape)} {dtype}")
      f.write(memoryview(array.reshape(-1).view(np.uint8)))
      if progress:
        progress(array.nbytes)
    f.flush()
    os.fsync(f.fileno())


def write_orbax(directory: Path, params: Mapping[tuple, np.ndarray]) -> None:
  """Writes flat {Flax path: array} as an Orbax PyTree checkpoint of a nested dict with string keys.

  Uncompressed: zstd saves ~8% on fp16 weights but halves write speed and triples restore time.
  """
  import absl.logging  # noqa: PLC0415
  import orbax.checkpoint as ocp  # noqa: PLC0415

  absl.logging.set_verbosity(absl.logging.ERROR)  # orbax logs every step of a save at WARNING on some versions
  tree: dict = {}
  for path, array in params.items():
    node = tree
    for part in map(str, path[:-1]):
      node = node.setdefault(part, {})
    node[str(path[-1])] = array
  try:
    # Orbax deep-copies numpy leaves before writing them in the background, which would double peak memory; these
    # arrays are never modified, so the copy is not needed.
    registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False))
    )
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)
  except (TypeError, AttributeError):  # an Orbax version without these options: its defaults
    handler = ocp.PyTreeCheckpointHandler()
  with ocp.Checkpointer(handler) as checkpointer:
    checkpointer.save(Path(directory).absolute(), tree)


def sha256_files(directory: Path, progress: Callable[[int], None] | None = None) -> dict[str, str]:
  """sha256 of every file under `directory`, keyed by '/'-separated relative path, sorted."""
  sums = {}
  for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
      while chunk := f.read(_HASH_CHUNK):
        digest.update(chunk)
        if progress:
          progress(len(chunk))
    sums[path.relative_to(directory).as_posix()] = digest.hexdigest()
  return sums


@dataclasses.dataclass
class Written:
  """What `write_converted` produced (for the summary and for `--verify`)."""

  out: Path
  manifest: dict
  nonfinite: dict[str, int]
  seconds_convert: float = 0.0


def _bar(total: int, desc: str, enabled: bool):
  from tqdm import tqdm  # noqa: PLC0415

  # disable=None: a bar on a terminal, nothing in logs and pipes.
  return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None if enabled else True)


def write_converted(
  ckpt,
  tmp: Path,
  *,
  dtype: str = "keep",
  fmt: str = "orbax",
  strict: bool = False,
  source_info: Mapping[str, Any] | None = None,
  progress: bool = True,
  warn: Callable[[str], None] = lambda m: print(f"warning: {m}", file=sys.stderr),
) -> Written:
  """Converts a checked source checkpoint into `tmp` (a staging directory; see `staging`).

  Args:
    ckpt: a `convert.checkpoint.SourceCheckpoint`.
    tmp: an empty directory.
    dtype: "keep", "float32", "bfloat16" or "float16" for the weight matrices, embedding and conv; A_log, D,
      dt biases and norm weights are always float32.
    fmt: "orbax" or "safetensors".
    strict: refuse weights holding NaN/Inf instead of warning.
    source_info: source, repo_id, revision, commit: copied into the manifest.
    progress: show progress bars (on a terminal).
    warn: where warnings go.

  Returns:
    The manifest written and the count of non-finite values per parameter.
  """
  from convert.checkpoint import ConvertError, release  # noqa: PLC0415
  from mamba_jax import torch_names  # noqa: PLC0415

  if fmt not in FORMATS:
    raise ValueError(f"format {fmt!r}: choose one of {FORMATS}")
  cfg: MambaConfig = ckpt.cfg
  plan = ckpt.plan
  out_dtypes = {path: output_dtype(path, p.tensor.dtype, dtype) for path, p in plan.items()}
  nonfinite: dict[str, int] = {}

  def make(path: tuple) -> np.ndarray:
    planned = plan[path]
    source = planned.tensor.read()
    array = contiguous(torch_names.to_flax(source, planned.transform), out_dtypes[path])
    bad = nonfinite_count(array)
    if bad:
      nonfinite[planned.tensor.key] = bad
      if strict:
        raise ConvertError(
          f"{planned.tensor.key} holds {bad} NaN/Inf values of {array.size}; the checkpoint is corrupted "
          "(without --strict this is a warning); nothing was written"
        )
    if array is not source:
      release(source)
    return array

  total = sum(int(np.prod(p.tensor.shape)) * out_dtypes[path].itemsize for path, p in plan.items())
  if fmt == "safetensors":
    items = [
      (path_str(path), _flax_shape(p), out_dtypes[path], lambda path=path: make(path)) for path, p in plan.items()
    ]
    with _bar(total, "convert+write", progress) as bar:
      write_safetensors(tmp / SAFETENSORS_FILE, items, {"format": "flax"}, bar.update)
  else:
    params = {}
    with _bar(total, "convert", progress) as bar:
      for path in plan:
        params[path] = make(path)
        bar.update(params[path].nbytes)
    if progress:
      print(f"writing Orbax checkpoint ({total / 2**30:.2f} GiB) ...", file=sys.stderr)
    write_orbax(tmp / ORBAX_DIR, params)
    del params
  if nonfinite:
    listed = ", ".join(f"{k} ({n})" for k, n in sorted(nonfinite.items()))
    warn(f"NaN/Inf values in {len(nonfinite)} tensors: {listed}; pass --strict to refuse such checkpoints")

  write_json(tmp / CONFIG, cfg.to_dict())
  copied = []
  for name in TOKENIZER_FILES:
    src = ckpt.directory / name
    if src.is_file():
      shutil.copyfile(src, tmp / name)  # follows the Hub cache's symlinks into blobs/
      copied.append(name)
  with _bar(total, "checksum", progress) as bar:
    files = sha256_files(tmp, bar.update)
  emb = ("backbone", "embedding", "embedding")
  manifest = {
    "converter": "mamba_jax convert",
    "converter_version": CONVERTER_VERSION,
    "artifact_version": ARTIFACT_VERSION,
    **{k: v for k, v in (source_info or {}).items() if v is not None},
    "source_format": ckpt.source_format,
    "arch": cfg.arch,
    "n_layer": cfg.n_layer,
    "d_model": cfg.d_model,
    "tie_embeddings": cfg.tie_embeddings,
    "parameters": ckpt.parameter_count,
    "dtype": out_dtypes[emb].name,
    "requested_dtype": dtype,
    "format": fmt,
    "weights": SAFETENSORS_FILE if fmt == "safetensors" else ORBAX_DIR,
    "nonfinite": nonfinite,
    "tokenizer_files": copied,
    "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "files": files,
  }
  write_json(tmp / MANIFEST, manifest)
  return Written(out=tmp, manifest=manifest, nonfinite=nonfinite)


def _flax_shape(planned) -> tuple[int, ...]:
  from mamba_jax.torch_names import Transform  # noqa: PLC0415

  shape = planned.tensor.shape
  if planned.transform is Transform.TRANSPOSE:
    return tuple(reversed(shape))
  if planned.transform is Transform.CONV:
    return (shape[2], shape[0])
  return tuple(shape)


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def read_manifest(directory: str | os.PathLike) -> dict:
  path = Path(directory) / MANIFEST
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path} is missing or unreadable ({e}); convert the checkpoint again") from e


def read_params(directory: str | os.PathLike) -> dict[tuple, np.ndarray]:
  """Reads the parameters of a directory written by `python -m convert`, as flat {Flax path: numpy array}.

  Args:
    directory: the converted directory (holds manifest.json).

  Returns:
    Arrays keyed by Flax path, e.g. ("backbone", "layers", 0, "mixer", "A_log"), in their stored dtypes.
  """
  directory = Path(directory)
  manifest = read_manifest(directory)
  fmt = manifest.get("format")
  if fmt == "safetensors":
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(str(directory / SAFETENSORS_FILE), framework="numpy") as f:
      return {path_tuple(k): f.get_tensor(k) for k in f.keys()}
  if fmt == "orbax":
    import absl.logging  # noqa: PLC0415
    import orbax.checkpoint as ocp  # noqa: PLC0415

    absl.logging.set_verbosity(absl.logging.ERROR)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
      tree = checkpointer.restore((directory / ORBAX_DIR).absolute())
    flat = {}

    def walk(node, prefix):
      if isinstance(node, Mapping):
        for k, v in node.items():
          walk(v, (*prefix, k))
      else:
        flat[path_tuple("/".join(map(str, prefix)))] = np.asarray(node)

    walk(tree, ())
    return flat
  raise ValueError(f"{directory / MANIFEST}: unknown weights format {fmt!r}; expected one of {FORMATS}")


def verify_checksums(directory: str | os.PathLike) -> list[str]:
  """Files whose sha256 differs from the manifest's (or that are missing); empty when all match."""
  directory = Path(directory)
  expected = read_manifest(directory).get("files", {})
  actual = sha256_files(directory)
  actual.pop(MANIFEST, None)
  return sorted(name for name, digest in expected.items() if actual.get(name) != digest)
