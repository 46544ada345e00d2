"""Flax parameters -> standard PyTorch-world checkpoints: transformers (safetensors) or state-spaces (`.bin`).

Neither route imports torch: the `.bin` is written by `convert.torch_bin.save_state_dict` in torch.save's zip
format, the safetensors file by `convert.artifact.write_safetensors`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convert import artifact
from mamba_jax import torch_names
from mamba_jax.config import MambaConfig
from mamba_jax.torch_names import Transform

EXPORT_FORMATS = ("hf", "state-spaces")


def flat_params(model_or_params: Any) -> dict[tuple, np.ndarray]:
  """{Flax path: numpy array} from a `MambaLM`, an nnx State, a flat {path tuple: array} or a nested dict.

  Only `nnx.Param` leaves are taken from a model: calibration scales (their own Variable type) are not weights;
  fold them into A_log before exporting.
  """
  from flax import nnx  # noqa: PLC0415

  if isinstance(model_or_params, nnx.Module):
    model_or_params = nnx.state(model_or_params, nnx.Param)
  if isinstance(model_or_params, nnx.State):
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(model_or_params)}
  if isinstance(model_or_params, Mapping) and all(isinstance(k, tuple) for k in model_or_params):
    return {k: np.asarray(v) for k, v in model_or_params.items()}
  flat = {}

  def walk(node, prefix):
    if isinstance(node, Mapping):
      for k, v in node.items():
        walk(v, (*prefix, int(k) if isinstance(k, str) and k.isdigit() else k))
    else:
      flat[prefix] = np.asarray(node)

  walk(model_or_params, ())
  return flat


def _to_torch(array: np.ndarray, transform: Transform) -> np.ndarray:
  if transform is Transform.TRANSPOSE:
    return artifact.contiguous(array.T, array.dtype)
  return torch_names.to_torch(array, transform)


def torch_state_dict(params: Mapping[tuple, np.ndarray], cfg: MambaConfig, fmt: str) -> dict[str, np.ndarray]:
  """Torch-named tensors for `fmt`.

  Args:
    params: flat {Flax path: array}.
    cfg: the architecture.
    fmt: "hf" (embedding key `backbone.embeddings.weight`; a tied head is omitted, as transformers saves it) or
      "state-spaces" (`backbone.embedding.weight`; a tied head is listed too, sharing the embedding's storage,
      because mamba_ssm loads its state dict strictly and torch's state_dict lists both names).
  """
  if fmt not in EXPORT_FORMATS:
    raise ValueError(f"export format {fmt!r}: choose one of {EXPORT_FORMATS}")
  embedding_key = "embeddings" if fmt == "hf" else "embedding"
  tensors = {}
  for path, array in params.items():
    key, transform = torch_names.torch_key(path, embedding_key)
    tensors[key] = _to_torch(np.asarray(array), transform)
  if fmt == "state-spaces" and cfg.tie_embeddings:
    tensors["lm_head.weight"] = tensors[f"backbone.{embedding_key}.weight"]
  return tensors


def export(
  model_or_params: Any,
  cfg: MambaConfig,
  out_dir: str | os.PathLike,
  fmt: str,
  *,
  force: bool = False,
  tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
  """Writes a checkpoint that transformers (`fmt="hf"`) or mamba_ssm (`fmt="state-spaces"`) loads unchanged.

  The directory is written to a temporary sibling and renamed at the end; an existing `out_dir` is replaced only
  with `force`.

  Args:
    model_or_params: a `MambaLM` (its `nnx.Param`s are exported, e.g. after calibration folded its A scales into
      A_log), or flat/nested parameters as `convert.artifact.read_params` returns them.
    cfg: the architecture.
    out_dir: the directory to write.
    fmt: "hf" (config.json + model.safetensors) or "state-spaces" (config.json + pytorch_model.bin).
    force: replace an existing `out_dir`.
    tokenizer_dir: a directory whose tokenizer files are copied along.

  Returns:
    The written directory.
  """
  if fmt not in EXPORT_FORMATS:
    raise ValueError(f"export format {fmt!r}: choose one of {EXPORT_FORMATS}")
  params = flat_params(model_or_params)
  hf_config = cfg.to_hf_dict() if fmt == "hf" else None  # raises early for what transformers cannot express
  tensors = torch_state_dict(params, cfg, fmt)
  out = Path(out_dir).absolute()
  with artifact.staging(out, force) as tmp:
    if fmt == "hf":
      dtype = tensors["backbone.embeddings.weight"].dtype.name
      artifact.write_json(tmp / "config.json", {**hf_config, "torch_dtype": dtype})
      items = [(k, a.shape, a.dtype, lambda a=a: a) for k, a in tensors.items()]
      artifact.write_safetensors(tmp / "model.safetensors", items, {"format": "pt"})
    else:
      from convert.torch_bin import save_state_dict  # noqa: PLC0415

      artifact.write_json(tmp / "config.json", cfg.to_state_spaces_dict())
      save_state_dict(tensors, tmp / "pytorch_model.bin")
    if tokenizer_dir is not None:
      for name in artifact.TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
          shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
  return out
