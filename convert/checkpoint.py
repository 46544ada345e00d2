"""Reading a source checkpoint directory (state-spaces, Hugging Face or Mistral) lazily, with every input check.

Nothing here loads the weights: tensors are memory-mapped (`.bin`) or read one at a time (safetensors), so that a
multi-GB checkpoint is never held twice. All checks that need only names, shapes, dtypes and the config run before a
single tensor is read, and report every problem at once.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mamba_jax import torch_names
from mamba_jax.config import MambaConfig, UnsupportedModelError
from mamba_jax.torch_names import Transform


class ConvertError(ValueError):
  """The input cannot be converted; the message says what is wrong and what to do."""


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One stored tensor, not yet read.

  Attributes:
    key: the name in the file (after stripping a Mistral `model.` prefix).
    shape: stored (torch) shape.
    dtype: stored dtype.
    read: returns the array (a memory-mapped view for `.bin`, a fresh array for safetensors).
  """

  key: str
  shape: tuple[int, ...]
  dtype: np.dtype
  read: Callable[[], np.ndarray]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class Planned:
  """How one Flax parameter is made: from which stored tensor, with which layout transform."""

  path: tuple
  tensor: Tensor
  transform: Transform


@dataclasses.dataclass
class SourceCheckpoint:
  """A checked source checkpoint.

  Attributes:
    directory: where it was read from.
    cfg: the architecture.
    source_format: "state-spaces", "hf" or "mistral".
    weight_files: the weight files (for messages and the manifest).
    tensors: every stored tensor by (prefix-stripped) name.
    plan: Flax path -> where its value comes from, in model order; complete and shape-checked.
  """

  directory: Path
  cfg: MambaConfig
  source_format: str
  weight_files: list[Path]
  tensors: dict[str, Tensor]
  plan: dict[tuple, Planned]

  @property
  def parameter_count(self) -> int:
    return sum(int(np.prod(p.tensor.shape)) for p in self.plan.values())

  @property
  def nbytes(self) -> int:
    return sum(p.tensor.nbytes for p in self.plan.values())

  def torch_tensors(self) -> dict[str, np.ndarray]:
    """The planned tensors by torch name (state-spaces embedding key), read now; for the PyTorch reference."""
    return {torch_names.torch_key(path)[0]: p.tensor.read() for path, p in self.plan.items()}


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_FLOAT_DTYPES = {"float64", "float32", "float16", "bfloat16"}


def _read_config(directory: Path) -> tuple[MambaConfig, dict]:
  for name in ("config.json", "params.json"):  # params.json: Mistral-native (Codestral) folders
    path = directory / name
    if path.exists():
      break
  else:
    raise ConvertError(
      f"{directory} has no config.json: a checkpoint directory needs the model's config.json next to its weights"
    )
  try:
    raw = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConvertError(f"{path} is not valid JSON ({e}); re-download or fix the file") from e
  if not isinstance(raw, dict):
    raise ConvertError(f"{path} holds a JSON {type(raw).__name__}, expected an object")
  try:
    cfg = MambaConfig.from_dict(raw)
  except UnsupportedModelError as e:
    raise ConvertError(f"{path}: {e}") from e
  except (KeyError, TypeError, ValueError) as e:
    raise ConvertError(f"{path} is not a usable Mamba config ({type(e).__name__}: {e})") from e
  return cfg, raw


def _shards_from_index(index: Path) -> list[Path]:
  """The shard files a `*.index.json` names, checked to exist."""
  try:
    names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
    raise ConvertError(f"{index} is not a valid shard index ({e}); re-download it") from e
  missing = [n for n in names if not (index.parent / n).exists()]
  if missing:
    raise ConvertError(f"{index} names shards that are missing: {missing}; re-download the checkpoint")
  return [index.parent / n for n in names]


def _safetensors_files(directory: Path) -> list[Path]:
  index = directory / "model.safetensors.index.json"
  if index.exists():
    return _shards_from_index(index)
  if (directory / "model.safetensors").exists():
    return [directory / "model.safetensors"]
  return sorted(directory.glob("consolidated*.safetensors")) or sorted(directory.glob("model-*-of-*.safetensors"))


def _bin_files(directory: Path) -> list[Path]:
  index = directory / "pytorch_model.bin.index.json"
  if index.exists():
    return _shards_from_index(index)
  return [directory / "pytorch_model.bin"] if (directory / "pytorch_model.bin").exists() else []


def _open_safetensors(files: list[Path]) -> dict[str, Tensor]:
  from safetensors import SafetensorError, safe_open  # noqa: PLC0415

  tensors: dict[str, Tensor] = {}
  for path in files:
    try:
      # Keep the handle open for the lifetime of the Tensor.read closures: each read is one tensor.
      handle = safe_open(str(path), framework="numpy")
      for key in handle.keys():
        info = handle.get_slice(key)
        dtype = _SAFETENSORS_DTYPES.get(info.get_dtype(), info.get_dtype())
        tensors[key] = Tensor(key, tuple(info.get_shape()), _np_dtype(dtype), _safetensors_reader(handle, key, path))
    except SafetensorError as e:
      raise ConvertError(f"{path} is truncated or corrupted ({e}); download or save it again") from e
    except (OSError, ValueError) as e:
      raise ConvertError(f"cannot read {path} ({e}); it is truncated or corrupted: download or save it again") from e
  return tensors


def _safetensors_reader(handle, key: str, path: Path) -> Callable[[], np.ndarray]:
  def read() -> np.ndarray:
    from safetensors import SafetensorError  # noqa: PLC0415

    try:
      return handle.get_tensor(key)
    except SafetensorError as e:
      raise ConvertError(f"{path}: cannot read tensor {key} ({e}); the file is corrupted") from e

  return read


def _np_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes  # noqa: PLC0415

    return np.dtype(ml_dtypes.bfloat16)
  try:
    return np.dtype(name.lower())
  except TypeError:
    return np.dtype(np.void)  # reported as a non-float dtype by the checks


def _open_bin(files: list[Path]) -> dict[str, Tensor]:
  from convert.torch_bin import CheckpointFormatError, UnsafeCheckpointError, load_state_dict  # noqa: PLC0415

  tensors: dict[str, Tensor] = {}
  for path in files:
    try:
      state = load_state_dict(path)
    except UnsafeCheckpointError as e:
      raise ConvertError(str(e)) from e
    except CheckpointFormatError as e:
      raise ConvertError(f"{e}") from e
    for key, array in state.items():
      tensors[key] = Tensor(key, tuple(array.shape), array.dtype, lambda a=array: a)
  return tensors


def _strip_prefix(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
  # Mistral-native files wrap the model in `model.` (mistral_inference's `MambaModel.model`).
  if tensors and all(k.startswith("model.") for k in tensors):
    return {k[len("model.") :]: dataclasses.replace(t, key=k[len("model.") :]) for k, t in tensors.items()}
  return tensors


def torch_shape(flax_shape: tuple[int, ...], transform: Transform) -> tuple[int, ...]:
  """The stored (torch) shape that maps to a Flax shape under `transform`."""
  if transform is Transform.TRANSPOSE:
    return tuple(reversed(flax_shape))
  if transform is Transform.CONV:
    k, c = flax_shape
    return (c, 1, k)
  return tuple(flax_shape)


def plan_parameters(cfg: MambaConfig, tensors: dict[str, Tensor], source: str) -> dict[tuple, Planned]:
  """Matches stored tensors to the model's parameters; raises one ConvertError listing every problem.

  Args:
    cfg: the architecture.
    tensors: stored tensors by name.
    source: a name for messages.

  Returns:
    Flax path -> Planned, in the model's parameter order.
  """
  from mamba_jax.loading import abstract_params  # noqa: PLC0415  (imports jax: only once input checks begin)

  expected = abstract_params(cfg)
  embedding_key = "embeddings" if "backbone.embeddings.weight" in tensors else "embedding"
  found: dict[tuple, Planned] = {}
  extra, mismatched, bad_dtype = [], [], []
  for key, tensor in tensors.items():
    hit = torch_names.flax_path(key)
    if hit is None:
      extra.append(key)
      continue
    path, transform = hit
    if path == ("lm_head", "kernel") and cfg.tie_embeddings:
      # torch's state_dict lists the tied head too; accept it when it has the embedding's shape, then drop it.
      want = (cfg.padded_vocab_size, cfg.d_model)
      if tensor.shape != want:
        mismatched.append(f"{key}: expected {want} (tied to the embedding), found {tensor.shape}")
      continue
    if path not in expected or path in found:
      extra.append(key)  # a parameter this config does not have, or a second name for one already seen
      continue
    want = torch_shape(tuple(expected[path].shape), transform)
    if tensor.shape != want:
      mismatched.append(f"{key}: expected {want}, found {tensor.shape}")
    if tensor.dtype.name not in _FLOAT_DTYPES:
      bad_dtype.append(f"{key}: {tensor.dtype}")
    found[path] = Planned(path, tensor, transform)
  missing = [torch_names.torch_key(p, embedding_key)[0] for p in expected if p not in found]
  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
  if extra:
    problems.append(f"unexpected keys ({len(extra)}): {', '.join(sorted(extra))}")
  if mismatched:
    problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
  if bad_dtype:
    problems.append(f"non-floating-point tensors: {', '.join(bad_dtype)}")
  if problems:
    arch = f"{cfg.arch}, {cfg.n_layer} layers, d_model {cfg.d_model}, {'tied' if cfg.tie_embeddings else 'untied'}"
    raise ConvertError(
      f"{source} does not match its config.json ({arch}):\n  " + "\n  ".join(problems) + "\nnothing was written"
    )
  return {p: found[p] for p in expected}


def read_checkpoint(directory: str | Path) -> SourceCheckpoint:
  """Opens and checks a checkpoint directory in the state-spaces, Hugging Face or Mistral format.

  Args:
    directory: holds config.json (or Mistral's params.json) and `model.safetensors` (or shards and their index,
      or `consolidated.safetensors`) or `pytorch_model.bin` (or shards and their index).

  Returns:
    The checked checkpoint; no tensor has been read yet.

  Raises:
    ConvertError: missing config or weights, unsupported architecture, unsafe or corrupted files, missing or extra
      keys, shape mismatches. The message lists every problem found.
  """
  directory = Path(directory)
  if not directory.is_dir():
    raise ConvertError(f"{directory} is not a directory")
  if (directory / "manifest.json").exists():
    raise ConvertError(f"{directory} was written by `python -m convert` already; load it with from_pretrained")
  cfg, raw = _read_config(directory)
  st_files, bin_files = _safetensors_files(directory), _bin_files(directory)
  if st_files:
    files, tensors = st_files, _open_safetensors(st_files)
  elif bin_files:
    files, tensors = bin_files, _open_bin(bin_files)
  else:
    raise ConvertError(
      f"{directory} has no weights: expected model.safetensors (or model-*.safetensors with "
      "model.safetensors.index.json), consolidated.safetensors, or pytorch_model.bin"
    )
  tensors = _strip_prefix(tensors)
  if "dim" in raw and "n_layers" in raw:
    source_format = "mistral"
  elif raw.get("model_type") in ("mamba", "mamba2"):
    source_format = "hf"
  else:
    source_format = "state-spaces"
  plan = plan_parameters(cfg, tensors, str(directory))
  return SourceCheckpoint(directory, cfg, source_format, files, tensors, plan)


def release(array: np.ndarray) -> None:
  """Drops a memory-mapped array's pages from this process's resident set (the OS page cache keeps them).

  After a tensor has been converted its source pages are not needed again; without this, a `.bin` read through a
  memory map would stay resident in full next to the converted copy, doubling peak memory.
  """
  root = array
  while isinstance(root.base, np.ndarray):
    root = root.base
  mm = root.base
  if not isinstance(mm, mmap.mmap) or not hasattr(mm, "madvise") or array.nbytes == 0:
    return
  # np.memmap maps from the allocation-granularity boundary below its offset.
  start_of_map = root.__array_interface__["data"][0] - getattr(root, "offset", 0) % mmap.ALLOCATIONGRANULARITY
  lo = array.__array_interface__["data"][0] - start_of_map
  hi = lo + array.nbytes
  lo -= lo % mmap.PAGESIZE
  hi = min(hi, len(mm))
  if 0 <= lo < hi:
    try:
      mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    except (OSError, ValueError):  # advice only: a platform that refuses it just keeps the pages
      pass
