"""Pallas selective scan (interpret mode on CPU, compiled on GPU) against the sequential reference in float64."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_jax import MambaConfig, MambaLM, ops
from mamba_jax.ops.selective_scan import pallas_triton as pt
from mamba_jax.ops.selective_scan.reference import selective_scan_reference
from mamba_jax.scales import CalibrationScale, attach_scales
from tests.conftest import (
  float64,
  kernel_call_lines,
  live_kernel_call_results,
  live_triton_call_results,
  operand_types,
  rel_err,
  result_types,
  triton_call_results,
)

INTERPRET = jax.default_backend() != "gpu"
# Few channels per program and short segments, so that short test sequences span several segments.
CFG = pt.SelectiveScanConfig(block_e=16, unroll=4, target_programs=8, block_e_bwd=8, unroll_bwd=2)
# Backward kernels: the rows kernel with one channel per thread (dB, dC summed by lane shuffles, as with the
# default config), the rows kernel with per-state sums over the block, and the (e, n) kernel.
BWD = {
  "rows": dict(bwd_rows=True, block_e_bwd=32, num_warps_bwd=1),
  "rows_blocksum": dict(bwd_rows=True),
  "en": dict(bwd_rows=False),
  # The forward with prefetching (its stored states feed the backward).
  "rows_prefetch": dict(bwd_rows=True, prefetch=True),
}


def _inputs(key, b=2, l=45, e=32, n=8, dtype=jnp.float32):
  k = jax.random.split(key, 9)
  r = lambda i, shape: jax.random.normal(k[i], shape, jnp.float32)
  return dict(
    u=r(0, (b, l, e)).astype(dtype),
    delta=r(1, (b, l, e)) * 0.5,
    A=-jnp.exp(r(2, (e, n)) * 0.5),
    B=r(3, (b, l, n)).astype(dtype),
    C=r(4, (b, l, n)).astype(dtype),
    D=r(5, (e,)),
    z=r(6, (b, l, e)).astype(dtype),
    delta_bias=r(7, (e,)) * 0.3,
    initial_state=r(8, (b, e, n)),
  )


CASES = {
  # Ragged length (45 is not a multiple of the segment length), several segments, every option.
  "all": dict(l=45, drop=(), softplus=True),
  # Nothing optional, one segment.
  "plain": dict(l=8, drop=("D", "z", "delta_bias", "initial_state"), softplus=False),
  # Several segments, exact multiple of the segment length, softplus without a bias, no z.
  "segments": dict(l=64, drop=("z", "delta_bias"), softplus=True),
}


def _case(name, dtype=jnp.float32, seed=0):
  spec = CASES[name]
  inp = _inputs(jax.random.PRNGKey(seed), l=spec["l"], dtype=dtype)
  for k in spec["drop"]:
    inp[k] = None
  return inp, dict(delta_softplus=spec["softplus"], return_last_state=True)


def _pallas(cfg=CFG, **kw):
  return pt.selective_scan_pallas(**kw, interpret=INTERPRET, config=cfg)


def _f64(tree):
  return jax.tree.map(lambda a: None if a is None else np.asarray(a, np.float64), tree)


def _outputs_and_grads(cfg, inp, kw, ct, **call):
  """(y, h) and the gradients of sum(y * ct) + sum(h) w.r.t. every array of `inp`, in its order."""
  names = list(inp)

  def f(*arrays):
    y, h = _pallas(cfg, **dict(zip(names, arrays, strict=True)), **kw, **call)
    return jnp.sum(y * ct) + jnp.sum(h), (y, h)

  (_, out), grads = jax.value_and_grad(f, argnums=tuple(range(len(names))), has_aux=True)(*inp.values())
  return out, grads


# Non-default kernel options (prefetch, the (e, n) backward) run on every case under `-m slow`, on "all" by default.
_SLOW = pytest.mark.slow


@pytest.mark.parametrize(
  "name, prefetch",
  [(name, False) for name in CASES]
  + [("all", True)]
  + [pytest.param(n, True, marks=_SLOW) for n in CASES if n != "all"],
)
def test_forward_matches_reference(name, prefetch):
  inp, kw = _case(name)
  y, h = _pallas(dataclasses.replace(CFG, prefetch=prefetch), **inp, **kw)
  with float64():
    y_ref, h_ref = selective_scan_reference(**_f64(inp), **kw)
    y_ref, h_ref = np.asarray(y_ref), np.asarray(h_ref)
  assert y.dtype == jnp.float32 and y.shape == inp["u"].shape
  assert h.dtype == jnp.float32 and h.shape == h_ref.shape
  assert rel_err(y, y_ref) < 1e-5
  assert rel_err(h, h_ref) < 1e-5


def test_forward_bf16_inputs():
  inp, kw = _case("all", dtype=jnp.bfloat16)
  y, h = _pallas(**inp, **kw)
  with float64():
    y_ref, h_ref = selective_scan_reference(**_f64(inp), **kw)
  assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
  assert rel_err(y, y_ref) < 1e-2
  assert rel_err(h, h_ref) < 1e-4  # the state never goes through bf16


@_SLOW  # the packed path (the default) is also checked against the reference by test_forward_bf16_inputs
def test_packed_bc_equals_unpacked():
  """With bf16 B and C, reading them as packed pairs in the forward's main kernel (`pack_bc`) is exact: outputs
  and gradients equal those of the unpacked kernels bit for bit, and the reference to float32 rounding."""
  inp, kw = _case("all", seed=2)
  inp["B"], inp["C"] = inp["B"].astype(jnp.bfloat16), inp["C"].astype(jnp.bfloat16)
  ct = jax.random.normal(jax.random.PRNGKey(5), inp["u"].shape)
  base = dataclasses.replace(CFG, **BWD["rows"])
  out, grads = _outputs_and_grads(dataclasses.replace(base, pack_bc=False), inp, kw, ct)
  out_p, grads_p = _outputs_and_grads(dataclasses.replace(base, pack_bc=True), inp, kw, ct)
  for a, b in zip(jax.tree.leaves((out, grads)), jax.tree.leaves((out_p, grads_p)), strict=True):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  with float64():
    y_ref, h_ref = selective_scan_reference(**_f64(inp), **kw)
  assert rel_err(out_p[0], y_ref) < 1e-5 and rel_err(out_p[1], h_ref) < 1e-5


def test_unpack_bc_reads_each_value():
  """`_pack_bc` / `_unpack_bc` round trip: every one of the 2n values comes back, in order."""
  B = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 4)).astype(jnp.bfloat16)
  C = jax.random.normal(jax.random.PRNGKey(1), (1, 3, 4)).astype(jnp.bfloat16)
  words = pt._pack_bc(B, C)[0]  # (3, 4) uint32
  want = np.concatenate([np.asarray(B[0], np.float32), np.asarray(C[0], np.float32)], axis=-1)
  for t in range(3):
    np.testing.assert_array_equal(np.array(pt._unpack_bc(words, t), np.float32), want[t])


@pytest.mark.parametrize(
  "name, bwd",
  [("all", "rows")]
  + [pytest.param(n, "rows", marks=_SLOW) for n in CASES if n != "all"]
  + [pytest.param("all", "en", marks=_SLOW), pytest.param("all", "rows_blocksum", marks=_SLOW)]
  + [pytest.param(n, "en", marks=_SLOW) for n in CASES if n != "all"]
  + [pytest.param("all", "rows_prefetch", marks=_SLOW)],
)
def test_gradients_match_reference(name, bwd):
  cfg = dataclasses.replace(CFG, **BWD[bwd])
  inp, kw = _case(name, seed=1)
  inp = {k: v for k, v in inp.items() if v is not None}
  names = list(inp)
  ct_y = jax.random.normal(jax.random.PRNGKey(3), inp["u"].shape)
  ct_h = jax.random.normal(jax.random.PRNGKey(4), (inp["u"].shape[0], inp["u"].shape[2], inp["A"].shape[1]))

  def loss(fn, ct_y, ct_h):
    def f(*arrays):
      y, h = fn(**dict(zip(names, arrays, strict=True)), **kw)
      return jnp.sum(y * ct_y) + jnp.sum(h * ct_h)

    return f

  args = [inp[k] for k in names]
  grads = jax.grad(loss(functools.partial(_pallas, cfg), ct_y, ct_h), argnums=tuple(range(len(args))))(*args)
  with float64():
    refs = jax.grad(
      loss(selective_scan_reference, np.float64(ct_y), np.float64(ct_h)), argnums=tuple(range(len(args)))
    )(*_f64(args))
    refs = [np.asarray(r) for r in refs]
  for k, g, r in zip(names, grads, refs, strict=True):
    assert g.shape == r.shape, k
    assert rel_err(g, r) < 5e-5, (k, rel_err(g, r))


@pytest.mark.parametrize("n", [2, 4, 8, 16, 32])
def test_warp_sums(n):
  """The rows backward's shuffle reduce-scatter of dB, dC (interpret-mode shuffles) over 2 warps, every n."""
  P, R = pt._lane_rows(n)
  x = np.random.default_rng(n).normal(size=(P, 64)).astype(np.float32)
  out = np.concatenate([np.asarray(v) for v in pt._warp_sums([jnp.asarray(v) for v in x], True)])  # (R * 64,)
  assert out.shape == (R * 64,)
  per_warp = out.reshape(R, 2, 32).transpose(1, 0, 2).reshape(2, R * 32)[:, pt._warp_sums_positions(P, P)]
  np.testing.assert_allclose(per_warp, x.reshape(P, 2, 32).sum(-1).T, rtol=1e-5, atol=1e-5)


def test_segments_cover_length():
  for l in (1, 7, 45, 4096, 65537):
    for e in (64, 4096):
      seg, s = pt._segments(l, 1, e, pt.DEFAULT_CONFIG)
      assert seg % pt.DEFAULT_CONFIG.unroll == 0 and seg * s >= l and seg * (s - 1) < l, (l, e, seg, s)


def test_segments_do_not_pad_whole_blocks():
  """A length of whole `unroll` blocks is cut without padding (a pad copies every input and output), with a
  segment count near the aimed one (programs = channel blocks x segments)."""
  cfg = pt.DEFAULT_CONFIG
  for l in (2048, 8192, 16384, 32768, 65536, 131072, 12288, 49152):
    for b in (1, 2):
      progs = b * 4096 // cfg.block_e
      seg, s = pt._segments(l, b, 4096, cfg)
      assert seg * s == l and seg % cfg.unroll == 0, (l, b, seg, s)
      want = min(-(-cfg.target_programs // progs), l // (4 * cfg.unroll))
      assert 0.9 * want <= s <= 2 * want, (l, b, s, want)


_LOWERED = {
  "default": {},
  "unpacked": dict(pack_bc=False),  # the default packs B and C
  "en": dict(bwd_rows=False, block_e_bwd=32),
}


@pytest.mark.parametrize("variant", ["default"] + [pytest.param(v, marks=_SLOW) for v in _LOWERED if v != "default"])
def test_lowers_to_triton_for_cuda(variant):
  """CI has no GPU: at least check that the kernels lower to Triton IR for CUDA at the benchmark shapes (the
  non-default kernels with the slow tests)."""
  b, l, e, n = 1, 4096, 4096, 16
  S = jax.ShapeDtypeStruct
  bf = jnp.bfloat16
  args = (S((b, l, e), bf), S((b, l, e), jnp.float32), S((e, n), jnp.float32), S((b, l, n), bf), S((b, l, n), bf))
  args += (S((e,), jnp.float32), S((b, l, e), bf), S((e,), jnp.float32))

  def f(*a, config=None):
    return pt.selective_scan_pallas(*a, True, config=config)

  cfg = dataclasses.replace(pt.DEFAULT_CONFIG, fwd_lowering="triton", **_LOWERED[variant])
  assert len(triton_call_results(functools.partial(f, config=cfg), *args)) == 2  # segment states, scan with y
  loss = lambda *a: jnp.sum(f(*a, config=cfg).astype(jnp.float32))
  grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5, 6, 7))
  assert len(triton_call_results(grad, *args)) == 4  # forward (2, saving states), backward (2)


def _wide_gate(z, start, width, seed=9):
  """z placed at columns [start, start + e) of a (b, l, width) array of other values (as in the in_proj output)."""
  wide = jax.random.normal(jax.random.PRNGKey(seed), (*z.shape[:-1], width), z.dtype)
  return wide.at[..., start : start + z.shape[-1]].set(z)


# 64: read in place; 45: padded, so the gate is sliced first (then the kernels of an ordinary z: slow tests only)
@pytest.mark.parametrize("l", [64, pytest.param(45, marks=pytest.mark.slow)])
def test_gate_read_from_wider_z(l):
  """z_start: the gate taken from columns of a wider array (the in_proj output) gives the outputs and gradients of
  the sliced gate bit for bit, and the gradient w.r.t. the wide array is zero outside the gate columns."""
  inp = _inputs(jax.random.PRNGKey(4), l=l)
  e = inp["u"].shape[-1]
  kw = dict(delta_softplus=True, return_last_state=True)
  cfg = dataclasses.replace(CFG, **BWD["rows"])
  wide = _wide_gate(inp["z"], 2 * e, 4 * e)
  ct = jax.random.normal(jax.random.PRNGKey(5), inp["u"].shape)
  out, grads = _outputs_and_grads(cfg, inp, kw, ct)
  out_w, grads_w = _outputs_and_grads(cfg, {**inp, "z": wide}, kw, ct, z_start=2 * e)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(out_w), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  iz = list(inp).index("z")
  for i, (g, g_w) in enumerate(zip(grads, grads_w, strict=True)):
    if i != iz:
      np.testing.assert_array_equal(np.asarray(g), np.asarray(g_w))
  dz_w = np.asarray(grads_w[iz])
  assert dz_w.shape == wide.shape
  np.testing.assert_array_equal(dz_w[..., 2 * e : 3 * e], np.asarray(grads[iz]))
  assert not dz_w[..., : 2 * e].any() and not dz_w[..., 3 * e :].any()
  assert np.abs(dz_w[..., 2 * e : 3 * e]).max() > 0


def test_gate_columns_out_of_range():
  inp = _inputs(jax.random.PRNGKey(0), l=8)
  e = inp["u"].shape[-1]
  for z, z_start in [(inp["z"], 1), (_wide_gate(inp["z"], 0, 2 * e), e + 1), (inp["z"][:, :4], 0)]:
    with pytest.raises(ValueError, match="gate columns"):
      _pallas(**{**inp, "z": z}, z_start=z_start)
  with pytest.raises(ValueError, match="must have u's shape"):
    _pallas(**{**inp, "z": _wide_gate(inp["z"], 0, 2 * e)})


@pytest.mark.parametrize("lowering", ["triton", "mosaic"])
def test_gate_in_place_lowering_has_no_copy(lowering):
  """At the model's shapes the wide gate lowers without a slice of z (the copy z_start exists to avoid), in either
  lowering of the forward's two kernels (named: on a Hopper GPU "auto" would pick Mosaic GPU, elsewhere Triton)."""
  b, l, e, n = 1, 4096, 4096, 16
  S = jax.ShapeDtypeStruct
  bf = jnp.bfloat16
  base = (S((b, l, e), bf), S((b, l, e), jnp.float32), S((e, n), jnp.float32), S((b, l, n), bf), S((b, l, n), bf))
  base += (S((e,), jnp.float32),)
  cfg = dataclasses.replace(pt.DEFAULT_CONFIG, fwd_lowering=lowering)

  def lowered(z_shape, z_start):
    def f(*a):
      return pt.selective_scan_pallas(*a[:6], a[6], a[7], True, z_start=z_start, config=cfg)

    args = (*base, S(z_shape, bf), S((e,), jnp.float32))
    try:
      return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except Exception as err:  # jaxlib without the Triton dialect: nothing to check here.
      if "triton" in str(err).lower() and "not" in str(err).lower():
        pytest.skip(f"no Triton lowering in this jaxlib: {err}")
      raise

  in_place = lowered((b, l, 2 * e), e)
  mark = {"triton": "__gpu$xla.gpu.triton", "mosaic": "custom_call @mosaic_gpu"}[lowering]
  assert in_place.count(mark) == 2
  assert "stablehlo.slice" not in in_place
  sliced = lowered((b, l, 2 * e), 8)  # not a whole number of channel blocks: sliced first
  assert "stablehlo.slice" in sliced


def _rowwise(fn, x):
  """fn(row, interpret) of a float32 vector: compiled in a Pallas kernel on GPU, its interpreter path on CPU."""
  if INTERPRET:
    return jax.jit(lambda v: fn(v, True))(x)
  from jax.experimental import pallas as pl

  blk = 1024
  xp = jnp.pad(jnp.asarray(x), (0, -len(x) % blk))

  def kernel(x_ref, y_ref):
    y_ref[...] = fn(x_ref[...], False)

  y = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct(xp.shape, jnp.float32),
    grid=(len(xp) // blk,),
    in_specs=[pl.BlockSpec((blk,), lambda i: (i,))],
    out_specs=pl.BlockSpec((blk,), lambda i: (i,)),
  )(xp)
  return y[: len(x)]


def test_fast_softplus_accuracy():
  """`_softplus_fast` (compiled on GPU, as interpreted on CPU) against float64 softplus with the official
  threshold: relative error within 1e-5 from deep in the exponential tail to past the threshold."""
  x = np.concatenate([np.linspace(-30.0, 30.0, 200001), [-3.0, 20.0, 20.5]]).astype(np.float32)
  y = np.asarray(_rowwise(pt._softplus_fast, x), np.float64)
  xd = x.astype(np.float64)
  want = np.where(xd > 20.0, xd, np.log1p(np.exp(np.minimum(xd, 20.0))))
  assert np.max(np.abs(y / want - 1.0)) < 1e-5


@_SLOW  # both paths; the default (True) runs in every other test
@pytest.mark.parametrize("fast", [True, False])
def test_fast_math_paths_match_reference(fast):
  """Both special-function paths of the kernels (`fast_math`): outputs and gradients (rows backward) against the
  float64 reference."""
  inp, kw = _case("all", seed=3)
  ct = jax.random.normal(jax.random.PRNGKey(6), inp["u"].shape)
  cfg = dataclasses.replace(CFG, **BWD["rows"], fast_math=fast)
  (y, h), grads = _outputs_and_grads(cfg, inp, kw, ct)
  names = list(inp)

  def ref_loss(*arrays):
    y, h = selective_scan_reference(**dict(zip(names, arrays, strict=True)), **kw)
    return jnp.sum(y * ct) + jnp.sum(h)

  with float64():
    y_ref, h_ref = selective_scan_reference(**_f64(inp), **kw)
    refs = jax.grad(ref_loss, argnums=tuple(range(len(names))))(*_f64(list(inp.values())))
  assert rel_err(y, y_ref) < 1e-5 and rel_err(h, h_ref) < 1e-5
  for k, g, r in zip(names, grads, refs, strict=True):
    assert rel_err(g, np.asarray(r)) < 5e-5, (k, rel_err(g, np.asarray(r)))


@_SLOW  # the model-level check (test_remat_gradient_step_stores_scan_states_once) runs by default
def test_remat_stores_states_once():
  """Under `jax.checkpoint` the forward pass runs the plain forward and only the backward's recomputation stores
  the state every K steps (`optimize_remat`): one state-storing forward in the lowered gradient, not two."""
  b, l, e, n = 1, 4096, 4096, 16
  S = jax.ShapeDtypeStruct
  bf = jnp.bfloat16
  args = (S((b, l, e), bf), S((b, l, e), jnp.float32), S((e, n), jnp.float32), S((b, l, n), bf), S((b, l, n), bf))
  args += (S((e,), jnp.float32), S((b, l, e), bf), S((e,), jnp.float32))

  def f(*a):
    triton = dict(fwd_lowering="triton", vjp_fwd_lowering="triton", adjoint_lowering="triton")
    return pt.selective_scan_pallas(*a, True, config=dataclasses.replace(pt.DEFAULT_CONFIG, **triton))

  stored = f"tensor<{b}x{l // pt.DEFAULT_CONFIG.unroll_bwd}x{n}x{e}xf32>"  # (b, l / K, n, e)
  S_ = pt._segments(l, b, e, pt.DEFAULT_CONFIG)[1]
  seg_states = [
    f"tensor<{b}x{S_ - 1}x{n}x{e}xf32>",
    f"tensor<{b}x{S_ - 1}x{e}xf32>",
  ]  # pass 1: all segments but the last
  # remat: the primal pass's 2 launches (pass 1 and 2), then the 4 of fwd + bwd; with the model's policy the
  # backward's recomputation reuses pass 1's segment states, so pass 1 runs once (the recomputed copy is dead code,
  # which XLA removes).
  for remat, launches, passes1 in ((None, 4, 1), ("plain", 6, 2), ("model policy", 5, 1)):
    g_ = {None: f, "plain": jax.checkpoint(f), "model policy": jax.checkpoint(f, policy=ops.remat_policy())}[remat]
    loss = lambda *a, g_=g_: jnp.sum(jnp.sin(g_(*a).astype(jnp.float32)))
    results = live_triton_call_results(jax.grad(loss, argnums=(0, 1)), *args)
    storing = [r for r in results if result_types(r)[-1] == stored]  # the storing forward's last output
    assert len(storing) == 1, (remat, results)
    assert len(results) == launches, (remat, results)
    assert sum(result_types(r) == seg_states for r in results) == passes1, (remat, results)


def test_model_remat_runs_segment_states_once_per_layer():
  """The model's rematerialised blocks (the gradient calibrator's) keep the selective scan's segment states from
  the forward pass: one pass-1 launch per layer in the lowered gradient, against two with a plain checkpoint."""
  cfg = MambaConfig.tiny("mamba1", d_model=256, n_layer=1, d_state=16)
  model = MambaLM(cfg, scan_impl="pallas", rngs=nnx.Rngs(0))
  attach_scales(model, "A", "linear", "layer")
  model.remat, model.scan_layers = True, False
  graphdef, scales, rest = nnx.split(model, CalibrationScale, ...)
  ids = jax.ShapeDtypeStruct((1, 1024), jnp.int32)

  def loss(scales, ids):
    return jnp.mean(nnx.merge(graphdef, scales, rest)(ids).astype(jnp.float32))

  e = cfg.d_inner
  S = pt._segments(1024, 1, e, pt.DEFAULT_CONFIG)[1]
  assert S > 1
  with pt.default_config_overrides(fwd_lowering="triton"):  # the same kernels on any machine (Mosaic GPU: see
    results = live_kernel_call_results(jax.grad(loss), scales, ids)  # test_pallas_selective_scan_mosaic.py)
  pass1 = [f"tensor<1x{S - 1}x{cfg.d_state}x{e}xf32>", f"tensor<1x{S - 1}x{e}xf32>"]  # all segments but the last
  assert sum(result_types(r) == pass1 for r in results) == cfg.n_layer, results


def test_remat_gradients_equal_plain_gradients():
  """Gradients under `jax.checkpoint` (the primal pass through the plain forward) equal those without."""
  inp, kw = _case("all", seed=4)
  ct = jax.random.normal(jax.random.PRNGKey(7), inp["u"].shape)
  names = list(inp)

  def loss(remat):
    def f(*arrays):
      y, h = _pallas(CFG, **dict(zip(names, arrays, strict=True)), **kw)
      return jnp.sum(y * ct) + jnp.sum(h)

    return jax.checkpoint(f) if remat else f

  plain = jax.grad(loss(False), argnums=tuple(range(len(names))))(*inp.values())
  remat = jax.grad(loss(True), argnums=tuple(range(len(names))))(*inp.values())
  for k, a, r in zip(names, plain, remat, strict=True):
    assert rel_err(r, a) < 1e-6, (k, rel_err(r, a))


@pytest.mark.parametrize("bias", [False, True])
def test_split_in_proj_gives_the_same_logits_and_scale_gradients(bias, monkeypatch):
  """`Mamba1Mixer.split_in_proj` (the in_proj as two products): the one product's logits and gradients w.r.t. the
  scales, and no (b, l, 2e) pad in the gradient (the halves' cotangents padded into one array for the product)."""
  from mamba_jax.mamba1 import Mamba1Mixer  # noqa: PLC0415

  cfg = MambaConfig.tiny("mamba1", d_model=48, n_layer=2, bias=bias)
  model = MambaLM(cfg, rngs=nnx.Rngs(0))
  attach_scales(model, "dt", "linear", "channel", init=0.8)
  graphdef, scales, rest = nnx.split(model, CalibrationScale, ...)
  ids = jax.random.randint(jax.random.key(2), (2, 40), 0, cfg.vocab_size)
  wide = f"tensor<2x40x{2 * cfg.d_inner}x"

  def loss(scales):
    return jnp.mean(nnx.merge(graphdef, scales, rest)(ids).astype(jnp.float32) ** 2)

  def run(split):
    monkeypatch.setattr(Mamba1Mixer, "split_in_proj", split)
    value, grad = jax.jit(jax.value_and_grad(loss))(scales)
    text = jax.jit(jax.grad(loss)).lower(scales).as_text()
    pads = sum("stablehlo.pad" in ln and wide in ln.rsplit("->", 1)[-1] for ln in text.splitlines())
    return value, grad, pads

  value, grad, pads = run(False)
  value_s, grad_s, pads_s = run(True)
  assert pads > 0 and pads_s == 0, (pads, pads_s)
  assert abs(float(value_s) - float(value)) <= 1e-6 * abs(float(value))
  for a, b in zip(jax.tree.leaves(grad_s), jax.tree.leaves(grad), strict=True):
    assert rel_err(a, b) < 1e-5


def test_vmapped_over_A_alone_equals_each_point():
  """The SPSA pair's first block: the kernels vmapped over A only (two scaled copies), with one unbatched u,
  delta, B, C, z; and the gradient of the pair's sum w.r.t. both A against each point's."""
  inp, kw = _case("all")
  inp["initial_state"] = None
  As = jnp.stack([inp["A"], 0.5 * inp["A"]])
  f = lambda A: _pallas(**{**inp, "A": A}, **kw)[0]  # noqa: E731
  loss = lambda A: jnp.sum(jnp.sin(f(A)))  # noqa: E731
  both = jax.jit(jax.vmap(f))(As)
  grads = jax.jit(jax.vmap(jax.grad(loss)))(As)
  for i in range(2):
    np.testing.assert_allclose(np.asarray(both[i]), np.asarray(jax.jit(f)(As[i])), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grads[i]), np.asarray(jax.jit(jax.grad(loss))(As[i])), rtol=1e-5, atol=1e-5)
  assert rel_err(both[0], both[1]) > 1e-2  # the scale acts


def test_chain_states_xla_equals_a_float64_loop():
  """`chain_states_xla`: h_in[0] = h0 (or zeros), h_in[s + 1] = 2^(dsum_s A2) h_in[s] + h_loc_s, against a plain
  float64 loop over the segments."""
  rng = np.random.default_rng(0)
  b, S, n, e = 2, 5, 4, 8
  h_loc = rng.normal(size=(b, S - 1, n, e)).astype(np.float32)
  dsum = rng.uniform(0, 2, size=(b, S - 1, e)).astype(np.float32)
  A2 = -rng.uniform(0.1, 1.5, size=(n, e)).astype(np.float32)
  h0 = rng.normal(size=(b, n, e)).astype(np.float32)
  for start in (h0, None):
    got = np.asarray(pt.chain_states_xla(jnp.asarray(h_loc), jnp.asarray(dsum), jnp.asarray(A2), start))
    want = np.zeros((b, S, n, e))
    want[:, 0] = 0.0 if start is None else start
    for s in range(S - 1):
      want[:, s + 1] = np.exp2(dsum[:, s, None, :].astype(np.float64) * A2) * want[:, s] + h_loc[:, s]
    assert got.shape == (b, S, n, e) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["all", "segments"])
def test_segment_chain_in_xla_matches_the_reference_and_the_inline_chain(name):
  """`segment_chain="xla"`: every segment's incoming state from one XLA scan, pass 2 reading its own. Outputs and
  gradients (the state-storing forward under `jax.vjp` takes the same path) against the float64 reference, and
  equal to pass 2's own chaining to float32 rounding."""
  inp, kw = _case(name, seed=6)
  inp = {k: v for k, v in inp.items() if v is not None}
  ct = jax.random.normal(jax.random.PRNGKey(8), inp["u"].shape)
  cfg = dataclasses.replace(CFG, unroll=2, target_programs=32)  # 5 (45 steps, padded) or 8 (64) segments
  assert pt._segments(inp["u"].shape[1], 2, 32, cfg)[1] >= 5
  out, grads = _outputs_and_grads(dataclasses.replace(cfg, segment_chain="xla"), inp, kw, ct)
  out_p, grads_p = _outputs_and_grads(cfg, inp, kw, ct)
  names = list(inp)

  def f(*arrays):
    y, h = selective_scan_reference(**dict(zip(names, arrays, strict=True)), **kw)
    return jnp.sum(y * np.float64(ct)) + jnp.sum(h), (y, h)

  with float64():
    (_, out_ref), grads_ref = jax.value_and_grad(f, argnums=tuple(range(len(names))), has_aux=True)(
      *_f64(list(inp.values()))
    )
  for a, p, r in zip(out, out_p, out_ref, strict=True):
    assert rel_err(a, r) < 1e-5 and rel_err(a, p) < 1e-6
  for k, a, p, r in zip(names, grads, grads_p, grads_ref, strict=True):
    assert rel_err(a, r) < 5e-5 and rel_err(a, p) < 1e-6, (k, rel_err(a, r), rel_err(a, p))


def test_segment_chain_xla_lowers_with_one_state_input_per_segment():
  """With `segment_chain="xla"` the Triton pass 2 lowers for CUDA and takes one (n, e) incoming state per program
  from the chained (b, s, n, e) array instead of pass 1's outputs (no GPU needed)."""
  b, l, e, n = 1, 4096, 4096, 16
  S = jax.ShapeDtypeStruct
  args = (S((b, l, e), jnp.bfloat16), S((b, l, e), jnp.float32), S((e, n), jnp.float32))
  args += (S((b, l, n), jnp.bfloat16), S((b, l, n), jnp.bfloat16))
  segs = pt._segments(l, b, e, pt.DEFAULT_CONFIG)[1]
  for chain in ("pass2", "xla"):
    cfg = dataclasses.replace(pt.DEFAULT_CONFIG, fwd_lowering="triton", segment_chain=chain)
    calls = kernel_call_lines(lambda *a, cfg=cfg: pt.selective_scan_pallas(*a, config=cfg), *args)["triton"]
    assert len(calls) == 2, calls  # pass 1, pass 2
    ins = operand_types(calls[1])
    assert (f"tensor<{b}x{segs}x{n}x{e}xf32>" in ins) == (chain == "xla"), ins
    assert (f"tensor<{b}x{segs - 1}x{n}x{e}xf32>" in ins) == (chain == "pass2"), ins


def test_segment_chain_refuses_unknown_values_and_mosaic_in_the_interpreter():
  inp, kw = _case("segments")
  with pytest.raises(ValueError, match="segment_chain must be 'pass2', 'xla' or 'mosaic'"):
    _pallas(dataclasses.replace(CFG, segment_chain="triton"), **inp, **kw)
  with pytest.raises(ValueError, match="segment_chain='mosaic' needs .* Use 'xla' or 'pass2'"):
    pt.selective_scan_pallas(**inp, **kw, interpret=True, config=dataclasses.replace(CFG, segment_chain="mosaic"))
