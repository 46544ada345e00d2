"""The residual add and the RMSNorm after it as one Pallas GPU kernel (Triton lowering); the backward is XLA's.

Shape legend: r rows (the leading dims flattened), k chunks of a row, w chunk width (a power of two), d width = k w.

Why a kernel: each block adds its predecessor's output to the residual stream and normalises the sum. XLA compiles
that as two passes, an add that writes the float32 sum and a reduction that reads it back to normalise: on an H200
(mamba-1.4b's 8K SPSA iteration, batch 2, calibrate.md round 22) 78.2 + 57.6 us per layer. Here one program owns a
block of rows, reads the residual and the block output once, and writes the sum and the normalised bf16 rows: 2
reads and 2 writes, 106-107 us per layer there (the iteration went 116.0 -> 113.6 ms). A width that is not a power
of two is read as k chunks of w columns, all held in registers. The sum is written over the residual's buffer.

The backward differentiates the XLA formula of the norm at the saved sum (`rms_norm_xla`): the add passes its
cotangent through. Under a rematerialised gradient the model keeps XLA's add and norm (the block's checkpoint
saves the sum, as before), so this backward runs in the gradient of un-rematerialised models only.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mamba_jax.ops.add_norm.reference import add_residual, add_rms_norm_xla, rms_norm_xla

F32 = jnp.float32
MIN_CHUNK = 16  # narrower power-of-two factors than this are left to XLA (see `supported`)
MAX_CHUNK = 4096
ROW_ELEMS = 4096  # elements of a row block (rows per program x d), at most, unless one row is more
ENABLED = True  # False: `ops.add_rms_norm` runs XLA's add and norm (rounds 2-21), for A/B runs; read when tracing
# (benchmarks/bench_calibrate.py --add-norm xla)


@dataclasses.dataclass(frozen=True)
class _Meta:
  eps: float
  out_dtype: jnp.dtype
  hidden_dtype: jnp.dtype  # the block output's, for its cotangent
  interpret: bool


def chunk_width(width: int) -> int:
  """w: the largest power of two dividing the width, at most MAX_CHUNK."""
  return min(width & -width, MAX_CHUNK)


def supported(width: int) -> bool:
  """Whether the kernel takes this width (a power-of-two factor of at least MIN_CHUNK)."""
  return chunk_width(width) >= MIN_CHUNK


def _row_block(rows: int, d: int) -> int:
  """Rows per program: a power of two dividing `rows`, the row block (all its chunks) at most ROW_ELEMS elements."""
  r = 1
  while r * 2 * d <= ROW_ELEMS and rows % (r * 2) == 0:
    r *= 2
  return r


def _kernel(r_ref, h_ref, w_ref, s_ref, y_ref, *, eps, k, w):
  """One row block. Refs: residual r and block output h (r_blk, k w) in their dtypes, weight (k w,) in the math
  dtype (float32; float64 for float64 inputs) -> the sum s in r's dtype and the normalised y, (r_blk, k w).

  s is r's buffer (aliased): every chunk of r is read before any of s is written, and the sums stay in registers
  for the output pass."""
  acc = w_ref.dtype
  sums = []  # chunk j of the sum, rounded to the residual's dtype as it is stored, (r_blk, w)
  for j in range(k):
    cols = pl.ds(j * w, w)
    sums.append(add_residual(r_ref[:, cols], h_ref[:, cols]))
  ssq = 0.0
  for j, s in enumerate(sums):
    s_ref[:, pl.ds(j * w, w)] = s
    s = s.astype(acc)
    ssq = ssq + jnp.sum(s * s, axis=1)
  rstd = jax.lax.rsqrt(ssq / (k * w) + eps)[:, None]  # (r_blk, 1)
  for j, s in enumerate(sums):
    y_ref[:, pl.ds(j * w, w)] = (s.astype(acc) * rstd * w_ref[pl.ds(j * w, w)][None, :]).astype(y_ref.dtype)


def _forward(meta: _Meta, residual, hidden, weight):
  d = residual.shape[-1]
  w = chunk_width(d)
  rows = residual.size // d
  r_blk = _row_block(rows, d)
  spec = pl.BlockSpec((r_blk, d), lambda ri: (ri, 0))  # (r, d)
  kernel = functools.partial(_kernel, eps=meta.eps, k=d // w, w=w)
  total, y = pl.pallas_call(
    kernel,
    out_shape=[jax.ShapeDtypeStruct((rows, d), residual.dtype), jax.ShapeDtypeStruct((rows, d), meta.out_dtype)],
    grid=(rows // r_blk,),
    in_specs=[spec, spec, pl.BlockSpec((d,), lambda ri: (0,))],
    out_specs=[spec, spec],
    compiler_params=plgpu.CompilerParams(num_warps=8 if r_blk * d >= 2048 else 4, num_stages=1),
    # The sum is written over the residual: the layer scan's carry then stays in its buffer. Without the alias,
    # XLA copied each block's sum into the carry (a 64 us memcpy per layer of mamba-1.4b's 8K SPSA iteration,
    # more than the kernel saved; calibrate.md round 22).
    input_output_aliases={0: 0},
    interpret=meta.interpret,
    name="add_rms_norm",
  )(residual.reshape(rows, d), hidden.reshape(rows, d), weight.astype(jnp.promote_types(residual.dtype, F32)))
  return total.reshape(residual.shape), y.reshape(residual.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _add_norm(meta: _Meta, residual, hidden, weight):
  return _forward(meta, residual, hidden, weight)


def _add_norm_fwd(meta, residual, hidden, weight):
  total, y = _forward(meta, residual, hidden, weight)
  # The sum, not the two addends: the norm's derivative needs only it, and it is one array where they are two.
  return (total, y), (total, weight)


def _add_norm_bwd(meta, saved, cotangents):
  total, weight = saved
  g_total, g_y = cotangents
  _, vjp = jax.vjp(lambda x, w_: rms_norm_xla(x, w_, meta.eps, meta.out_dtype), total, weight)
  dx, dweight = vjp(g_y)
  acc = jnp.promote_types(total.dtype, F32)
  d_sum = (g_total.astype(total.dtype) + dx).astype(acc)  # the sum's cotangent, added where the sum is stored
  return d_sum.astype(total.dtype), d_sum.astype(meta.hidden_dtype), dweight


_add_norm.defvjp(_add_norm_fwd, _add_norm_bwd)


def add_rms_norm_pallas(
  residual: jax.Array,  # (..., d)
  hidden: jax.Array,  # (..., d)
  weight: jax.Array,  # (d,)
  eps: float = 1e-5,
  out_dtype=None,
  *,
  interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Same contract as `add_rms_norm_xla`; differentiable in residual, hidden and weight."""
  d = residual.shape[-1]
  if hidden.shape != residual.shape or weight.shape != (d,):
    raise ValueError(
      f"add_rms_norm: residual {residual.shape}, block output {hidden.shape} and weight {weight.shape} do not match"
    )
  if not supported(d):
    raise ValueError(f"add_rms_norm_pallas: width {d} has no power-of-two factor >= {MIN_CHUNK}; use impl='xla'")
  meta = _Meta(float(eps), jnp.dtype(out_dtype or hidden.dtype), jnp.dtype(hidden.dtype), interpret)
  return _add_norm(meta, residual, hidden, weight)


__all__ = ["add_rms_norm_pallas", "add_rms_norm_xla", "supported"]
