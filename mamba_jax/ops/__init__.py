"""Scan operators, the mixers' causal conv and Mamba2's gated norm, and the one place where an implementation is
chosen.

`impl` picks the implementation: "auto" (Pallas on GPU when available, XLA elsewhere), "pallas",
"xla" or "reference" (the slow sequential scan used by tests).
"""

import math

import jax

from mamba_jax.ops._remat import REMAT_SAVED, remat_policy
from mamba_jax.ops.add_norm.reference import add_rms_norm_xla
from mamba_jax.ops.causal_conv.reference import causal_conv1d_xla, window_bounds
from mamba_jax.ops.gated_norm.reference import gated_rms_norm_xla
from mamba_jax.ops.selective_scan.reference import gate_columns, selective_scan_reference
from mamba_jax.ops.selective_scan.xla import selective_scan_xla
from mamba_jax.ops.ssd.reference import ssd_reference
from mamba_jax.ops.ssd.xla import ssd_xla

IMPLS = ("auto", "pallas", "xla", "reference")


def _pallas_module(op: str):
  """The Pallas implementation of `op`, or None where it does not exist (yet)."""
  try:
    if op == "ssd":
      from mamba_jax.ops.ssd import pallas_triton as mod  # noqa: PLC0415
    elif op == "causal_conv":
      from mamba_jax.ops.causal_conv import pallas_triton as mod  # noqa: PLC0415
    elif op == "gated_norm":
      from mamba_jax.ops.gated_norm import pallas_triton as mod  # noqa: PLC0415
    elif op == "add_norm":
      from mamba_jax.ops.add_norm import pallas_triton as mod  # noqa: PLC0415
    else:
      from mamba_jax.ops.selective_scan import pallas_triton as mod  # noqa: PLC0415
  except ImportError:
    return None
  return mod


def resolve_impl(impl: str, op: str) -> str:
  """Turns "auto" into a concrete implementation for the default backend."""
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
  if impl == "auto":
    return "pallas" if jax.default_backend() == "gpu" and _pallas_module(op) is not None else "xla"
  if impl == "pallas" and _pallas_module(op) is None:
    raise NotImplementedError(f"no Pallas implementation of {op} in this build; use impl='xla'")
  return impl


def ssd(
  x,
  dt,
  A,
  B,
  C,
  chunk_size: int,
  D=None,
  z=None,
  dt_bias=None,
  dt_softplus: bool = False,
  dt_limit: tuple[float, float] = (0.0, math.inf),
  initial_states=None,
  return_final_states: bool = False,
  *,
  impl: str = "auto",
):
  """Mamba2 SSD scan (the semantics of mamba_ssm's `mamba_chunk_scan_combined`).

  Per head h (group g = h // (nheads / ngroups)), with dt' = clamp(softplus(dt + dt_bias)) when asked:
    S_t = exp(dt'_t A_h) S_{t-1} + dt'_t x_t B_t^T,   y_t = S_t C_t + D_h x_t,   y_t *= silu(z_t).

  Args:
    x: `(batch, seqlen, nheads, headdim)`.
    dt: `(batch, seqlen, nheads)`, raw time step.
    A: `(nheads,)`, negative decay rates (`-exp(A_log)`).
    B, C: `(batch, seqlen, ngroups, dstate)`.
    chunk_size: SSD block length; any seqlen works (the tail chunk is padded).
    D: `(nheads,)` or `(nheads, headdim)` skip connection.
    z: `(batch, seqlen, nheads, headdim)` gate.
    dt_bias: `(nheads,)`. dt_softplus: apply softplus (threshold 20). dt_limit: clamp after softplus.
    initial_states: `(batch, nheads, headdim, dstate)`.
    return_final_states: also return the final state, float32 `(batch, nheads, headdim, dstate)`.
    impl: "auto" | "pallas" | "xla" | "reference".

  Returns:
    y `(batch, seqlen, nheads, headdim)` in x's dtype (state and accumulation are float32), and the
    final state when `return_final_states`.
  """
  args = (x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, tuple(dt_limit), initial_states, return_final_states)
  impl = resolve_impl(impl, "ssd")
  if impl == "reference":
    return ssd_reference(*args)
  if impl == "pallas":
    return _pallas_module("ssd").ssd_pallas(*args)
  return ssd_xla(*args)


def selective_scan(
  u,
  delta,
  A,
  B,
  C,
  D=None,
  z=None,
  delta_bias=None,
  delta_softplus: bool = False,
  initial_state=None,
  return_last_state: bool = False,
  *,
  z_start: int | None = None,
  impl: str = "auto",
):
  """Mamba1 selective scan (the semantics of mamba_ssm's `selective_scan_fn`), **channels-last**.

  Unlike `selective_scan_fn`, whose tensors are `(batch, d_inner, seqlen)`, every sequence tensor here
  is `(batch, seqlen, channels)`, the layout the rest of the model uses. With d' = softplus(delta +
  delta_bias) when asked:
    h_t = exp(d'_t A) h_{t-1} + d'_t B_t u_t,   y_t = h_t C_t + D u_t,   y_t *= silu(z_t).

  Args:
    u, delta, z: `(batch, seqlen, d_inner)`.
    A: `(d_inner, dstate)`.
    B, C: `(batch, seqlen, dstate)`.
    D, delta_bias: `(d_inner,)`.
    initial_state: `(batch, d_inner, dstate)`.
    return_last_state: also return the last state, float32 `(batch, d_inner, dstate)`.
    z_start: when given, z is a wider `(batch, seqlen, width)` array (e.g. the in_proj output) whose columns
      [z_start, z_start + d_inner) are the gate; the Pallas kernels read them in place instead of from a sliced
      copy (the gradient w.r.t. z then has z's width, zero outside the gate columns).
    impl: "auto" | "pallas" | "xla" | "reference".

  Returns:
    y `(batch, seqlen, d_inner)` in u's dtype, and the last state when `return_last_state`.
  """
  impl = resolve_impl(impl, "selective_scan")
  if impl == "pallas":
    mod = _pallas_module("selective_scan")
    return mod.selective_scan_pallas(
      u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state, z_start=z_start
    )
  if z_start is not None:
    z = gate_columns(z, z_start, u.shape, "selective_scan")
  args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state)
  if impl == "reference":
    return selective_scan_reference(*args)
  return selective_scan_xla(*args)


def causal_conv1d(
  src,
  weight,
  bias=None,
  *,
  start: int | None = None,
  width: int | None = None,
  silu: bool = True,
  splits: tuple[int, ...] | None = None,
  impl: str = "auto",
):
  """Depthwise causal conv1d over time (mamba_ssm's `causal_conv1d_fn`), channels-last, with the SiLU fused.

  out[t] = silu(sum_i weight[i] x[t - k + 1 + i] + bias) with zero history before t = 0, float32 math.

  Args:
    src: `(batch, seqlen, d)`; the conv reads its columns [start, start + width) (all of them by default), so a
      mixer can pass its in_proj output and let the Pallas kernel read the window in place.
    weight: `(k, width)`; weight[k - 1] multiplies the current step (torch's Conv1d weight (c, 1, k) transposed).
    bias: `(width,)` or None.
    silu: apply the SiLU.
    splits: channel counts of consecutive windows (summing to width, e.g. Mamba2's x | B | C): returns a tuple of
      one output per window; the Pallas path writes each as its own array (no slicing copies).
    impl: "auto" | "pallas" | "xla" | "reference" ("reference" is the XLA formula). "auto" takes the Pallas kernel
      on GPU where start and width (of each split) are multiples of 16, else XLA.

  Returns:
    `(batch, seqlen, width)` in src's dtype, or a tuple of `(batch, seqlen, split)` with `splits`.
  """
  start, width = window_bounds(src.shape[-1], start, width)
  if splits is not None and sum(splits) != width:
    raise ValueError(f"causal_conv1d: splits {splits} do not sum to the window's {width} channels")
  impl = resolve_impl(impl, "causal_conv")
  mod = _pallas_module("causal_conv") if impl == "pallas" else None
  offsets = [0]
  for n in splits or (width,):
    offsets.append(offsets[-1] + n)
  pieces = list(zip(offsets[:-1], offsets[1:], strict=True))
  if mod is not None and src.ndim == 3 and all(mod.supported(start + a, e - a) for a, e in pieces):
    outs = tuple(
      mod.causal_conv1d_pallas(
        src, weight[:, a:e], None if bias is None else bias[a:e], start=start + a, width=e - a, silu=silu
      )
      for a, e in pieces
    )
  else:
    out = causal_conv1d_xla(src, weight, bias, start=start, width=width, silu=silu)
    outs = tuple(out[..., a:e] for a, e in pieces) if splits is not None else (out,)
  return outs if splits is not None else outs[0]


def gated_rms_norm(
  y,
  z,
  weight,
  ngroups: int = 1,
  eps: float = 1e-5,
  norm_before_gate: bool = False,
  *,
  z_start: int | None = None,
  impl: str = "auto",
):
  """Mamba2's gated RMSNorm (mamba_ssm's `RMSNormGated`), per group of `e / ngroups` contiguous channels.

  norm_before_gate=False: rmsnorm(y * silu(z)) * weight; True: rmsnorm(y) * weight * silu(z); float32 math.

  Args:
    y, z: `(..., e)`.
    weight: `(e,)`.
    z_start: when given, z is a wider array (e.g. the in_proj output) whose columns [z_start, z_start + e) are the
      gate; the Pallas kernel reads them in place instead of from a sliced copy.
    impl: "auto" | "pallas" | "xla" | "reference" ("reference" is the XLA formula). "auto" takes the Pallas kernel
      on GPU where the group width has a power-of-two factor of at least 16, else XLA.

  Returns:
    `(..., e)` in y's dtype.
  """
  args = (y, z, weight, ngroups, eps, norm_before_gate)
  impl = resolve_impl(impl, "gated_norm")
  if impl == "pallas":
    mod = _pallas_module("gated_norm")
    if mod.supported(y.shape[-1], ngroups):
      return mod.gated_rms_norm_pallas(*args, z_start=z_start)
  return gated_rms_norm_xla(*args, z_start=z_start)


def add_rms_norm(residual, hidden, weight, eps: float = 1e-5, out_dtype=None, *, impl: str = "auto"):
  """The residual add and the RMSNorm after it (mamba_ssm's fused add + norm): (s, rmsnorm(s) * weight) with
  s = residual + hidden added in float32 and kept in the residual's dtype.

  Args:
    residual: `(..., d)`, the residual stream (float32 when `residual_in_fp32`).
    hidden: `(..., d)`, the previous block's output.
    weight: `(d,)`.
    out_dtype: the normalised output's dtype (default: hidden's).
    impl: "auto" | "pallas" | "xla" | "reference" ("reference" is the XLA formula). "auto" takes the Pallas kernel
      on GPU where the width has a power-of-two factor of at least 16, else XLA.

  Returns:
    (the sum in residual's dtype, the normalised sum in out_dtype), each `(..., d)`.
  """
  impl = resolve_impl(impl, "add_norm")
  if impl == "pallas":
    mod = _pallas_module("add_norm")
    if mod.ENABLED and mod.supported(residual.shape[-1]):
      return mod.add_rms_norm_pallas(residual, hidden, weight, eps, out_dtype)
  return add_rms_norm_xla(residual, hidden, weight, eps, out_dtype)


__all__ = [
  "add_rms_norm",
  "causal_conv1d",
  "gated_rms_norm",
  "ssd",
  "selective_scan",
  "REMAT_SAVED",
  "remat_policy",
  "ssd_reference",
  "selective_scan_reference",
  "ssd_xla",
  "selective_scan_xla",
]
