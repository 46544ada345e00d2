"""Mamba2 SSD (chunked state-space duality) as Pallas GPU kernels (Triton lowering), forward and backward.

Shape legend: b batch, l length, c chunks, k chunks in a segment, s segments, t/u positions in a chunk,
h heads, p head dim, g groups, r heads per group, n state.

Design (see benchmarks/results/scans.md for measurements):
  * The sequence is cut into chunks of `T` tokens (`SSDConfig.block_t`, a tuning parameter: the result does
    not depend on it beyond float rounding, so the caller's `chunk_size` is only a hint) and the chunks into
    `s` segments of `k` chunks. One program owns one (batch, head, segment) and walks its chunks in order,
    keeping the (p, n) state in registers: there is no chunk-state round trip through memory in the
    forward pass, and the number of programs (b * h * s) is chosen to fill the GPU at any length.
  * Forward = 2 launches: (1) a Pallas kernel computes each segment's state from a zero start; (2) the main
    Pallas kernel chains those end states (from the initial state) up to its own segment, a few (p, n) steps,
    then recomputes the segment from its true incoming state and writes y with D and the z gate fused. Step 1
    only does the state half of the chunk math, so the whole forward costs ~1.3x the FLOPs of one pass. (Round 5
    ran an XLA scan over segments between the launches, a few small kernels and a (b, h, s, p, n) array written
    and read; chaining in the kernel took the H100 stream time at 8K from 0.270 to 0.255 ms, scans.md round 6.)
  * Backward = adjoint passes and a chunk-parallel gradient kernel. Under `jax.vjp` the forward stores every
    chunk-entry state (in the dots' operand dtype: the dots read them in that dtype anyway, and it halves their
    traffic for bf16). The adjoint passes are the forward's pattern in reverse: a Pallas kernel per (batch, head,
    segment) walks the chunks backwards from a zero adjoint, a tiny XLA scan over segments gives each segment
    end's true adjoint, and a second walk from it stores the adjoint at every chunk end (and its inner product
    with the chunk-entry state, which the decay's gradient needs). With a gate, the forward also saves the output
    before it (in the input dtype, as the official kernels do), and the gate's backward (dz, and the gradient
    of the scan output in the input dtype) is one elementwise XLA fusion, so no backward kernel sees the gate
    (in the chunk kernel the gate's extra live tiles cost ~2x). Then one program per (H heads of a group,
    chunk, batch), independent of every other, writes dx, d(dt), d(log-decay cumsum), dB and dC summed over
    its H heads, and dD per chunk; it reads the stored states and adjoints only as dot operands.
    Thousands of independent programs hide the latency of the small matrix products that bound the earlier
    design (one program per segment walking its chunks backwards: 2-3x slower on an H100). The heads' dB/dC and
    dD partial sums are finished in XLA; with half-precision inputs the dB/dC terms are float16 rows with a
    float32 scale each (`SSDConfig.bwd_partials`: half the bytes of float32, rounding within 2^-12 of each row's
    largest term; the 64K forward+backward 8.61 -> 8.01 ms on an H200, dB/dC error +0.2%, scans.md round 15).
    dt_bias/softplus/clamp, A and the cumsum are differentiated by XLA (they are cheap elementwise/scan ops on
    (b, h, l) float32 arrays).
  * Triton and Mosaic GPU, chosen by measurement (benchmarks/results/scans.md, rounds 13-15, H200): the
    forward's two kernels also exist in Mosaic GPU (`pallas_mosaic.py`, TMA rings and warpgroup matrix products):
    the main kernel 11-18% and the segment-state kernel 1.2-1.8x faster than this file's at 8K-64K tokens, the
    whole forward 0.214 / 0.690 / 1.307 ms against 0.250 / 0.858 / 1.509 all-Triton (stream), so on a Hopper GPU
    they are the default (`SSDConfig.fwd_main_lowering`, `mosaic_segment_states`), under `jax.vjp` too
    (`mosaic_vjp_forward`: the Mosaic GPU main kernel copies out the chunk-entry states as it holds them,
    transposed, and the backward's kernels take them so, `transposed_states`; 64K forward+backward 8.00 -> 7.59
    ms, round 15). The backward's kernels stay Triton: they run in Pallas interpret mode on the CPU (CI tests
    them there; the GPU interpreter of jax 0.10 cannot run Mosaic GPU kernels with layouts), and the chunk
    kernel, the one that bounds it (3.5 of 7.6 ms at 64K, round 15), has nine small products and was not ported
    (time).
  * 64-bit safety: every BlockSpec block starts at a per-dimension block index (no flattened offsets in
    our code), and the Pallas Triton lowering switches pointer offsets to int64 for arrays above 4 GiB;
    in-kernel `pl.ds` starts stay below the segment length.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mamba_jax.ops._dt import process_dt
from mamba_jax.ops._kernel_refs import split_refs
from mamba_jax.ops._lowering import use_mosaic

_SQ = pl.squeezed if hasattr(pl, "squeezed") else None


@dataclasses.dataclass(frozen=True)
class SSDConfig:
  """Block sizes and launch parameters.

  Attributes:
    block_t: tokens per chunk in the forward kernels (a power of two, >= 16).
    block_t_bwd: tokens per chunk under `jax.vjp` (forward and backward kernels); divides `block_t`.
    target_programs: aim for at least this many programs (b * h * segments) per forward launch.
    target_programs_bwd: the same for the backward's adjoint pass (its segments are independent of the
      forward's: the forward stores every chunk-entry state).
    num_warps: warps per program of the forward kernels and the backward's adjoint pass.
    num_stages: Triton software-pipelining depth of the chunk loop.
    num_warps_bwd, num_stages_bwd: the same for the backward's chunk kernel.
    heads_per_program_bwd: heads of one group handled by one program of the backward's chunk kernel (rounded
      down to a power of two dividing the heads per group); they share the C B^T product, and their dB and dC
      are summed in the kernel, which divides the per-head dB/dC partials' traffic by this number.
    bwd_partials: how the backward's chunk kernel stores each program's dB and dC terms, which XLA then sums
      over the heads of a group. With float32 inputs they are always float32. With bf16/fp16 inputs:
      "float32"; "scaled_fp16", float16 rows scaled so that each (token, head) row's largest magnitude is
      2^14, with the float32 scale stored beside them (rounding within 2^-12 of the row's largest term, 8x
      finer than bf16; float32's range); or "input", the inputs' dtype (a plain rounding of every per-head
      term; with fp16 inputs also fp16's range, so large or tiny terms overflow or flush). Both halve the
      partials' bytes, written by the kernel and read by the reduction. "scaled_fp16" needs
      heads_per_program_bwd = 1; "auto" is "scaled_fp16" there and "float32" otherwise (round 15 of
      benchmarks/results/scans.md: on an H200 it took the 64K-token forward+backward from 8.605 to ~8.0 ms and
      the dB/dC errors against float32 XLA from 3.308e-3 to 3.315e-3; "input" was faster still, but raised them
      to 3.70e-3).
    fwd_main_lowering: the lowering of the forward's main kernel: "triton", "mosaic"
      (Pallas Mosaic GPU, `pallas_mosaic.py`: 11-15% faster than the Triton main kernel on an H200, round 13 of
      benchmarks/results/scans.md) or "auto" (Mosaic GPU on a Hopper GPU where the shapes suit its matrix
      units: 64-token chunks, bf16/fp16 inputs, head dim and state multiples of 64; Triton otherwise). The
      backward is Triton in every case; the forward under `jax.vjp` follows `mosaic_vjp_forward`.
    mosaic_stages: shared-memory buffers of chunk tiles in the Mosaic GPU main kernel (1: the fastest on an H200).
    mosaic_segment_states: with the Mosaic GPU main kernel, compute the segments' end states (the forward's first
      launch) in Mosaic GPU too (`pallas_mosaic.segment_states`: one warpgroup matrix product per chunk) instead of
      Triton (1.2-1.8x faster than the Triton kernel at 8K-64K on an H200, round 14 of benchmarks/results/scans.md).
    mosaic_state_stages: shared-memory buffers of chunk tiles in the Mosaic GPU segment-state kernel (2: the
      fastest of 1-3 on an H200).
    mosaic_vjp_forward: with the Mosaic GPU main kernel (and 64-token backward chunks), run the forward under
      `jax.vjp` in Mosaic GPU too: it stores the chunk-entry states as it holds them, transposed (n, p), and the
      backward's kernels then hold states and adjoints transposed (`transposed_states`). Off: the Triton forward
      stores them (with the Mosaic GPU segment states when `mosaic_segment_states`).
    transposed_states: the backward's layout of the stored states and of the adjoints, (n, p) instead of (p, n);
      None: (n, p) exactly when the Mosaic GPU forward stores them. True with the Triton forward runs the same
      backward kernels in Pallas interpret mode (CPU tests).
    Defaults: the fastest of small sweeps on an H100 (benchmarks/bench_scans.py --tune, benchmarks/profile_ssd_fwd.py;
      benchmarks/results/scans.md).
  """

  block_t: int = 64
  block_t_bwd: int = 64
  target_programs: int = 264
  target_programs_bwd: int = 528
  num_warps: int = 4
  num_stages: int = 2
  num_warps_bwd: int = 4
  num_stages_bwd: int = 1
  heads_per_program_bwd: int = 1
  bwd_partials: str = "auto"
  fwd_main_lowering: str = "auto"
  mosaic_stages: int = 1
  mosaic_segment_states: bool = True
  mosaic_state_stages: int = 2
  mosaic_vjp_forward: bool = True
  transposed_states: bool | None = None


DEFAULT_CONFIG = SSDConfig()


# ----------------------------------------------------------------------------------------------------------------------
# Helpers used inside kernels.


def _mm(a, b, *, ta=False, tb=False, cdt=jnp.float32):
  """(a or a^T) @ (b or b^T) with `cdt` operands and float32 accumulation."""
  a = a.astype(cdt)
  b = b.astype(cdt)
  dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
  prec = jax.lax.Precision.HIGHEST if cdt == jnp.float32 else None
  return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _last(v, T):
  """v[T - 1] of a (T,) vector as a scalar (a masked sum: Triton has no element extraction)."""
  return jnp.sum(jnp.where(jax.lax.broadcasted_iota(jnp.int32, (T,), 0) == T - 1, v, 0.0))


def _decay_matrix(c, T):
  """L[t, u] = exp(c_t - c_u) for u <= t else 0, (T, T) float32."""
  row = jax.lax.broadcasted_iota(jnp.int32, (T, T), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (T, T), 1)
  return jnp.exp(jnp.where(row >= col, c[:, None] - c[None, :], -jnp.inf))


def _silu_parts(z):
  sig = jax.nn.sigmoid(z)
  return z * sig, sig * (1.0 + z * (1.0 - sig))


# ----------------------------------------------------------------------------------------------------------------------
# Forward kernels.


def _fwd_segment_state_kernel(x_ref, dt_ref, cs_ref, b_ref, out_ref, *, T, K, cdt):
  """State at the end of one segment from a zero start.

  Refs: x (k*T, p), dt (k*T,), cs (k*T,), B (k*T, n) -> out (p, n) float32.
  """
  p, n = out_ref.shape

  def body(k, S):
    sl = pl.ds(k * T, T)
    x = x_ref[sl, :].astype(jnp.float32)  # (t, p)
    dt = dt_ref[sl]  # (t,)
    c = cs_ref[sl]  # (t,)
    c_end = _last(c, T)
    w = (jnp.exp(c_end - c) * dt)[:, None] * x  # (t, p)
    return jnp.exp(c_end) * S + _mm(w, b_ref[sl, :], ta=True, cdt=cdt)  # (p, n)

  out_ref[...] = jax.lax.fori_loop(0, K, body, jnp.zeros((p, n), jnp.float32))


def _fwd_kernel(*refs, T, K, cdt, has_d, has_z, save_states, chain, tr=False):
  """y for one (batch, head, segment), walking its chunks from the segment's incoming state.

  Refs: x (k*T, p), dt (k*T,), cs (k*T,), B (k*T, n), C (k*T, n), [D (p,)], [z (k*T, p)], S0 (p, n) the scan's
  initial state, [when `chain`: S_loc (s, p, n) every segment's end state from a zero start and dec (s,) every
  segment's total decay]
  -> y (k*T, p), [chunk-entry states (k, p, n) ((k, n, p) with `tr`) in the dots' operand dtype, [the output
  before the gate (k*T, p)]].
  The segment's incoming state is chained here from S0 through the segments before it (a few (p, n) steps), so the
  forward needs no XLA scan over segments between its two launches.
  """
  named, _ = split_refs(refs, *[True] * 5, has_d, has_z, True, chain, chain, True, save_states, save_states and has_z)
  x_ref, dt_ref, cs_ref, b_ref, c_ref, d_ref, z_ref, s0_ref, sloc_ref, dec_ref, y_ref, st_ref, yp_ref = named

  def body(k, S):
    sl = pl.ds(k * T, T)
    if save_states:
      st_ref[k] = (S.T if tr else S).astype(st_ref.dtype)
    xr = x_ref[sl, :]
    x = xr.astype(jnp.float32)  # (t, p)
    dt = dt_ref[sl]  # (t,)
    c = cs_ref[sl]  # (t,)
    Bm = b_ref[sl, :]  # (t, n)
    Cm = c_ref[sl, :]  # (t, n)
    c_end = _last(c, T)
    cb = _mm(Cm, Bm, tb=True, cdt=cdt)  # (t, u)
    M = cb * _decay_matrix(c, T) * dt[None, :]  # (t, u)
    y_state = jnp.exp(c)[:, None] * _mm(Cm, S, tb=True, cdt=cdt)  # (t, p) the incoming state's contribution
    y = _mm(M, xr, cdt=cdt) + y_state  # (t, p)
    if has_d:
      y = y + d_ref[...][None, :] * x
    if has_z:
      if yp_ref is not None:
        yp_ref[sl, :] = y.astype(yp_ref.dtype)
      y = y * _silu_parts(z_ref[sl, :].astype(jnp.float32))[0]
    y_ref[sl, :] = y.astype(y_ref.dtype)
    w = (jnp.exp(c_end - c) * dt)[:, None] * x  # (t, p)
    return jnp.exp(c_end) * S + _mm(w, Bm, ta=True, cdt=cdt)  # (p, n)

  S_in = s0_ref[...]
  if chain:
    S_in = jax.lax.fori_loop(0, pl.program_id(1), lambda j, S: dec_ref[j] * S + sloc_ref[j], S_in)
  jax.lax.fori_loop(0, K, body, S_in)


# ----------------------------------------------------------------------------------------------------------------------
# Backward kernels.


def _bwd_segment_state_kernel(dy_ref, cs_ref, c_ref, out_ref, *, T, K, cdt, tr):
  """Adjoint state at the start of one segment from a zero adjoint at its end.

  Refs: dy (k*T, p) the gradient of the scan output (after the gate's backward), cs (k*T,), C (k*T, n)
  -> out (p, n) float32 ((n, p) with `tr`).
  """

  def body(i, G):
    return _adjoint_step(dy_ref, cs_ref, c_ref, K - 1 - i, G, T, cdt, tr)

  out_ref[...] = jax.lax.fori_loop(0, K, body, jnp.zeros(out_ref.shape, jnp.float32))


def _adjoint_step(dy_ref, cs_ref, c_ref, k, G, T, cdt, tr):
  """The adjoint at chunk k's start from the adjoint G (p, n) at its end (G^T (n, p) with `tr`)."""
  sl = pl.ds(k * T, T)
  c = cs_ref[sl]
  dy = jnp.exp(c)[:, None] * dy_ref[sl, :].astype(jnp.float32)
  dG = _mm(c_ref[sl, :], dy, ta=True, cdt=cdt) if tr else _mm(dy, c_ref[sl, :], ta=True, cdt=cdt)
  return jnp.exp(_last(c, T)) * G + dG


def _bwd_adjoint_kernel(dy_ref, cs_ref, c_ref, st_ref, g0_ref, g_ref, gs_ref, *, T, K, cdt, tr):
  """The adjoint state at every chunk end of one segment, from the true adjoint at the segment's end.

  Refs: dy (k*T, p), cs (k*T,), C (k*T, n), chunk-entry states (k, p, n), adjoint at the segment's end (p, n)
  -> adjoint at each chunk's end (k, p, n) in the states' dtype, and <adjoint at the chunk's end, state at its
  start> repeated over the chunk's tokens (k*T,) float32. With `tr` the states and adjoints are (n, p).
  """

  def body(i, G):
    k = K - 1 - i
    g_ref[k] = G.astype(g_ref.dtype)
    gs_ref[pl.ds(k * T, T)] = jnp.full((T,), jnp.sum(G * st_ref[k].astype(jnp.float32)))
    return _adjoint_step(dy_ref, cs_ref, c_ref, k, G, T, cdt, tr)

  jax.lax.fori_loop(0, K, body, g0_ref[...])


def _bwd_chunk_kernel(*refs, T, H, cdt, has_d, scaled, tr):
  """All gradients of one chunk of `H` heads of one group, independent of every other chunk.

  Refs in: x (t, H, p), dt (H, t), cs (H, t), B (t, n), C (t, n), [D (H, p)], dy (t, H, p) the gradient of the
    scan output (after the gate's backward),
    chunk-entry states S (H, p, n), adjoint at the chunk end G (H, p, n) ((H, n, p) both, with `tr`),
    <G, S> (H, t) (constant over t).
  Refs out: dx (t, H, p), ddt (H, t), dcs (H, t), dB and dC summed over the H heads (t, n) (with `scaled`: float16
    rows, and their float32 scales (t, 1) each), [dD partial (H, p)].
  """
  named, _ = split_refs(refs, *[True] * 5, has_d, *[True] * 9, scaled, scaled, has_d)
  x_ref, dt_ref, cs_ref, b_ref, c_ref, d_ref, dy_ref, st_ref, g_ref, gs_ref, dx_ref = named[:11]
  ddt_ref, dcs_ref, db_ref, dc_ref, db_scale_ref, dc_scale_ref, dd_ref = named[11:]
  last = jax.lax.broadcasted_iota(jnp.int32, (T,), 0) == T - 1
  Bm = b_ref[...]  # (t, n)
  Cm = c_ref[...]  # (t, n)
  cb = _mm(Cm, Bm, tb=True, cdt=cdt)  # (t, u), shared by the group's heads
  # The statements are ordered so that each large intermediate dies early (its last use follows soon after it is
  # made, and results are stored as soon as they are final). Registers, not FLOPs, bound this kernel: this order
  # and bf16 states took the 32K-token fwd+bwd from 20.6 to 8.6 ms on an H100 (benchmarks/results/scans.md).
  for j in range(H):
    xr = x_ref[:, j, :]
    x = xr.astype(jnp.float32)  # (t, p)
    dt = dt_ref[j, :]  # (t,)
    c = cs_ref[j, :]  # (t,)
    c_end = _last(c, T)
    ec = jnp.exp(c)  # (t,)
    edec = jnp.exp(c_end - c)  # (t,)
    cbL = cb * _decay_matrix(c, T)  # (t, u)
    S = st_ref[j]  # (p, n) state entering the chunk, in the dots' operand dtype (only dots read it)
    y_state = ec[:, None] * _mm(Cm, S, tb=not tr, cdt=cdt)  # (t, p) the incoming state's part of the scan output
    dy = dy_ref[:, j, :].astype(jnp.float32)  # (t, p)
    if has_d:
      Dv = d_ref[j, :][None, :]
      dd_ref[j, :] = jnp.sum(dy * x, axis=0)
    dcs = jnp.sum(dy * y_state, axis=1)  # (t,)
    G = g_ref[j]  # (p, n) adjoint of the state leaving the chunk, like S
    GS = _last(gs_ref[j, :], T)  # <G, S>, from the adjoint pass's float32 values
    dtx = dt[:, None] * x  # (t, p)
    # P[t, u] = (dy_t . dt_u x_u) L[t, u];  W[t, u] = P[t, u] cb[t, u].
    R = _mm(dy, dtx, tb=True, cdt=cdt)  # (t, u)
    P = R * _decay_matrix(c, T)
    dC = _mm(P, Bm, cdt=cdt) + ec[:, None] * _mm(dy, S, tb=tr, cdt=cdt)  # (t, n)
    _store_partial(dc_ref, dc_scale_ref, dC, j)
    # d/dc_t, arranged so that terms which cancel in exact arithmetic cancel exactly here too (the
    # diagonal of W, and the q terms against <G, S_out>).
    # (Taking rowsum(W) from a saved full scan output instead breaks the first cancellation: with bf16 operands
    # the A and dt_bias gradients then lose an order of magnitude of accuracy.)
    W = R * cbL  # (t, u)
    dcs = dcs + jnp.sum(W, axis=1) - jnp.sum(W, axis=0)
    dB = _mm(P, Cm, ta=True, cdt=cdt) + edec[:, None] * _mm(dtx, G, tb=tr, cdt=cdt)  # (t, n)
    _store_partial(db_ref, db_scale_ref, dB, j)
    BG = _mm(Bm, G, tb=not tr, cdt=cdt)  # (t, p)
    q = edec * dt * jnp.sum(x * BG, axis=1)  # (t,)
    dcs_ref[j, :] = dcs - q + jnp.where(last, jnp.exp(c_end) * GS + jnp.sum(q), 0.0)
    dxs = _mm(cbL, dy, ta=True, cdt=cdt) + edec[:, None] * BG  # (t, p)
    dx = dt[:, None] * dxs
    if has_d:
      dx = dx + Dv * dy
    dx_ref[:, j, :] = dx.astype(dx_ref.dtype)
    ddt_ref[j, :] = jnp.sum(x * dxs, axis=1)


_SCALED_TOP = 2.0**14  # a scaled float16 row's largest magnitude (float16's largest finite value is 65504)
_SCALED_TINY = 2.0**-110  # rows below this magnitude are scaled as if it were their largest: 2^14 / it is finite


def _store_partial(ref, scale_ref, v, j):
  """A (t, n) dB or dC term into its output block: with `scale_ref` (one head per program), each token's row
  v_t * (2^14 / max_n |v_t|) in float16 and its scale max_n |v_t| / 2^14 in float32 (a reduction along n stays
  within a warp); else ref = v for the first head of a program, ref += v after (the output block belongs to this
  program), in ref's dtype."""
  if scale_ref is None:
    ref[...] = (v if j == 0 else ref[...].astype(jnp.float32) + v).astype(ref.dtype)
    return
  m = jnp.maximum(jnp.max(jnp.abs(v), axis=1), _SCALED_TINY)  # (t,)
  ref[...] = (v * (_SCALED_TOP / m)[:, None]).astype(ref.dtype)
  scale_ref[:, 0] = m / _SCALED_TOP


# ----------------------------------------------------------------------------------------------------------------------
# Wrappers: grids and BlockSpecs.


@dataclasses.dataclass(frozen=True)
class _Meta:
  """Static description of one call (hashable: it is a `custom_vjp` non-differentiable argument)."""

  T: int
  K: int  # chunks per segment
  S: int  # segments
  g: int
  has_d: bool
  has_z: bool
  num_warps: int
  num_stages: int
  interpret: bool
  mosaic_fwd: bool = False  # the plain forward's main kernel in Mosaic GPU
  mosaic_stages: int = 1
  mosaic_states: bool = False  # with `mosaic_fwd`, the segment-state kernel in Mosaic GPU too
  mosaic_state_stages: int = 2

  # The backward: (chunk length, chunk-kernel warps, chunk-kernel stages, adjoint-pass segments, heads per program).
  bwd: tuple[int, int, int, int, int] = (64, 8, 1, 1, 1)
  bwd_partials: str = "float32"  # `SSDConfig.bwd_partials`, "float32" for float32 inputs
  mosaic_vjp: bool = False  # the forward under `jax.vjp` in Mosaic GPU (it stores transposed states)
  states_t: bool = False  # stored chunk states and the backward's adjoints transposed, (n, p)

  def state_dims(self, p: int, n: int) -> tuple[int, int]:
    """The trailing dims of stored chunk states and of the backward's adjoints: (p, n), or (n, p) transposed."""
    return (n, p) if self.states_t else (p, n)

  def for_vjp(self) -> "_Meta":
    """The forward under `jax.vjp`: the same segments cut into the backward's chunks."""
    t = self.bwd[0]
    return dataclasses.replace(self, T=t, K=self.K * self.T // t)

  def for_bwd(self) -> "_Meta":
    """The backward's adjoint pass: the backward's chunks and segments, the forward's launch parameters."""
    t, _, _, s, _ = self.bwd
    return dataclasses.replace(self, T=t, S=s, K=self.S * self.K * self.T // (t * s))


def _cdt(dtype):
  return dtype if dtype in (jnp.bfloat16, jnp.float16) else jnp.float32


def _specs(meta, b, h, p, n):
  """BlockSpecs over the grid (h, s, b) for the tensor layouts used by the segment kernels."""
  KT = meta.K * meta.T
  r = h // meta.g
  seq_hp = pl.BlockSpec((_SQ, KT, _SQ, p), lambda hi, si, bi: (bi, si, hi, 0))  # (b, l, h, p)
  seq_gn = pl.BlockSpec((_SQ, KT, _SQ, n), lambda hi, si, bi: (bi, si, hi // r, 0))  # (b, l, g, n)
  seq_h = pl.BlockSpec((_SQ, _SQ, KT), lambda hi, si, bi: (bi, hi, si))  # (b, h, l)
  head_p = pl.BlockSpec((_SQ, p), lambda hi, si, bi: (hi, 0))  # (h, p)
  seg_pn = pl.BlockSpec((_SQ, _SQ, _SQ, p, n), lambda hi, si, bi: (bi, hi, si, 0, 0))  # (b, h, s, p, n)
  init_pn = pl.BlockSpec((_SQ, _SQ, p, n), lambda hi, si, bi: (bi, hi, 0, 0))  # (b, h, p, n)
  all_seg_pn = pl.BlockSpec((_SQ, _SQ, meta.S, p, n), lambda hi, si, bi: (bi, hi, 0, 0, 0))  # (b, h, s, p, n)
  all_seg = pl.BlockSpec((_SQ, _SQ, meta.S), lambda hi, si, bi: (bi, hi, 0))  # (b, h, s)
  st = meta.state_dims(p, n)
  seg_st = pl.BlockSpec((_SQ, _SQ, _SQ, *st), lambda hi, si, bi: (bi, hi, si, 0, 0))  # (b, h, s, *st)
  chunks_st = pl.BlockSpec((_SQ, _SQ, meta.K, *st), lambda hi, si, bi: (bi, hi, si, 0, 0))  # (b, h, c, *st)
  return dict(
    seq_hp=seq_hp,
    seq_gn=seq_gn,
    seq_h=seq_h,
    head_p=head_p,
    seg_pn=seg_pn,
    init_pn=init_pn,
    all_seg_pn=all_seg_pn,
    all_seg=all_seg,
    seg_st=seg_st,
    chunks_st=chunks_st,
  )


def _call(kernel, meta, grid, in_specs, out_specs, out_shape, name, num_warps=None, num_stages=None):
  params = plgpu.CompilerParams(num_warps=num_warps or meta.num_warps, num_stages=num_stages or meta.num_stages)
  return pl.pallas_call(
    kernel,
    out_shape=out_shape,
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    compiler_params=params,
    interpret=meta.interpret,
    name=name,
  )


def _fwd_segment_states(meta, x, dtp, cs, B):
  """(b, h, s, p, n) float32 state at each segment's end from a zero start."""
  b, _, h, p = x.shape
  n = B.shape[-1]
  sp = _specs(meta, b, h, p, n)
  kernel = functools.partial(_fwd_segment_state_kernel, T=meta.T, K=meta.K, cdt=_cdt(x.dtype))
  return _call(
    kernel,
    meta,
    (h, meta.S, b),
    [sp["seq_hp"], sp["seq_h"], sp["seq_h"], sp["seq_gn"]],
    sp["seg_pn"],
    jax.ShapeDtypeStruct((b, h, meta.S, p, n), jnp.float32),
    "ssd_fwd_segment_states",
  )(x, dtp, cs, B)


def _fwd_main(meta, x, dtp, cs, B, C, D, z, S0, S_loc, dec, save_states):
  """y (b, l, h, p) and, when `save_states`, (the (b, h, c, p, n) chunk-entry states in the dots' operand dtype,
  with a gate the output before it (b, l, h, p), else None)."""
  b, l, h, p = x.shape
  n = B.shape[-1]
  sp = _specs(meta, b, h, p, n)
  chain = S_loc is not None
  kernel = functools.partial(
    _fwd_kernel,
    T=meta.T,
    K=meta.K,
    cdt=_cdt(x.dtype),
    has_d=meta.has_d,
    has_z=meta.has_z,
    save_states=save_states,
    chain=chain,
    tr=meta.states_t,
  )
  in_specs = [sp["seq_hp"], sp["seq_h"], sp["seq_h"], sp["seq_gn"], sp["seq_gn"]]
  args = [x, dtp, cs, B, C]
  if meta.has_d:
    in_specs.append(sp["head_p"])
    args.append(D)
  if meta.has_z:
    in_specs.append(sp["seq_hp"])
    args.append(z)
  in_specs.append(sp["init_pn"])
  args.append(S0)
  if chain:
    in_specs += [sp["all_seg_pn"], sp["all_seg"]]
    args += [S_loc, dec]
  out_specs = [sp["seq_hp"]]
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
  if save_states:
    out_specs.append(sp["chunks_st"])
    out_shape.append(jax.ShapeDtypeStruct((b, h, meta.S * meta.K, *meta.state_dims(p, n)), _cdt(x.dtype)))
    if meta.has_z:
      out_specs.append(sp["seq_hp"])
      out_shape.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
  outs = _call(kernel, meta, (h, meta.S, b), in_specs, out_specs, out_shape, "ssd_fwd")(*args)
  if not save_states:
    return outs[0], None
  return outs[0], (outs[1], outs[2] if meta.has_z else None)


def _bwd_segment_states(meta, dy, cs, C, h):
  """(b, h, s, p, n) float32 adjoint at each segment's start from a zero adjoint at its end ((b, h, s, n, p) with
  `meta.states_t`)."""
  b, _, _, p = dy.shape
  n = C.shape[-1]
  sp = _specs(meta, b, h, p, n)
  kernel = functools.partial(_bwd_segment_state_kernel, T=meta.T, K=meta.K, cdt=_cdt(dy.dtype), tr=meta.states_t)
  in_specs = [sp["seq_hp"], sp["seq_h"], sp["seq_gn"]]
  out_shape = jax.ShapeDtypeStruct((b, h, meta.S, *meta.state_dims(p, n)), jnp.float32)
  call = _call(kernel, meta, (h, meta.S, b), in_specs, sp["seg_st"], out_shape, "ssd_bwd_segment_states")
  return call(dy, cs, C)


def _bwd_adjoints(meta, dy, cs, C, states, G_seg):
  """The adjoint at every chunk end (b, h, c, p, n), in the states' dtype and layout ((b, h, c, n, p) with
  `meta.states_t`), and <it, the chunk-entry state> repeated over each chunk's tokens (b, h, l) float32."""
  b, l, h, p = dy.shape
  n = C.shape[-1]
  sp = _specs(meta, b, h, p, n)
  kernel = functools.partial(_bwd_adjoint_kernel, T=meta.T, K=meta.K, cdt=_cdt(dy.dtype), tr=meta.states_t)
  in_specs = [sp["seq_hp"], sp["seq_h"], sp["seq_gn"], sp["chunks_st"], sp["seg_st"]]
  out_shape = [jax.ShapeDtypeStruct(states.shape, states.dtype), jax.ShapeDtypeStruct((b, h, l), jnp.float32)]
  out_specs = [sp["chunks_st"], sp["seq_h"]]
  call = _call(kernel, meta, (h, meta.S, b), in_specs, out_specs, out_shape, "ssd_bwd_adjoints")
  return call(dy, cs, C, states, G_seg)


def _bwd_chunks(meta, x, dtp, cs, B, C, D, dy, states, G, GS):
  """All gradients, one program per (H heads, chunk, batch): dx, ddt, dcs, then dB and dC each as (its terms summed
  over each program's heads, their scales or None; `_sum_partials` finishes them), and dD's partial sums."""
  b, l, h, p = x.shape
  n = B.shape[-1]
  T, H = meta.T, meta.bwd[4]
  r = h // meta.g
  nc = l // T
  seq_hp = pl.BlockSpec((_SQ, T, H, p), lambda hb, ci, bi: (bi, ci, hb, 0))  # (b, l, h, p)
  seq_gn = pl.BlockSpec((_SQ, T, _SQ, n), lambda hb, ci, bi: (bi, ci, hb * H // r, 0))  # (b, l, g, n)
  seq_h = pl.BlockSpec((_SQ, H, T), lambda hb, ci, bi: (bi, hb, ci))  # (b, h, l)
  chunk_st = pl.BlockSpec((_SQ, H, _SQ, *meta.state_dims(p, n)), lambda hb, ci, bi: (bi, hb, ci, 0, 0))  # (b, h, c, .)
  sum_n = pl.BlockSpec((_SQ, T, _SQ, n), lambda hb, ci, bi: (bi, ci, hb, 0))  # (b, l, h // H, n)
  scaled = meta.bwd_partials == "scaled_fp16"
  part_dtype = {"float32": jnp.float32, "scaled_fp16": jnp.float16, "input": x.dtype}[meta.bwd_partials]
  kernel = functools.partial(
    _bwd_chunk_kernel, T=T, H=H, cdt=_cdt(x.dtype), has_d=meta.has_d, scaled=scaled, tr=meta.states_t
  )
  in_specs = [seq_hp, seq_h, seq_h, seq_gn, seq_gn]
  args = [x, dtp, cs, B, C]
  if meta.has_d:
    in_specs.append(pl.BlockSpec((H, p), lambda hb, ci, bi: (hb, 0)))
    args.append(D)
  in_specs += [seq_hp, chunk_st, chunk_st, seq_h]
  args += [dy, states, G, GS]
  out_specs = [seq_hp, seq_h, seq_h, sum_n, sum_n]
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
  out_shape += [jax.ShapeDtypeStruct((b, h, l), jnp.float32)] * 2
  out_shape += [jax.ShapeDtypeStruct((b, l, h // H, n), part_dtype)] * 2
  if scaled:  # the dB and dC rows' scales, (b, l, h), laid out as the partials' rows for the reduction
    out_specs += [pl.BlockSpec((_SQ, T, H), lambda hb, ci, bi: (bi, ci, hb))] * 2
    out_shape += [jax.ShapeDtypeStruct((b, l, h), jnp.float32)] * 2
  if meta.has_d:
    out_specs.append(pl.BlockSpec((_SQ, H, _SQ, p), lambda hb, ci, bi: (bi, hb, ci, 0)))  # (b, h, c, p)
    out_shape.append(jax.ShapeDtypeStruct((b, h, nc, p), jnp.float32))
  _, w, st, _, _ = meta.bwd
  call = _call(kernel, meta, (h // H, nc, b), in_specs, out_specs, out_shape, "ssd_bwd", num_warps=w, num_stages=st)
  outs = list(call(*args))
  dx, ddt, dcs, dB, dC = outs[:5]
  scales = outs[5:7] if scaled else (None, None)
  return dx, ddt, dcs, (dB, scales[0]), (dC, scales[1]), outs[-1] if meta.has_d else None


# ----------------------------------------------------------------------------------------------------------------------
# Segment-level scans (XLA; (b, h, s, p, n) arrays with s small).


def _chunk_ends(meta, cs):
  """Total log-decay of each chunk, (b, h, s, k)."""
  b, h, _ = cs.shape
  return cs.reshape(b, h, meta.S, meta.K, meta.T)[..., -1]


def _segment_decay(meta, cs):
  """exp(total log-decay of each segment), (b, h, s)."""
  return jnp.exp(_chunk_ends(meta, cs).sum(-1))


def _unroll(s):
  """Unroll the scans over segments: on a GPU each step of an XLA while loop costs a round trip to the host for
  its condition (~25 us; see the selective scan's notes), more than the step itself, and a model pays it in every
  layer. Long scans (tiny batch x heads) are unrolled in blocks to bound the program size."""
  return True if s <= 64 else 16


def _over_segments(S0, S_loc, dec, reverse=False):
  """Chains the segments: S <- dec_s * S + S_loc_s from S0, over s in order (or in reverse).

  Returns (the carry entering each segment's step, (b, h, s, p, n); the last carry, (b, h, p, n)). Forward: each
  segment's incoming state and the final state, from the initial state and each segment's local end state (the
  Mosaic GPU path passes them transposed, (n, p): the step is elementwise). Reverse (the backward): the adjoint at
  each segment's end and at the start of the sequence, from the final state's adjoint and each segment's local
  adjoint."""

  def step(S, inp):
    loc, d = inp
    return d[..., None, None] * S + loc, S

  xs = (jnp.moveaxis(S_loc, 2, 0), jnp.moveaxis(dec, 2, 0))
  S_last, S_each = jax.lax.scan(step, S0, xs, reverse=reverse, unroll=_unroll(dec.shape[2]))
  return jnp.moveaxis(S_each, 0, 2), S_last


# ----------------------------------------------------------------------------------------------------------------------
# The differentiable core on padded, preprocessed inputs.


def _core_fwd_impl(meta, x, dtp, cs, B, C, D, z, S0, save_states):
  dec = _segment_decay(meta, cs)
  if meta.mosaic_fwd and (meta.mosaic_vjp or not save_states):
    from mamba_jax.ops.ssd import pallas_mosaic  # noqa: PLC0415 (Mosaic GPU is loaded only where it runs)

    bt = pallas_mosaic.transposed_b(B)  # (b, g, n, l)
    S0_t = jnp.swapaxes(S0, -1, -2)  # the Mosaic GPU kernels hold the state transposed, (n, p)
    if meta.S == 1:
      S_in_t, S_fin = S0_t[:, :, None], _final_state_one_segment(meta, x, dtp, cs, B, S0)
    else:
      if meta.mosaic_states:
        S_loc_t = pallas_mosaic.segment_states(meta, x, dtp, cs, bt)  # (b, h, s, n, p)
      else:
        S_loc_t = jnp.swapaxes(_fwd_segment_states(meta, x, dtp, cs, B), -1, -2)
      S_in_t, S_fin_t = _over_segments(S0_t, S_loc_t, dec)
      S_fin = jnp.swapaxes(S_fin_t, -1, -2)
    if save_states:  # under `jax.vjp`: the chunk-entry states come out transposed (meta.states_t)
      y, states = pallas_mosaic.fwd_main(meta, x, dtp, cs, bt, C, D, z, S_in_t, save_states=True)
      return y, S_fin, states
    return pallas_mosaic.fwd_main(meta, x, dtp, cs, bt, C, D, z, S_in_t), S_fin, None
  if meta.S > 1:
    if meta.mosaic_states and meta.T == 64:  # under `jax.vjp`: the Mosaic GPU segment states feed the Triton kernel
      from mamba_jax.ops.ssd import pallas_mosaic  # noqa: PLC0415

      S_loc = jnp.swapaxes(pallas_mosaic.segment_states(meta, x, dtp, cs, pallas_mosaic.transposed_b(B)), -1, -2)
    else:
      S_loc = _fwd_segment_states(meta, x, dtp, cs, B)
    y, states = _fwd_main(meta, x, dtp, cs, B, C, D, z, S0, S_loc, dec, save_states)
    # The final state, in XLA; dead code (removed by XLA) unless the caller uses it.
    S_fin = _over_segments(S0, S_loc, dec)[1]
  else:
    y, states = _fwd_main(meta, x, dtp, cs, B, C, D, z, S0, None, None, save_states)
    # One segment: the final state is the last chunk's state advanced over the last chunk; recompute in XLA
    # cheaply only when asked (the caller drops it otherwise, and XLA removes dead code).
    S_fin = _final_state_one_segment(meta, x, dtp, cs, B, S0)
  return y, S_fin, states


def _final_state_one_segment(meta, x, dtp, cs, B, S0):
  S_loc = _fwd_segment_states(meta, x, dtp, cs, B)[:, :, 0]
  dec = _segment_decay(meta, cs)[:, :, 0]
  return dec[..., None, None] * S0 + S_loc


def _chunk_cumsum(meta, da):
  """Log-decay cumulated from each chunk's start, (b, h, l) float32."""
  b, h, l = da.shape
  return jnp.cumsum(da.reshape(b, h, l // meta.T, meta.T), axis=-1).reshape(b, h, l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(meta, x, dtp, da, B, C, D, z, S0):
  """(y, final state) from padded inputs; dtp and da = dtp * A are (b, h, l) float32."""
  cs = _chunk_cumsum(meta, da)
  y, S_fin, _ = _core_fwd_impl(meta, x, dtp, cs, B, C, D, z, S0, save_states=False)
  return y, S_fin


def _core_fwd(meta, x, dtp, da, B, C, D, z, S0):
  meta = meta.for_vjp()
  cs = _chunk_cumsum(meta, da)
  y, S_fin, (states, y_pre) = _core_fwd_impl(meta, x, dtp, cs, B, C, D, z, S0, save_states=True)
  return (y, S_fin), (x, dtp, cs, B, C, D, z, states, y_pre)


def _core_bwd(meta, res, cts):
  meta = meta.for_bwd()
  x, dtp, cs, B, C, D, z, states, y_pre = res
  dout, dS_fin = cts
  b, l, h, p = x.shape
  g, n = B.shape[-2:]
  dout = dout.astype(x.dtype)
  dz = None
  if meta.has_z:  # the gate's backward, elementwise in XLA; dy in the input dtype, as the official kernels do
    silu_z, dsilu_z = _silu_parts(z.astype(jnp.float32))
    dz = (dout.astype(jnp.float32) * y_pre.astype(jnp.float32) * dsilu_z).astype(z.dtype)
    dy = (dout.astype(jnp.float32) * silu_z).astype(x.dtype)
  else:
    dy = dout
  # Adjoint passes: local adjoints at the segment starts, the segment ends' true adjoints by a short scan over
  # segments, then the true adjoint at every chunk end.
  G_loc = _bwd_segment_states(meta, dy, cs, C, h)
  dS_fin = dS_fin.astype(jnp.float32)
  G_seg, G0 = _over_segments(jnp.swapaxes(dS_fin, -1, -2) if meta.states_t else dS_fin, G_loc,
                             _segment_decay(meta, cs), reverse=True)  # fmt: skip
  G0 = jnp.swapaxes(G0, -1, -2) if meta.states_t else G0
  G, GS = _bwd_adjoints(meta, dy, cs, C, states, G_seg)
  dx, ddt, dcs, dBh, dCh, dD = _bwd_chunks(meta, x, dtp, cs, B, C, D, dy, states, G, GS)
  dB = _sum_partials(*dBh, g).astype(B.dtype)
  dC = _sum_partials(*dCh, g).astype(C.dtype)
  if meta.has_d:
    dD = dD.sum((0, 2)).astype(D.dtype)
  # cs = chunk-local cumsum of da, so d(da)_j = sum over t >= j in j's chunk of d(cs)_t.
  dda = jnp.flip(jnp.cumsum(jnp.flip(dcs.reshape(b, h, l // meta.T, meta.T), -1), axis=-1), -1).reshape(b, h, l)
  return dx, ddt, dda, dB, dC, dD, dz, G0


def _sum_partials(part, scale, g):
  """(b, l, g, n) float32: the chunk kernel's (b, l, h', n) dB or dC terms summed over each group's programs, each
  row times its (b, l, h') scale when the terms are scaled float16 rows (scale None otherwise)."""
  part = part.astype(jnp.float32)
  if scale is not None:
    part = part * scale[..., None]
  b, l, hp, n = part.shape
  return part.reshape(b, l, g, hp // g, n).sum(3)


# optimize_remat: under `jax.checkpoint` the forward pass, whose residuals are dropped, runs the plain forward and
# only the backward pass's recomputation stores the chunk-entry states and the pre-gate output (see the same
# line in the selective scan).
_core.defvjp(_core_fwd, _core_bwd, optimize_remat=True)


# ----------------------------------------------------------------------------------------------------------------------
# Public function.


def _divisor_near(nc: int, b: int, h: int, target_programs: int) -> tuple[int, int | None]:
  """(wanted segments, the smallest divisor of nc in [want, 4 * want] or None) for b * h * segments >= target."""
  want = max(1, min(nc, -(-target_programs // (b * h))))
  return want, next((s for s in range(want, min(nc, 4 * want) + 1) if nc % s == 0), None)


def _segments(nc: int, b: int, h: int, target_programs: int) -> tuple[int, int]:
  """(segments, chunks per segment) with segments * chunks >= nc, preferring exact divisors of nc."""
  want, s = _divisor_near(nc, b, h, target_programs)
  if s is not None:
    return s, nc // s
  k = -(-nc // want)
  return -(-nc // k), k


def _heads_per_program(r: int, want: int) -> int:
  """The largest power of two <= `want` that divides the heads per group `r` (block shapes are powers of two)."""
  H = 1
  while H * 2 <= want and r % (H * 2) == 0:
    H *= 2
  return H


def _bwd_segments(nc: int, b: int, h: int, target_programs: int, fwd_segments: int) -> int:
  """Backward segments: a divisor of the nc (padded) backward chunks near the target, else the forward's."""
  s = _divisor_near(nc, b, h, target_programs)[1]
  return fwd_segments if s is None else s


def _use_mosaic_fwd(cfg: SSDConfig, T: int, p: int, n: int, dtype, interpret: bool) -> bool:
  """Whether the plain forward's main kernel runs in Mosaic GPU (see `SSDConfig.fwd_main_lowering`)."""
  fits = T == 64 and p % 64 == 0 and n % 64 == 0 and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  needs = (
    "64-token chunks (block_t=64), bf16/fp16 inputs, head dim and state multiples of 64 and a compiled run; got "
    f"block_t={T}, p={p}, n={n}, {jnp.dtype(dtype)}, interpret={interpret}"
  )
  return use_mosaic(cfg.fwd_main_lowering, "fwd_main_lowering", fits, interpret, needs)


def _bwd_partials(cfg: SSDConfig, dtype, heads_per_program: int) -> str:
  """`SSDConfig.bwd_partials`, checked, for inputs of `dtype` ("float32" for float32 inputs)."""
  if cfg.bwd_partials not in ("auto", "float32", "scaled_fp16", "input"):
    raise ValueError(f"bwd_partials must be 'auto', 'float32', 'scaled_fp16' or 'input', not {cfg.bwd_partials!r}")
  if _cdt(jnp.dtype(dtype)) == jnp.float32:
    return "float32"
  if cfg.bwd_partials == "auto":
    return "scaled_fp16" if heads_per_program == 1 else "float32"
  if cfg.bwd_partials == "scaled_fp16" and heads_per_program != 1:
    raise ValueError(
      "bwd_partials='scaled_fp16' scales each head's dB/dC rows, so it needs one head per program: set "
      f"heads_per_program_bwd=1 (got {cfg.heads_per_program_bwd}) or use bwd_partials='float32' or 'input'."
    )
  return cfg.bwd_partials


def _make_meta(
  cfg: SSDConfig, b: int, l: int, h: int, g: int, has_d: bool, has_z: bool, interpret: bool, mosaic_fwd=False,
  dtype=jnp.float32,
) -> _Meta:  # fmt: skip
  """Chunks, segments and launch parameters of one call; the padded length is meta.S * meta.K * meta.T."""
  T = cfg.block_t
  S, K = _segments(-(-l // T), b, h, cfg.target_programs)
  T_bwd = min(cfg.block_t_bwd, T)
  S_bwd = _bwd_segments(S * K * T // T_bwd, b, h, cfg.target_programs_bwd, S)
  H = _heads_per_program(h // g, cfg.heads_per_program_bwd)
  bwd = (T_bwd, cfg.num_warps_bwd, cfg.num_stages_bwd, S_bwd, H)
  mosaic_vjp = mosaic_fwd and cfg.mosaic_vjp_forward and T_bwd == 64
  if mosaic_vjp and cfg.transposed_states is False:
    raise ValueError(
      "the Mosaic GPU forward stores transposed states: set transposed_states=None (or True), or "
      "mosaic_vjp_forward=False for the Triton forward"
    )
  return _Meta(
    T, K, S, g, has_d, has_z, cfg.num_warps, cfg.num_stages, interpret, mosaic_fwd, cfg.mosaic_stages,
    mosaic_fwd and cfg.mosaic_segment_states, cfg.mosaic_state_stages, bwd=bwd,
    bwd_partials=_bwd_partials(cfg, dtype, H), mosaic_vjp=mosaic_vjp,
    states_t=mosaic_vjp or bool(cfg.transposed_states),
  )  # fmt: skip


def ssd_pallas(
  x: jax.Array,  # (b, l, h, p)
  dt: jax.Array,  # (b, l, h)
  A: jax.Array,  # (h,)
  B: jax.Array,  # (b, l, g, n)
  C: jax.Array,  # (b, l, g, n)
  chunk_size: int = 256,
  D: jax.Array | None = None,  # (h,) or (h, p)
  z: jax.Array | None = None,  # (b, l, h, p)
  dt_bias: jax.Array | None = None,  # (h,)
  dt_softplus: bool = False,
  dt_limit: tuple[float, float] = (0.0, math.inf),
  initial_states: jax.Array | None = None,  # (b, h, p, n)
  return_final_states: bool = False,
  *,
  interpret: bool = False,
  config: SSDConfig | None = None,
):
  """Same contract as `mamba_jax.ops.ssd`; differentiable in every array argument.

  Args:
    chunk_size: accepted for API compatibility; the kernels' chunk length is `config.block_t` (the result
      is the same function up to float rounding).
    interpret: run the kernels in the Pallas interpreter (CPU tests).
    config: block sizes; `DEFAULT_CONFIG` when None.
  """
  del chunk_size
  cfg = config or DEFAULT_CONFIG
  b, l, h, p = x.shape
  g, n = B.shape[-2:]
  if h % g:
    raise ValueError(f"nheads={h} must be a multiple of ngroups={g}")
  mosaic_fwd = _use_mosaic_fwd(cfg, cfg.block_t, p, n, x.dtype, interpret)
  meta = _make_meta(cfg, b, l, h, g, D is not None, z is not None, interpret, mosaic_fwd, x.dtype)
  pad = meta.S * meta.K * meta.T - l

  def pad_l(a, axis=1):
    if not pad:
      return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, pad)
    return jnp.pad(a, widths)

  # Time step and chunk-local cumulative log-decay, (b, h, l) float32; padded steps have dt = 0 (identity).
  dtp = jnp.swapaxes(process_dt(dt, dt_bias, dt_softplus, tuple(dt_limit)).astype(jnp.float32), 1, 2)
  dtp = pad_l(dtp, axis=2)
  da = dtp * A.astype(jnp.float32)[None, :, None]
  Dp = None
  if D is not None:
    Dp = jnp.broadcast_to((D[:, None] if D.ndim == 1 else D).astype(jnp.float32), (h, p))
  S0 = jnp.zeros((b, h, p, n), jnp.float32) if initial_states is None else initial_states.astype(jnp.float32)
  zp = None if z is None else pad_l(z)
  y, S_fin = _core(meta, pad_l(x), dtp, da, pad_l(B), pad_l(C), Dp, zp, S0)
  y = y[:, :l] if pad else y
  return (y, S_fin) if return_final_states else y


__all__ = ["SSDConfig", "DEFAULT_CONFIG", "ssd_pallas"]
