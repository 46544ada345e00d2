"""Pallas SSD kernels (interpret mode on CPU, compiled on GPU) against the sequential reference in float64."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.ops.ssd import pallas_triton as pt
from mamba_jax.ops.ssd.reference import ssd_reference
from tests.conftest import float64, rel_err, result_types, triton_call_results

INTERPRET = jax.default_backend() != "gpu"
# Small chunks and few programs per launch, so that short test sequences still span several chunks and segments.
CFG = pt.SSDConfig(block_t=32, block_t_bwd=16, target_programs=8, heads_per_program_bwd=1)


def _inputs(key, b=2, l=77, h=4, p=16, g=2, n=16, dtype=jnp.float32):
  k = jax.random.split(key, 9)
  r = lambda i, shape: jax.random.normal(k[i], shape, jnp.float32)
  return dict(
    x=r(0, (b, l, h, p)).astype(dtype),
    dt=r(1, (b, l, h)) * 0.5,
    A=-jnp.exp(r(2, (h,)) * 0.5),
    B=r(3, (b, l, g, n)).astype(dtype),
    C=r(4, (b, l, g, n)).astype(dtype),
    D=r(5, (h,)),
    z=r(6, (b, l, h, p)).astype(dtype),
    dt_bias=r(7, (h,)) * 0.3,
    initial_states=r(8, (b, h, p, n)),
  )


CASES = {
  # ngroups 2, ragged tail (77 = 4 chunks of 16 + 13), several segments, every option.
  "all": dict(l=77, g=2, drop=(), softplus=True, limit=(0.01, 2.0)),
  # One group, length a multiple of the chunk, nothing optional.
  "plain": dict(l=64, g=1, drop=("D", "z", "dt_bias", "initial_states"), softplus=False, limit=(0.0, math.inf)),
  # The model's call: no gate (Mamba2 gates in its norm), so the backward skips the scan-output recompute.
  "no_z": dict(l=77, g=2, drop=("z",), softplus=True, limit=(0.0, math.inf)),
  # D per (head, headdim), no gate, a single segment (one program per head).
  "D_hdim": dict(l=20, g=4, drop=("z",), softplus=True, limit=(0.0, math.inf), D_hdim=True),
}


def _case(name, dtype=jnp.float32, seed=0):
  spec = CASES[name]
  inp = _inputs(jax.random.PRNGKey(seed), l=spec["l"], g=spec["g"], dtype=dtype)
  if spec.get("D_hdim"):
    inp["D"] = jax.random.normal(jax.random.PRNGKey(5), (4, 16))
  for k in spec["drop"]:
    inp[k] = None
  kw = dict(chunk_size=16, dt_softplus=spec["softplus"], dt_limit=spec["limit"], return_final_states=True)
  return inp, kw


def _pallas(config=CFG, **kw):
  return pt.ssd_pallas(**kw, interpret=INTERPRET, config=config)


def _f64(tree):
  return jax.tree.map(lambda a: None if a is None else np.asarray(a, np.float64), tree)


@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_reference(name):
  inp, kw = _case(name)
  y, S = _pallas(**inp, **kw)
  with float64():
    y_ref, S_ref = ssd_reference(**_f64(inp), **kw)
    y_ref, S_ref = np.asarray(y_ref), np.asarray(S_ref)
  assert y.dtype == jnp.float32 and y.shape == inp["x"].shape
  assert S.dtype == jnp.float32 and S.shape == S_ref.shape
  assert rel_err(y, y_ref) < 1e-5
  assert rel_err(S, S_ref) < 1e-5


def test_forward_bf16_inputs():
  inp, kw = _case("all", dtype=jnp.bfloat16)
  y, S = _pallas(**inp, **kw)
  with float64():
    y_ref, S_ref = ssd_reference(**_f64(inp), **kw)
  assert y.dtype == jnp.bfloat16 and S.dtype == jnp.float32
  assert rel_err(y, y_ref) < 2e-2
  assert rel_err(S, S_ref) < 2e-2


# The backward cuts the sequence into its own segments: one chunk each (many) or as few as the forward's.
BWD_SEGMENTS = {
  "many": CFG,
  "few": pt.SSDConfig(block_t=32, block_t_bwd=16, target_programs=8, target_programs_bwd=8, heads_per_program_bwd=2),
  # States and adjoints held transposed, (n, p), as when the Mosaic GPU forward stores them.
  "transposed": dataclasses.replace(CFG, transposed_states=True),
}


@pytest.mark.parametrize(
  "name,bwd",
  [
    ("all", "many"),
    ("all", "few"),
    ("no_z", "few"),
    ("all", "transposed"),
    pytest.param("D_hdim", "many", marks=pytest.mark.slow),
  ],
)
def test_gradients_match_reference(name, bwd):
  inp, kw = _case(name, seed=1)
  pallas = functools.partial(_pallas, config=BWD_SEGMENTS[bwd])
  names = [k for k, v in inp.items() if v is not None]
  key = jax.random.PRNGKey(3)
  ct_y = jax.random.normal(key, inp["x"].shape)
  ct_S = jax.random.normal(jax.random.fold_in(key, 1), inp["initial_states"].shape)

  def loss(fn, ct_y, ct_S):
    def f(*arrays):
      y, S = fn(**dict(zip(names, arrays, strict=True)), **{k: None for k in inp if inp[k] is None}, **kw)
      return jnp.sum(y * ct_y) + jnp.sum(S * ct_S)

    return f

  args = [inp[k] for k in names]
  grads = jax.grad(loss(pallas, ct_y, ct_S), argnums=tuple(range(len(args))))(*args)
  with float64():
    f64 = _f64(args)
    refs = jax.grad(loss(ssd_reference, np.float64(ct_y), np.float64(ct_S)), argnums=tuple(range(len(args))))(*f64)
    refs = [np.asarray(r) for r in refs]
  for k, g, r in zip(names, grads, refs, strict=True):
    assert g.shape == r.shape, k
    assert rel_err(g, r) < 5e-5, (k, rel_err(g, r))


@pytest.mark.slow
def test_gradients_bf16_inputs_close():
  """bf16 operands: gradients of dt and A involve long sums; they must stay within bf16 accuracy."""
  inp, kw = _case("all", dtype=jnp.bfloat16, seed=2)
  names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias"]
  ct = jax.random.normal(jax.random.PRNGKey(4), inp["x"].shape)

  def loss(fn):
    def f(*arrays):
      d = dict(inp, **dict(zip(names, arrays, strict=True)))
      return jnp.sum(fn(**d, **dict(kw, return_final_states=False)).astype(jnp.float32) * ct)

    return f

  args = [inp[k] for k in names]
  grads = jax.grad(loss(_pallas), argnums=tuple(range(len(args))))(*args)
  with float64():
    refs = jax.grad(loss(ssd_reference), argnums=tuple(range(len(args))))(*_f64(args))
    refs = [np.asarray(r) for r in refs]
  for k, g, r in zip(names, grads, refs, strict=True):
    assert rel_err(g, r) < 3e-2, (k, rel_err(g, r))


def test_segments_cover_all_chunks():
  for nc in (1, 7, 16, 512, 1023):
    for bh in (1, 64, 1000):
      s, k = pt._segments(nc, bh, 1, pt.DEFAULT_CONFIG.target_programs)
      assert s * k >= nc and (s - 1) * k < nc, (nc, bh, s, k)


def test_backward_segments_divide_the_chunks():
  for s_fwd, k_fwd, ratio in ((1, 1, 2), (3, 5, 2), (64, 16, 1), (7, 1, 4)):
    nc = s_fwd * k_fwd * ratio  # backward chunks: the forward's padded length in the backward's chunk length
    for target in (1, 8, 264, 4096):
      s = pt._bwd_segments(nc, 1, 8, target, s_fwd)
      assert nc % s == 0, (nc, target, s)


@pytest.mark.parametrize("partials", ["float32", "scaled_fp16"])
def test_lowers_to_triton_for_cuda(partials):
  """CI has no GPU: at least check that the kernels lower to Triton IR for CUDA at the benchmark shapes."""
  # Triton throughout (on a Hopper GPU the default runs the forward's segment states in Mosaic GPU).
  cfg = dataclasses.replace(pt.DEFAULT_CONFIG, bwd_partials=partials, fwd_main_lowering="triton")
  b, l, h, p, g, n = 1, 4096, 8, 64, 1, 128
  S = jax.ShapeDtypeStruct
  bf = jnp.bfloat16
  args = (S((b, l, h, p), bf), S((b, l, h), jnp.float32), S((h,), jnp.float32), S((b, l, g, n), bf))
  args += (S((b, l, g, n), bf), S((h,), jnp.float32), S((b, l, h, p), bf))

  def f(x, dt, A, B, C, D, z):
    return pt.ssd_pallas(x, dt, A, B, C, 256, D, z, None, True, config=cfg).astype(jnp.float32).sum()

  grad = jax.grad(f, argnums=tuple(range(7)))
  # fwd segment states, fwd, bwd segment states, bwd chunk adjoints, bwd chunk gradients
  results = triton_call_results(grad, *args)
  assert len(results) == 5
  partial_type = f"tensor<{b}x{l}x{h}x{n}x{'f16' if partials == 'scaled_fp16' else 'f32'}>"
  assert result_types(results[-1]).count(partial_type) == 2, results[-1]


def test_remat_stores_chunk_states_once():
  """Under `jax.checkpoint` the forward pass runs the plain forward and only the backward's recomputation stores
  the chunk-entry states (`optimize_remat`): one state-storing forward in the lowered gradient, not two."""
  b, l, h, p, g, n = 1, 4096, 8, 64, 1, 128
  S = jax.ShapeDtypeStruct
  bf = jnp.bfloat16
  args = (S((b, l, h, p), bf), S((b, l, h), jnp.float32), S((h,), jnp.float32), S((b, l, g, n), bf))
  args += (S((b, l, g, n), bf), S((h,), jnp.float32), S((b, l, h, p), bf))

  def f(*a):  # Triton throughout (a Hopper GPU's default runs some forward kernels in Mosaic GPU)
    return pt.ssd_pallas(*a[:5], 256, *a[5:], None, True, config=pt.SSDConfig(fwd_main_lowering="triton"))

  states = f"tensor<{b}x{h}x{l // 64}x{p}x{n}xbf16>"  # (b, h, c, p, n) chunk-entry states
  for remat in (False, True):
    g_ = jax.checkpoint(f) if remat else f
    loss = lambda *a, g_=g_: jnp.sum(jnp.sin(g_(*a).astype(jnp.float32)))
    results = triton_call_results(jax.grad(loss, argnums=(0, 1)), *args)
    storing = [r for r in results if result_types(r)[1:2] == [states]]  # the forward's (y, states, ...)
    assert len(storing) == 1, (remat, results)
  assert len(results) == 7  # the primal pass's 2 launches, then the 5 of the recomputed forward and backward


def test_remat_gradients_equal_plain_gradients():
  """Gradients under `jax.checkpoint` (the primal pass through the plain forward) equal those without."""
  inp, kw = _case("all", seed=4)
  names = [k for k, v in inp.items() if v is not None]
  ct = jax.random.normal(jax.random.PRNGKey(7), inp["x"].shape)

  def loss(remat):
    def f(*arrays):
      y, S = _pallas(**dict(zip(names, arrays, strict=True)), **kw)
      return jnp.sum(y * ct) + jnp.sum(S)

    return jax.checkpoint(f) if remat else f

  args = [inp[k] for k in names]
  plain = jax.grad(loss(False), argnums=tuple(range(len(args))))(*args)
  remat = jax.grad(loss(True), argnums=tuple(range(len(args))))(*args)
  for k, a, r in zip(names, plain, remat, strict=True):
    assert rel_err(r, a) < 1e-6, (k, rel_err(r, a))


class _Ref:
  """A stand-in for a kernel ref (`ref[...]`, `ref[0, :]`, `.shape`) over a jnp array."""

  def __init__(self, shape, dtype):
    self.a = jnp.zeros(shape, dtype)
    self.shape, self.dtype = shape, jnp.dtype(dtype)

  def __getitem__(self, idx):
    return self.a[idx]

  def __setitem__(self, idx, v):
    self.a = self.a.at[idx].set(v)


@pytest.mark.parametrize("magnitude", [0.0, 1e-38, 1e-30, 1e-20, 1e-3, 1.0, 3e4, 1e30])
def test_scaled_partials_keep_float32_range_and_12_bits(magnitude):
  """A scaled float16 row times its scale equals the float32 row to 2^-12 of the row's largest magnitude, or of
  2^-110 for rows below it (their scale stays a normal float32, which GPUs do not flush), at any magnitude float32
  holds (plain float16 would overflow above 65504 and flush below ~6e-8), rows of very different magnitudes in one
  tile included."""
  T, n = 16, 8
  row_scale = jnp.float32(magnitude) * jnp.logspace(-6, 0, T, dtype=jnp.float32)[:, None]
  v = jax.random.normal(jax.random.PRNGKey(0), (T, n)) * row_scale
  v = v.at[3].set(0.0)  # a zero row
  ref, scale = _Ref((T, n), jnp.float16), _Ref((T, 1), jnp.float32)
  pt._store_partial(ref, scale, v, 0)
  back = ref.a.astype(jnp.float32) * scale.a
  assert bool(jnp.all(jnp.isfinite(back)))
  top = jnp.maximum(jnp.max(jnp.abs(v), axis=1, keepdims=True), 2.0**-110)
  assert bool(jnp.all(jnp.abs(back - v) <= 2.0**-12 * top * 1.0001))
  assert float(jnp.max(jnp.abs(ref.a.astype(jnp.float32)))) <= 2.0**14
  assert float(jnp.min(scale.a)) >= 2.0**-126  # normal


@pytest.mark.parametrize("partials", ["scaled_fp16", pytest.param("input", marks=pytest.mark.slow)])
def test_half_precision_partials_change_only_dB_dC(partials):
  """bf16 inputs: storing the chunk kernel's dB/dC terms in 16 bits leaves every other gradient bit-identical and
  keeps dB and dC as close to float64 as float32 terms do (scaled), or within bf16's accuracy (plain bf16)."""
  inp, kw = _case("all", dtype=jnp.bfloat16, seed=2)
  names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]
  ct = jax.random.normal(jax.random.PRNGKey(4), inp["x"].shape)

  def loss(fn):
    def f(*arrays):
      y, S = fn(**dict(zip(names, arrays, strict=True)), **kw)
      return jnp.sum(y.astype(jnp.float32) * ct) + jnp.sum(S)

    return f

  args = [inp[k] for k in names]
  grad = lambda cfg: jax.grad(loss(functools.partial(_pallas, config=cfg)), argnums=tuple(range(len(args))))(*args)
  base = grad(dataclasses.replace(CFG, bwd_partials="float32"))
  half = grad(dataclasses.replace(CFG, bwd_partials=partials))
  with float64():
    refs = jax.grad(loss(ssd_reference), argnums=tuple(range(len(args))))(*_f64(args))
  for k, a, h_, r in zip(names, base, half, refs, strict=True):
    if k not in ("B", "C"):
      assert np.array_equal(np.asarray(a, np.float32), np.asarray(h_, np.float32)), k
      continue
    e_base, e_half = rel_err(a, np.asarray(r)), rel_err(h_, np.asarray(r))
    assert e_half < (1.1 * e_base if partials == "scaled_fp16" else 2e-2), (k, e_base, e_half)


def test_scaled_partials_need_one_head_per_program():
  with pytest.raises(ValueError, match="heads_per_program_bwd=1"):
    pt._make_meta(dataclasses.replace(CFG, bwd_partials="scaled_fp16", heads_per_program_bwd=2), 1, 64, 4, 1,
                  False, False, True, dtype=jnp.bfloat16)  # fmt: skip
  with pytest.raises(ValueError, match="bwd_partials must be"):
    pt._make_meta(dataclasses.replace(CFG, bwd_partials="bf16"), 1, 64, 4, 1, False, False, True)
  meta = pt._make_meta(dataclasses.replace(CFG, bwd_partials="input"), 1, 64, 4, 1, False, False, True)
  assert meta.bwd_partials == "float32"  # float32 inputs keep float32 terms
  auto = lambda H: pt._make_meta(dataclasses.replace(CFG, heads_per_program_bwd=H), 1, 64, 4, 1, False, False, True,
                                 dtype=jnp.bfloat16).bwd_partials  # fmt: skip
  assert (auto(1), auto(2)) == ("scaled_fp16", "float32")
