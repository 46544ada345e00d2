"""Depthwise causal conv1d (+ SiLU) as a Pallas GPU kernel (Triton lowering); the backward is XLA's.

Shape legend: b batch, l length, d the source's width, c window channels, t rows per program, w channels per
program, k conv width.

Why a kernel: the mixers' conv reads a column window of the in_proj output, and Mamba2's SSD kernel needs x, B and
C as separate arrays. XLA fuses the window, the shifted multiply-adds and the SiLU into one pass that writes x, and
copies B and C out in another. Here each program reads its (t + k - 1, w) input rows straight out of the source
(the window's column offset is a BlockSpec block index, so nothing is sliced or padded in memory) and writes (t, w)
outputs once, one launch per window. Measured on an H100 (mamba2-1.3b at 8K tokens,
benchmarks/results/calibrate.md): 0.080 ms per layer against 0.095 ms for XLA's passes; the memory floor is ~0.047.
Rows before 0 and at or beyond l are masked in the loads, and stores beyond l are masked: any length works.
The interpreter (CPU tests) cannot load from negative row offsets (its dynamic slices clamp), so there the source
is first padded with k - 1 zero rows and no load starts below row 0; the GPU path masks instead.
The backward differentiates the XLA formula (`causal_conv1d_xla`); it runs only under gradient calibration.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mamba_jax.ops._reference_vjp import reference_vjp
from mamba_jax.ops.causal_conv.reference import causal_conv1d_xla, window_bounds

F32 = jnp.float32
_SQ = pl.squeezed if hasattr(pl, "squeezed") else None
MIN_BLOCK_W = 16
MAX_BLOCK_W = 128
BLOCK_T = 64


@dataclasses.dataclass(frozen=True)
class _Meta:
  start: int
  width: int
  silu: bool
  has_bias: bool
  interpret: bool


def block_width(start: int, width: int) -> int:
  """w: the largest power of two (at most MAX_BLOCK_W) dividing both the window's start and its width."""
  m = start | width
  return min(m & -m, MAX_BLOCK_W)


def supported(start: int, width: int) -> bool:
  return block_width(start, width) >= MIN_BLOCK_W


def _kernel(*refs, T, k, l, pad, silu, has_bias, interpret):
  """One (row block, channel block, batch). Refs: x the source's (rows, w) column stripe, weight (k, w) and
  [bias (w,)] in the math dtype -> out (t, w)."""
  x_ref, w_ref = refs[:2]
  b_ref = refs[2] if has_bias else None
  o_ref = refs[-1]
  acc_dt = w_ref.dtype
  t0 = pl.program_id(0) * T
  w = o_ref.shape[-1]
  row = t0 + jax.lax.broadcasted_iota(jnp.int32, (T, w), 0)  # output rows
  acc = jnp.zeros((T, w), acc_dt)
  if has_bias:
    acc = acc + b_ref[...][None, :].astype(acc_dt)
  for i in range(k):
    s = k - 1 - i  # this tap reads row - s
    rows = pl.ds(t0 - s + pad, T)
    mask = (row < l) if interpret else (row >= s) & (row < l)
    x = plgpu.load(x_ref.at[rows, :], mask=mask, other=0.0)
    acc = acc + x.astype(acc_dt) * w_ref[i, :][None, :]
  if silu:
    acc = acc * jax.nn.sigmoid(acc)
  plgpu.store(o_ref, acc.astype(o_ref.dtype), mask=row < l)


def _forward(meta: _Meta, src, weight, bias):
  b, l, _ = src.shape
  k = weight.shape[0]
  c = meta.width
  w = block_width(meta.start, c)
  acc_dt = jnp.promote_types(src.dtype, F32)
  pad = k - 1 if meta.interpret else 0
  if pad:
    src = jnp.pad(src, ((0, 0), (pad, 0), (0, 0)))
  col0 = meta.start // w
  in_specs = [
    pl.BlockSpec((_SQ, l + pad, w), lambda ti, ci, bi: (bi, 0, col0 + ci)),  # (b, l, d): the whole column stripe
    pl.BlockSpec((k, w), lambda ti, ci, bi: (0, ci)),  # (k, c)
  ]
  args = [src, weight.astype(acc_dt)]
  if meta.has_bias:
    in_specs.append(pl.BlockSpec((w,), lambda ti, ci, bi: (ci,)))
    args.append(bias.astype(acc_dt))
  kernel = functools.partial(
    _kernel, T=BLOCK_T, k=k, l=l, pad=pad, silu=meta.silu, has_bias=meta.has_bias, interpret=meta.interpret
  )
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((b, l, c), src.dtype),
    grid=(pl.cdiv(l, BLOCK_T), c // w, b),
    in_specs=in_specs,
    out_specs=pl.BlockSpec((_SQ, BLOCK_T, w), lambda ti, ci, bi: (bi, ti, ci)),
    compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
    interpret=meta.interpret,
    name="causal_conv1d",
  )(*args)


def _reference(meta: _Meta, src, weight, bias):
  return causal_conv1d_xla(src, weight, bias, start=meta.start, width=meta.width, silu=meta.silu)


_conv = reference_vjp(_forward, _reference)


def causal_conv1d_pallas(
  src: jax.Array,  # (b, l, d)
  weight: jax.Array,  # (k, c)
  bias: jax.Array | None = None,  # (c,)
  *,
  start: int | None = None,
  width: int | None = None,
  silu: bool = True,
  interpret: bool = False,
) -> jax.Array:
  """Same contract as `causal_conv1d_xla`; differentiable in src, weight and bias."""
  start, width = window_bounds(src.shape[-1], start, width)
  if src.ndim != 3 or start < 0 or start + width > src.shape[-1] or weight.shape[1:] != (width,):
    raise ValueError(
      f"causal_conv1d: src {src.shape} (window of {width} from column {start}) and weight {weight.shape} do not match"
    )
  if bias is not None and bias.shape != (width,):
    raise ValueError(f"causal_conv1d: bias {bias.shape} does not match the window's {width} channels")
  if not supported(start, width):
    raise ValueError(
      f"causal_conv1d_pallas: window start {start} and width {width} share no power-of-two block of at least "
      f"{MIN_BLOCK_W} channels; use impl='xla'"
    )
  meta = _Meta(start, width, silu, bias is not None, interpret)
  if bias is None:
    bias = jnp.zeros((width,), F32)  # a differentiable placeholder; the kernel skips it
  return _conv(meta, src, weight, bias)


__all__ = ["causal_conv1d_pallas", "supported"]
