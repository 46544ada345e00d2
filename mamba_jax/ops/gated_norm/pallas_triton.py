"""Mamba2's gated RMSNorm as a Pallas GPU kernel (Triton lowering); the backward is XLA's.

Shape legend: r rows (the leading dims flattened), g groups, k chunks of a group, w chunk width (a power of two),
e width = g k w.

Why a kernel: XLA compiles this normalisation into a reduction and an elementwise pass and materialises the float32
gated input (and a float32 copy of y) in memory between them. Measured on an H100 (mamba2-1.3b, 8K tokens,
benchmarks/results/calibrate.md): those fusions took ~8 ms of a 58 ms forward. Here one program owns one
(row block, group), reads y and z once in their own dtype, and writes the output once: 2 reads and 1 write, 0.074 ms
per layer there against a ~0.067 ms memory floor. z may be a wider array (the in_proj output) read in place. A group
whose width is not a power of two is read as k chunks of w columns, twice (sum of squares, then the output; the
second read is expected to come from L2, not measured: the group widths of the real checkpoints are 1536 to 5120
columns for mamba2-130m to 2.7b and 1024 for Codestral, and only 4096 was timed).
The backward differentiates the XLA formula (`gated_rms_norm_xla`) from the saved inputs; it only runs under
gradient calibration, where it is one more elementwise fusion next to the scan's backward.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mamba_jax.ops._reference_vjp import reference_vjp
from mamba_jax.ops.gated_norm.reference import gated_rms_norm_xla

F32 = jnp.float32
MIN_CHUNK = 16  # narrower power-of-two factors than this are left to XLA (see `supported`)
MAX_CHUNK = 8192


@dataclasses.dataclass(frozen=True)
class _Meta:
  ngroups: int
  eps: float
  norm_before_gate: bool
  z_start: int  # the gate is columns [z_start, z_start + e) of z's last dim
  interpret: bool


def chunk_width(group_width: int) -> int:
  """w: the largest power of two dividing the group width, at most MAX_CHUNK."""
  return min(group_width & -group_width, MAX_CHUNK)


def supported(width: int, ngroups: int) -> bool:
  """Whether the kernel takes this shape (a group width with a power-of-two factor of at least MIN_CHUNK)."""
  return width % ngroups == 0 and chunk_width(width // ngroups) >= MIN_CHUNK


def _row_block(rows: int, w: int) -> int:
  """Rows per program: up to 2048 elements per chunk tile, a power of two dividing `rows`."""
  r = 1
  while r * 2 * w <= 2048 and rows % (r * 2) == 0:
    r *= 2
  return r


def _kernel(y_ref, z_ref, w_ref, o_ref, *, eps, norm_before_gate, k, w):
  """One (row block, group). Refs: y, z, out (r_blk, k w); weight (k w,) in the math dtype (float32; float64 for
  float64 inputs, which the tests use). Each is read as k chunks of w columns."""
  acc = w_ref.dtype

  def gated(j):  # (the normalised input, the gate) of chunk j, (r_blk, w)
    cols = pl.ds(j * w, w)
    y = y_ref[:, cols].astype(acc)
    z = z_ref[:, cols].astype(acc)
    gate = z * jax.nn.sigmoid(z)
    return (y, gate) if norm_before_gate else (y * gate, gate)

  parts = [gated(0)] if k == 1 else None  # one chunk: keep it in registers for the output pass
  ssq = 0.0
  for j in range(k):
    v, _ = parts[0] if parts else gated(j)
    ssq = ssq + jnp.sum(v * v, axis=1)
  rstd = jax.lax.rsqrt(ssq / (k * w) + eps)[:, None]  # (r_blk, 1)
  for j in range(k):
    v, gate = parts[0] if parts else gated(j)
    out = v * rstd * w_ref[pl.ds(j * w, w)][None, :]
    if norm_before_gate:
      out = out * gate
    o_ref[:, pl.ds(j * w, w)] = out.astype(o_ref.dtype)


def _forward(meta: _Meta, y, z, weight):
  e = y.shape[-1]
  g = meta.ngroups
  eg = e // g
  w = chunk_width(eg)
  rows = y.size // e
  r_blk = _row_block(rows, w)
  z_blk0 = meta.z_start // eg  # gated_rms_norm_pallas makes z_start a multiple of the group width
  y_spec = pl.BlockSpec((r_blk, eg), lambda ri, gi: (ri, gi))  # (r, e)
  z_spec = pl.BlockSpec((r_blk, eg), lambda ri, gi: (ri, z_blk0 + gi))  # (r, z's width)
  w_spec = pl.BlockSpec((eg,), lambda ri, gi: (gi,))  # (e,)
  kernel = functools.partial(_kernel, eps=meta.eps, norm_before_gate=meta.norm_before_gate, k=eg // w, w=w)
  out = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((rows, e), y.dtype),
    grid=(rows // r_blk, g),
    in_specs=[y_spec, z_spec, w_spec],
    out_specs=y_spec,
    compiler_params=plgpu.CompilerParams(num_warps=8 if r_blk * w >= 2048 else 4, num_stages=1),
    interpret=meta.interpret,
    name="gated_rms_norm",
  )(y.reshape(rows, e), z.reshape(rows, z.shape[-1]), weight.astype(jnp.promote_types(y.dtype, F32)))
  return out.reshape(y.shape)


def _reference(meta: _Meta, y, z, weight):
  return gated_rms_norm_xla(y, z, weight, meta.ngroups, meta.eps, meta.norm_before_gate, z_start=meta.z_start)


_norm = reference_vjp(_forward, _reference)


def gated_rms_norm_pallas(
  y: jax.Array,  # (..., e)
  z: jax.Array,  # (..., e), or wider with z_start
  weight: jax.Array,  # (e,)
  ngroups: int = 1,
  eps: float = 1e-5,
  norm_before_gate: bool = False,
  *,
  z_start: int | None = None,
  interpret: bool = False,
) -> jax.Array:
  """Same contract as `gated_rms_norm_xla`; differentiable in y, z and weight.

  z_start: when given, the gate is `z[..., z_start : z_start + e]` of a wider z (e.g. the in_proj output), read in
    place when z_start is a multiple of the group width (no copy), else sliced first.
  """
  e = y.shape[-1]
  z_start = 0 if z_start is None else int(z_start)
  if z.shape[:-1] != y.shape[:-1] or z_start < 0 or z_start + e > z.shape[-1] or weight.shape != (e,):
    raise ValueError(
      f"gated_rms_norm: y {y.shape}, z {z.shape} (gate columns from {z_start}) and weight {weight.shape} do not match"
    )
  if not supported(e, ngroups):
    raise ValueError(
      f"gated_rms_norm_pallas: group width {e}/{ngroups} has no power-of-two factor >= {MIN_CHUNK}; use impl='xla'"
    )
  if z_start % (e // ngroups):
    z, z_start = z[..., z_start : z_start + e], 0
  return _norm(_Meta(ngroups, float(eps), bool(norm_before_gate), z_start, interpret), y, z, weight)


__all__ = ["gated_rms_norm_pallas", "supported"]
