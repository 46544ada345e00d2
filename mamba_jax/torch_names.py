"""Mapping between mamba_ssm / transformers state-dict keys and this model's parameter paths.

One table, used in both directions: loading (torch -> Flax) and exporting (Flax -> torch).
"""

import enum
import re
from collections.abc import Callable

import numpy as np

from mamba_jax.config import MambaConfig


class Transform(enum.Enum):
  IDENTITY = "identity"
  # nn.Linear.weight (out, in)  <->  nnx.Linear.kernel (in, out)
  TRANSPOSE = "transpose"
  # depthwise nn.Conv1d.weight (c, 1, k)  <->  CausalConv1d.kernel (k, c)
  CONV = "conv"


def _mixer(m: re.Match, *tail) -> tuple:
  return ("backbone", "layers", int(m[1]), "mixer", *tail)


# (torch key regex, match -> Flax path, transform). The embedding key is `embedding` in state-spaces
# checkpoints and `embeddings` in transformers ones.
_RULES: list[tuple[str, Callable[[re.Match], tuple], Transform]] = [
  (r"backbone\.embeddings?\.weight", lambda m: ("backbone", "embedding", "embedding"), Transform.IDENTITY),
  (r"backbone\.norm_f\.weight", lambda m: ("backbone", "norm_f", "weight"), Transform.IDENTITY),
  (r"lm_head\.weight", lambda m: ("lm_head", "kernel"), Transform.TRANSPOSE),
  (
    r"backbone\.layers\.(\d+)\.norm\.weight",
    lambda m: ("backbone", "layers", int(m[1]), "norm", "weight"),
    Transform.IDENTITY,
  ),
  (
    r"backbone\.layers\.(\d+)\.mixer\.(in_proj|out_proj|x_proj|dt_proj)\.weight",
    lambda m: _mixer(m, m[2], "kernel"),
    Transform.TRANSPOSE,
  ),
  (
    r"backbone\.layers\.(\d+)\.mixer\.(in_proj|out_proj|dt_proj|conv1d)\.bias",
    lambda m: _mixer(m, m[2], "bias"),
    Transform.IDENTITY,
  ),
  (r"backbone\.layers\.(\d+)\.mixer\.conv1d\.weight", lambda m: _mixer(m, "conv1d", "kernel"), Transform.CONV),
  (r"backbone\.layers\.(\d+)\.mixer\.(A_log|D|dt_bias)", lambda m: _mixer(m, m[2]), Transform.IDENTITY),
  (r"backbone\.layers\.(\d+)\.mixer\.norm\.weight", lambda m: _mixer(m, "norm", "weight"), Transform.IDENTITY),
]

# Parameters that every reference computes with in float32, whatever the checkpoint's dtype.
FLOAT32_LEAVES = {"A_log", "D", "dt_bias"}


def flax_path(key: str) -> tuple[tuple, Transform] | None:
  """The Flax path (tuple of str/int) and transform for a torch key, or None if the key is unknown."""
  for pattern, make_path, transform in _RULES:
    m = re.fullmatch(pattern, key)
    if m:
      return make_path(m), transform
  return None


def to_flax(array: np.ndarray, transform: Transform) -> np.ndarray:
  if transform is Transform.TRANSPOSE:
    return array.T
  if transform is Transform.CONV:
    return array[:, 0, :].T  # (c, 1, k) -> (k, c)
  return array


def to_torch(array: np.ndarray, transform: Transform) -> np.ndarray:
  if transform is Transform.TRANSPOSE:
    return np.ascontiguousarray(array.T)
  if transform is Transform.CONV:
    return np.ascontiguousarray(array.T[:, None, :])  # (k, c) -> (c, 1, k)
  return array


def torch_key(path: tuple, embedding_key: str = "embedding") -> tuple[str, Transform]:
  """Inverse of `flax_path`: a Flax parameter path -> (torch key, transform).

  Args:
    path: e.g. ("backbone", "layers", 3, "mixer", "in_proj", "kernel").
    embedding_key: "embedding" (state-spaces) or "embeddings" (transformers).
  """
  p = tuple(path)
  if p == ("backbone", "embedding", "embedding"):
    return f"backbone.{embedding_key}.weight", Transform.IDENTITY
  if p == ("backbone", "norm_f", "weight"):
    return "backbone.norm_f.weight", Transform.IDENTITY
  if p == ("lm_head", "kernel"):
    return "lm_head.weight", Transform.TRANSPOSE
  if p[:2] == ("backbone", "layers"):
    i, rest = p[2], p[3:]
    if rest == ("norm", "weight"):
      return f"backbone.layers.{i}.norm.weight", Transform.IDENTITY
    if rest[0] == "mixer":
      sub = rest[1:]
      if sub == ("conv1d", "kernel"):
        return f"backbone.layers.{i}.mixer.conv1d.weight", Transform.CONV
      if len(sub) == 1:
        return f"backbone.layers.{i}.mixer.{sub[0]}", Transform.IDENTITY
      if sub[-1] == "kernel":
        return f"backbone.layers.{i}.mixer.{sub[0]}.weight", Transform.TRANSPOSE
      return f"backbone.layers.{i}.mixer.{'.'.join(map(str, sub))}", Transform.IDENTITY
  raise KeyError(f"no torch name for Flax parameter {'/'.join(map(str, p))}")


def expected_torch_keys(cfg: MambaConfig) -> set[str]:
  """The state-spaces keys of a model (lm_head only when untied)."""
  from mamba_jax.loading import abstract_params  # noqa: PLC0415

  return {torch_key(p)[0] for p in abstract_params(cfg)}
