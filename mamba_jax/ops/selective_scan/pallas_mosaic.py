"""The Mamba1 selective scan's kernels in Pallas Mosaic GPU (Hopper: TMA copies into a shared-memory ring).

Shape legend: b batch, l length (padded to s * L_s), s segments, L_s segment length, t steps of a chunk (T of them),
e inner channels (d_inner; 128 per program), n state.

The same algorithm and work per program as the Triton forward (`pallas_triton._fwd_kernel`: one warpgroup per
(128-channel block, segment, batch), one channel per thread, its n states in registers, the time loop walked step by
step), with the data path the Triton lowering cannot express: each chunk's u, delta and z (t, 128) tiles and its
[B_t, C_t] (t, 2n) float32 rows arrive by TMA into a ring of `stages` shared-memory buffers while the previous chunk
is computed, so each step reads its rows and its 2n broadcast scalars from shared memory instead of issuing global
loads close to their use (the Triton kernels' top stall, scans.md round 7). y leaves through a double-buffered
(t, 128) tile by TMA.

  * `segment_states`: pass 1, each segment's end state from zero (b, s - 1, n, e) and its sum of delta
    (b, s - 1, e), for all segments but the last (nothing reads its end state from zero).
  * `segment_adjoints`: the backward's pass 1, each segment's adjoint carry from a zero adjoint at its end
    (b, s, n, e), the chunks walked last first.
  * `chain_states` (with `SelectiveScanConfig.segment_chain="mosaic"`): every segment's incoming state from pass
    1's outputs, in one small launch between the passes (b, s, n, e).
  * `fwd_main`: pass 2, chains the end states of the segments before its own (or reads its incoming state from
    `chain_states`), walks its segment from the true incoming state and writes y (with D u and the z gate) and
    the last segment's end state (b, n, e); with `save` (the forward under `jax.vjp`) also the state before every
    K-th step (b, l / K, n, e), the rows backward's (`pallas_triton._bwd_rows_kernel`) input, stored from
    registers.

Each takes the padded inputs of `pallas_triton` and returns what its Triton counterpart returns (`_segment_states`,
`_forward`, the rows backward's segment adjoints), to float32 rounding, so that the two lowerings mix: the Triton
forward under `jax.vjp` can take this pass 1's segment states, the Triton backward these stored states.

Details:
  * Lane semantics with every array's layout given: (e,) rows in `WG_STRIDED` layout, thread i holding channel i
    (or channels [c i, c i + c) with c channels per thread); B_t and C_t as scalar shared-memory loads, the same
    address in every lane (a broadcast), float32 so that no unpacking follows.
  * exp2, log2 and the gate's division lower to `ex2.approx`, `lg2.approx` and an approximate reciprocal
    (`approx_math`), as the Triton kernels' inline PTX does; the softplus is always the fast one (Triton's
    `fast_math=True`, the default). Multiplies and adds may contract into FMAs.
  * No automatic barriers (`unsafe_no_auto_barriers`): each thread reads and writes only its own channels' shared
    memory, and the two places where threads hand memory to the copy engine or take it back have explicit
    barriers (`commit_smem`, a proxy fence and a warpgroup barrier): after a chunk's steps (every thread is done
    with the ring slot that the next copy refills and has written its y rows), and after the wait for the y tile
    written two chunks ago (only the copies' issuing thread waits).
  * Measured on an H200 at 8K tokens (benchmarks/results/scans.md, round 18): T = 16 and 8 equal, 32 and 64
    slower; 2 buffers faster than 1, 3 equal; 2 channels per thread slower.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from mamba_jax.ops._dt import softplus_from_exp2
from mamba_jax.ops._mosaic_gpu import divisor_up_to as _divisor_up_to
from mamba_jax.ops._mosaic_gpu import load_row as _load_row
from mamba_jax.ops._mosaic_gpu import row_layout as _row_layout

E_BLOCK = 128  # channels per program with one channel per thread of the warpgroup (`channels_per_thread` 1)
_LOG2E = 1.4426950408889634
_PARAMS = dict(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane, unsafe_no_auto_barriers=True)


def _log2(x):
  """log2 without a division: `jnp.log2` is log(x) / log(2), whose division costs a special-function reciprocal
  per step under approx_math (the kernels' PTX, round 19); log(x) lowers to `lg2.approx` times ln 2."""
  return jnp.log(x) * _LOG2E


# 2^f = 1 + f q(f) on [-1/2, 1/2]: q a degree-4 least-squares fit of (2^f - 1) / f at Chebyshev nodes, in float32
# (relative error of 1 + f q(f) at most 2.9e-7 in float32 arithmetic; ex2.approx's is ~2^-22). Round 12's Triton
# polynomial (scans.md), whose kernels were then far from the special-function unit's bound.
_EXP2_Q = (0.0013390877284109592, 0.009666378609836102, 0.055503569543361664, 0.2402234822511673, 0.6931471824645996)
_ROUNDER = 12582912.0  # 1.5 * 2^23: x + _ROUNDER rounds x to an integer held in the low mantissa bits
_EXP2_MIN = -126.0  # 2^-126, the smallest normal float32


def exp2_fma(x):
  """2^x for float32 x <= 0 on the FMA and integer units, without the special-function unit (MUFU).

  x is clamped to -126 (2^-126 for anything below; the decays exp(delta A) use it, where ex2.approx flushes to 0),
  rounded to an integer j by adding and subtracting 1.5 * 2^23, 2^(x - j) evaluated as 1 + f q(f), and j shifted
  into the exponent bits (the low bits of x + 1.5 * 2^23 hold j; shifted left by 23 the constant's bits leave
  the word): 11 instructions, 9 on the FMA pipe and 2 integer. Relative error within 3e-7 for -126 <= x <= 0.
  """
  xc = jnp.maximum(x, _EXP2_MIN)
  t = xc + _ROUNDER
  f = xc - (t - _ROUNDER)  # in [-1/2, 1/2]
  q = f * _EXP2_Q[0] + _EXP2_Q[1]
  for c in _EXP2_Q[2:]:
    q = q * f + c
  p = 1.0 + f * q  # 2^f
  i32 = jnp.int32
  bits = lax.bitcast_convert_type(p, i32) + lax.shift_left(lax.bitcast_convert_type(t, i32), i32(23))
  return lax.bitcast_convert_type(bits, jnp.float32)


def _decay(x, m, n, poly):
  """exp2(x) for state m of n's decay: `exp2_fma` for the last `poly` states, else ex2.approx (approx_math)."""
  return exp2_fma(x) if m >= n - poly else jnp.exp2(x)


def _delta(raw, bias, seg0_t, meta):
  """delta at one step from its raw (e,) row: bias, softplus, and zero past the true length."""
  x = raw.astype(jnp.float32)
  if bias is not None:
    x = x + bias
  d = softplus_from_exp2(x, jnp.exp2, _log2) if meta.softplus else x  # approximate ex2 / lg2 (approx_math)
  if meta.ragged:
    d = d * (seg0_t < meta.l).astype(jnp.float32)
  return d


def _program(meta, E, T):
  """This program's batch bi, segment si, first channel e0, channel columns, first row seg0, and chunk count K."""
  ei, si, bi = lax.axis_index("e"), lax.axis_index("s"), lax.axis_index("b")
  e0 = pl.multiple_of(ei * E, E)
  seg0 = si * meta.seg_len
  return bi, si, e0, pl.ds(e0, E), seg0, meta.seg_len // T


def _start_ring(ins, bar, bi, e0, E, T, stages, K, chunk_start):
  """Issues the copies of the first `stages` chunks into the ring; returns fetch(k, slot), which copies the k-th
  chunk (rows chunk_start(k) ... + T of batch bi) into ring slot `slot`, arriving on barrier `slot`.
  ins: (gmem ref, smem ring, column offset of the E-channel block from e0, or None for the ring's width of columns
  from the first: whole rows, or pass 1's B from pass 2's [B | C] rows)."""

  def fetch(k, slot):
    rows = pl.ds(chunk_start(k), T)
    for g, s, off in ins:
      cols = pl.ds(0, s.shape[-1]) if off is None else pl.ds(e0 + off, E)
      plgpu.copy_gmem_to_smem(g.at[bi, rows, cols], s.at[slot], bar.at[slot])

  for k in range(min(stages, K)):
    fetch(k, k)
  return fetch


def _kernel(*refs, meta, T, stages, write_y, save, E, poly, has_h0, has_hin):
  """One (channel block, segment, batch). Refs, in order:
  in: u, delta (b, l, e), A2 = A^T log2(e) (n, e) float32, BC (b, l, 2n) float32 (B_t then C_t; pass 1 copies
    the first n columns: B alone (b, l, n), or B from these rows), [D (e,)], [z (b, l, width)] when `write_y`,
    [delta_bias (e,)], and when `write_y` either h_in (b, s, n, e), every segment's incoming state
    (`chain_states`), or [h0 (b, n, e)] and, with several segments, h_loc (b, s - 1, n, e) and dsum (b, s - 1, e)
    from pass 1, which each program chains up to its segment.
  out: `write_y`: y (b, l, e), h_last (b, n, e), [h_sub (b, l / K, n, e) with `save`, K = `meta.unroll_bwd`
    dividing T]; else h_out (b, s - 1, n, e), dsum (b, s - 1, e).
  scratch: the u, delta, [z] and BC rings, the out tiles, the ring's barriers."""
  refs = list(refs)
  take = lambda cond=True: refs.pop(0) if cond else None  # noqa: E731
  u_g, dl_g, a2_g, bc_g = take(), take(), take(), take()
  d_g = take(write_y and meta.has_d)
  z_g = take(write_y and meta.has_z)
  bias_g = take(meta.has_bias)
  hin_g = take(write_y and has_hin)
  h0_g = take(write_y and has_h0)
  chain_here = write_y and meta.S > 1 and not has_hin
  hl_g, ds_g = take(chain_here), take(chain_here)
  out0, out1 = take(), take()
  h_sub = take(save)
  u_s, dl_s = take(), take()
  z_s = take(write_y and meta.has_z)
  bc_s, o_s, bar = take(), take(), take()
  assert not refs, refs
  n = a2_g.shape[0]

  bi, si, e0, cols, seg0, K = _program(meta, E, T)
  K_save = meta.unroll_bwd
  ins = [(u_g, u_s, 0), (dl_g, dl_s, 0), (bc_g, bc_s, None)]
  if z_s is not None:
    ins.append((z_g, z_s, meta.z_start))

  fetch = _start_ring(ins, bar, bi, e0, E, T, stages, K, lambda k: seg0 + k * T)

  A2 = [_load_row(a2_g.at[k, cols]) for k in range(n)]
  bias = _load_row(bias_g.at[cols]).astype(jnp.float32) if bias_g is not None else None
  Dv = _load_row(d_g.at[cols]).astype(jnp.float32) if d_g is not None else None
  zero = plgpu.layout_cast(jnp.zeros((E,), jnp.float32), _row_layout(E))  # a splat would change the carry's layout
  if hin_g is not None:
    h = tuple(_load_row(hin_g.at[bi, si, k, cols]) for k in range(n))
  elif write_y:
    h = tuple(_load_row(h0_g.at[bi, k, cols]) for k in range(n)) if has_h0 else (zero,) * n
    if hl_g is not None:

      def chain(i, h):
        ds = _load_row(ds_g.at[bi, i, cols])
        return tuple(jnp.exp2(ds * A2[k]) * h[k] + _load_row(hl_g.at[bi, i, k, cols]) for k in range(n))

      h = lax.fori_loop(0, si, chain, h)
  else:
    h = (zero,) * n

  def body(k, carry):
    h, dsum = carry
    slot = lax.rem(k, stages)
    plgpu.barrier_wait(bar.at[slot])
    if write_y:
      ybuf = lax.rem(k, 2)
      plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the tile written two chunks ago has left ...
      plgpu.commit_smem()  # ... before any thread rewrites it (the copies' issuing thread waited)
    for j in range(T):
      if save and j % K_save == 0:  # the state before step k T + j
        row = (seg0 + k * T + j) // K_save
        for m in range(n):
          h_sub[bi, row, m, cols] = h[m]
      u = _load_row(u_s.at[slot, j]).astype(jnp.float32)
      d = _delta(_load_row(dl_s.at[slot, j]), bias, seg0 + k * T + j, meta)
      du = d * u
      Bt = [bc_s[slot, j, m] for m in range(n)]
      h = tuple(_decay(d * A2[m], m, n, poly) * h[m] + Bt[m] * du for m in range(n))
      if write_y:
        y = Dv * u if Dv is not None else zero
        for m in range(n):
          y = y + h[m] * bc_s[slot, j, n + m]
        if z_s is not None:
          zt = _load_row(z_s.at[slot, j]).astype(jnp.float32)
          y = y * zt / (1.0 + jnp.exp2(zt * -_LOG2E))
        o_s[ybuf, j] = y.astype(o_s.dtype)
      else:
        dsum = dsum + d
    plgpu.commit_smem()  # every thread is done with this slot and has written its y rows

    @pl.when(k + stages < K)
    def _():
      fetch(k + stages, slot)

    if write_y:
      plgpu.copy_smem_to_gmem(o_s.at[ybuf], out0.at[bi, pl.ds(seg0 + k * T, T), cols])
    return h, dsum

  h, dsum = lax.fori_loop(0, K, body, (h, zero))
  if write_y:
    plgpu.wait_smem_to_gmem(0)

    @pl.when(si == meta.S - 1)
    def _():
      for m in range(n):
        out1[bi, m, cols] = h[m]
  else:
    for m in range(n):
      out0[bi, si, m, cols] = h[m]
    out1[bi, si, cols] = dsum


def _adjoint_kernel(*refs, meta, T, stages, E, poly):
  """Backward pass 1, one (channel block, segment, batch): walk the segment backwards from a zero adjoint, as
  `pallas_triton._bwd_rows_kernel` with `full=False`: g_t = c_{t+1} + dy0_t C_t, c_t = a_t g_t, with
  a_t = exp(delta_t A) and dy0 = dy * silu(z). Refs, in order:
  in: delta, dy (b, l, e), A2 = A^T log2(e) (n, e) float32, C (b, l, n) float32, [z (b, l, width)],
    [delta_bias (e,)].
  out: c_out (b, s, n, e) float32, the adjoint carry out of the segment's first step.
  scratch: the delta, dy, [z] and C rings, the ring's barriers. Chunks arrive last first."""
  refs = list(refs)
  take = lambda cond=True: refs.pop(0) if cond else None  # noqa: E731
  dl_g, dy_g, a2_g, c_g = take(), take(), take(), take()
  z_g = take(meta.has_z)
  bias_g = take(meta.has_bias)
  out = take()
  dl_s, dy_s = take(), take()
  z_s = take(meta.has_z)
  c_s, bar = take(), take()
  assert not refs, refs
  n = a2_g.shape[0]

  bi, si, e0, cols, seg0, K = _program(meta, E, T)
  ins = [(dl_g, dl_s, 0), (dy_g, dy_s, 0), (c_g, c_s, None)]
  if z_s is not None:
    ins.append((z_g, z_s, meta.z_start))

  def chunk_start(k):  # the k-th chunk fetched is the (K - 1 - k)-th of the segment
    return seg0 + (K - 1 - k) * T

  fetch = _start_ring(ins, bar, bi, e0, E, T, stages, K, chunk_start)

  A2 = [_load_row(a2_g.at[m, cols]) for m in range(n)]
  bias = _load_row(bias_g.at[cols]).astype(jnp.float32) if bias_g is not None else None
  zero = plgpu.layout_cast(jnp.zeros((E,), jnp.float32), _row_layout(E))

  def body(k, c):
    slot = lax.rem(k, stages)
    plgpu.barrier_wait(bar.at[slot])
    for j in reversed(range(T)):
      d = _delta(_load_row(dl_s.at[slot, j]), bias, chunk_start(k) + j, meta)
      dy0 = _load_row(dy_s.at[slot, j]).astype(jnp.float32)
      if z_s is not None:
        zt = _load_row(z_s.at[slot, j]).astype(jnp.float32)
        dy0 = dy0 * zt / (1.0 + jnp.exp2(zt * -_LOG2E))
      c = tuple(_decay(d * A2[m], m, n, poly) * (c[m] + dy0 * c_s[slot, j, m]) for m in range(n))
    plgpu.commit_smem()  # every thread is done with this slot

    @pl.when(k + stages < K)
    def _():
      fetch(k + stages, slot)

    return c

  c = lax.fori_loop(0, K, body, (zero,) * n)
  for m in range(n):
    out[bi, si, m, cols] = c[m]


def _chain_kernel(*refs, stages, E, has_h0):
  """One (channel block, batch): every segment's incoming state, h_in[0] = h0 (or zeros) and
  h_in[s + 1] = exp2(dsum_s A2) h_in[s] + h_loc_s, one channel per thread with its n states in registers, as each
  pass-2 program would chain them up to its own segment. Refs, in order:
  in: h_loc (b, s - 1, n, e), dsum (b, s - 1, e), A2 (n, e), [h0 (b, n, e)], all float32.
  out: h_in (b, s, n, e) float32.
  scratch: the h_loc (stages, n, E) and dsum (stages, 1, E) rings, their barriers: segment k's rows arrive by TMA
  `stages` segments ahead, so the loop waits on one copy's latency at its start only, not at every segment (the
  chain's few exps and FMAs per segment are far shorter than a global load)."""
  refs = list(refs)
  take = lambda cond=True: refs.pop(0) if cond else None  # noqa: E731
  hl_g, ds_g, a2_g = take(), take(), take()
  h0_g = take(has_h0)
  out = take()
  hl_s, ds_s, bar = take(), take(), take()
  assert not refs, refs
  n = a2_g.shape[0]
  K = hl_g.shape[1]  # s - 1 segments to chain over
  ei, bi = lax.axis_index("e"), lax.axis_index("b")
  e0 = pl.multiple_of(ei * E, E)
  cols = pl.ds(e0, E)

  def fetch(k, slot):
    plgpu.copy_gmem_to_smem(hl_g.at[bi, k, :, cols], hl_s.at[slot], bar.at[slot])
    plgpu.copy_gmem_to_smem(ds_g.at[bi, pl.ds(k, 1), cols], ds_s.at[slot], bar.at[slot])

  for k in range(min(stages, K)):
    fetch(k, k)
  A2 = [_load_row(a2_g.at[m, cols]) for m in range(n)]
  zero = plgpu.layout_cast(jnp.zeros((E,), jnp.float32), _row_layout(E))
  h = tuple(_load_row(h0_g.at[bi, m, cols]) for m in range(n)) if has_h0 else (zero,) * n
  for m in range(n):
    out[bi, 0, m, cols] = h[m]

  def body(k, h):
    slot = lax.rem(k, stages)
    plgpu.barrier_wait(bar.at[slot])
    ds = _load_row(ds_s.at[slot, 0])
    h = tuple(jnp.exp2(ds * A2[m]) * h[m] + _load_row(hl_s.at[slot, m]) for m in range(n))
    plgpu.commit_smem()  # every thread is done with this slot before the copy engine refills it

    @pl.when(k + stages < K)
    def _():
      fetch(k + stages, slot)

    for m in range(n):
      out[bi, k + 1, m, cols] = h[m]
    return h

  lax.fori_loop(0, K, body, h)


def chain_states(h_loc, dsum, A2, h0, *, stages=8, cpt=1):
  """Every segment's incoming state (b, s, n, e) float32 from pass 1's outputs, h_loc (b, s - 1, n, e) and dsum
  (b, s - 1, e), A2 = A^T log2(e) (n, e) and h0 (b, n, e) float32 or None (zeros): one small launch, so that no
  pass-2 program repeats the chain of the segments before its own (`fwd_main(h_in=...)`). `stages` segments'
  rows in flight; `cpt` channels per thread."""
  b, K, n, e = h_loc.shape
  E = E_BLOCK * cpt
  stages = _stages(stages, K)
  ins = [h_loc, dsum, A2] + ([] if h0 is None else [h0])
  call = plgpu.kernel(
    functools.partial(_chain_kernel, stages=stages, E=E, has_h0=h0 is not None),
    out_type=jax.ShapeDtypeStruct((b, K + 1, n, e), jnp.float32),
    scratch_types=[
      plgpu.SMEM((stages, n, E), jnp.float32),
      plgpu.SMEM((stages, 1, E), jnp.float32),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),
    ],
    grid=(e // E, b),
    grid_names=("e", "b"),
    compiler_params=plgpu.CompilerParams(**_PARAMS),
  )
  return call(*ins)


def _call(
  meta,
  ins,
  out_type,
  write_y,
  has_z,
  bc_width,
  dtype,
  T,
  stages,
  cpt,
  save=False,
  poly=0,
  has_h0=True,
  segments=None,
  has_hin=False,
):
  b, lp, e = ins[0].shape
  E = E_BLOCK * cpt
  ring = lambda width, dt: plgpu.SMEM((stages, T, width), dt)  # noqa: E731
  scratch = [ring(E, ins[0].dtype), ring(E, ins[1].dtype)]
  if has_z:
    scratch.append(ring(E, dtype))
  scratch.append(ring(bc_width, jnp.float32))
  scratch.append(plgpu.SMEM((2, T, E), out_type[0].dtype) if write_y else plgpu.SMEM((1,), jnp.float32))
  scratch.append(plgpu.Barrier(num_arrivals=3 + has_z, num_barriers=stages))
  call = plgpu.kernel(
    functools.partial(
      _kernel,
      meta=meta,
      T=T,
      stages=stages,
      write_y=write_y,
      save=save,
      E=E,
      poly=poly,
      has_h0=has_h0,
      has_hin=has_hin,
    ),
    out_type=out_type,
    scratch_types=scratch,
    grid=(e // E, meta.S if segments is None else segments, b),
    grid_names=("e", "s", "b"),
    compiler_params=plgpu.CompilerParams(**_PARAMS),
  )
  return call(*ins)


def bc_rows(B, C):
  """Pass 2's [B_t, C_t] rows (b, l, 2n) float32, which pass 1 reads its B from (one conversion for both)."""
  return jnp.concatenate([B, C], axis=-1).astype(jnp.float32)


def segment_states(meta, u, delta, A2, B, delta_bias, *, T=16, stages=2, cpt=1, poly=0):
  """Pass 1 from the padded inputs: (h_out (b, s - 1, n, e), dsum (b, s - 1, e)) float32 for every segment but
  the last, as `pallas_triton`'s.
  A2 = A^T log2(e) (n, e) float32; B (b, l, n), or `bc_rows` (b, l, 2n), of which it copies the first n columns;
  T steps per copy, `stages` buffers, `cpt` channels per thread; the decays of the last `poly` of the n states on
  the FMA units (`exp2_fma`)."""
  b, lp, e = u.shape
  n = A2.shape[0]
  T = _divisor_up_to(meta.seg_len, T)
  ins = [u, delta, A2, B.astype(jnp.float32)] + ([delta_bias] if meta.has_bias else [])
  f32 = jnp.float32
  S1 = meta.S - 1
  out = [jax.ShapeDtypeStruct((b, S1, n, e), f32), jax.ShapeDtypeStruct((b, S1, e), f32)]
  stages = _stages(stages, meta.seg_len // T)
  return tuple(_call(meta, ins, out, False, False, n, u.dtype, T, stages, cpt, poly=poly, segments=S1))


def fwd_main(
  meta, u, delta, A2, B, C, D, z, delta_bias, h0, seg, *, T=16, stages=2, cpt=1, save=False, poly=0, h_in=None
):
  """Pass 2 from the padded inputs: (y (b, l, e), the last state (b, n, e) float32[, h_sub (b, l / K, n, e)
  float32 the state before every K = `meta.unroll_bwd`-th step, with `save`]). h0 (b, n, e) float32, or None for
  zeros (no array to build and read); seg: pass 1's outputs (None with one segment), which each program chains up
  to its own segment; or h_in (b, s, n, e) float32, every segment's incoming state (`chain_states`; then h0 and seg
  are not read). With `save`, T is a multiple of K. `poly`: as `segment_states`'."""
  b, lp, e = u.shape
  n = A2.shape[0]
  T = _divisor_up_to(meta.seg_len, T, meta.unroll_bwd if save else 1)
  ins = [u, delta, A2, bc_rows(B, C)]
  ins += [D] if meta.has_d else []
  ins += [z] if meta.has_z else []
  ins += [delta_bias] if meta.has_bias else []
  if h_in is not None:
    ins.append(h_in)
    h0 = seg = None
  ins += ([] if h0 is None else [h0]) + ([] if seg is None else list(seg))
  out = [jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct((b, n, e), jnp.float32)]
  out += [jax.ShapeDtypeStruct((b, lp // meta.unroll_bwd, n, e), jnp.float32)] if save else []
  zdt = z.dtype if z is not None else u.dtype
  stages = _stages(stages, meta.seg_len // T)
  return tuple(
    _call(
      meta, ins, out, True, meta.has_z, 2 * n, zdt, T, stages, cpt, save=save, poly=poly, has_h0=h0 is not None,
      has_hin=h_in is not None,
    )
  )  # fmt: skip


def segment_adjoints(meta, delta, dy, A2, C, z, delta_bias, *, T=16, stages=2, cpt=1, poly=0):
  """Backward pass 1 from the padded inputs: each segment's adjoint carry from a zero adjoint at its end
  (b, s, n, e) float32, as `pallas_triton`'s `selective_scan_bwd_segment_adjoints` with `bwd_rows`.
  A2 = A^T log2(e) (n, e) float32; dy the cotangent of y (b, l, e). `poly`: as `segment_states`'."""
  b, lp, e = delta.shape
  n = A2.shape[0]
  T = _divisor_up_to(meta.seg_len, T)
  stages = _stages(stages, meta.seg_len // T)
  E = E_BLOCK * cpt
  ins = [delta, dy, A2, C.astype(jnp.float32)] + ([z] if meta.has_z else []) + ([delta_bias] if meta.has_bias else [])
  ring = lambda a: plgpu.SMEM((stages, T, E), a.dtype)  # noqa: E731
  scratch = [ring(delta), ring(dy)] + ([ring(z)] if meta.has_z else [])
  scratch += [plgpu.SMEM((stages, T, n), jnp.float32), plgpu.Barrier(num_arrivals=3 + meta.has_z, num_barriers=stages)]
  call = plgpu.kernel(
    functools.partial(_adjoint_kernel, meta=meta, T=T, stages=stages, E=E, poly=poly),
    out_type=jax.ShapeDtypeStruct((b, meta.S, n, e), jnp.float32),
    scratch_types=scratch,
    grid=(e // E, meta.S, b),
    grid_names=("e", "s", "b"),
    compiler_params=plgpu.CompilerParams(**_PARAMS),
  )
  return call(*ins)


def _stages(want, K):
  return max(1, min(want, K))


__all__ = ["E_BLOCK", "bc_rows", "chain_states", "exp2_fma", "fwd_main", "segment_adjoints", "segment_states"]
