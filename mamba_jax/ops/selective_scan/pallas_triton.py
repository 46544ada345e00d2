"""Mamba1 selective scan (channels-last) as a Pallas GPU kernel (Triton lowering).

Shape legend: b batch, l length, s segments, e inner channels (d_inner), n state.

Design:
  * The recurrence h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t is elementwise in (e, n) with a decay that
    depends on n, so there is no matrix form to exploit; the kernel walks time step by step with the
    (e-block, n) state in registers. The time loop is unrolled `unroll` steps per iteration so that the loads
    of those steps are independent of the carried state and can all be in flight before the first is used.
  * Parallelism beyond b * e / e_blk programs comes from cutting the sequence into segments: pass 1 computes
    each segment's end state from a zero start, XLA combines segments (decay exp(A * sum delta)), pass 2
    recomputes each segment from its true incoming state and writes y with D and the z gate fused.
    delta_bias and softplus are applied inside the kernels.
  * Backward: XLA autodiff of `selective_scan_xla` (the chunked associative scan with rematerialisation) on
    the saved inputs; the Pallas kernels only speed up the forward pass. See benchmarks/results/scans.md.
  * 64-bit safety: blocks start at per-dimension block indices and the Pallas Triton lowering uses int64
    offsets for arrays above 4 GiB; in-kernel row indices stay below the segment length.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mamba_jax.ops._dt import SOFTPLUS_THRESHOLD
from mamba_jax.ops.selective_scan.xla import selective_scan_xla

_SQ = pl.squeezed if hasattr(pl, "squeezed") else None


@dataclasses.dataclass(frozen=True)
class SelectiveScanConfig:
  """Block sizes and launch parameters.

  Attributes:
    block_e: channels per program (a power of two).
    unroll: time steps per loop iteration (loads issued together).
    target_programs: aim for at least this many programs (b * e / block_e * segments).
    num_warps: warps per program.
    num_stages: Triton software-pipelining depth.

  Defaults: the fastest of a small sweep on an H100 at 32K tokens (benchmarks/bench_scans.py --tune).
  """

  block_e: int = 128
  unroll: int = 16
  target_programs: int = 1056
  num_warps: int = 4
  num_stages: int = 2


DEFAULT_CONFIG = SelectiveScanConfig()


@dataclasses.dataclass(frozen=True)
class _Meta:
  l: int  # true length (steps at or beyond it are identity)
  seg_len: int
  S: int
  unroll: int
  block_e: int
  has_d: bool
  has_z: bool
  has_bias: bool
  softplus: bool
  num_warps: int
  num_stages: int
  interpret: bool


def _delta(d, bias, softplus):
  if bias is not None:
    d = d + bias
  if softplus:
    d = jnp.where(d > SOFTPLUS_THRESHOLD, d, jnp.log1p(jnp.exp(jnp.minimum(d, SOFTPLUS_THRESHOLD))))
  return d


def _scan_kernel(*refs, meta: _Meta, write_y: bool):
  """One (batch, channel block, segment): walk the segment's steps from its incoming state.

  Refs in: u (L_s, e_blk), delta (L_s, e_blk), A (e_blk, n), B (L_s, n), C (L_s, n) [write_y], [D (e_blk,)],
    [z (L_s, e_blk)], [delta_bias (e_blk,)], h_in (e_blk, n).
  Refs out: y (L_s, e_blk) when `write_y`, else the segment's end state h_out (e_blk, n) float32.
  """
  refs = list(refs)
  u_ref, d_ref, a_ref, b_ref = refs[:4]
  i = 4
  c_ref = dd_ref = z_ref = bias_ref = None
  if write_y:
    c_ref = refs[i]
    i += 1
    if meta.has_d:
      dd_ref = refs[i]
      i += 1
    if meta.has_z:
      z_ref = refs[i]
      i += 1
  if meta.has_bias:
    bias_ref = refs[i]
    i += 1
  h_ref, out_ref = refs[i], refs[i + 1]
  A = a_ref[...].astype(jnp.float32)  # (e, n)
  bias = bias_ref[...].astype(jnp.float32) if meta.has_bias else None
  Dv = dd_ref[...].astype(jnp.float32) if write_y and meta.has_d else None
  seg0 = pl.program_id(1) * meta.seg_len
  ragged = meta.l % meta.seg_len != 0 or meta.l < meta.S * meta.seg_len

  def body(it, h):
    for j in range(meta.unroll):
      t = it * meta.unroll + j
      u = u_ref[t, :].astype(jnp.float32)  # (e,)
      d = _delta(d_ref[t, :].astype(jnp.float32), bias, meta.softplus)  # (e,)
      if ragged:
        d = jnp.where(seg0 + t < meta.l, d, 0.0)
      Bt = b_ref[t, :].astype(jnp.float32)  # (n,)
      h = jnp.exp(d[:, None] * A) * h + (d * u)[:, None] * Bt[None, :]  # (e, n)
      if write_y:
        y = jnp.sum(h * c_ref[t, :].astype(jnp.float32)[None, :], axis=1)  # (e,)
        if meta.has_d:
          y = y + Dv * u
        if meta.has_z:
          y = y * jax.nn.silu(z_ref[t, :].astype(jnp.float32))
        out_ref[t, :] = y.astype(out_ref.dtype)
    return h

  h = jax.lax.fori_loop(0, meta.seg_len // meta.unroll, body, h_ref[...])
  if not write_y:
    out_ref[...] = h


def _scan_call(meta, u, delta, A, B, C, D, z, delta_bias, h_in, write_y):
  b, lp, e = u.shape
  n = A.shape[-1]
  eb, Ls = meta.block_e, meta.seg_len
  seq_e = pl.BlockSpec((_SQ, Ls, eb), lambda ei, si, bi: (bi, si, ei))
  seq_n = pl.BlockSpec((_SQ, Ls, n), lambda ei, si, bi: (bi, si, 0))
  vec_e = pl.BlockSpec((eb,), lambda ei, si, bi: (ei,))
  en = pl.BlockSpec((eb, n), lambda ei, si, bi: (ei, 0))
  seg_en = pl.BlockSpec((_SQ, _SQ, eb, n), lambda ei, si, bi: (bi, si, ei, 0))
  in_specs, args = [seq_e, seq_e, en, seq_n], [u, delta, A, B]
  if write_y:
    in_specs.append(seq_n)
    args.append(C)
    if meta.has_d:
      in_specs.append(vec_e)
      args.append(D)
    if meta.has_z:
      in_specs.append(seq_e)
      args.append(z)
  if meta.has_bias:
    in_specs.append(vec_e)
    args.append(delta_bias)
  in_specs.append(seg_en)
  args.append(h_in)
  if write_y:
    out_spec, out_shape = seq_e, jax.ShapeDtypeStruct(u.shape, u.dtype)
  else:
    out_spec, out_shape = seg_en, jax.ShapeDtypeStruct((b, meta.S, e, n), jnp.float32)
  return pl.pallas_call(
    functools.partial(_scan_kernel, meta=meta, write_y=write_y),
    out_shape=out_shape,
    grid=(e // eb, meta.S, b),
    in_specs=in_specs,
    out_specs=out_spec,
    compiler_params=plgpu.CompilerParams(num_warps=meta.num_warps, num_stages=meta.num_stages),
    interpret=meta.interpret,
    name="selective_scan_fwd" if write_y else "selective_scan_segment_states",
  )(*args)


def _forward(meta, u, delta, A, B, C, D, z, delta_bias, h0):
  """y (b, l_pad, e) and the last state (b, e, n) float32."""
  b, lp, e = u.shape
  n = A.shape[-1]
  A32 = A.astype(jnp.float32)
  if meta.S == 1:
    h_seg = h0[:, None]
    h_last = _scan_call(meta, u, delta, A, B, C, D, z, delta_bias, h_seg, write_y=False)[:, 0]
  else:
    zeros = jnp.zeros((b, meta.S, e, n), jnp.float32)
    h_loc = _scan_call(meta, u, delta, A, B, C, D, z, delta_bias, zeros, write_y=False)  # (b, s, e, n)
    d = _delta(delta.astype(jnp.float32), None if delta_bias is None else delta_bias.astype(jnp.float32), meta.softplus)
    d = jnp.where(jnp.arange(lp)[None, :, None] < meta.l, d, 0.0)
    dsum = d.reshape(b, meta.S, meta.seg_len, e).sum(2)  # (b, s, e)
    dec = jnp.exp(dsum[..., None] * A32)  # (b, s, e, n)

    def step(h, inp):
      loc, dc = inp
      return dc * h + loc, h

    h_last, h_in = jax.lax.scan(step, h0, (jnp.moveaxis(h_loc, 1, 0), jnp.moveaxis(dec, 1, 0)))
    h_seg = jnp.moveaxis(h_in, 0, 1)
  y = _scan_call(meta, u, delta, A, B, C, D, z, delta_bias, h_seg, write_y=True)
  return y, h_last


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(meta, u, delta, A, B, C, D, z, delta_bias, h0):
  return _forward(meta, u, delta, A, B, C, D, z, delta_bias, h0)


def _xla(meta, u, delta, A, B, C, D, z, delta_bias, h0):
  l = meta.l
  y, h = selective_scan_xla(
    u[:, :l],
    delta[:, :l],
    A,
    B[:, :l],
    C[:, :l],
    D,
    None if z is None else z[:, :l],
    delta_bias,
    meta.softplus,
    h0,
    True,
  )
  pad = u.shape[1] - l
  return (jnp.pad(y, ((0, 0), (0, pad), (0, 0))) if pad else y), h


def _core_fwd(meta, *args):
  return _forward(meta, *args), args


def _core_bwd(meta, args, cts):
  _, vjp = jax.vjp(functools.partial(_xla, meta), *args)
  return vjp(cts)


_core.defvjp(_core_fwd, _core_bwd)


def _segments(l, b, e, cfg):
  """(segment length, segments): segment length a multiple of `unroll`."""
  progs = b * max(1, e // cfg.block_e)
  S = max(1, min(-(-cfg.target_programs // progs), l // (4 * cfg.unroll)))
  seg = -(-l // S)
  seg = -(-seg // cfg.unroll) * cfg.unroll
  return seg, -(-l // seg)


def selective_scan_pallas(
  u: jax.Array,  # (b, l, e)
  delta: jax.Array,  # (b, l, e)
  A: jax.Array,  # (e, n)
  B: jax.Array,  # (b, l, n)
  C: jax.Array,  # (b, l, n)
  D: jax.Array | None = None,  # (e,)
  z: jax.Array | None = None,  # (b, l, e)
  delta_bias: jax.Array | None = None,  # (e,)
  delta_softplus: bool = False,
  initial_state: jax.Array | None = None,  # (b, e, n)
  return_last_state: bool = False,
  *,
  interpret: bool = False,
  config: SelectiveScanConfig | None = None,
):
  """Same contract as `mamba_jax.ops.selective_scan`; differentiable in every array argument.

  Args:
    interpret: run the kernels in the Pallas interpreter (CPU tests).
    config: block sizes; `DEFAULT_CONFIG` when None.
  """
  cfg = config or DEFAULT_CONFIG
  b, l, e = u.shape
  n = A.shape[-1]
  eb = min(cfg.block_e, e)
  if e % eb:
    raise ValueError(f"d_inner={e} must be a multiple of block_e={eb}")
  seg, S = _segments(l, b, e, dataclasses.replace(cfg, block_e=eb))
  meta = _Meta(
    l, seg, S, cfg.unroll, eb, D is not None, z is not None, delta_bias is not None, delta_softplus,
    cfg.num_warps, cfg.num_stages, interpret,
  )  # fmt: skip
  pad = seg * S - l

  def pad_l(a):
    return jnp.pad(a, ((0, 0), (0, pad), (0, 0))) if pad and a is not None else a

  h0 = jnp.zeros((b, e, n), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
  y, h = _core(meta, pad_l(u), pad_l(delta), A, pad_l(B), pad_l(C), D, pad_l(z), delta_bias, h0)
  y = y[:, :l] if pad else y
  return (y, h) if return_last_state else y


__all__ = ["SelectiveScanConfig", "DEFAULT_CONFIG", "selective_scan_pallas"]
