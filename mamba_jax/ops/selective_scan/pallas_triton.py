"""Mamba1 selective scan (channels-last) as Pallas GPU kernels (Triton lowering), forward and backward.

Shape legend: b batch, l length (padded to s * L_s), s segments, L_s segment length, k sub-chunks of K steps,
f channel blocks, e inner channels (d_inner), n state.

Design:
  * The recurrence h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t is elementwise in (e, n) with a decay that
    depends on n, so there is no matrix form to exploit; each program walks time step by step with its
    (n, e-block) state in registers. The time loop is unrolled `unroll` steps per iteration so that the loads
    of those steps are independent of the carried state and can all be in flight before the first is used.
  * The forward holds the state transposed, (n, e-block) with the channels last: Triton's default layout then
    gives each thread one channel and all n states, so the per-channel work of a step (softplus of delta, the
    z gate, D u, the y store) runs once per channel instead of once per (channel, state) and the y reduction
    over n stays inside a thread (no shuffles). B_t and C_t rows are broadcast to every thread (converted to
    float32 once, in XLA, so that each row is a few vector loads and no conversions). Measured on an H100
    (benchmarks/results/scans.md): the (e, n) layout spread n over 16 lanes and repeated the per-channel work
    16 times, which was most of the forward's instructions.
  * Parallelism beyond b * e / e_blk programs comes from cutting the sequence into segments: pass 1 computes
    each segment's end state from a zero start (and the segment's sum of delta), for all but the last segment,
    whose end state from zero nothing reads (its sum of delta, which the backward needs, is one XLA reduction
    there; round 25: 1 / s of pass 1's work, s = 32 at 8K tokens and batch 2); pass 2 first chains the end
    states of the segments before its own (decay exp(A * sum delta), a few steps of (n, e-block) work), then
    recomputes its segment from the true incoming state and writes y with D and the z gate fused. Two launches
    and no XLA scan between them (an XLA while loop over the segments cost ~25 us per segment, ~0.8 ms).
    delta_bias and softplus are applied inside the kernels. Tried and removed (H200, round 10, scans.md): a third
    small kernel that chained every segment's incoming state once, so that no main-kernel program repeats the
    chain of the segments before its own; at 8K it took the main kernel from 0.366 to 0.309 ms but cost 0.050
    ms itself (stream 0.633 -> 0.619 ms) and 6 min 21 s to compile (its 64 unrolled segments).
  * Triton does not contract a multiply and an add into an FMA (Nsight Compute on an H100: 16 fused against 117
    separate float32 instructions per warp and step), so the forward spells its FMAs out (`_fma`, inline PTX):
    15-17% off the forward at 8K-64K (benchmarks/results/scans.md, round 7). The same change made the backward
    slower, so the backward keeps plain multiplies and adds.
  * Each step reads n B and n C values that every thread needs (scalar loads, the same address in every lane:
    with bf16 inputs the main forward kernel reads them as bf16 pairs packed in 32-bit words, `pack_bc`), and
    the segment count divides the length where it can (`_segments`): padding the sequence cost a copy of every
    input and output, 6.56 -> 4.65 ms forward and 29.7 -> 20.5 ms forward+backward at 64K tokens (round 8).
  * exp(delta A) is the hot special function (l * e * n of them per pass): on GPU it is one `ex2.approx` with
    A pre-scaled by log2(e) (inline PTX; libdevice's `__nv_expf` costs several instructions more). The
    interpreter uses `jnp.exp2`.
  * Softplus of delta (`fast_math`) is lg2(1 + e^x) ln 2 from `ex2.approx` and `lg2.approx`, with a series below
    x = -3: ~12 instructions where libdevice's log1pf is ~30, 3.8% off the forward at 8K (H200, round 12). Tried and
    removed (round 12): computing some states' decays as a polynomial on the FMA units, to unload the special-
    function unit (16 exponentials per clock and SM against 128 FMAs): slower in proportion to the instructions
    it added (8K 0.614 -> 0.634-0.701 ms), so the forward is bound by issue and latency, not by that unit.
  * Backward (`jax.custom_vjp`), same segment structure run in reverse. The forward under `jax.vjp` also
    stores the state every K = `unroll_bwd` steps, (b, l / K, n, e) float32 ((b, l / K, e, n) for the (e, n)
    kernel). Backward pass 1 walks each segment backwards from a zero adjoint and gives the segment's adjoint
    carry; XLA chains the segments right to left (an unrolled scan, no while loop); pass 2 walks each segment
    backwards from its true adjoint, K steps at a time: it reloads the stored state at the K-block's start,
    recomputes the K states forward in registers (unrolled), then walks them backwards and writes du, d(delta),
    dz, dB and dC partial rows, and per-program partial sums of dA, dD and d(delta_bias) (XLA sums the partials).
  * Under `jax.checkpoint` (`optimize_remat`) the forward pass runs the plain forward and only the backward's
    recomputation stores states; without it both passes store them (a Pallas call cannot drop an output).
    Pass 1 runs outside the custom VJP, on inputs cut from differentiation, and its outputs are named
    (`SELECTIVE_SCAN_SEGMENT_STATES`): the model's remat policy (`mamba_jax.ops.remat_policy`) saves them, so the
    recomputation runs pass 2 only (mamba-1.4b gradient step at 8K on an H200: 284.5 -> 276.8 ms, +0.8 GiB;
    calibrate.md round 16). The VJP is still the whole scan's; pass 1's outputs get zero cotangents.
  * On Hopper, pass 1 and the plain pass 2 (outside `jax.vjp`) run as Mosaic GPU kernels (`pallas_mosaic.py`,
    `SelectiveScanConfig.fwd_lowering`): the same work per program, with each chunk's rows brought into shared
    memory by TMA; both passes 1.10 -> 0.78 ms at 8K tokens and batch 2 on an H200 (round 18, scans.md). So do
    the state-storing forward under `jax.vjp` (`vjp_fwd_lowering`) and the backward's pass 1 (`adjoint_lowering`,
    round 20; the default since round 21, when their compiled tests passed on an H200); the backward's pass 2 is
    Triton.
  * Tried and removed (round 16, scans.md): a one-pass forward parallel over time inside each program (a pair scan,
    `tt.scan`, per state over (T, E) tiles), 8-19x slower than the two passes.
  * The default backward (`bwd_rows`) holds state, adjoint and decay as n (e-block,) rows like the forward, one
    channel per thread, so the reductions over n are in-thread sums. Only dB_t and dC_t sum over channels: when
    the block is one channel per thread, each warp combines its 2n values with 31 `shfl.sync.bfly` lane
    exchanges (no shared memory, no barriers) and writes one row per step; XLA sums the warps' rows. Measured on
    an H100 at 32K tokens, forward+backward went from 23.5 ms with the (e, n) kernel to 10.8 ms (scans.md).
  * With `z_start` the gate is read in place from a wider array (the Mamba1 mixer passes its in_proj output,
    whose second half is z): the z blocks start at block index z_start / e-block, so XLA need not copy z out
    (the round-6 profile of mamba-1.4b put that copy at 2.2 ms of an 8K-token forward on an H100; on an H200 the
    in-place read took an 8K mamba-1.4b SPSA iteration from 146.8 to 140.4 ms, calibrate.md round 10). The
    backward returns dz padded with zeros to z's width.
  * 64-bit safety: blocks start at per-dimension block indices and the Pallas Triton lowering uses int64
    offsets for arrays above 4 GiB; in-kernel row indices stay below the segment length.
"""

import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mamba_jax.ops._dt import SOFTPLUS_THRESHOLD, softplus_from_exp2
from mamba_jax.ops._lowering import use_mosaic
from mamba_jax.ops._remat import SELECTIVE_SCAN_SEGMENT_STATES
from mamba_jax.ops.selective_scan import pallas_mosaic
from mamba_jax.ops.selective_scan.reference import check_gate_columns, gate_columns

_SQ = pl.squeezed if hasattr(pl, "squeezed") else None
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class SelectiveScanConfig:
  """Block sizes and launch parameters.

  Attributes:
    block_e: channels per forward program (a power of two); 32 * num_warps gives one channel per thread.
    unroll: forward time steps per loop iteration (loads issued together); a multiple of `unroll_bwd`.
    target_programs: aim for at least this many programs (b * e / block_e * segments).
    num_warps: warps per forward program.
    num_stages: Triton software-pipelining depth.
    block_e_bwd: channels per backward program; with `bwd_rows`, 32 * num_warps_bwd gives one channel per
      thread.
    unroll_bwd: K, the steps whose states the backward holds in registers; the forward under `jax.vjp`
      stores the state every K steps.
    num_warps_bwd: warps per backward program.
    bwd_rows: backward kernel. True: `_bwd_rows_kernel`, the state and adjoint held as n (e-block,) rows like
      the forward (one channel per thread; the stored states are (n, e) rows). False: `_bwd_kernel`, the
      (e-block, n) layout (n spread over lanes, per-step reductions over n across lanes).
    prefetch: the forward loads the next `unroll` steps' u, delta and z rows while it computes the current ones
      (carried through the loop). Without it, the forward loads a block's rows at the block's start, and under
      `jax.vjp` (where it also stores states) each step's rows where that step uses them: on an H100, block-start
      loads under `jax.vjp` slowed forward+backward (8K 3.006 vs 2.777 ms); outside it they were not measured
      against per-step loads (benchmarks/results/scans.md, round 7).
    pack_bc: when B and C are bfloat16, the forward's main kernel reads them as pairs packed in 32-bit words
      (`_pack_bc`): one scalar load per two values instead of one per value, and a shift or mask to unpack each
      (exact). On an H100 the forward's stream time fell 4-6% at 8K-64K; the segment-state kernel and the
      backward read float32 B and C, because packed they were slower (benchmarks/results/scans.md, round 8).
    fast_math: the softplus of delta (with `delta_softplus`; once per channel and step in every kernel, twice in
      the backward's main kernel) from `ex2.approx` and `lg2.approx` (`_softplus_fast`, relative error within
      ~4e-6) instead of libdevice's log1pf of an exponential, and the backward's two sigmoids per step (of z and
      of delta's pre-activation) with `rcp.approx` instead of a float32 division (the forward's gate always
      uses `rcp.approx`). On an H200 (round 12, one lease) the forward at 8K took 0.588 against 0.611 ms
      (stream); the backward with it was not timed.
    fwd_lowering: the plain forward's two kernels (pass 1, and pass 2 outside `jax.vjp`): "triton", "mosaic"
      (Pallas Mosaic GPU, `pallas_mosaic.py`: the same work per program with the chunks' rows arriving by TMA
      into shared memory; on an H200 at 8K tokens both passes 1.099 -> 0.784 ms at batch 2 and 0.595 -> 0.458 ms
      at batch 1, round 18 of benchmarks/results/scans.md) or "auto" (Mosaic GPU on a Hopper GPU when d_inner is
      a multiple of 128 and d_state of 4, Triton otherwise). The backward is Triton in every case.
    vjp_fwd_lowering: the forward under `jax.vjp` (pass 2 that also stores the state every K steps for the
      backward; under `jax.checkpoint` the backward's recomputation): "triton", "mosaic" (`pallas_mosaic.fwd_main`
      with `save`, needs `bwd_rows` as well as what `fwd_lowering` needs) or "auto" (Mosaic GPU on a Hopper GPU
      where it can run).
    adjoint_lowering: the backward's pass 1 (each segment's adjoint carry from zero): "triton", "mosaic"
      (`pallas_mosaic.segment_adjoints`; what `vjp_fwd_lowering`'s "mosaic" needs) or "auto".
      Both "auto" by default since round 21 (their compiled GPU tests, test_pallas_selective_scan_mosaic.py,
      passed on an H200). With both "auto", mamba-1.4b's 8K gradient step took 248.8 / 246.2 ms on an H200,
      against 269.2 ms with both "triton" (calibrate.md, round 20).
    mosaic_chunk: steps per TMA copy (T) in the Mosaic GPU kernels (the largest divisor of the segment length up
      to it; 16 was the fastest of 16 / 32 / 64 on an H200).
    mosaic_stages: shared-memory buffers of chunk rows in the Mosaic GPU kernels (2 and 3 were equal on an H200).
    mosaic_channels_per_thread: channels per thread in the Mosaic GPU kernels (128 times it per program): each
      step's 2n B / C scalars are read once for that many channels.
    mosaic_poly_pass1, mosaic_poly_pass2, mosaic_poly_adjoint: of the n decays exp(delta A_m) that each step
      computes per channel, how many (the last states) the Mosaic GPU pass 1, pass 2 (both forms) and the
      backward's pass 1 compute on the FMA units (`pallas_mosaic.exp2_fma`, 11 instructions) instead of the
      special-function unit (one `ex2.approx`, 16 per clock and SM against 128 FMAs). Round 18 put the forward's
      passes at 72-84% of that unit's floor (scans.md); the same polynomial in the Triton kernels of round 12,
      then far from it, only added time. Off (0) by default: on an H200 at 8K, batch 2 (round 23, stream ms),
      pass 1 took 0.349 with none, 0.335 with 2 and 0.346 / 0.386 / 0.413 with 4 / 6 / 8; pass 2 0.445 with
      none and 0.460-0.551 with 2-8, and mamba-1.4b's SPSA iteration did not get faster with 2 / 0 (114.0
      against 114.1 ms in one lease) or 4 / 3 (115.8 against 113.6).
    segment_chain: where each segment's incoming state is chained from pass 1's outputs. "pass2": every pass-2
      program chains the segments before its own (segment s repeats s chain steps, on average s / 2 of its L_s
      own: 6% of pass 2's steps at 8K and batch 2, s = 32, 25% at batch 1, s = 64); "xla": an unrolled XLA scan
      gives them all once, (b, s, n, e), and pass 2 reads its own; "mosaic": a small Mosaic GPU kernel does
      (`pallas_mosaic.chain_states`, the segments' rows arriving by TMA several ahead; a Hopper GPU). Round 10's
      Triton chain kernel took the main kernel from 0.366 to 0.309 ms at 8K, batch 1, and cost 0.050 ms itself
      (each segment waited on its loads; scans.md); "xla" and "mosaic" are not timed yet (round 25), so "pass2"
      stays the default.
    barrier_segment_states: pass 1's outputs reach their users (pass 2, and under `jax.checkpoint` the saved
      residuals) through `lax.optimization_barrier`. Without it, in a rematerialised gradient over the layer scan,
      XLA's dynamic-slice fusion put the Mosaic GPU pass 1 in a fusion that writes the stacked residual and kept a
      clone for pass 2: two pass-1 launches per layer (the custom call has side effects, so the copy stays;
      benchmarks/results/calibrate.md, rounds 19-20). The barrier is free at run time.

  Defaults: forward 128 channels x 4 warps (one channel per thread) with 2112 target programs, which keeps
  the segment count of rounds 3-9's 256 x 8 with 1056: on an H200 (round 10, one lease) stream 0.603 / 2.148 /
  4.200 ms against 0.622 / 2.187 / 4.266 at 8K / 32K / 64K tokens, and forward+backward at 8K 2.560 against
  2.563 ms; 128 x 4 with 1056 (half the segments) lost (0.638 / 2.412 / 4.726), as did splitting each channel's
  state over 2 or 4 threads (128 x 8: 1.154 ms at 8K; 64 x 8: 2.177 ms), unroll 8 (0.664) and one stage (equal).
  Backward: rows with 128 channels x 4 warps, the fastest of a sweep on an H100 at 32K tokens (round 3; 32 x 1
  and 64 x 2 were within 2%). The (e, n) kernel's own sweep had picked 32 channels, K = 8, 2 warps.
  """

  block_e: int = 128
  unroll: int = 16
  target_programs: int = 2112
  num_warps: int = 4
  num_stages: int = 2
  block_e_bwd: int = 128
  unroll_bwd: int = 8
  num_warps_bwd: int = 4
  bwd_rows: bool = True
  prefetch: bool = False
  pack_bc: bool = True
  fast_math: bool = True
  fwd_lowering: str = "auto"
  vjp_fwd_lowering: str = "auto"
  adjoint_lowering: str = "auto"
  mosaic_chunk: int = 16
  mosaic_stages: int = 2
  mosaic_channels_per_thread: int = 1
  mosaic_poly_pass1: int = 0
  mosaic_poly_pass2: int = 0
  mosaic_poly_adjoint: int = 0
  barrier_segment_states: bool = True
  segment_chain: str = "pass2"


DEFAULT_CONFIG = SelectiveScanConfig()


@contextlib.contextmanager
def default_config_overrides(**changes):
  """Within the block, `selective_scan_pallas` calls that pass no config use `DEFAULT_CONFIG` with `changes`.

  The config is read when a call is traced, so use it around the tracing (inside a jitted function's body), e.g.
  `calibrate.spsa`'s vmapped pair. Not thread-safe: it swaps the module's default for the block's duration.
  """
  global DEFAULT_CONFIG
  saved = DEFAULT_CONFIG
  DEFAULT_CONFIG = dataclasses.replace(saved, **changes)
  try:
    yield DEFAULT_CONFIG
  finally:
    DEFAULT_CONFIG = saved


@dataclasses.dataclass(frozen=True)
class _Meta:
  l: int  # true length (steps at or beyond it are identity)
  seg_len: int
  S: int
  unroll: int
  block_e: int
  unroll_bwd: int
  block_e_bwd: int
  has_d: bool
  has_z: bool
  has_bias: bool
  softplus: bool
  num_warps: int
  num_stages: int
  num_warps_bwd: int
  bwd_rows: bool
  prefetch: bool
  pack_bc: bool  # the forward's main kernel reads B and C as bf16 pairs in uint32 words (`_pack_bc`)
  z_start: int  # the gate is columns [z_start, z_start + e) of z (read in place; a multiple of both blocks)
  interpret: bool
  fast_math: bool  # `SelectiveScanConfig.fast_math`
  mosaic: bool = False  # pass 1 and the plain pass 2 in Mosaic GPU (`SelectiveScanConfig.fwd_lowering`)
  mosaic_chunk: int = 16
  mosaic_stages: int = 2
  mosaic_cpt: int = 1  # `SelectiveScanConfig.mosaic_channels_per_thread`
  mosaic_vjp: bool = False  # the forward under `jax.vjp` in Mosaic GPU (`SelectiveScanConfig.vjp_fwd_lowering`)
  mosaic_adjoint: bool = False  # the backward's pass 1 in Mosaic GPU (`SelectiveScanConfig.adjoint_lowering`)
  mosaic_poly: tuple[int, int, int] = (0, 0, 0)  # `SelectiveScanConfig.mosaic_poly_*`: pass 1, pass 2, adjoint
  chain: str = "pass2"  # `SelectiveScanConfig.segment_chain`

  @property
  def ragged(self):
    return self.l < self.S * self.seg_len

  @property
  def lane_sums(self):
    """The rows backward sums dB and dC over each warp's lanes with shuffles (`_warp_sums`)."""
    return self.bwd_rows and self.block_e_bwd == 32 * self.num_warps_bwd


def _ptx(asm, *args):
  """One PTX instruction applied elementwise to same-shape 32-bit arrays ($0 the result, $1... the args)."""
  (y,) = plgpu.elementwise_inline_asm(
    asm,
    args=list(args),
    constraints=",".join(["=r"] + ["r"] * len(args)),
    pack=1,
    result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, args[0].dtype)],
  )
  return y


def _exp2(x, interpret):
  return jnp.exp2(x) if interpret else _ptx("ex2.approx.ftz.f32 $0, $1;", x)


def _fma(a, b, c, interpret):
  """a * b + c as one `fma.rn.f32` (float32 (e,) rows; b or c may be scalars): Triton does not contract a
  multiply and an add into an FMA (Nsight Compute counted 16 fused against 117 separate float32 instructions
  per warp and step in the forward)."""
  if interpret:
    return a * b + c
  b, c = (jnp.broadcast_to(v, a.shape).astype(jnp.float32) for v in (b, c))
  return _ptx("fma.rn.f32 $0, $1, $2, $3;", a, b, c)


def _rcp(x, interpret):
  """1 / x as one `rcp.approx.ftz.f32` (at most 1 ulp off; a float32 division is a dozen instructions)."""
  return 1.0 / x if interpret else _ptx("rcp.approx.ftz.f32 $0, $1;", x)


def _pack_bc(B, C):
  """(b, l, n) uint32: the 2n bfloat16 values [B_t, C_t] of each step as pairs, value 2j in word j's low half."""
  BC = jnp.concatenate([B, C], axis=-1)  # (b, l, 2n)
  return jax.lax.bitcast_convert_type(BC.reshape(*BC.shape[:-1], -1, 2), jnp.uint32)


def _unpack_bc(ref, t):
  """Step t's 2n values [B_t, C_t] as float32 scalars, from `_pack_bc`'s words (ref (L_s, n) uint32): a bfloat16
  is the high half of the float32 of the same value."""
  vals = []
  for j in range(ref.shape[-1]):
    w = ref[t, j]
    vals.append(jax.lax.bitcast_convert_type(jax.lax.shift_left(w, jnp.uint32(16)), jnp.float32))
    vals.append(jax.lax.bitcast_convert_type(w & jnp.uint32(0xFFFF0000), jnp.float32))
  return vals


def _softplus(x):
  return jnp.where(x > SOFTPLUS_THRESHOLD, x, jnp.log1p(jnp.exp(jnp.minimum(x, SOFTPLUS_THRESHOLD))))


def _softplus_fast(x, interpret):
  """Softplus (float32 (e,) rows) from `ex2.approx` and `lg2.approx` (`_dt.softplus_from_exp2`)."""
  lg2 = jnp.log2 if interpret else functools.partial(_ptx, "lg2.approx.ftz.f32 $0, $1;")
  return softplus_from_exp2(x, functools.partial(_exp2, interpret=interpret), lg2)


def _lane_xor(x, m, interpret):
  """x (e,), one element per thread, as held by lane `lane ^ m` of the same warp (`shfl.sync.bfly`)."""
  if interpret:
    return x[jnp.arange(x.shape[0]) ^ m]  # element i is lane i % 32 of warp i // 32
  return _ptx(f"shfl.sync.bfly.b32 $0, $1, {m}, 0x1f, -1;", x)


def _lane_rows(n):
  """(P, R): the 2n values dB_t, dC_t padded to a power of two P, and the R rows `_warp_sums` leaves."""
  P = 1 << (2 * n - 1).bit_length()
  return P, max(1, P // 32)


def _warp_sums(vals, interpret):
  """Sums over each warp's 32 lanes of P (a power of two) (e,) rows held one element per thread.

  A reduce-scatter: each of the 5 butterfly levels halves the rows, a lane keeping the half that its bit
  selects and adding its partner's copy of that half, so P values cost P - 1 shuffles (P separate
  reductions would cost 5 P, plus a shared-memory round and barriers to combine warps). Returns
  max(1, P / 32) rows; `_warp_sums_positions` says which value each (row, lane) holds.
  """
  lane = jax.lax.broadcasted_iota(jnp.int32, vals[0].shape, 0) & 31
  m = 16
  while m:
    if len(vals) > 1:
      half = len(vals) // 2
      hi = (lane & m) != 0
      vals = [
        jnp.where(hi, b, a) + _lane_xor(jnp.where(hi, a, b), m, interpret)
        for a, b in zip(vals[:half], vals[half:], strict=True)
      ]
    else:
      vals = [vals[0] + _lane_xor(vals[0], m, interpret)]
    m //= 2
  return vals


def _warp_sums_positions(P, count):
  """Position r * 32 + lane of the `_warp_sums` output holding value j, for j < count."""
  pos = {}
  for r in range(max(1, P // 32)):
    for lane in range(32):
      j, half = r, P
      for i in range(min(P.bit_length() - 1, 5)):
        half //= 2
        j += half * ((lane >> (4 - i)) & 1)
      pos.setdefault(j, r * 32 + lane)
  return [pos[j] for j in range(count)]


class _Refs:
  """Names the kernel's refs in the order `_call` passes them."""

  def __init__(self, refs, names):
    refs = list(refs)
    assert len(refs) == len(names), (len(refs), names)
    self.__dict__.update(zip(names, refs, strict=True))


def _step_delta(r, t, seg0, meta, bias, raw=None):
  """(delta after bias/softplus and the ragged mask, raw delta + bias) at row t; both (e,) float32.

  raw: the row r.delta[t, :] when already loaded."""
  x = (r.delta[t, :] if raw is None else raw).astype(jnp.float32)
  if bias is not None:
    x = x + bias
  if meta.softplus:
    d = _softplus_fast(x, meta.interpret) if meta.fast_math else _softplus(x)
  else:
    d = x
  if meta.ragged:
    d = jnp.where(seg0 + t < meta.l, d, 0.0)
  return d, x


def _fwd_kernel(*refs, names, meta: _Meta, write_y: bool, save: bool, chained: bool = False):
  """One (channel block, segment, batch): walk the segment's steps from its incoming state.

  The state is held as n separate (e,) rows: one channel per thread (see the module docstring).
  Refs in: u, delta (L_s, e), A2 = A^T log2(e) (n, e), B (L_s, n) float32 (with `pack_bc` and `write_y`: BC (L_s,
    n) uint32, `_pack_bc`'s words), [C (L_s, n) float32 (not with `pack_bc`), D (e,), z (L_s, e)] when `write_y`,
    [delta_bias (e,)], and when `write_y` either (`chained`) h_in (n, e) this segment's incoming state
    (`_chain_states`), or h0 (n, e) the scan's initial state and, with several segments, h_loc (s - 1, n, e) the
    end states from zero and dsum (s - 1, e) the sums of delta of all segments but the last (pass 1's outputs),
    chained here up to this segment.
  Refs out: [y (L_s, e)] when `write_y`, else dsum (e,) = sum of delta; h_out (n, e) float32 the segment's end
    state (from zero when not `write_y`); [h_sub (L_s / K, n, e) float32 the state before every K-th step,
    (L_s / K, e, n) without `bwd_rows`] when `save`.
  """
  r = _Refs(refs, names)
  n = r.A2.shape[0]
  A2 = [r.A2[k, :] for k in range(n)]  # n x (e,)
  bias = r.bias[...].astype(jnp.float32) if meta.has_bias else None
  Dv = r.D[...].astype(jnp.float32) if write_y and meta.has_d else None
  si = pl.program_id(1)
  seg0 = si * meta.seg_len
  K = meta.unroll_bwd
  zeros = jnp.zeros(r.A2.shape[1:], jnp.float32)

  fma = functools.partial(_fma, interpret=meta.interpret)
  if write_y and chained:
    h = tuple(r.h_in[k, :] for k in range(n))
  elif write_y:
    h = tuple(r.h0[k, :] for k in range(n))
    if meta.S > 1:

      def chain(i, h):
        ds = r.dsum[i, :]
        return tuple(fma(_exp2(ds * A2[k], meta.interpret), h[k], r.h_loc[i, k, :]) for k in range(n))

      h = jax.lax.fori_loop(0, si, chain, h)
  else:
    h = (zeros,) * n
  U = meta.unroll
  blocks = meta.seg_len // U

  def load_step(t):
    """The per-channel rows of step t: (u, raw delta, z or None)."""
    return r.u[t, :], r.delta[t, :], r.z[t, :] if write_y and meta.has_z else None

  def load(it):
    """The rows of steps it * U ... it * U + U - 1."""
    return tuple(load_step(it * U + j) for j in range(U))

  def body(it, carry):
    h, ds, rows = carry
    nxt = ()
    if meta.prefetch:  # issue the next block's loads first; their latency hides behind this block's work
      nxt = load(jnp.minimum(it + 1, blocks - 1))
    elif not save:
      rows = load(it)
    for j in range(U):
      t = it * U + j
      if save and j % K == 0:
        for k in range(n):
          if meta.bwd_rows:
            r.h_sub[t // K, k, :] = h[k]
          else:
            r.h_sub[t // K, :, k] = h[k]  # strided: the (e, n) backward's layout
      u_raw, delta_raw, z_raw = rows[j] if rows else load_step(t)
      u = u_raw.astype(jnp.float32)  # (e,)
      d, _ = _step_delta(r, t, seg0, meta, bias, raw=delta_raw)  # (e,)
      du = d * u
      if meta.pack_bc and write_y:
        bc = _unpack_bc(r.BC, t)
        Bt, Ct = bc[:n], bc[n:]
      else:
        Bt = [r.B[t, k] for k in range(n)]
        Ct = [r.C[t, k] for k in range(n)] if write_y else []
      h = tuple(fma(_exp2(d * A2[k], meta.interpret), h[k], Bt[k] * du) for k in range(n))
      if write_y:
        y = Dv * u if meta.has_d else zeros
        for k in range(n):
          y = fma(h[k], Ct[k], y)  # (e,)
        if meta.has_z:
          zt = z_raw.astype(jnp.float32)
          y = y * zt * _rcp(1.0 + _exp2(-_LOG2E * zt, meta.interpret), meta.interpret)
        r.y[t, :] = y.astype(r.y.dtype)
      else:
        ds = ds + d
    return h, ds, nxt

  h, ds, _ = jax.lax.fori_loop(0, blocks, body, (h, zeros, load(0) if meta.prefetch else ()))
  for k in range(n):
    r.h_out[k, :] = h[k]
  if not write_y:
    r.dsum[...] = ds


def _bwd_kernel(*refs, names, meta: _Meta, full: bool):
  """One (channel block, segment, batch): walk the segment backwards from its adjoint at the segment end.

  Adjoint: g_t = dL/dh_t = dy0_t C_t + a_{t+1} g_{t+1}, with a_t = exp(delta_t A), dy0 = dy * silu(z); the
  carry between steps is c_t = a_t g_t, and the carry out of the segment's first step is dL/dh(entry).
  Refs in: u, delta (L_s, e), A2 (e, n), B, C (L_s, n), [D (e,)], [z (L_s, e)], [delta_bias (e,)], dy (L_s, e),
    [h_sub (L_s / K, e, n)] when `full`, c_in (e, n) the carry into the segment's last step.
  Refs out: c_out (e, n); when `full` also du, d(delta) (L_s, e), [dz (L_s, e)], dB, dC (L_s, n) summed over
    this channel block, dA (e, n), [dD (e,)], [d(delta_bias) (e,)] summed over the segment.
  """
  r = _Refs(refs, names)
  A2 = r.A2[...]
  e_blk, n = A2.shape
  bias = r.bias[...].astype(jnp.float32) if meta.has_bias else None
  Dv = r.D[...].astype(jnp.float32) if meta.has_d else None
  seg0 = pl.program_id(1) * meta.seg_len
  K = meta.unroll_bwd
  zeros_e = jnp.zeros((e_blk,), jnp.float32)

  def dy0_at(t):
    dy = r.dy[t, :].astype(jnp.float32)
    if not meta.has_z:
      return dy, dy, None
    zt = r.z[t, :].astype(jnp.float32)
    return dy * jax.nn.silu(zt), dy, zt

  def body(i, carry):
    c, dA, dD, dbias = carry
    kb = meta.seg_len // K - 1 - i
    hs = None
    if full:
      h = r.h_sub[kb]  # (e, n) state before step kb * K
      hs = [h]
      for j in range(K):
        t = kb * K + j
        d, _ = _step_delta(r, t, seg0, meta, bias)
        u = r.u[t, :].astype(jnp.float32)
        h = _exp2(d[:, None] * A2, meta.interpret) * h + (d * u)[:, None] * r.B[t, :].astype(jnp.float32)[None, :]
        hs.append(h)
    for j in reversed(range(K)):
      t = kb * K + j
      d, x = _step_delta(r, t, seg0, meta, bias)
      a = _exp2(d[:, None] * A2, meta.interpret)  # (e, n)
      dy0, dy, zt = dy0_at(t)
      Ct = r.C[t, :].astype(jnp.float32)  # (n,)
      g = c + dy0[:, None] * Ct[None, :]  # (e, n)
      c = a * g
      if not full:
        continue
      u = r.u[t, :].astype(jnp.float32)
      Bt = r.B[t, :].astype(jnp.float32)
      h_prev, h_t = hs[j], hs[j + 1]
      r.dC[t, :] = jnp.sum(dy0[:, None] * h_t, axis=0)
      r.dB[t, :] = jnp.sum(g * (d * u)[:, None], axis=0)
      sgB = jnp.sum(g * Bt[None, :], axis=1)  # (e,)
      q = a * g * h_prev  # (e, n)
      dA = dA + d[:, None] * q
      dd = _LN2 * jnp.sum(q * A2, axis=1) + u * sgB  # dL/d(delta) (e,)
      du = d * sgB
      if meta.has_d:
        du = du + Dv * dy0
        dD = dD + dy0 * u
      r.du[t, :] = du.astype(r.du.dtype)
      if meta.has_z:
        y0 = jnp.sum(h_t * Ct[None, :], axis=1)
        if meta.has_d:
          y0 = y0 + Dv * u
        sz = jax.nn.sigmoid(zt)
        r.dz[t, :] = (dy * y0 * sz * (1.0 + zt * (1.0 - sz))).astype(r.dz.dtype)
      if meta.softplus:
        dd = dd * jnp.where(x > SOFTPLUS_THRESHOLD, 1.0, jax.nn.sigmoid(x))
      if meta.ragged:
        dd = jnp.where(seg0 + t < meta.l, dd, 0.0)
      r.ddelta[t, :] = dd.astype(r.ddelta.dtype)
      if meta.has_bias:
        dbias = dbias + dd
    return c, dA, dD, dbias

  init = (r.c_in[...], jnp.zeros_like(A2), zeros_e, zeros_e)
  c, dA, dD, dbias = jax.lax.fori_loop(0, meta.seg_len // K, body, init)
  r.c_out[...] = c
  if full:
    r.dA[...] = dA
    if meta.has_d:
      r.dD[...] = dD
    if meta.has_bias:
      r.dbias[...] = dbias


def _bwd_rows_kernel(*refs, names, meta: _Meta, full: bool):
  """`_bwd_kernel` with every (e, n) quantity held as n (e,) rows: one channel per thread, as in the forward.

  The sums over n (g B_t, q A, h C_t) are sums of rows inside a thread; only dB_t and dC_t, sums over the
  channel block, cross threads (n scalars per step each).
  Refs in: u, delta (L_s, e), A2 = A^T log2(e) (n, e), B, C (L_s, n) float32, [D (e,)], [z (L_s, e)],
    [delta_bias (e,)], dy (L_s, e), [h_sub (L_s / K, n, e)] when `full`, c_in (n, e).
  Refs out: c_out (n, e); when `full` also du, d(delta) (L_s, e), [dz (L_s, e)], dB, dC (L_s, n) summed over
    this channel block, dA (n, e), [dD (e,)], [d(delta_bias) (e,)] summed over the segment.
  """
  r = _Refs(refs, names)
  n, e_blk = r.A2.shape
  A2 = [r.A2[k, :] for k in range(n)]  # n x (e,)
  bias = r.bias[...].astype(jnp.float32) if meta.has_bias else None
  Dv = r.D[...].astype(jnp.float32) if meta.has_d else None
  seg0 = pl.program_id(1) * meta.seg_len
  K = meta.unroll_bwd
  zeros = jnp.zeros((e_blk,), jnp.float32)
  recip = functools.partial(_rcp, interpret=meta.interpret) if meta.fast_math else (lambda v: 1.0 / v)

  def body(i, carry):
    c, dA, dD, dbias = carry
    kb = meta.seg_len // K - 1 - i
    hs = None
    if full:
      h = tuple(r.h_sub[kb, k, :] for k in range(n))  # state before step kb * K
      hs = [h]
      for j in range(K - 1):  # the state after the block's last step is recomputed where it is used
        t = kb * K + j
        d, _ = _step_delta(r, t, seg0, meta, bias)
        du = d * r.u[t, :].astype(jnp.float32)
        h = tuple(_exp2(d * A2[k], meta.interpret) * h[k] + r.B[t, k] * du for k in range(n))
        hs.append(h)
    for j in reversed(range(K)):
      t = kb * K + j
      d, x = _step_delta(r, t, seg0, meta, bias)
      a = [_exp2(d * A2[k], meta.interpret) for k in range(n)]
      dy = r.dy[t, :].astype(jnp.float32)
      dy0 = dy
      if meta.has_z:
        zt = r.z[t, :].astype(jnp.float32)
        sz = recip(1.0 + _exp2(-_LOG2E * zt, meta.interpret))
        dy0 = dy * zt * sz
      Ct = [r.C[t, k] for k in range(n)]
      g = [c[k] + dy0 * Ct[k] for k in range(n)]
      c = tuple(a[k] * g[k] for k in range(n))
      if not full:
        continue
      u = r.u[t, :].astype(jnp.float32)
      du = d * u
      Bt = [r.B[t, k] for k in range(n)]
      h_prev = hs[j]
      h_t = [a[k] * h_prev[k] + Bt[k] * du for k in range(n)]
      if meta.lane_sums:
        P, _ = _lane_rows(n)
        v = [g[k] * du for k in range(n)] + [dy0 * h_t[k] for k in range(n)] + [zeros] * (P - 2 * n)
        for ri, row in enumerate(_warp_sums(v, meta.interpret)):
          r.dBC[t, ri * e_blk : (ri + 1) * e_blk] = row
      else:
        for k in range(n):
          r.dB[t, k] = jnp.sum(g[k] * du)
          r.dC[t, k] = jnp.sum(dy0 * h_t[k])
      sgB = sum(g[k] * Bt[k] for k in range(n))
      q = [c[k] * h_prev[k] for k in range(n)]  # a g h_prev
      dA = tuple(dA[k] + d * q[k] for k in range(n))
      dd = _LN2 * sum(q[k] * A2[k] for k in range(n)) + u * sgB  # dL/d(delta) (e,)
      dx = d * sgB
      if meta.has_d:
        dx = dx + Dv * dy0
        dD = dD + dy0 * u
      r.du[t, :] = dx.astype(r.du.dtype)
      if meta.has_z:
        y0 = sum(h_t[k] * Ct[k] for k in range(n))
        if meta.has_d:
          y0 = y0 + Dv * u
        r.dz[t, :] = (dy * y0 * sz * (1.0 + zt * (1.0 - sz))).astype(r.dz.dtype)
      if meta.softplus:
        dd = dd * jnp.where(x > SOFTPLUS_THRESHOLD, 1.0, recip(1.0 + _exp2(-_LOG2E * x, meta.interpret)))
      if meta.ragged:
        dd = jnp.where(seg0 + t < meta.l, dd, 0.0)
      r.ddelta[t, :] = dd.astype(r.ddelta.dtype)
      if meta.has_bias:
        dbias = dbias + dd
    return c, dA, dD, dbias

  init = (tuple(r.c_in[k, :] for k in range(n)), (zeros,) * n, zeros, zeros)
  c, dA, dD, dbias = jax.lax.fori_loop(0, meta.seg_len // K, body, init)
  for k in range(n):
    r.c_out[k, :] = c[k]
  if full:
    for k in range(n):
      r.dA[k, :] = dA[k]
    if meta.has_d:
      r.dD[...] = dD
    if meta.has_bias:
      r.dbias[...] = dbias


def _specs(meta, eb, b, lp, e, n):
  Ls, K = meta.seg_len, meta.unroll_bwd
  return dict(
    seq_e=lambda: pl.BlockSpec((_SQ, Ls, eb), lambda ei, si, bi: (bi, si, ei)),
    seq_z=lambda: pl.BlockSpec((_SQ, Ls, eb), lambda ei, si, bi: (bi, si, ei + meta.z_start // eb)),
    seq_n=lambda: pl.BlockSpec((_SQ, Ls, n), lambda ei, si, bi: (bi, si, 0)),
    part_n=lambda: pl.BlockSpec((_SQ, _SQ, Ls, n), lambda ei, si, bi: (bi, ei, si, 0)),
    part_lanes=lambda: pl.BlockSpec((_SQ, _SQ, Ls, _lane_rows(n)[1] * eb), lambda ei, si, bi: (bi, ei, si, 0)),
    vec_e=lambda: pl.BlockSpec((eb,), lambda ei, si, bi: (ei,)),
    en=lambda: pl.BlockSpec((eb, n), lambda ei, si, bi: (ei, 0)),
    seg_en=lambda: pl.BlockSpec((_SQ, _SQ, eb, n), lambda ei, si, bi: (bi, si, ei, 0)),
    seg_e=lambda: pl.BlockSpec((_SQ, _SQ, eb), lambda ei, si, bi: (bi, si, ei)),
    ne=lambda: pl.BlockSpec((n, eb), lambda ei, si, bi: (0, ei)),
    b_ne=lambda: pl.BlockSpec((_SQ, n, eb), lambda ei, si, bi: (bi, 0, ei)),
    seg_ne=lambda: pl.BlockSpec((_SQ, _SQ, n, eb), lambda ei, si, bi: (bi, si, 0, ei)),
    all_ne=lambda: pl.BlockSpec((_SQ, meta.S - 1, n, eb), lambda ei, si, bi: (bi, 0, 0, ei)),  # pass 1's
    all_e=lambda: pl.BlockSpec((_SQ, meta.S - 1, eb), lambda ei, si, bi: (bi, 0, ei)),
    sub_en=lambda: pl.BlockSpec((_SQ, Ls // K, eb, n), lambda ei, si, bi: (bi, si, ei, 0)),
    sub_ne=lambda: pl.BlockSpec((_SQ, Ls // K, n, eb), lambda ei, si, bi: (bi, si, 0, ei)),
  )


def _call(kernel, meta, eb, num_warps, ins, outs, name, segments=None, **kw):
  """ins / outs: lists of (ref name, spec kind, array or ShapeDtypeStruct); programs for the first `segments`
  segments (all when None)."""
  b, lp, e = ins[0][2].shape
  n = ins[3][2].shape[-1]  # B
  sp = _specs(meta, eb, b, lp, e, n)
  names = tuple(k for k, _, _ in ins) + tuple(k for k, _, _ in outs)
  return pl.pallas_call(
    functools.partial(kernel, names=names, meta=meta, **kw),
    out_shape=[s for _, _, s in outs],
    grid=(e // eb, meta.S if segments is None else segments, b),
    in_specs=[sp[k]() for _, k, _ in ins],
    out_specs=[sp[k]() for _, k, _ in outs],
    compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=meta.num_stages),
    interpret=meta.interpret,
    name=name,
  )(*[a for _, _, a in ins])


def _seg_decay(A, dsum):
  return jnp.exp(dsum[..., None] * A.astype(jnp.float32))  # (b, s, e, n)


def _sub_kind(meta):
  return "sub_ne" if meta.bwd_rows else "sub_en"


def _segment_states(meta, u, delta, A, B, C, delta_bias):
  """Pass 1: each segment's end state from a zero start (b, s - 1, n, e) and its sum of delta (b, s - 1, e),
  float32, for every segment but the last (whose end state only pass 2 computes: the chains into later segments
  are all that read these); None with one segment. The Mosaic GPU kernel reads B from pass 2's float32 [B | C]
  rows (`bc_rows`: XLA computes the one conversion for both passes), the Triton kernel from B alone."""
  if meta.S == 1:
    return None
  b, lp, e = u.shape
  n = A.shape[-1]
  f32 = jnp.float32
  A2 = A.astype(f32).T * _LOG2E  # (n, e)
  if meta.mosaic:
    kw = dict(T=meta.mosaic_chunk, stages=meta.mosaic_stages, cpt=meta.mosaic_cpt, poly=meta.mosaic_poly[0])
    return pallas_mosaic.segment_states(meta, u, delta, A2, pallas_mosaic.bc_rows(B, C), delta_bias, **kw)
  ins = [("u", "seq_e", u), ("delta", "seq_e", delta), ("A2", "ne", A2)]
  ins += [("B", "seq_n", B.astype(f32))] + ([("bias", "vec_e", delta_bias)] if meta.has_bias else [])
  outs = [("h_out", "seg_ne", jax.ShapeDtypeStruct((b, meta.S - 1, n, e), f32))]
  outs += [("dsum", "seg_e", jax.ShapeDtypeStruct((b, meta.S - 1, e), f32))]
  name, segs = SELECTIVE_SCAN_SEGMENT_STATES, meta.S - 1
  return tuple(_call(_fwd_kernel, meta, meta.block_e, meta.num_warps, ins, outs, name, segs, write_y=False, save=False))


def _last_segment_dsum(meta, delta, delta_bias):
  """The last segment's sum of delta (b, e) float32, which pass 1 does not compute (the backward's chain of
  adjoints over the segments needs every segment's): one XLA reduction of its true rows."""
  x = delta[:, (meta.S - 1) * meta.seg_len : meta.l].astype(jnp.float32)
  if meta.has_bias:
    x = x + delta_bias.astype(jnp.float32)
  return (jax.nn.softplus(x) if meta.softplus else x).sum(1)


def chain_states_xla(h_loc, dsum, A2, h0):
  """Every segment's incoming state (b, s, n, e) float32 from pass 1's h_loc (b, s - 1, n, e) and dsum
  (b, s - 1, e), A2 = A^T log2(e) (n, e) and h0 (b, n, e) float32 or None (zeros): h_in[0] = h0,
  h_in[s + 1] = exp2(dsum_s A2) h_in[s] + h_loc_s, as each pass-2 program chains them up to its own segment; an
  XLA scan, unrolled (a while loop's steps each cost a round trip to the host on a GPU)."""
  h0 = jnp.zeros(h_loc.shape[:1] + h_loc.shape[2:], jnp.float32) if h0 is None else h0
  dec = jnp.exp2(dsum[:, :, None, :] * A2)  # (b, s - 1, n, e)

  def step(h, inp):
    loc, d = inp
    h = d * h + loc
    return h, h

  xs = (jnp.moveaxis(h_loc, 1, 0), jnp.moveaxis(dec, 1, 0))
  _, hs = jax.lax.scan(step, h0, xs, unroll=True if h_loc.shape[1] <= 64 else 16)
  return jnp.concatenate([h0[:, None], jnp.moveaxis(hs, 0, 1)], axis=1)


def _chain_states(meta, seg, A2, h0):
  """`SelectiveScanConfig.segment_chain` ("xla" or "mosaic"): every segment's incoming state (b, s, n, e)."""
  if meta.chain == "mosaic":
    return pallas_mosaic.chain_states(*seg, A2, h0, cpt=meta.mosaic_cpt)
  return chain_states_xla(*seg, A2, h0)


def _forward(meta, save, u, delta, A, B, C, D, z, delta_bias, h0, seg):
  """y (b, l_pad, e), the last state (b, e, n) float32, [the states every K steps] when `save`.

  seg: `_segment_states` of the same inputs (or None with one segment)."""
  b, lp, e = u.shape
  n = A.shape[-1]
  f32 = jnp.float32
  A2 = A.astype(f32).T * _LOG2E  # (n, e)
  h0t = None if h0 is None else jnp.swapaxes(h0, 1, 2)  # (b, n, e); the Mosaic GPU kernel starts from zeros without
  h_in = None if seg is None or meta.chain == "pass2" else _chain_states(meta, seg, A2, h0t)  # (b, s, n, e)
  if meta.mosaic_vjp if save else meta.mosaic:
    kw = dict(T=meta.mosaic_chunk, stages=meta.mosaic_stages, cpt=meta.mosaic_cpt, save=save, poly=meta.mosaic_poly[1])
    res = pallas_mosaic.fwd_main(meta, u, delta, A2, B, C, D, z, delta_bias, h0t, seg, h_in=h_in, **kw)
    return res[0], jnp.swapaxes(res[1], 1, 2), res[2] if save else None
  h0 = jnp.zeros((b, e, n), f32) if h0 is None else h0
  common = [("u", "seq_e", u), ("delta", "seq_e", delta), ("A2", "ne", A2)]
  bias_in = [("bias", "vec_e", delta_bias)] if meta.has_bias else []
  seg_ne = jax.ShapeDtypeStruct((b, meta.S, n, e), f32)
  chain_in = [] if seg is None else [("h_loc", "all_ne", seg[0]), ("dsum", "all_e", seg[1])]
  if meta.pack_bc:
    ins = common + [("BC", "seq_n", _pack_bc(B, C))]
  else:
    ins = common + [("B", "seq_n", B.astype(f32)), ("C", "seq_n", C.astype(f32))]
  ins += [("D", "vec_e", D)] if meta.has_d else []
  ins += [("z", "seq_z", z)] if meta.has_z else []
  if h_in is None:
    ins += bias_in + [("h0", "b_ne", jnp.swapaxes(h0, 1, 2))] + chain_in
  else:
    ins += bias_in + [("h_in", "seg_ne", h_in)]
  outs = [("y", "seq_e", jax.ShapeDtypeStruct(u.shape, u.dtype)), ("h_out", "seg_ne", seg_ne)]
  if save:
    sub = (n, e) if meta.bwd_rows else (e, n)
    outs.append(("h_sub", _sub_kind(meta), jax.ShapeDtypeStruct((b, lp // meta.unroll_bwd, *sub), f32)))
  kw = dict(write_y=True, save=save, chained=h_in is not None)
  res = _call(_fwd_kernel, meta, meta.block_e, meta.num_warps, ins, outs, "selective_scan_fwd", **kw)
  y, h_out = res[0], res[1]
  return y, jnp.swapaxes(h_out[:, -1], 1, 2), res[2] if save else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(meta, u, delta, A, B, C, D, z, delta_bias, h0, seg):
  """The scan given its segment states `seg` (pass 1, computed outside so that a remat policy can keep them:
  `SELECTIVE_SCAN_SEGMENT_STATES`). The gradient is the whole scan's: `seg` is a function of the other inputs and
  gets zeros."""
  y, h, _ = _forward(meta, False, u, delta, A, B, C, D, z, delta_bias, h0, seg)
  return y, h


def _core_fwd(meta, *args):
  y, h, h_sub = _forward(meta, True, *args)
  return (y, h), (args, h_sub)


def _core_bwd(meta, res, cts):
  (u, delta, A, B, C, D, z, delta_bias, h0, seg_states), h_sub = res
  if seg_states is not None:  # (b, s, e): pass 1's s - 1 and the last segment's
    dsum = jnp.concatenate([seg_states[1], _last_segment_dsum(meta, delta, delta_bias)[:, None]], axis=1)
  dy, dh_last = cts
  b, lp, e = u.shape
  n = A.shape[-1]
  f32 = jnp.float32
  eb = meta.block_e_bwd
  nf = e // eb
  # The kernels' (e, n) layout: (n, e) rows for `_bwd_rows_kernel`; `lay` maps (..., e, n) to it and back.
  if meta.bwd_rows:
    kernel, seg, lay = _bwd_rows_kernel, "seg_ne", lambda a: jnp.swapaxes(a, -1, -2)
    ins = [("u", "seq_e", u), ("delta", "seq_e", delta), ("A2", "ne", lay(A.astype(f32)) * _LOG2E)]
    ins += [("B", "seq_n", B.astype(f32)), ("C", "seq_n", C.astype(f32))]
  else:
    kernel, seg, lay = _bwd_kernel, "seg_en", lambda a: a
    ins = [("u", "seq_e", u), ("delta", "seq_e", delta), ("A2", "en", A.astype(f32) * _LOG2E)]
    ins += [("B", "seq_n", B), ("C", "seq_n", C)]
  ins += [("D", "vec_e", D)] if meta.has_d else []
  ins += [("z", "seq_z", z)] if meta.has_z else []
  ins += [("bias", "vec_e", delta_bias)] if meta.has_bias else []
  ins += [("dy", "seq_e", dy)]
  seg_sd = jax.ShapeDtypeStruct((b, meta.S, *((n, e) if meta.bwd_rows else (e, n))), f32)
  if meta.S == 1:
    c_seg = lay(dh_last[:, None].astype(f32))
  else:
    if meta.mosaic_adjoint:
      kw = dict(T=meta.mosaic_chunk, stages=meta.mosaic_stages, cpt=meta.mosaic_cpt, poly=meta.mosaic_poly[2])
      A2 = A.astype(f32).T * _LOG2E  # (n, e)
      c_loc = pallas_mosaic.segment_adjoints(meta, delta, dy, A2, C, z, delta_bias, **kw)
    else:
      c_loc = _call(
        kernel, meta, eb, meta.num_warps_bwd, ins + [("c_in", seg, jnp.zeros(seg_sd.shape, f32))],
        [("c_out", seg, seg_sd)], "selective_scan_bwd_segment_adjoints", full=False,
      )[0]  # fmt: skip

    def step(c, inp):
      loc, dc = inp
      return loc + dc * c, c

    dec = lay(_seg_decay(A, dsum))
    _, c_in = jax.lax.scan(
      step, lay(dh_last.astype(f32)), (jnp.moveaxis(c_loc, 1, 0), jnp.moveaxis(dec, 1, 0)), reverse=True, unroll=True
    )
    c_seg = jnp.moveaxis(c_in, 0, 1)
  outs = [
    ("c_out", seg, seg_sd),
    ("du", "seq_e", jax.ShapeDtypeStruct(u.shape, u.dtype)),
    ("ddelta", "seq_e", jax.ShapeDtypeStruct(delta.shape, delta.dtype)),
  ]
  outs += [("dz", "seq_e", jax.ShapeDtypeStruct(u.shape, z.dtype))] if meta.has_z else []
  if meta.lane_sums:  # per warp: value `_warp_sums_positions` of lane l of row r at r * e_blk + warp * 32 + l
    P, R = _lane_rows(n)
    outs += [("dBC", "part_lanes", jax.ShapeDtypeStruct((b, nf, lp, R * eb), f32))]
  else:
    outs += [
      ("dB", "part_n", jax.ShapeDtypeStruct((b, nf, lp, n), f32)),
      ("dC", "part_n", jax.ShapeDtypeStruct((b, nf, lp, n), f32)),
    ]
  outs += [("dA", seg, seg_sd)]
  outs += [("dD", "seg_e", jax.ShapeDtypeStruct((b, meta.S, e), f32))] if meta.has_d else []
  outs += [("dbias", "seg_e", jax.ShapeDtypeStruct((b, meta.S, e), f32))] if meta.has_bias else []
  ins += [("h_sub", _sub_kind(meta), h_sub), ("c_in", seg, c_seg)]
  res = dict(
    zip(
      [k for k, _, _ in outs],
      _call(kernel, meta, eb, meta.num_warps_bwd, ins, outs, "selective_scan_bwd", full=True),
      strict=True,
    )
  )
  dz = res["dz"] if meta.has_z else None
  if meta.has_z and z.shape[-1] != e:  # the gradient w.r.t. the wider z: zero outside the gate columns
    dz = jnp.pad(dz, ((0, 0), (0, 0), (meta.z_start, z.shape[-1] - meta.z_start - e)))
  if meta.lane_sums:
    dbc = res["dBC"].reshape(b, nf, lp, R, eb // 32, 32).sum((1, 4)).reshape(b, lp, R * 32)
    dbc = dbc[..., jnp.asarray(_warp_sums_positions(P, 2 * n))]
    dB, dC = dbc[..., :n], dbc[..., n:]
  else:
    dB, dC = res["dB"].sum(1), res["dC"].sum(1)
  return (
    res["du"],
    res["ddelta"],
    lay(res["dA"].sum((0, 1))).astype(A.dtype),
    dB.astype(B.dtype),
    dC.astype(C.dtype),
    res["dD"].sum((0, 1)).astype(D.dtype) if meta.has_d else None,
    dz,
    res["dbias"].sum((0, 1)).astype(delta_bias.dtype) if meta.has_bias else None,
    None if h0 is None else lay(res["c_out"][:, 0]),
    jax.tree.map(jnp.zeros_like, seg_states),
  )


# optimize_remat: under `jax.checkpoint` (the model's `remat`, the gradient calibrator) the forward pass, whose
# residuals are dropped, runs the plain forward (`_core`) and only the recomputation in the backward pass runs
# `_core_fwd`, which stores the state every K steps. Without it both passes store them (the Pallas call cannot
# drop an output): at 8K tokens 268 MB written per layer for nothing (test_pallas_selective_scan.py checks the
# lowered calls).
_core.defvjp(_core_fwd, _core_bwd, optimize_remat=True)


def _aimed_segments(l, b, e, cfg):
  """The segment count that gives `target_programs` programs (at most one segment per 4 `unroll` blocks)."""
  progs = b * max(1, e // cfg.block_e)
  return max(1, min(-(-cfg.target_programs // progs), l // (4 * cfg.unroll)))


def _padded_segments(l, S, unroll):
  """(segment length, segments): about S segments, each a multiple of `unroll`, l padded up to their total."""
  seg = -(-l // S)
  seg = -(-seg // unroll) * unroll
  return seg, -(-l // seg)


def _segments(l, b, e, cfg):
  """(segment length, segments): segment length a multiple of `unroll`, segments * length >= l.

  Aims at `target_programs` programs, preferring a segment count within [0.9, 2] x the aimed one that divides
  l into whole `unroll` blocks: padding l costs a copy of u, delta, z, B and C and of y (and of their
  cotangents under `jax.vjp`). At 64K tokens the aimed 66 segments (of 1008 steps) padded 992 steps.
  """
  want = _aimed_segments(l, b, e, cfg)
  if l % cfg.unroll == 0:
    blocks = l // cfg.unroll
    exact = [S for S in range(max(1, (9 * want) // 10), 2 * want + 1) if blocks % S == 0]
    if exact:
      S = min(exact, key=lambda S: abs(S - want))
      return l // S, S
  return _padded_segments(l, want, cfg.unroll)


def _use_mosaic(cfg: SelectiveScanConfig, e: int, n: int, interpret: bool, option: str = "fwd_lowering") -> bool:
  """Whether the kernels that `option` chooses the lowering of run in Mosaic GPU: "fwd_lowering" (pass 1 and the
  plain pass 2), "vjp_fwd_lowering" or "adjoint_lowering" (see `SelectiveScanConfig`). The latter two write the
  rows backward's layouts, so they also need `bwd_rows`."""
  block = pallas_mosaic.E_BLOCK * cfg.mosaic_channels_per_thread
  rows = option == "fwd_lowering" or cfg.bwd_rows
  needs = (
    f"d_inner a multiple of {block} (128 x mosaic_channels_per_thread), d_state a multiple of 4"
    f"{'' if option == 'fwd_lowering' else ', bwd_rows'} and a compiled run; got d_inner={e}, d_state={n}, "
    f"bwd_rows={cfg.bwd_rows}, interpret={interpret}"
  )
  fits = e % block == 0 and n % 4 == 0 and rows
  return use_mosaic(getattr(cfg, option), option, fits, interpret, needs)


def _segment_chain(cfg: SelectiveScanConfig, e: int, interpret: bool) -> str:
  """`cfg.segment_chain`, checked: "pass2", "xla", or "mosaic" where a Mosaic GPU kernel can run."""
  chain = cfg.segment_chain
  if chain not in ("pass2", "xla", "mosaic"):
    raise ValueError(f"segment_chain must be 'pass2', 'xla' or 'mosaic', not {chain!r}")
  block = pallas_mosaic.E_BLOCK * cfg.mosaic_channels_per_thread
  if chain == "mosaic" and (interpret or e % block):
    raise ValueError(
      f"segment_chain='mosaic' needs d_inner a multiple of {block} (128 x mosaic_channels_per_thread) and a "
      f"compiled run on a Hopper GPU; got d_inner={e}, interpret={interpret}. Use 'xla' or 'pass2'."
    )
  return chain


def selective_scan_pallas(
  u: jax.Array,  # (b, l, e)
  delta: jax.Array,  # (b, l, e)
  A: jax.Array,  # (e, n)
  B: jax.Array,  # (b, l, n)
  C: jax.Array,  # (b, l, n)
  D: jax.Array | None = None,  # (e,)
  z: jax.Array | None = None,  # (b, l, e), or (b, l, width) with z_start
  delta_bias: jax.Array | None = None,  # (e,)
  delta_softplus: bool = False,
  initial_state: jax.Array | None = None,  # (b, e, n)
  return_last_state: bool = False,
  *,
  z_start: int | None = None,
  interpret: bool = False,
  config: SelectiveScanConfig | None = None,
):
  """Same contract as `mamba_jax.ops.selective_scan`; differentiable in every array argument.

  Args:
    z_start: the gate is `z[..., z_start : z_start + e]` of a wider z (the in_proj output), read in place when
      z_start is a multiple of both channel blocks and the length needs no padding, else sliced first.
    interpret: run the kernels in the Pallas interpreter (CPU tests).
    config: block sizes; `DEFAULT_CONFIG` when None.
  """
  cfg = config or DEFAULT_CONFIG
  b, l, e = u.shape
  n = A.shape[-1]
  eb, eb_bwd = min(cfg.block_e, e), min(cfg.block_e_bwd, e)
  if e % eb or e % eb_bwd:
    raise ValueError(f"d_inner={e} must be a multiple of block_e={eb} and block_e_bwd={eb_bwd}")
  if cfg.unroll % cfg.unroll_bwd:
    raise ValueError(f"unroll={cfg.unroll} must be a multiple of unroll_bwd={cfg.unroll_bwd}")
  seg, S = _segments(l, b, e, dataclasses.replace(cfg, block_e=eb))
  pad = seg * S - l
  if z_start is not None:
    if pad or z_start % eb or z_start % eb_bwd:  # the blocks cannot address the gate columns in place
      z, z_start = gate_columns(z, int(z_start), u.shape, "selective_scan"), None
    else:
      check_gate_columns(z, int(z_start), u.shape, "selective_scan")
  elif z is not None and z.shape != u.shape:
    raise ValueError(f"selective_scan: z {z.shape} must have u's shape {u.shape} (or give z_start)")
  z_start = int(z_start or 0)
  bf16_bc = B.dtype == C.dtype == jnp.bfloat16
  meta = _Meta(
    l, seg, S, cfg.unroll, eb, cfg.unroll_bwd, eb_bwd, D is not None, z is not None, delta_bias is not None,
    delta_softplus, cfg.num_warps, cfg.num_stages, cfg.num_warps_bwd, cfg.bwd_rows, cfg.prefetch,
    cfg.pack_bc and bf16_bc, z_start, interpret, cfg.fast_math, _use_mosaic(cfg, e, n, interpret), cfg.mosaic_chunk,
    cfg.mosaic_stages, cfg.mosaic_channels_per_thread, _use_mosaic(cfg, e, n, interpret, "vjp_fwd_lowering"),
    _use_mosaic(cfg, e, n, interpret, "adjoint_lowering"),
    (cfg.mosaic_poly_pass1, cfg.mosaic_poly_pass2, cfg.mosaic_poly_adjoint), _segment_chain(cfg, e, interpret),
  )  # fmt: skip

  def pad_l(a):
    return jnp.pad(a, ((0, 0), (0, pad), (0, 0))) if pad and a is not None else a

  h0 = None if initial_state is None else initial_state.astype(jnp.float32)  # None: zeros
  u, delta, B, C, z = (pad_l(a) for a in (u, delta, B, C, z))
  # Pass 1 outside the custom VJP, named: under jax.checkpoint a policy that saves its name (the model's
  # remat does) keeps them from the forward pass, so the backward's recomputation runs pass 2 only.
  # Its inputs are cut from differentiation (a pallas_call has no JVP); `_core`'s VJP is the whole scan's.
  seg = _segment_states(meta, *jax.lax.stop_gradient((u, delta, A, B, C, delta_bias)))
  if seg is not None and cfg.barrier_segment_states:
    seg = jax.lax.optimization_barrier(seg)  # no fusion may take (and clone) the pass-1 call: see the config
  seg = None if seg is None else checkpoint_name(seg, SELECTIVE_SCAN_SEGMENT_STATES)
  y, h = _core(meta, u, delta, A, B, C, D, z, delta_bias, h0, seg)
  y = y[:, :l] if pad else y
  return (y, h) if return_last_state else y


__all__ = [
  "SelectiveScanConfig",
  "DEFAULT_CONFIG",
  "chain_states_xla",
  "default_config_overrides",
  "selective_scan_pallas",
]
