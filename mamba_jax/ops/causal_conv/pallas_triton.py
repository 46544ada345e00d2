"""Depthwise causal conv1d (+ SiLU) and its backward as Pallas GPU kernels (Triton lowering).

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

Two forwards, chosen by FWD_KERNEL when the conv is traced: "tile" (`_kernel`, the one timed above) computes a
(BLOCK_T, w) tile of outputs from k shifted (BLOCK_T, w) loads of the source (each input row loaded k times);
"walk" (`_walk_kernel`, in the backward's style) walks its FWD_BLOCK_T rows of one w-channel stripe step by step,
FWD_CHANNELS_PER_THREAD channels per thread, loading each source row once (plus the k - 1 halo rows before its block)
and holding the last k - 1 in registers. The walk's row loads clip the index into [0, l) and zero the rows outside
(as the backward's), so the same code runs compiled and interpreted, with no padding. On an H200 (round 22,
mamba-1.4b's x window at 8K, batch 2) the walk took 112 us against the tile's 123-126, but mamba-1.4b's SPSA
iteration did not move (119.8 against 120.5 ms in one lease), and at batch 1 and on Mamba2's window it lost; the tile
stays the default. Both kernels take the weight and bias in their dtype and cast them inside. A third forward, in
Mosaic GPU (`pallas_mosaic.py`: the walk's work per program with the rows arriving and leaving by TMA), is chosen
with FWD_KERNEL = "mosaic" or "auto" (round 25; not timed yet).

The backward (`_bwd_kernel`, under gradient calibration) is a kernel too: each program walks its BWD_BLOCK_T rows of
one w-channel stripe step by step, BWD_CHANNELS_PER_THREAD channels per thread, the last k - 1 inputs and
pre-activation gradients held in registers, so the pre-activation (for the SiLU's derivative) is recomputed once
per row and dx, this block's share of dweight and dbias come out of one pass over x and the output's cotangent g:
  dpre[t] = g[t] silu'(pre[t]),  dx[t] = sum_i weight[i] dpre[t + k - 1 - i],
  dweight[i] = sum_t dpre[t] x[t - k + 1 + i],  dbias = sum_t dpre[t].
A program's last k - 1 rows of dpre (the halo of the next block) are recomputed by both; the partial sums over row
blocks and batches are added by XLA. Before it (rounds 2-20) the backward was XLA's derivative of the formula. On an
H200 at 8K tokens (round 21, bench_causal_conv.py: forward + backward, bf16, with the source's other columns'
gradient added): mamba-1.4b's x window 0.422 -> 0.293 ms, mamba2-1.3b's x | B | C 0.462 -> 0.370 ms; in
mamba-1.4b's gradient step (one channel per thread then) the two XLA fusions around the old backward (7.7 + 5.2 ms)
became the kernel (7.9 ms), a pad-and-add fusion (3.9 ms) and an add (2.4 ms) (benchmarks/results/calibrate.md).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mamba_jax.ops._lowering import use_mosaic
from mamba_jax.ops.causal_conv import pallas_mosaic
from mamba_jax.ops.causal_conv.reference import causal_conv1d_xla, window_bounds

F32 = jnp.float32
_SQ = pl.squeezed if hasattr(pl, "squeezed") else None
MIN_BLOCK_W = 16
MAX_BLOCK_W = 128
# the forward: "tile" (`_kernel`), "walk" (`_walk_kernel`), "mosaic" (`pallas_mosaic.forward`, Hopper) or "auto"
# (Mosaic GPU on a Hopper GPU where the window fits, else the tile); read when the conv is traced
FWD_KERNEL = "tile"
MOSAIC_ROWS = 256  # rows per program of the Mosaic GPU forward
MOSAIC_CHUNK = 32  # rows per TMA copy of the Mosaic GPU forward
MOSAIC_STAGES = 2  # copies in flight in the Mosaic GPU forward
MOSAIC_CPT = 1  # channels per thread of the Mosaic GPU forward
BLOCK_T = 64  # rows per program of the tile forward
FWD_TILE_WARPS = 4  # the tile forward's warps
FWD_BLOCK_T = 128  # rows per program of the walk forward
FWD_UNROLL = 8  # walk forward steps per loop iteration (its gcd with FWD_BLOCK_T)
FWD_CHANNELS_PER_THREAD = 4  # the walk forward's warps are w / (32 x this)
BWD_BLOCK_T = 128  # rows per backward program (k - 1 of them recomputed as the next block's halo)
BWD_UNROLL = 8  # backward steps per loop iteration
# The backward's warps are w / (32 x this). On an H200 at 8K tokens (bench_causal_conv.py, round 21), forward +
# backward of mamba-1.4b's x window: 0.341 ms with 1 (4 warps), 0.328 with 2, 0.293 with 4 (one warp, 8-byte
# loads), against 0.422 for XLA's; 256 or 64 rows per program no better (0.325-0.339).
BWD_CHANNELS_PER_THREAD = 4
BWD_KERNEL = True  # False: the backward is XLA's derivative of the formula (rounds 2-20), for A/B runs; read when
# a gradient is traced (benchmarks/bench_calibrate.py --conv-backward xla)


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


def _kernel(*refs, T, k, l, pad, silu, has_bias, interpret, acc_dt):
  """One (row block, channel block, batch). Refs: x the source's (rows, w) column stripe, weight (k, w) and
  [bias (w,)] in their dtype, cast to acc_dt (the math dtype) here -> out (t, w)."""
  x_ref, w_ref = refs[:2]
  b_ref = refs[2] if has_bias else None
  o_ref = refs[-1]
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
    acc = acc + x.astype(acc_dt) * w_ref[i, :].astype(acc_dt)[None, :]
  if silu:
    acc = acc * jax.nn.sigmoid(acc)
  plgpu.store(o_ref, acc.astype(o_ref.dtype), mask=row < l)


def _forward_inputs(meta: _Meta, src, weight, bias, rows: int, w: int):
  """A forward's in_specs and arguments: the source's (rows, w) column stripes (the window's column offset a block
  index: nothing sliced), the weight (k, w) blocks and [the bias (w,) blocks], weight and bias in their own dtype (the
  kernels cast them)."""
  col0 = meta.start // w
  in_specs = [
    pl.BlockSpec((_SQ, rows, w), lambda ti, ci, bi: (bi, 0, col0 + ci)),  # (b, l, d): the whole column stripe
    pl.BlockSpec((weight.shape[0], w), lambda ti, ci, bi: (0, ci)),  # (k, c)
  ]
  args = [src, weight]
  if meta.has_bias:
    in_specs.append(pl.BlockSpec((w,), lambda ti, ci, bi: (ci,)))
    args.append(bias)
  return in_specs, args


def _tile_forward(meta: _Meta, src, weight, bias):
  b, l, _ = src.shape
  k = weight.shape[0]
  c = meta.width
  w = block_width(meta.start, c)
  acc_dt = jnp.promote_types(src.dtype, F32)
  pad = k - 1 if meta.interpret else 0
  if pad:
    src = jnp.pad(src, ((0, 0), (pad, 0), (0, 0)))
  in_specs, args = _forward_inputs(meta, src, weight, bias, l + pad, w)
  kernel = functools.partial(
    _kernel,
    T=BLOCK_T,
    k=k,
    l=l,
    pad=pad,
    silu=meta.silu,
    has_bias=meta.has_bias,
    interpret=meta.interpret,
    acc_dt=acc_dt,
  )
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((b, l, c), src.dtype),
    grid=(pl.cdiv(l, BLOCK_T), c // w, b),
    in_specs=in_specs,
    out_specs=pl.BlockSpec((_SQ, BLOCK_T, w), lambda ti, ci, bi: (bi, ti, ci)),
    compiler_params=plgpu.CompilerParams(num_warps=FWD_TILE_WARPS, num_stages=1),
    interpret=meta.interpret,
    name="causal_conv1d",
  )(*args)


def _walk_kernel(*refs, T, U, k, l, silu, has_bias, acc_dt):
  """One (row block, channel block, batch) of the walk forward. Refs: x the source's (l, w) column stripe, weight
  (k, w) and [bias (w,)] in their dtype (cast to acc_dt here) -> out (t, w) rows [t0, t0 + t) (stores at or
  beyond l masked).

  Steps r = t0 ... t0 + t - 1: each loads x[r] (once), forms out[r] from the window of the last k inputs and
  stores it; the k - 1 rows before t0 are loaded first (zero before row 0)."""
  x_ref, w_ref = refs[:2]
  b_ref = refs[2] if has_bias else None
  o_ref = refs[-1]
  w = o_ref.shape[-1]
  t0 = pl.program_id(0) * T
  wts = [w_ref[i, :].astype(acc_dt) for i in range(k)]  # k x (w,)
  bias = b_ref[...].astype(acc_dt) if has_bias else None

  def row(r):  # x[r] in the math dtype, zero outside [0, l)
    v = x_ref[jnp.clip(r, 0, l - 1), :].astype(acc_dt)
    return jnp.where((r >= 0) & (r < l), v, 0.0)

  def body(it, xs):
    xs = list(xs)  # x[r - k + 1 .. r - 1]
    for u in range(U):
      j = it * U + u
      xs = xs + [row(t0 + j)]
      acc = sum(wts[i] * xs[i] for i in range(k))
      if has_bias:
        acc = acc + bias
      if silu:
        acc = acc * jax.nn.sigmoid(acc)
      out = acc.astype(o_ref.dtype)
      if l % T:  # a ragged last block: its rows at or beyond l are not stored
        plgpu.store(o_ref.at[j, :], out, mask=jnp.full((w,), t0 + j < l))
      else:
        o_ref[j, :] = out
      xs = xs[1:]
    return tuple(xs)

  jax.lax.fori_loop(0, T // U, body, tuple(row(t0 - k + 1 + i) for i in range(k - 1)))


def _walk_forward(meta: _Meta, src, weight, bias):
  b, l, _ = src.shape
  k = weight.shape[0]
  c = meta.width
  w = block_width(meta.start, c)
  acc_dt = jnp.promote_types(src.dtype, F32)
  T = FWD_BLOCK_T
  U = math.gcd(T, FWD_UNROLL)
  in_specs, args = _forward_inputs(meta, src, weight, bias, l, w)
  kernel = functools.partial(_walk_kernel, T=T, U=U, k=k, l=l, silu=meta.silu, has_bias=meta.has_bias, acc_dt=acc_dt)
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((b, l, c), src.dtype),
    grid=(pl.cdiv(l, T), c // w, b),
    in_specs=in_specs,
    out_specs=pl.BlockSpec((_SQ, T, w), lambda ti, ci, bi: (bi, ti, ci)),
    compiler_params=plgpu.CompilerParams(num_warps=max(1, w // (32 * FWD_CHANNELS_PER_THREAD)), num_stages=1),
    interpret=meta.interpret,
    name="causal_conv1d_walk",
  )(*args)


def _mosaic_forward(meta: _Meta, src, weight, bias):
  kw = dict(rows=MOSAIC_ROWS, chunk=MOSAIC_CHUNK, stages=MOSAIC_STAGES, cpt=MOSAIC_CPT)
  bias = bias if meta.has_bias else None
  return pallas_mosaic.forward(src, weight, bias, start=meta.start, width=meta.width, silu=meta.silu, **kw)


def _forward(meta: _Meta, src, weight, bias):
  """The forward FWD_KERNEL names (read here, when the conv is traced)."""
  if FWD_KERNEL in ("mosaic", "auto"):
    fits = pallas_mosaic.fits(meta.start, meta.width, src.shape[1], chunk=MOSAIC_CHUNK, cpt=MOSAIC_CPT)
    needs = (
      f"a window of whole {pallas_mosaic.E_BLOCK * MOSAIC_CPT}-channel blocks, a length that is a multiple of "
      f"MOSAIC_CHUNK = {MOSAIC_CHUNK} and a compiled run; got the window [{meta.start}, {meta.start + meta.width}), "
      f"length {src.shape[1]}, interpret={meta.interpret}"
    )
    if use_mosaic(FWD_KERNEL, "causal_conv1d FWD_KERNEL", fits, meta.interpret, needs):
      return _mosaic_forward(meta, src, weight, bias)
    return _tile_forward(meta, src, weight, bias)
  if FWD_KERNEL == "walk":
    return _walk_forward(meta, src, weight, bias)
  if FWD_KERNEL == "tile":
    return _tile_forward(meta, src, weight, bias)
  raise ValueError(f"causal_conv1d: FWD_KERNEL {FWD_KERNEL!r} is none of 'tile', 'walk', 'mosaic' and 'auto'")


def _bwd_kernel(*refs, T, U, k, l, silu, has_bias):
  """One (row block, channel block, batch) of the backward. Refs: x the source's (l, w) column stripe, g the
  output's cotangent (l, w), weight (k, w) and [bias (w,)] in their dtype -> dx (t, w) rows [t0, t0 + t), and this
  block's partial dweight (k, w) and dbias (w,) (the rows it owns: [t0, t0 + t) below l).

  Steps r = t0 ... t0 + t + k - 2: each loads x[r] and g[r], recomputes pre[r] from the window of the last k
  inputs, and forms dpre[r]; from r = t0 + k - 1 on, dx[r - k + 1] takes the window of the last k dpre."""
  x_ref, g_ref, w_ref = refs[:3]
  b_ref = refs[3] if has_bias else None
  dx_ref, dw_ref, db_ref = refs[-3:]
  w = dx_ref.shape[-1]
  t0 = pl.program_id(0) * T
  acc_dt = dw_ref.dtype
  wts = [w_ref[i, :].astype(acc_dt) for i in range(k)]  # k x (w,)
  bias = b_ref[...].astype(acc_dt) if has_bias else None
  zero = jnp.zeros((w,), acc_dt)

  def row(ref, r):  # ref[r] in the math dtype, zero outside [0, l)
    v = ref[jnp.clip(r, 0, l - 1), :].astype(acc_dt)
    return jnp.where((r >= 0) & (r < l), v, 0.0)

  def step(r, xs, dps, dw, db):
    """Row r: xs = x[r - k + 1 .. r - 1], dps = dpre[r - k + 1 .. r - 1] in, the windows moved on by one and the
    sums out, with dx[r - k + 1]."""
    xs = xs + [row(x_ref, r)]
    pre = sum(wts[i] * xs[i] for i in range(k))
    if has_bias:
      pre = pre + bias
    dp = row(g_ref, r)
    if silu:
      sg = 1.0 / (1.0 + jnp.exp(-pre))
      dp = dp * sg * (1.0 + pre * (1.0 - sg))
    dps = dps + [dp]
    dp_own = jnp.where(r < t0 + T, dp, 0.0)  # the halo rows' sums are the next block's
    dw = [dw[i] + dp_own * xs[i] for i in range(k)]
    db = db + dp_own
    dx = sum(wts[i] * dps[k - 1 - i] for i in range(k))
    return xs[1:], dps[1:], dw, db, dx

  xs = [row(x_ref, t0 - k + 1 + i) for i in range(k - 1)]
  dps, dw, db = [zero] * (k - 1), [zero] * k, zero  # dpre before t0: no dx of this block reads it
  for r in range(k - 1):  # the first k - 1 rows: no dx yet (row t0's reaches k - 1 rows ahead)
    xs, dps, dw, db, _ = step(t0 + r, xs, dps, dw, db)

  def body(it, carry):
    xs, dps, dw, db = carry
    for u in range(U):
      j = it * U + u
      xs, dps, dw, db, dx = step(t0 + j + k - 1, list(xs), list(dps), list(dw), db)
      dx_ref[j, :] = dx.astype(dx_ref.dtype)  # row t0 + j (the output has whole blocks of rows)
    return tuple(xs), tuple(dps), tuple(dw), db

  _, _, dw, db = jax.lax.fori_loop(0, T // U, body, (tuple(xs), tuple(dps), tuple(dw), db))
  for i in range(k):
    dw_ref[i, :] = dw[i]
  db_ref[...] = db


def _backward(meta: _Meta, src, weight, bias, g):
  """(dsrc (b, l, d) in src's dtype, zero outside the window; dweight (k, c), dbias (c,) in the math dtype (float32,
  float64 for float64 inputs)) from the output's cotangent g (b, l, c)."""
  b, l, d = src.shape
  acc_dt = jnp.promote_types(src.dtype, F32)
  k = weight.shape[0]
  c = meta.width
  w = block_width(meta.start, c)
  nt = pl.cdiv(l, BWD_BLOCK_T)
  col0 = meta.start // w
  stripe = lambda c0: pl.BlockSpec((_SQ, l, w), lambda ti, ci, bi: (bi, 0, c0 + ci))  # noqa: E731
  in_specs = [stripe(col0), stripe(0), pl.BlockSpec((k, w), lambda ti, ci, bi: (0, ci))]
  args = [src, g, weight]
  if meta.has_bias:
    in_specs.append(pl.BlockSpec((w,), lambda ti, ci, bi: (ci,)))
    args.append(bias)
  kernel = functools.partial(_bwd_kernel, T=BWD_BLOCK_T, U=BWD_UNROLL, k=k, l=l, silu=meta.silu, has_bias=meta.has_bias)
  dx, dw, db = pl.pallas_call(
    kernel,
    out_shape=[
      jax.ShapeDtypeStruct((b, nt * BWD_BLOCK_T, c), src.dtype),
      jax.ShapeDtypeStruct((b, nt, k, c), acc_dt),
      jax.ShapeDtypeStruct((b, nt, c), acc_dt),
    ],
    grid=(nt, c // w, b),
    in_specs=in_specs,
    out_specs=[
      pl.BlockSpec((_SQ, BWD_BLOCK_T, w), lambda ti, ci, bi: (bi, ti, ci)),
      pl.BlockSpec((_SQ, _SQ, k, w), lambda ti, ci, bi: (bi, ti, 0, ci)),
      pl.BlockSpec((_SQ, _SQ, w), lambda ti, ci, bi: (bi, ti, ci)),
    ],
    compiler_params=plgpu.CompilerParams(num_warps=max(1, w // (32 * BWD_CHANNELS_PER_THREAD)), num_stages=1),
    interpret=meta.interpret,
    name="causal_conv1d_bwd",
  )(*args)
  dx = dx[:, :l] if nt * BWD_BLOCK_T != l else dx
  dsrc = jnp.pad(dx, ((0, 0), (0, 0), (meta.start, d - meta.start - c)))
  return dsrc, dw.sum(axis=(0, 1)), db.sum(axis=(0, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv(meta: _Meta, src, weight, bias):
  return _forward(meta, src, weight, bias)


def _conv_fwd(meta, src, weight, bias):
  return _forward(meta, src, weight, bias), (src, weight, bias)


def _reference(meta: _Meta, src, weight, bias):
  return causal_conv1d_xla(src, weight, bias, start=meta.start, width=meta.width, silu=meta.silu)


def _conv_bwd(meta, saved, g):
  src, weight, bias = saved
  if not BWD_KERNEL:
    return jax.vjp(functools.partial(_reference, meta), *saved)[1](g)
  dsrc, dw, db = _backward(meta, src, weight, bias, g)
  return dsrc.astype(src.dtype), dw.astype(weight.dtype), db.astype(bias.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


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
