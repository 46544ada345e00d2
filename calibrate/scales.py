"""Calibration scales on disk: save, load (with shape checks against the model) and fold into A_log.

A scales directory holds `scales.safetensors` (one tensor per target, stacked over layers: `(n_layer, *shape)`)
and `scales.json` (target, mode, granularity, the model's architecture and sizes, and whatever the calibrator
adds: method, hyper-parameters, data fingerprint).

Shape legend: L layers, e inner channels, n state, h heads.
"""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_jax.scales import CalibrationScale, attach_scales, scale_shape

SCALES_FILE = "scales.safetensors"
META_FILE = "scales.json"
_ATTR = {"A": "a_scale", "dt": "dt_scale"}


class ScalesError(ValueError):
  """A scales directory is missing, malformed, or made for another model."""


def scale_vars(model) -> dict[str, list[CalibrationScale]]:
  """{target: [one CalibrationScale per layer]} for every target attached to `model`."""
  out = {}
  for target, attr in _ATTR.items():
    found = [getattr(layer.mixer, attr) for layer in model.backbone.layers]
    if any(v is not None for v in found):
      out[target] = found
  return out


def model_signature(cfg) -> dict:
  """The sizes a scales file depends on: stored in the metadata and compared on load."""
  sig = {"arch": cfg.arch, "n_layer": cfg.n_layer, "d_model": cfg.d_model, "d_inner": cfg.d_inner}
  sig.update({"d_state": cfg.d_state} if cfg.arch == "mamba1" else {"nheads": cfg.nheads})
  return sig


def stacked(model) -> dict[str, np.ndarray]:
  """{target: (L, *shape) float32} of the attached scales."""
  return {t: np.stack([np.asarray(v[...], np.float32) for v in vs]) for t, vs in scale_vars(model).items()}


def set_stacked(model, values: dict[str, np.ndarray]) -> None:
  """Writes (L, *shape) arrays into the attached scales of `model`."""
  vars_ = scale_vars(model)
  for target, arr in values.items():
    for i, var in enumerate(vars_[target]):
      var.set_value(jnp.asarray(arr[i], jnp.float32))


def save_scales(model, out_dir: str | os.PathLike, meta: dict | None = None) -> pathlib.Path:
  """Writes the model's scales and their metadata to `out_dir`.

  Args:
    model: a MambaLM with scales attached (`attach_scales`).
    out_dir: the directory (created).
    meta: extra metadata (method, hyper-parameters, data fingerprint, ...), stored under "calibration".

  Returns:
    The directory.
  """
  from safetensors.numpy import save_file  # noqa: PLC0415

  vars_ = scale_vars(model)
  if not vars_:
    raise ScalesError("the model has no calibration scales attached; nothing to save")
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  targets = {}
  for target, vs in vars_.items():
    mixer = model.backbone.layers[0].mixer
    targets[target] = {
      "mode": vs[0].get_metadata().get("mode", mixer.scale_mode),
      "granularity": vs[0].get_metadata()["granularity"],
      "shape": list(np.shape(vs[0][...])),
    }
  record = {
    "format": "mamba_jax.calibration_scales/1",
    "model": model_signature(model.cfg),
    "apply_in_decode": bool(model.backbone.layers[0].mixer.scales_in_decode),
    "targets": targets,
    "calibration": meta or {},
  }
  # Write the tensors first, the metadata last: a directory with a metadata file is complete.
  tmp = out / (SCALES_FILE + ".tmp")
  save_file({t: np.ascontiguousarray(a) for t, a in stacked(model).items()}, str(tmp))
  os.replace(tmp, out / SCALES_FILE)
  (out / META_FILE).write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
  return out


def _json_default(x):
  if isinstance(x, np.generic | jax.Array | np.ndarray):
    return np.asarray(x).tolist()
  return str(x)


def read_scales(scales_dir: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
  """Reads (metadata, {target: (L, *shape) array}) from a scales directory, with clear errors."""
  from safetensors.numpy import load_file  # noqa: PLC0415

  d = pathlib.Path(scales_dir)
  if not d.is_dir():
    raise ScalesError(f"scales directory {d} does not exist")
  if not (d / META_FILE).exists() or not (d / SCALES_FILE).exists():
    raise ScalesError(
      f"{d} is not a scales directory: expected {META_FILE} and {SCALES_FILE} (from `python -m calibrate`)"
    )
  try:
    meta = json.loads((d / META_FILE).read_text())
  except json.JSONDecodeError as e:
    raise ScalesError(f"{d / META_FILE} is not valid JSON: {e}") from e
  arrays = load_file(str(d / SCALES_FILE))
  missing = sorted(set(meta.get("targets", {})) - set(arrays))
  if missing:
    raise ScalesError(f"{d / SCALES_FILE} lacks the tensors {missing} named in {META_FILE}")
  return meta, arrays


def load_scales(model, scales_dir: str | os.PathLike) -> None:
  """Attaches the scales saved in `scales_dir` to `model` (in place), after checking they fit it.

  Raises:
    ScalesError: naming the mismatch when the directory was made for another model (layer count, sizes,
      architecture) or is malformed.
  """
  meta, arrays = read_scales(scales_dir)
  cfg = model.cfg
  want = model_signature(cfg)
  saved = meta.get("model", {})
  diffs = [f"{k}: scales made for {saved.get(k)!r}, model has {v!r}" for k, v in want.items() if saved.get(k) != v]
  if diffs:
    raise ScalesError(f"scales in {scales_dir} were made for another model ({'; '.join(diffs)})")
  for target, info in meta["targets"].items():
    shape = scale_shape(
      cfg.arch,
      target,
      info["granularity"],
      d_inner=cfg.d_inner,
      d_state=cfg.d_state,
      nheads=cfg.nheads if cfg.arch == "mamba2" else 0,
    )
    expected = (cfg.n_layer, *shape)
    if tuple(arrays[target].shape) != expected:
      raise ScalesError(
        f"scales in {scales_dir}: tensor {target!r} has shape {tuple(arrays[target].shape)}, the model needs "
        f"{expected} (n_layer, *{info['granularity']} shape)"
      )
    attach_scales(model, target, info["mode"], info["granularity"], apply_in_decode=meta.get("apply_in_decode", True))
  set_stacked(model, {t: arrays[t] for t in meta["targets"]})


def fold_into_params(params: dict[tuple, np.ndarray], meta: dict, arrays: dict[str, np.ndarray]) -> dict:
  """Folds A scales into A_log so an unmodified model computes the calibrated A exactly.

  linear: -exp(A_log) * s = -exp(A_log + log s);  power: -exp(A_log * s) = -exp(A_log'), A_log' = A_log * s.
  The per-layer scale broadcasts against A_log: (), (e, 1) or (e, n) on Mamba1 A_log (e, n); () or (h,) on
  Mamba2 A_log (h,).

  Args:
    params: flat {Flax path: array} of the checkpoint (not modified).
    meta: the scales metadata (`read_scales`).
    arrays: {target: (L, *shape)}.

  Returns:
    A new flat params dict with every layer's A_log replaced.

  Raises:
    ScalesError: for dt scales, which have no place in an ordinary checkpoint.
  """
  if "dt" in meta["targets"]:
    raise ScalesError(
      "dt scales cannot be folded into the checkpoint: dt = softplus(dt_raw + bias) * s has no equivalent "
      "in the stored weights (the scale multiplies after the softplus, and also scales the input gain dt*B). "
      "Load them at run time with `from_pretrained(model_dir, scales=DIR)` instead."
    )
  mode = meta["targets"]["A"]["mode"]
  s_all = np.asarray(arrays["A"], np.float32)
  out = dict(params)
  for i in range(s_all.shape[0]):
    path = ("backbone", "layers", i, "mixer", "A_log")
    A_log = np.asarray(params[path], np.float32)
    s = s_all[i]
    if mode == "linear":
      if np.any(s <= 0):
        raise ScalesError(f"layer {i}: linear A scales must be > 0 to fold into A_log (log s), found min {s.min()}")
      # Same float32 ops as jnp: the folded model matches the scaled one to ~1 ulp of A.
      folded = np.asarray(jnp.asarray(A_log) + jnp.log(jnp.asarray(s)))
    elif mode == "power":
      folded = np.asarray(jnp.asarray(A_log) * jnp.asarray(s))  # bitwise the product the scaled model computes
    else:
      raise ScalesError(f"unknown A scale mode {mode!r}")
    out[path] = np.broadcast_to(folded, A_log.shape).astype(np.float32)
  return out


def fold_model(model, scales_dir: str | os.PathLike | None = None):
  """A new MambaLM without scales whose A_log has the model's (or `scales_dir`'s) A scales folded in."""
  from mamba_jax.loading import model_from_params  # noqa: PLC0415

  if scales_dir is not None:
    meta, arrays = read_scales(scales_dir)
  else:
    vars_ = scale_vars(model)
    if not vars_:
      raise ScalesError("the model has no calibration scales to fold")
    meta = {"targets": {t: {"mode": vs[0].get_metadata()["mode"]} for t, vs in vars_.items()}}
    arrays = stacked(model)
  params = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  folded = fold_into_params(params, meta, arrays)
  return model_from_params(model.cfg, folded, model.dtype, model.backbone.layers[0].mixer.scan_impl)


def projection(lo: float, hi: float):
  """The projection onto the clamp range [lo, hi], applied to every scale leaf after each update."""
  return lambda tree: jax.tree.map(lambda s: jnp.clip(s, lo, hi), tree)
