"""Depthwise causal conv1d (+ SiLU): the Pallas kernel (interpret mode on CPU, compiled on GPU) and the XLA formula
against a float64 NumPy loop written from torch's Conv1d(groups=c, padding=k-1) definition; gradients against
finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mamba_jax import ops
from mamba_jax.ops.causal_conv import pallas_triton as pt
from mamba_jax.ops.causal_conv.reference import causal_conv1d_xla
from tests.conftest import float64, kernel_call_lines, operand_types, rel_err

INTERPRET = jax.default_backend() != "gpu"


def _numpy_reference(src, weight, bias, start, width, silu):
  """out[b, t, c] = sum_j torch_w[c, 0, j] x[b, t - (k - 1) + j, c] + bias[c]; torch_w[c, 0, j] = weight[j, c]."""
  x = np.asarray(src, np.float64)[..., start : start + width]
  w = np.asarray(weight, np.float64)
  b, l, c = x.shape
  k = w.shape[0]
  out = np.zeros((b, l, c))
  for t in range(l):
    for j in range(k):
      if t - (k - 1) + j >= 0:
        out[:, t] += w[j] * x[:, t - (k - 1) + j]
  if bias is not None:
    out += np.asarray(bias, np.float64)
  return out / (1.0 + np.exp(-out)) if silu else out


def _inputs(b, l, d, width, k=4, seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  src = jax.random.normal(ks[0], (b, l, d), jnp.float32).astype(dtype)
  weight = 0.5 * jax.random.normal(ks[1], (k, width), jnp.float32)
  bias = 0.1 * jax.random.normal(ks[2], (width,), jnp.float32)
  return src, weight, bias


# (b, l, source width, window start, window width, conv width): the whole array; an inner window (as in Mamba2's
# x | B | C); lengths 1 and below the conv width, below, at (128: two tile blocks, one walk block) and past the tile
# forward's 64-row block and the walk forward's 128 (ragged tails), several walk blocks in a 128-channel window of a
# wider source; conv widths 2-4.
CASES = [
  (2, 5, 32, 0, 32, 4),
  (1, 1, 32, 0, 32, 3),
  (2, 2, 48, 16, 32, 4),
  (2, 128, 112, 32, 48, 4),
  (1, 150, 96, 16, 64, 4),
  (3, 70, 64, 0, 32, 2),
  (1, 300, 256, 128, 128, 3),
]
FWD_KERNELS = ["tile", "walk"]


@pytest.mark.parametrize("fwd", FWD_KERNELS)
@pytest.mark.parametrize("b,l,d,start,width,k", CASES)
@pytest.mark.parametrize("silu,with_bias", [(True, True), (False, True), (False, False)])
def test_pallas_and_xla_match_float64_reference(b, l, d, start, width, k, silu, with_bias, fwd, monkeypatch):
  monkeypatch.setattr(pt, "FWD_KERNEL", fwd)
  src, weight, bias = _inputs(b, l, d, width, k)
  bias = bias if with_bias else None
  want = _numpy_reference(src, weight, bias, start, width, silu)
  got = pt.causal_conv1d_pallas(src, weight, bias, start=start, width=width, silu=silu, interpret=INTERPRET)
  assert got.shape == (b, l, width) and got.dtype == src.dtype
  assert rel_err(got, want) < 1e-5
  assert rel_err(causal_conv1d_xla(src, weight, bias, start=start, width=width, silu=silu), want) < 1e-5


@pytest.mark.parametrize("fwd", FWD_KERNELS)
def test_no_bias_and_bf16(fwd, monkeypatch):
  monkeypatch.setattr(pt, "FWD_KERNEL", fwd)
  src, weight, _ = _inputs(2, 33, 64, 64, dtype=jnp.bfloat16)
  got = pt.causal_conv1d_pallas(src, weight, None, interpret=INTERPRET)
  assert got.dtype == jnp.bfloat16
  assert rel_err(got, _numpy_reference(src, weight, None, 0, 64, True)) < 1e-2


@pytest.mark.parametrize("fwd", FWD_KERNELS)
def test_bf16_weight_and_bias_are_cast_in_the_kernel(fwd, monkeypatch):
  """The models keep the conv's weight and bias in bf16; the kernels read them so and compute in float32."""
  monkeypatch.setattr(pt, "FWD_KERNEL", fwd)
  src, weight, bias = _inputs(2, 70, 64, 64, dtype=jnp.bfloat16)
  weight, bias = weight.astype(jnp.bfloat16), bias.astype(jnp.bfloat16)
  want = _numpy_reference(src, weight, bias, 0, 64, True)
  got = pt.causal_conv1d_pallas(src, weight, bias, interpret=INTERPRET)
  assert got.dtype == jnp.bfloat16 and rel_err(got, want) < 1e-2
  g = jnp.ones(got.shape, jnp.bfloat16)
  dsrc, dw, db = jax.vjp(lambda *a: pt.causal_conv1d_pallas(*a, interpret=INTERPRET), src, weight, bias)[1](g)
  ref = jax.vjp(lambda *a: causal_conv1d_xla(*a), src, weight.astype(jnp.float32), bias.astype(jnp.float32))[1](g)
  assert dw.dtype == db.dtype == jnp.bfloat16
  assert rel_err(dsrc, ref[0]) < 1e-2 and rel_err(dw, ref[1]) < 1e-2 and rel_err(db, ref[2]) < 1e-2


@pytest.mark.parametrize("fwd", FWD_KERNELS)
def test_pallas_gradients_match_finite_differences(fwd, monkeypatch):
  monkeypatch.setattr(pt, "FWD_KERNEL", fwd)
  with float64():
    src, weight, bias = (a.astype(jnp.float64) for a in _inputs(2, 9, 48, 16, seed=1))
    got = pt.causal_conv1d_pallas(src, weight, bias, start=16, width=16, interpret=INTERPRET)
    assert got.dtype == jnp.float64  # the math in float64 too
    assert rel_err(got, _numpy_reference(src, weight, bias, 16, 16, True)) < 1e-12
    fn = lambda s, w, b: pt.causal_conv1d_pallas(s, w, b, start=16, width=16, interpret=INTERPRET)
    check_grads(fn, (src, weight, bias), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_unknown_forward_kernel(monkeypatch):
  monkeypatch.setattr(pt, "FWD_KERNEL", "rows")
  src, weight, bias = _inputs(1, 8, 32, 32)
  with pytest.raises(ValueError, match="FWD_KERNEL"):
    pt.causal_conv1d_pallas(src, weight, bias, interpret=True)


def test_dispatch_and_bad_input():
  src, weight, bias = _inputs(1, 8, 40, 24)
  assert not pt.supported(8, 24)  # start 8, width 24: no common power-of-two block of 16 channels
  with pytest.raises(ValueError, match="impl='xla'"):
    pt.causal_conv1d_pallas(src, weight, bias, start=8, width=24, interpret=True)
  got = ops.causal_conv1d(src, weight, bias, start=8, width=24, impl="pallas")  # falls back to XLA
  assert rel_err(got, _numpy_reference(src, weight, bias, 8, 24, True)) < 1e-5
  with pytest.raises(ValueError, match="do not match"):
    pt.causal_conv1d_pallas(src, weight, bias, start=32, width=24, interpret=True)  # past the last column


# (b, l, source width, window start, window width, conv width): lengths below, at and past the backward's
# 128-row block (ragged tail), several blocks, conv widths 2-4.
BWD_CASES = [
  (2, 5, 32, 0, 32, 4),
  (1, 128, 64, 0, 64, 4),
  (2, 300, 112, 32, 48, 4),
  (3, 70, 64, 0, 32, 2),
  (1, 257, 48, 16, 16, 3),
]


@pytest.mark.parametrize("b,l,d,start,width,k", BWD_CASES)
@pytest.mark.parametrize("silu,with_bias", [(True, True), (False, False)])
def test_backward_kernel_matches_the_formulas_derivative(b, l, d, start, width, k, silu, with_bias):
  """The backward kernel's d(src), d(weight), d(bias) against jax.vjp of the XLA formula, float32; d(src) is zero
  outside the window."""
  src, weight, bias = _inputs(b, l, d, width, k, seed=b + l + k)
  bias = bias if with_bias else None
  g = jax.random.normal(jax.random.PRNGKey(l), (b, l, width), jnp.float32)
  kw = dict(start=start, width=width, silu=silu)
  args = (src, weight) + ((bias,) if with_bias else ())

  def pallas(s, w, *bb):
    return pt.causal_conv1d_pallas(s, w, *(bb or (None,)), **kw, interpret=INTERPRET)

  def xla(s, w, *bb):
    return causal_conv1d_xla(s, w, *(bb or (None,)), **kw)

  got = jax.vjp(pallas, *args)[1](g)
  want = jax.vjp(xla, *args)[1](g)
  for name, a, e in zip(("src", "weight", "bias"), got, want, strict=False):
    assert a.shape == e.shape and a.dtype == e.dtype, name
    assert rel_err(a, e) < 1e-5, name
  outside = np.concatenate([np.asarray(got[0])[..., :start], np.asarray(got[0])[..., start + width :]], -1)
  assert not outside.any()


def test_backward_kernel_bf16():
  """bf16 inputs and cotangent (the model's): d(src) in bf16 to its rounding, the weight's float32 sums close."""
  src, weight, bias = _inputs(2, 200, 64, 64, dtype=jnp.bfloat16, seed=5)
  g = jax.random.normal(jax.random.PRNGKey(9), (2, 200, 64), jnp.float32).astype(jnp.bfloat16)
  got = jax.vjp(lambda s, w, bb: pt.causal_conv1d_pallas(s, w, bb, interpret=INTERPRET), src, weight, bias)[1](g)
  want = jax.vjp(lambda s, w, bb: causal_conv1d_xla(s, w, bb), src, weight, bias)[1](g)
  assert got[0].dtype == jnp.bfloat16
  assert rel_err(got[0], want[0]) < 1e-2
  assert rel_err(got[1], want[1]) < 1e-3 and rel_err(got[2], want[2]) < 1e-3


@pytest.mark.parametrize("fwd", FWD_KERNELS)
@pytest.mark.parametrize("kernel", [True, False])
def test_gradient_lowers_to_the_forward_and_backward_kernels(kernel, fwd, monkeypatch):
  """On CUDA the gradient runs the two Triton kernels (the forward's output feeds nothing the backward needs, but
  jax.vjp computes it); with `BWD_KERNEL` off (the A/B switch of the benchmarks) only the forward's, the backward
  being XLA's derivative of the formula (CI has no GPU: the CUDA lowering runs on the CPU). Either forward
  (`FWD_KERNEL`) lowers."""
  monkeypatch.setattr(pt, "BWD_KERNEL", kernel)
  monkeypatch.setattr(pt, "FWD_KERNEL", fwd)
  src, weight, bias = _inputs(1, 256, 128, 128)

  def loss(s, w, bb):
    return jnp.sum(pt.causal_conv1d_pallas(s, w, bb) ** 2)

  try:
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(src, weight, bias).lower(lowering_platforms=("cuda",))
  except Exception as err:  # jaxlib without the Triton dialect
    if "triton" in str(err).lower() and "not" in str(err).lower():
      pytest.skip(f"no Triton lowering in this jaxlib: {err}")
    raise
  text = text.as_text()
  assert text.count("__gpu$xla.gpu.triton") == (2 if kernel else 1)
  assert ("causal_conv1d_bwd" in text) == kernel
  assert ("causal_conv1d_walk" in text) == (fwd == "walk")
  if not kernel:  # the switch's path run here: the formula's derivative
    run = lambda s, w, bb: jnp.sum(pt.causal_conv1d_pallas(s, w, bb, interpret=INTERPRET) ** 2)  # noqa: E731
    got = jax.grad(run, argnums=(0, 1, 2))(src, weight, bias)
    want = jax.grad(lambda s, w, bb: jnp.sum(causal_conv1d_xla(s, w, bb) ** 2), argnums=(0, 1, 2))(src, weight, bias)
    for a, e in zip(got, want, strict=True):
      assert rel_err(a, e) < 1e-5


ON_HOPPER = jax.default_backend() == "gpu" and getattr(jax.devices()[0], "compute_capability", "") in ("9.0", "9.0a")
_HOPPER = pytest.mark.skipif(not ON_HOPPER, reason="the Mosaic GPU forward runs only on a Hopper GPU")


@pytest.mark.parametrize(
  "name, b, l, d, start, width",
  [("mamba-1.4b x", 2, 8192, 8192, 0, 4096), ("mamba2-1.3b x|B|C", 1, 8192, 8768, 4096, 4352)],
)
def test_mosaic_forward_lowers_at_the_models_windows(name, b, l, d, start, width, monkeypatch):
  """FWD_KERNEL = "mosaic": the forward is one Mosaic GPU call reading the window in place (the source, whole,
  is its operand) and writing (b, l, c); the gradient keeps the Triton backward (lowered for CUDA, no GPU
  needed)."""
  monkeypatch.setattr(pt, "FWD_KERNEL", "mosaic")
  S = jax.ShapeDtypeStruct
  args = (S((b, l, d), jnp.bfloat16), S((4, width), jnp.bfloat16), S((width,), jnp.bfloat16))
  f = lambda s, w, bb: pt.causal_conv1d_pallas(s, w, bb, start=start, width=width)  # noqa: E731
  calls = kernel_call_lines(f, *args)
  assert not calls["triton"] and len(calls["mosaic"]) == 1, name
  assert operand_types(calls["mosaic"][0])[0] == f"tensor<{b}x{l}x{d}xbf16>"
  assert calls["mosaic"][0].rsplit("-> ", 1)[-1].strip() == f"tensor<{b}x{l}x{width}xbf16>"
  grad = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) ** 2), argnums=(0, 1, 2))  # needs the output
  calls = kernel_call_lines(grad, *args)
  assert len(calls["mosaic"]) == 1 and len(calls["triton"]) == 1 and "causal_conv1d_bwd" in calls["triton"][0]


def test_mosaic_forward_refuses_what_it_cannot_run_and_auto_falls_back(monkeypatch):
  src, weight, bias = _inputs(1, 64, 256, 256)
  monkeypatch.setattr(pt, "FWD_KERNEL", "mosaic")
  with pytest.raises(ValueError, match="FWD_KERNEL='mosaic' needs .*interpret=True"):
    pt.causal_conv1d_pallas(src, weight, bias, interpret=True)
  monkeypatch.setattr(pt, "FWD_KERNEL", "auto")  # the interpreter: the tile forward
  got = pt.causal_conv1d_pallas(src, weight, bias, interpret=INTERPRET)
  assert rel_err(got, _numpy_reference(src, weight, bias, 0, 256, True)) < 1e-5
  assert pt.pallas_mosaic.fits(128, 256, 64, chunk=32, cpt=1)
  assert not pt.pallas_mosaic.fits(64, 256, 64, chunk=32, cpt=1)  # start inside a 128-channel block
  assert not pt.pallas_mosaic.fits(0, 256, 70, chunk=32, cpt=1)  # a ragged last copy
  assert not pt.pallas_mosaic.fits(0, 128, 64, chunk=32, cpt=2)  # fewer channels than a 256-channel program


@_HOPPER
@pytest.mark.parametrize(
  "b, l, d, start, width, rows, chunk, cpt, dtype",
  [
    (2, 512, 512, 0, 256, 256, 32, 1, jnp.bfloat16),  # mamba-1.4b's layout: the window first
    (1, 448, 768, 256, 384, 128, 32, 1, jnp.bfloat16),  # an inner window; 448 rows: 64-row programs
    (2, 256, 512, 256, 256, 256, 16, 2, jnp.float32),  # two channels per thread, float32
  ],
)
@pytest.mark.parametrize("silu,with_bias", [(True, True), (False, False)])
def test_mosaic_forward_matches_float64_reference(b, l, d, start, width, rows, chunk, cpt, dtype, silu, with_bias,
                                                  monkeypatch):  # fmt: skip
  for name, value in (("FWD_KERNEL", "mosaic"), ("MOSAIC_ROWS", rows), ("MOSAIC_CHUNK", chunk), ("MOSAIC_CPT", cpt)):
    monkeypatch.setattr(pt, name, value)
  src, weight, bias = _inputs(b, l, d, width, dtype=dtype, seed=l)
  bias = bias if with_bias else None
  got = jax.jit(lambda s, w, bb: pt.causal_conv1d_pallas(s, w, bb, start=start, width=width, silu=silu))(
    src, weight, bias
  )
  want = _numpy_reference(src, weight, bias, start, width, silu)
  assert got.shape == (b, l, width) and got.dtype == dtype
  assert rel_err(got, want) < (1e-2 if dtype == jnp.bfloat16 else 1e-5)
