"""Building a model from a config and named weights, and `from_pretrained` for checkpoint directories.

Formats: Hugging Face (`config.json` + `model.safetensors` or a sharded index), state-spaces (`config.json` +
`pytorch_model.bin`, read without torch), Mistral, and this project's converted directories; the readers live in
`convert/` (checkpoint.py for official checkpoints, artifact.py for converted ones).
"""

import os
import pathlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_jax import torch_names
from mamba_jax.config import MambaConfig
from mamba_jax.model import MambaLM

F32 = jnp.float32


class CheckpointError(ValueError):
  """The weights do not fit the model the config describes."""


def _dtype(dtype) -> np.dtype | None:
  if dtype is None or (isinstance(dtype, str) and dtype == "keep"):
    return None
  try:
    return jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"dtype={dtype!r} is not a dtype name; use e.g. 'float32', 'bfloat16' or 'float16'") from e


def abstract_model(cfg: MambaConfig, dtype=F32, scan_impl: str = "auto") -> MambaLM:
  """The model with `jax.ShapeDtypeStruct` leaves: no weight is allocated."""
  dtype = _dtype(dtype) or F32
  return nnx.eval_shape(lambda: MambaLM(cfg, param_dtype=dtype, scan_impl=scan_impl, rngs=nnx.Rngs(0)))


def abstract_params(cfg: MambaConfig, dtype=F32) -> dict[tuple, jax.ShapeDtypeStruct]:
  """Flat {path: ShapeDtypeStruct} of every parameter, without allocating."""
  _, state = nnx.split(abstract_model(cfg, dtype), nnx.Param)
  return {path: var.get_value() for path, var in nnx.to_flat_state(state)}


def param_count(cfg: MambaConfig) -> int:
  return sum(int(np.prod(s.shape)) for s in abstract_params(cfg).values())


def leaf_dtype(path: tuple, dtype) -> np.dtype:
  """A_log, D, dt biases and norm weights are float32 whatever the model dtype (as in every reference)."""
  name = path[-1]
  if name in torch_names.FLOAT32_LEAVES or name == "weight" or path[-2:] == ("dt_proj", "bias"):
    return jnp.dtype(F32)
  return jnp.dtype(dtype)


def model_from_params(
  cfg: MambaConfig, params: Mapping[tuple, np.ndarray], dtype=None, scan_impl: str = "auto", source: str = "weights"
) -> MambaLM:
  """Builds a MambaLM from flat {Flax path: array}. Checks every path and shape, and reports all problems at once.

  Args:
    cfg: the architecture.
    params: arrays keyed by Flax path, e.g. ("backbone", "layers", 0, "mixer", "A_log").
    dtype: parameter/compute dtype; None keeps the embedding's stored dtype.
    scan_impl: passed to the mixers.
    source: a name for error messages.
  """
  emb = params.get(("backbone", "embedding", "embedding"))
  dtype = _dtype(dtype) or (jnp.dtype(emb.dtype) if emb is not None else jnp.dtype(F32))
  model = abstract_model(cfg, dtype, scan_impl)
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  flat = dict(nnx.to_flat_state(state))
  missing = sorted("/".join(map(str, p)) for p in flat if p not in params)
  extra = sorted("/".join(map(str, p)) for p in params if p not in flat)
  mismatched = [
    f"{'/'.join(map(str, p))}: expected {tuple(flat[p].get_value().shape)}, found {tuple(np.shape(a))}"
    for p, a in params.items()
    if p in flat and tuple(np.shape(a)) != tuple(flat[p].get_value().shape)
  ]
  problems = []
  if missing:
    problems.append(f"missing parameters: {missing}")
  if extra:
    problems.append(f"unexpected parameters: {extra}")
  if mismatched:
    problems.append(f"shape mismatches: {mismatched}")
  if problems:
    raise CheckpointError(
      f"{source} does not fit the config ({cfg.arch}, {cfg.n_layer} layers): " + "; ".join(problems)
    )
  for path, var in flat.items():
    var.set_value(jnp.asarray(params[path], dtype=leaf_dtype(path, dtype)))
  return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def _resolve(source: str | os.PathLike, revision: str | None) -> pathlib.Path:
  path = pathlib.Path(source)
  if path.is_dir():
    return path
  try:
    from convert.hub import resolve_source  # noqa: PLC0415
  except ImportError as e:  # pragma: no cover - the convert package ships with mamba_jax
    raise FileNotFoundError(f"{source} is not a directory") from e
  return pathlib.Path(resolve_source(str(source), revision=revision).path)


def load_config(directory: str | os.PathLike) -> MambaConfig:
  path = pathlib.Path(directory) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: a checkpoint directory needs a config.json")
  return MambaConfig.from_json(path)


def from_pretrained(
  source: str | os.PathLike,
  dtype=None,
  *,
  scan_impl: str = "auto",
  revision: str | None = None,
  scales: str | os.PathLike | None = None,
) -> MambaLM:
  """Loads a Mamba/Mamba2 language model.

  Args:
    source: a local directory (Hugging Face format, state-spaces format or one written by
      `python -m convert`), or a hub id such as "state-spaces/mamba2-130m" (resolved through the
      Hugging Face cache; `HF_HUB_OFFLINE=1` is honoured).
    dtype: a name such as "bfloat16", a jnp dtype, or None to keep the stored dtype. A_log, D, dt
      biases and norm weights stay float32.
    scan_impl: "auto" | "pallas" | "xla" | "reference".
    revision: hub revision (branch, tag or commit).
    scales: a directory written by `python -m calibrate` whose calibration scales to load.

  Returns:
    A `MambaLM`: `model(ids)` maps int token ids (b, l) to logits (b, l, padded_vocab).
  """
  directory = _resolve(source, revision)
  if (directory / "manifest.json").exists():  # written by `python -m convert`
    from convert.artifact import read_params  # noqa: PLC0415

    cfg, params = load_config(directory), read_params(directory)
  else:  # an official checkpoint: read lazily (memory-mapped), with every key and shape checked
    from convert.checkpoint import read_checkpoint  # noqa: PLC0415

    checkpoint = read_checkpoint(directory)
    cfg = checkpoint.cfg
    params = {path: torch_names.to_flax(p.tensor.read(), p.transform) for path, p in checkpoint.plan.items()}
  model = model_from_params(cfg, params, dtype, scan_impl, source=str(directory))
  if scales is not None:
    from calibrate.scales import load_scales  # noqa: PLC0415

    load_scales(model, scales)
  return model
