"""The Mamba2 SSD forward's two kernels in Pallas Mosaic GPU (Hopper: TMA copies and warpgroup matrix products).

Shape legend: b batch, l length, s segments, t/u positions in a chunk, h heads, p head dim, g groups, n state.

Built to choose the Pallas lowering by measurement (issue 4: "both Pallas lowerings exist on Hopper ... choose by
measurement"): they are the Triton forward's kernels (`pallas_triton._fwd_segment_state_kernel` and `_fwd_kernel`)
written for Mosaic GPU, with the same work per program (one (batch, head, segment), walking its chunks in order with
the state in registers), so that the two lowerings are compared on the same algorithm.
`benchmarks/profile_ssd_mosaic.py` times both; benchmarks/results/scans.md has the figures and the choice.

Main kernel (`fwd_main`): per chunk of T tokens, one warpgroup (128 threads) issues four warpgroup matrix products,
all with untransposed shared-memory operands (B is given transposed, (b, g, n, l), so that both products that read
it take it as is):
  cb = C B^T            (t, n) @ (n, u)
  y  = e^c * (C S^T)    (t, n) @ (n, p)     S^T is kept in shared memory in the operands' dtype
  y += (cb * L * dt) x  (t, u) @ (u, p)     the left operand from registers
  S^T = e^c_end S^T + B^T w,  w = e^(c_end - c) dt x    (n, t) @ (t, p)
while the next chunks' tiles arrive by TMA into a ring of `stages` buffers. The state is kept transposed, (n, p),
so that the third product's accumulator is the next chunk's right operand without a transpose. One stage (no
prefetch beyond the current chunk's copies) measured faster than two (scans.md round 13), so it is the default.
Under `jax.vjp` (`save_states`) it also copies each chunk-entry state out of shared memory, transposed as it holds
it, and with a gate the output before the gate, for the backward (scans.md round 15: the 64K forward+backward
8.00 -> 7.59 ms against the Triton forward storing them).

Segment-state kernel (`segment_states`): each segment's end state from a zero start, the last product above alone,
given transposed, (n, p), as the main kernel takes its incoming states (the XLA scan over segments between the two
launches is elementwise, so it needs no transpose either). It waits on its copies more than the main kernel, so two
stages (the next chunk's tiles in flight) are its default: 1.2-1.8x faster than the Triton kernel on an H200, one and
three stages slower (scans.md round 14).

`pallas_triton.ssd_pallas` runs them for the forward on Hopper GPUs, under `jax.vjp` too
(`SSDConfig.fwd_main_lowering`, `mosaic_segment_states`, `mosaic_vjp_forward`); the backward stays Triton. CI
cannot run Mosaic GPU kernels (the GPU interpreter of jax 0.10 lacks layout casts and transposed refs), so the CPU
tests lower them for CUDA (the Pallas-to-Mosaic lowering, with its shape and layout checks) and the GPU tests
compare them with the Triton kernels and float64 references.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from mamba_jax.ops._kernel_refs import split_refs
from mamba_jax.ops._mosaic_gpu import load as _load

_WG = plgpu.Layout.WGMMA
_ROW = plgpu.Layout.WGMMA.reduce(1)  # a (t,) vector along the rows of a (t, .) accumulator
_COL = plgpu.Layout.WGMMA.reduce(0)  # a (u,) vector along the columns
# Every array's layout is given above, so the kernel is lowered with lane semantics (jax 0.10's default; 0.11's is
# warpgroup semantics, whose layout inference found no solution for this kernel on the H200).
_SEMANTICS = plgpu.LoweringSemantics.Lane


def _tile(shape, dtype):
  """A shared-memory tile laid out for TMA and the matrix units (128-byte swizzle over 64-element rows)."""
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def _fetch_state_tiles(gmem, smem, bar, slot, bi, hi, gi, t0, T):
  """TMA copies of one chunk's x (t, p), dt (t,), cs (t,) and B^T (n, t) tiles into `slot` of their rings, all
  arriving on bar[slot] (4 arrivals)."""
  x_g, dt_g, cs_g, bt_g = gmem
  x_s, dt_s, cs_s, bt_s = smem
  plgpu.copy_gmem_to_smem(x_g.at[bi, pl.ds(t0, T), hi], x_s.at[slot], bar.at[slot])
  plgpu.copy_gmem_to_smem(dt_g.at[bi, hi, pl.ds(t0, T)], dt_s.at[slot], bar.at[slot])
  plgpu.copy_gmem_to_smem(cs_g.at[bi, hi, pl.ds(t0, T)], cs_s.at[slot], bar.at[slot])
  plgpu.copy_gmem_to_smem(bt_g.at[bi, gi, :, pl.ds(t0, T)], bt_s.at[slot], bar.at[slot])


def _fwd_kernel(*refs, T, K, r, stages, has_d, has_z, save_states):
  """y for one (batch, head, segment) from its incoming state S^T; with `save_states` (under `jax.vjp`) also every
  chunk-entry state S^T (n, p) in the operands' dtype and, with a gate, the output before it."""
  yp = save_states and has_z
  named, scratch = split_refs(refs, *[True] * 5, has_d, has_z, True, True, save_states, yp)
  x_g, dt_g, cs_g, bt_g, c_g, d_g, z_g, s_g, y_g, st_g, yp_g = named
  # Scratch, in `fwd_main`'s order: x, [z], B^T, C, dt, cs, w, S^T, y, the barriers, [the pre-gate output].
  (x_s, z_s, bt_s, c_s, dt_s, cs_s, w_s, st_s, y_s, bar, yp_s), _ = split_refs(scratch, True, has_z, *[True] * 8, yp)

  hi, si, bi = lax.axis_index("h"), lax.axis_index("s"), lax.axis_index("b")
  gi = hi // r
  base = si * (K * T)

  def fetch(k, slot):
    t0 = base + k * T
    _fetch_state_tiles((x_g, dt_g, cs_g, bt_g), (x_s, dt_s, cs_s, bt_s), bar, slot, bi, hi, gi, t0, T)
    plgpu.copy_gmem_to_smem(c_g.at[bi, pl.ds(t0, T), gi], c_s.at[slot], bar.at[slot])
    if has_z:
      plgpu.copy_gmem_to_smem(z_g.at[bi, pl.ds(t0, T), hi], z_s.at[slot], bar.at[slot])

  for k in range(min(stages, K)):
    fetch(k, k)

  S = _load(s_g.at[bi, hi, si], _WG, optimized=False)  # (n, p) float32, the incoming state
  st_s[...] = S.astype(st_s.dtype)
  plgpu.commit_smem()
  Dv = _load(d_g.at[hi], _COL, optimized=False) if has_d else None  # (p,)
  row = plgpu.broadcasted_iota(jnp.int32, (T, T), 0, layout=_WG)
  col = plgpu.broadcasted_iota(jnp.int32, (T, T), 1, layout=_WG)

  def body(k, S):
    slot = lax.rem(k, stages)
    t0 = base + k * T
    if st_g is not None:  # the chunk-entry state, as the products below read it; read before st_s is rewritten
      plgpu.copy_smem_to_gmem(st_s, st_g.at[bi, hi, si * K + k])
    plgpu.barrier_wait(bar.at[slot])
    c_row = _load(cs_s.at[slot], _ROW)  # (t,)
    c_col = _load(cs_s.at[slot], _COL)  # (u,)
    dt_row = _load(dt_s.at[slot], _ROW)
    dt_col = _load(dt_s.at[slot], _COL)
    c_end = cs_g[bi, hi, t0 + T - 1]

    def products(cb_acc, y_acc):
      plgpu.wgmma(cb_acc, c_s.at[slot], bt_s.at[slot])
      plgpu.wgmma(y_acc, c_s.at[slot], st_s)
      return cb_acc[...], y_acc[...]

    cb, y_state = pl.run_scoped(products, plgpu.ACC((T, T), jnp.float32), plgpu.ACC((T, x_s.shape[-1]), jnp.float32))
    shape_tt, shape_tp = cb.shape, y_state.shape
    diff = lax.broadcast_in_dim(c_row, shape_tt, [0]) - lax.broadcast_in_dim(c_col, shape_tt, [1])
    L = jnp.exp(jnp.where(row >= col, diff, -jnp.inf))
    M = (cb * L * lax.broadcast_in_dim(dt_col, shape_tt, [1])).astype(x_s.dtype)  # (t, u)
    y0 = y_state * lax.broadcast_in_dim(jnp.exp(c_row), shape_tp, [0])

    def intra(acc):
      plgpu.wgmma(acc, M, x_s.at[slot])

    y = pl.run_state(intra)(plgpu.ACC.init(y0))  # (t, p)
    x = _load(x_s.at[slot], _WG).astype(jnp.float32)  # (t, p)
    if has_d:
      y = y + lax.broadcast_in_dim(Dv, shape_tp, [1]) * x
    y_pre = y
    if has_z:
      zz = _load(z_s.at[slot], _WG).astype(jnp.float32)
      y = y * zz * jax.nn.sigmoid(zz)
    wgt = jnp.exp(c_end - c_row) * dt_row  # (t,)
    w_s[...] = (x * lax.broadcast_in_dim(wgt, shape_tp, [0])).astype(w_s.dtype)
    # Every copy out has read its shared memory: the previous chunk's y (and pre-gate output) have left y_s (yp_s),
    # and this chunk's entry state has left st_s, which the update below rewrites.
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    y_s[...] = y.astype(y_s.dtype)
    if yp_s is not None:
      yp_s[...] = y_pre.astype(yp_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(y_s, y_g.at[bi, pl.ds(t0, T), hi])
    if yp_s is not None:
      plgpu.copy_smem_to_gmem(yp_s, yp_g.at[bi, pl.ds(t0, T), hi])

    def update(acc):
      plgpu.wgmma(acc, bt_s.at[slot], w_s)

    S = pl.run_state(update)(plgpu.ACC.init(S * jnp.exp(c_end)))  # (n, p)
    st_s[...] = S.astype(st_s.dtype)
    plgpu.commit_smem()

    @pl.when(k + stages < K)
    def _():
      fetch(k + stages, slot)

    return S

  lax.fori_loop(0, K, body, S)
  plgpu.wait_smem_to_gmem(0)


def _segment_state_kernel(x_g, dt_g, cs_g, bt_g, out_g, *scratch, T, K, r, stages):
  """S^T (n, p) float32 at the end of one (batch, head, segment) from a zero start: per chunk one warpgroup matrix
  product, S^T = e^c_end S^T + B^T w with w = e^(c_end - c) dt x (the main kernel's state update)."""
  x_s, bt_s, dt_s, cs_s, w_s, out_s, bar = scratch
  n, p = out_s.shape
  hi, si, bi = lax.axis_index("h"), lax.axis_index("s"), lax.axis_index("b")
  gi = hi // r
  base = si * (K * T)

  def fetch(k, slot):
    _fetch_state_tiles((x_g, dt_g, cs_g, bt_g), (x_s, dt_s, cs_s, bt_s), bar, slot, bi, hi, gi, base + k * T, T)

  for k in range(min(stages, K)):
    fetch(k, k)

  def chunk(k, S):
    """The state after chunk k from S, the state before it (None: zero, for the first chunk)."""
    slot = lax.rem(k, stages) if S is not None else 0
    t0 = base + k * T
    plgpu.barrier_wait(bar.at[slot])
    c_row = _load(cs_s.at[slot], _ROW)  # (t,)
    dt_row = _load(dt_s.at[slot], _ROW)
    c_end = cs_g[bi, hi, t0 + T - 1]
    x = _load(x_s.at[slot], _WG).astype(jnp.float32)  # (t, p)
    wgt = jnp.exp(c_end - c_row) * dt_row  # (t,)
    w_s[...] = (x * lax.broadcast_in_dim(wgt, x.shape, [0])).astype(w_s.dtype)
    plgpu.commit_smem()

    def update(acc):
      plgpu.wgmma(acc, bt_s.at[slot], w_s)

    if S is None:

      def first(acc):
        update(acc)
        return acc[...]

      S = pl.run_scoped(first, plgpu.ACC((n, p), jnp.float32))  # a zero-initialised accumulator
      if stages < K:
        fetch(stages, slot)
    else:
      S = pl.run_state(update)(plgpu.ACC.init(S * jnp.exp(c_end)))  # (n, p)

      @pl.when(k + stages < K)
      def _():
        fetch(k + stages, slot)

    return S

  S = lax.fori_loop(1, K, chunk, chunk(0, None))
  out_s[...] = S
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(out_s, out_g.at[bi, hi, si])
  plgpu.wait_smem_to_gmem(0)


def transposed_b(B):
  """B (b, l, g, n) as (b, g, n, l): both kernels read B^T tiles, untransposed operands of their products."""
  return jnp.transpose(B, (0, 2, 3, 1))


def _stages(want, K):
  return max(1, min(want, K))


def segment_states(meta, x, dtp, cs, bt, *, stages=None):
  """(b, h, s, n, p) float32, each segment's end state (transposed, S^T) from a zero start, from the padded,
  preprocessed inputs of `pallas_triton._fwd_segment_states` with B as `transposed_b(B)`."""
  b, l, h, p = x.shape
  g, n = bt.shape[1:3]
  T, K = meta.T, meta.K
  stages = _stages(meta.mosaic_state_stages if stages is None else stages, K)
  scratch = [
    _tile((stages, T, p), x.dtype),  # x
    _tile((stages, n, T), bt.dtype),  # B^T
    plgpu.SMEM((stages, T), jnp.float32),  # dt
    plgpu.SMEM((stages, T), jnp.float32),  # cs
    _tile((T, p), x.dtype),  # w
    plgpu.SMEM((n, p), jnp.float32, transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))),
    plgpu.Barrier(num_arrivals=4, num_barriers=stages),
  ]
  call = plgpu.kernel(
    functools.partial(_segment_state_kernel, T=T, K=K, r=h // g, stages=stages),
    out_type=jax.ShapeDtypeStruct((b, h, meta.S, n, p), jnp.float32),
    scratch_types=scratch,
    grid=(h, meta.S, b),
    grid_names=("h", "s", "b"),
    compiler_params=plgpu.CompilerParams(approx_math=True, lowering_semantics=_SEMANTICS),
  )
  return call(x, dtp, cs, bt)


def fwd_main(meta, x, dtp, cs, bt, C, D, z, S_in, *, stages=None, save_states=False):
  """y (b, l, h, p) from the padded, preprocessed inputs of `pallas_triton._fwd_main`, B as `transposed_b(B)`, and
  S_in (b, h, s, n, p), each segment's incoming state transposed (float32). With `save_states`, (y, (every
  chunk-entry state transposed (b, h, c, n, p) in the inputs' dtype, with a gate the output before it (b, l, h, p),
  else None)), what `pallas_triton._fwd_main` stores for the backward, with the states transposed."""
  b, l, h, p = x.shape
  g, n = bt.shape[1:3]
  T, K = meta.T, meta.K
  stages = _stages(meta.mosaic_stages if stages is None else stages, K)
  dtype = x.dtype
  scratch = [
    _tile((stages, T, p), dtype),  # x
    _tile((stages, n, T), dtype),  # B^T
    _tile((stages, T, n), dtype),  # C
    plgpu.SMEM((stages, T), jnp.float32),  # dt
    plgpu.SMEM((stages, T), jnp.float32),  # cs
    _tile((T, p), dtype),  # w
    _tile((n, p), dtype),  # S^T
    _tile((T, p), dtype),  # y
    plgpu.Barrier(num_arrivals=5 + (z is not None), num_barriers=stages),
  ]
  if z is not None:
    scratch.insert(1, _tile((stages, T, p), dtype))  # z
  out_type = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
  if save_states:
    out_type.append(jax.ShapeDtypeStruct((b, h, meta.S * K, n, p), dtype))
    if z is not None:
      out_type.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
      scratch.append(_tile((T, p), dtype))  # the output before the gate
  args = [x, dtp, cs, bt, C]
  if D is not None:
    args.append(D)
  if z is not None:
    args.append(z)
  args.append(S_in.astype(jnp.float32))
  kernel = functools.partial(
    _fwd_kernel, T=T, K=K, r=h // g, stages=stages, has_d=D is not None, has_z=z is not None, save_states=save_states
  )
  call = plgpu.kernel(
    kernel,
    out_type=out_type if save_states else out_type[0],
    scratch_types=scratch,
    grid=(h, meta.S, b),
    grid_names=("h", "s", "b"),
    compiler_params=plgpu.CompilerParams(approx_math=True, lowering_semantics=_SEMANTICS),
  )
  outs = call(*args)
  if not save_states:
    return outs
  return outs[0], (outs[1], outs[2] if z is not None else None)


__all__ = ["fwd_main", "segment_states", "transposed_b"]
