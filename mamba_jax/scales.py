"""Calibration scales on A or dt: their own variable type, kept apart from the frozen checkpoint weights.

`nnx.state(model, nnx.Param)` is exactly the checkpoint; `nnx.state(model, CalibrationScale)` is the
handful of numbers a calibrator tunes. A scale of 1 leaves the model unchanged.

Forms (s broadcast to the quantity it scales):
  target "A", mode "linear":  A = -exp(A_log) * s      (spectrum scaling; equals A_log + log s)
  target "A", mode "power":   A = -exp(A_log * s)      (what the Mamba Modulation code releases)
  target "dt":                dt = softplus(dt_raw + dt_bias) * s, before discretisation (MambaExtend)
Granularity: "layer" (one scalar), "head" (Mamba2, (h,)), "channel" (Mamba1, (e,)), "entry" (Mamba1 A, (e, n)).
"""

import jax.numpy as jnp
from flax import nnx

TARGETS = ("A", "dt")
MODES = ("linear", "power")
GRANULARITIES = ("layer", "head", "channel", "entry")


class CalibrationScale(nnx.Variable):
  """A multiplicative calibration scale; not an `nnx.Param`, so weight filters and optimizers skip it."""


def scale_shape(arch: str, target: str, granularity: str, *, d_inner: int, d_state: int, nheads: int) -> tuple:
  """The shape of one layer's scale, or a ValueError naming what the architecture offers."""
  if target not in TARGETS:
    raise ValueError(f"target={target!r} is not one of {TARGETS}")
  shapes = {
    ("mamba1", "A"): {"layer": (), "channel": (d_inner, 1), "entry": (d_inner, d_state)},
    ("mamba1", "dt"): {"layer": (), "channel": (d_inner,)},
    ("mamba2", "A"): {"layer": (), "head": (nheads,)},
    ("mamba2", "dt"): {"layer": (), "head": (nheads,)},
  }[(arch, target)]
  if granularity not in shapes:
    raise ValueError(
      f"granularity={granularity!r} does not exist for target {target!r} on {arch}; choose one of {sorted(shapes)}"
    )
  return shapes[granularity]


def scaled_A(A_log: jnp.ndarray, scale: jnp.ndarray | None, mode: str) -> jnp.ndarray:
  """-exp(A_log) with the calibration scale applied, float32."""
  A_log = A_log.astype(jnp.float32)
  if scale is None:
    return -jnp.exp(A_log)
  s = scale.astype(jnp.float32)
  if mode == "linear":
    return -jnp.exp(A_log) * s
  if mode == "power":
    return -jnp.exp(A_log * s)
  raise ValueError(f"mode={mode!r} is not one of {MODES}")


class ScaleHooks:
  """Where a mixer reads its calibration scales; mixed into Mamba1Mixer and Mamba2Mixer.

  A mixer has `a_scale` and `dt_scale` (None, or a CalibrationScale set by `attach_scales`), the A `scale_mode`, and
  `scales_in_decode` (False reproduces the released code, which scales only the parallel prefill).
  """

  def init_scale_hooks(self) -> None:
    self.a_scale = nnx.data(None)
    self.dt_scale = nnx.data(None)
    self.scale_mode = "linear"
    self.scales_in_decode = True

  def _scale(self, name: str, decode: bool) -> jnp.ndarray | None:
    var = getattr(self, name)
    if var is None or (decode and not self.scales_in_decode):
      return None
    return var[...]

  def _A(self, decode: bool = False) -> jnp.ndarray:
    """A = -exp(A_log) with the A scale applied (float32): (e, n) for Mamba1, (h,) for Mamba2."""
    return scaled_A(self.A_log[...], self._scale("a_scale", decode), self.scale_mode)


def attach_scales(
  model,
  target: str = "A",
  mode: str = "linear",
  granularity: str = "layer",
  *,
  apply_in_decode: bool = True,
  init: float = 1.0,
) -> None:
  """Gives every mixer of `model` a CalibrationScale for `target`, initialised to `init` (1 = identity).

  Args:
    model: a MambaLM.
    target: "A" or "dt".
    mode: "linear" or "power" (A only; ignored for dt).
    granularity: "layer", "head" (Mamba2), "channel" or "entry" (Mamba1; entry for A only).
    apply_in_decode: also apply the scales in the recurrent decode step. False reproduces the released
      MambaExtend / Mamba Modulation code, which scales only the parallel prefill.
    init: initial value of every scale.
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is not one of {MODES}")
  cfg = model.cfg
  shape = scale_shape(
    cfg.arch,
    target,
    granularity,
    d_inner=cfg.d_inner,
    d_state=cfg.d_state,
    nheads=cfg.nheads if cfg.arch == "mamba2" else 0,
  )
  for layer in model.backbone.layers:
    mixer = layer.mixer
    var = CalibrationScale(jnp.full(shape, init, jnp.float32), target=target, mode=mode, granularity=granularity)
    setattr(mixer, "a_scale" if target == "A" else "dt_scale", var)
    mixer.scale_mode = mode
    mixer.scales_in_decode = apply_in_decode
