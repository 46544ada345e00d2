"""The depthwise causal conv's forward (+ SiLU) in Pallas Mosaic GPU (Hopper: TMA copies into a shared-memory ring).

Shape legend: b batch, l length, d the source's width, c window channels, r rows per program, t rows per copy,
e channels per program (128 per thread of the warpgroup times `cpt`), k conv width.

Why: the Triton forwards (`pallas_triton`) move the window at 2.1-2.4 TB/s at best on an H200 (mamba-1.4b's x
window at 8K, batch 2: 0.111-0.126 ms against a ~0.067 ms floor at 4 TB/s; at batch 1 0.084-0.107 ms, XLA's
fusion 0.083; causal_conv_round22.jsonl), each row's loads issued close to their use. Here the rows arrive as
(t, e) tiles by TMA into a ring of `stages` buffers while the previous tile is computed, and the outputs leave as
(t, e) tiles by TMA, as the selective scan's Mosaic GPU kernels do (`selective_scan/pallas_mosaic.py`).

One program per (channel block, r-row block, batch): one channel per thread (lane semantics), which walks its r rows
in order with the last k - 1 inputs in registers, so each source row is read from shared memory once. The k - 1
rows before the block are loaded from global memory at the start (zero before row 0). The window's column offset
is part of each copy's source slice: nothing is sliced or padded in memory. SiLU as x / (1 + 2^(-x log2 e)), with
`ex2.approx` and an approximate reciprocal (`approx_math`, as the scan kernels' gate).

Runs where l is a multiple of the copy's rows and the window's start and width are multiples of 128 `cpt` channels
(`fits`); `pallas_triton` falls back to the Triton forward elsewhere. Not timed yet (round 25).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from mamba_jax.ops._mosaic_gpu import divisor_up_to, load_row

E_BLOCK = 128  # channels per program with one channel per thread
_LOG2E = 1.4426950408889634
_PARAMS = dict(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane, unsafe_no_auto_barriers=True)


def fits(start: int, width: int, l: int, *, chunk: int, cpt: int) -> bool:
  """Whether `forward` runs this window: whole channel blocks, whole copies of rows."""
  E = E_BLOCK * cpt
  return start % E == 0 and width % E == 0 and l % chunk == 0


def _kernel(*refs, k, T, R, stages, E, start, silu, has_bias):
  """One (channel block, row block, batch). Refs: src (b, l, d), weight (k, c), [bias (c,)] in their dtypes ->
  out (b, l, c); scratch: the (stages, t, e) ring of source rows, the (2, t, e) output tiles, the ring's
  barriers."""
  refs = list(refs)
  x_g, w_g = refs.pop(0), refs.pop(0)
  b_g = refs.pop(0) if has_bias else None
  out_g, x_s, o_s, bar = refs
  ei, ti, bi = lax.axis_index("e"), lax.axis_index("t"), lax.axis_index("b")
  e0 = pl.multiple_of(ei * E, E)
  src_cols, out_cols = pl.ds(start + e0, E), pl.ds(e0, E)
  r0 = ti * R
  K = R // T
  f32 = jnp.float32

  def fetch(c, slot):  # rows r0 + c t ... + t of the window into ring slot `slot`
    plgpu.copy_gmem_to_smem(x_g.at[bi, pl.ds(r0 + c * T, T), src_cols], x_s.at[slot], bar.at[slot])

  for c in range(min(stages, K)):
    fetch(c, c)
  wts = [load_row(w_g.at[i, out_cols]).astype(f32) for i in range(k)]
  bias = load_row(b_g.at[out_cols]).astype(f32) if has_bias else None

  def halo(i):  # x[r0 - k + 1 + i], zero before row 0
    r = r0 - (k - 1) + i
    return load_row(x_g.at[bi, jnp.maximum(r, 0), src_cols]).astype(f32) * (r >= 0).astype(f32)

  def body(c, xs):
    slot = lax.rem(c, stages)
    ybuf = lax.rem(c, 2)
    plgpu.barrier_wait(bar.at[slot])
    plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the tile written two copies ago has left ...
    plgpu.commit_smem()  # ... before any thread rewrites it (the copies' issuing thread waited)
    xs = list(xs)  # x[row - k + 1 .. row - 1]
    for j in range(T):
      xs.append(load_row(x_s.at[slot, j]).astype(f32))
      acc = wts[0] * xs[0]
      for i in range(1, k):
        acc = acc + wts[i] * xs[i]
      if has_bias:
        acc = acc + bias
      if silu:
        acc = acc / (1.0 + jnp.exp2(acc * -_LOG2E))
      o_s[ybuf, j] = acc.astype(o_s.dtype)
      xs = xs[1:]
    plgpu.commit_smem()  # every thread is done with this slot and has written its output rows

    @pl.when(c + stages < K)
    def _():
      fetch(c + stages, slot)

    plgpu.copy_smem_to_gmem(o_s.at[ybuf], out_g.at[bi, pl.ds(r0 + c * T, T), out_cols])
    return tuple(xs)

  lax.fori_loop(0, K, body, tuple(halo(i) for i in range(k - 1)))
  plgpu.wait_smem_to_gmem(0)


def forward(src, weight, bias, *, start, width, silu, rows=256, chunk=32, stages=2, cpt=1):
  """out (b, l, c) in src's dtype = [silu](sum_i weight[i] x[t - k + 1 + i] + bias) over the window
  src[..., start : start + width] (zero before row 0); bias None for none. `rows` per program, `chunk` rows per
  copy, `stages` copies in flight, `cpt` channels per thread. Call where `fits`."""
  b, l, _ = src.shape
  k = weight.shape[0]
  E = E_BLOCK * cpt
  if not fits(start, width, l, chunk=chunk, cpt=cpt):
    raise ValueError(
      f"causal_conv1d (Mosaic GPU): the window [{start}, {start + width}) needs start and width multiples of {E} "
      f"and the length ({l}) a multiple of {chunk} rows"
    )
  R = divisor_up_to(l, rows, chunk)  # rows per program: a multiple of the copies, tiling l
  stages = max(1, min(stages, R // chunk))
  has_bias = bias is not None
  kernel = functools.partial(_kernel, k=k, T=chunk, R=R, stages=stages, E=E, start=start, silu=silu, has_bias=has_bias)
  call = plgpu.kernel(
    kernel,
    out_type=jax.ShapeDtypeStruct((b, l, width), src.dtype),
    scratch_types=[
      plgpu.SMEM((stages, chunk, E), src.dtype),
      plgpu.SMEM((2, chunk, E), src.dtype),
      plgpu.Barrier(num_arrivals=1, num_barriers=stages),
    ],
    grid=(width // E, l // R, b),
    grid_names=("e", "t", "b"),
    compiler_params=plgpu.CompilerParams(**_PARAMS),
  )
  return call(src, weight, *([bias] if has_bias else []))


__all__ = ["E_BLOCK", "fits", "forward"]
