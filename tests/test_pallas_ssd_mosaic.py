"""The SSD forward's Mosaic GPU main kernel: its CUDA lowering on any machine, its outputs on a GPU."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.ops.ssd import pallas_mosaic as pm
from mamba_jax.ops.ssd import pallas_triton as pt
from mamba_jax.ops.ssd.reference import ssd_reference
from tests.conftest import float64, rel_err

# 64-token chunks (the matrix units' tile), few programs, so that 300 tokens span several segments and a ragged tail.
CFG = pt.SSDConfig(block_t=64, target_programs=8)


def _inputs(l=300, b=1, h=4, p=64, g=2, n=64, with_z=True):
  k = jax.random.split(jax.random.PRNGKey(0), 8)
  r = lambda i, shape: jax.random.normal(k[i], shape, jnp.float32)
  return dict(
    x=r(0, (b, l, h, p)).astype(jnp.bfloat16),
    dt=r(1, (b, l, h)) * 0.5 - 1.0,
    A=-jnp.exp(r(2, (h,)) * 0.5),
    B=r(3, (b, l, g, n)).astype(jnp.bfloat16),
    C=r(4, (b, l, g, n)).astype(jnp.bfloat16),
    D=r(5, (h,)),
    z=r(6, (b, l, h, p)).astype(jnp.bfloat16) if with_z else None,
    dt_bias=r(7, (h,)) * 0.3,
  )


def _mosaic(stages=1, **inp):
  cfg = dataclasses.replace(CFG, fwd_main_lowering="mosaic", mosaic_stages=stages)
  return pt.ssd_pallas(**inp, dt_softplus=True, config=cfg)


@pytest.mark.parametrize("states_in_mosaic", [True, False])
@pytest.mark.parametrize("with_z", [True, False])
def test_lowers_to_mosaic_gpu_kernels_for_cuda(with_z, states_in_mosaic):
  """Runs Mosaic GPU's lowering and layout inference (no GPU needed): the main kernel and, by default, the
  segment-state kernel in Mosaic GPU; with `mosaic_segment_states=False` the latter stays Triton."""
  inp = _inputs(with_z=with_z)
  meta = pt._make_meta(CFG, 1, 300, 4, 2, True, with_z, False)
  assert meta.S > 1 and meta.S * meta.K * meta.T > 300  # several segments, a padded tail
  cfg = dataclasses.replace(CFG, fwd_main_lowering="mosaic", mosaic_segment_states=states_in_mosaic)
  fn = lambda i: pt.ssd_pallas(**i, dt_softplus=True, config=cfg)  # noqa: E731
  text = jax.jit(fn).trace(inp).lower(lowering_platforms=("cuda",)).as_text()
  assert sum("stablehlo.custom_call @mosaic_gpu" in ln for ln in text.splitlines()) == 1 + states_in_mosaic
  assert sum("__gpu$xla.gpu.triton" in ln for ln in text.splitlines()) == 1 - states_in_mosaic


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="Mosaic GPU kernels run only on a GPU")
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_segment_states_match_triton_and_float64_on_gpu(stages):
  """Each segment's end state from a zero start: the Mosaic GPU kernel against the Triton one (same bf16
  operands) and against a float64 sequential recurrence of the same preprocessed inputs."""
  inp = _inputs(l=640)
  meta = pt._make_meta(CFG, 1, 640, 4, 2, True, True, False)
  assert meta.S > 1 and meta.K > stages
  x, B = inp["x"], inp["B"]
  dtp = jnp.swapaxes(jax.nn.softplus(inp["dt"] + inp["dt_bias"]), 1, 2)  # (b, h, l) float32
  cs = pt._chunk_cumsum(meta, dtp * inp["A"][None, :, None])
  got = pm.segment_states(meta, x, dtp, cs, pm.transposed_b(B), stages=stages)  # (b, h, s, n, p)
  tri = jnp.swapaxes(pt._fwd_segment_states(meta, x, dtp, cs, B), -1, -2)
  # float64: per segment, S <- e^{dt A} S + dt x B^T step by step from zero.
  xs, Bs = np.asarray(x, np.float64), np.asarray(B, np.float64)
  dts, A = np.asarray(dtp, np.float64), np.asarray(inp["A"], np.float64)
  L = meta.K * meta.T
  want = np.zeros(got.shape)
  for h in range(4):
    for s in range(meta.S):
      S = np.zeros((64, 64))  # (p, n)
      for t in range(s * L, (s + 1) * L):
        S = np.exp(dts[0, h, t] * A[h]) * S + dts[0, h, t] * np.outer(xs[0, t, h], Bs[0, t, h // 2])
      want[0, h, s] = S.T
  assert got.shape == (1, 4, meta.S, 64, 64) and got.dtype == jnp.float32
  err_tri = rel_err(tri, want)
  assert err_tri < 1e-2
  assert rel_err(got, want) < max(2 * err_tri, 1e-3)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="Mosaic GPU kernels run only on a GPU")
@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("with_z", [True, False])
def test_matches_reference_on_gpu(stages, with_z):
  inp = _inputs(with_z=with_z)
  y = _mosaic(stages=stages, **inp)
  with float64():
    f64 = {k: None if v is None else np.asarray(v, np.float64) for k, v in inp.items()}
    y_ref = np.asarray(ssd_reference(**f64, chunk_size=64, dt_softplus=True))
  y_tri = pt.ssd_pallas(**inp, dt_softplus=True, config=dataclasses.replace(CFG, fwd_main_lowering="triton"))
  assert y.shape == inp["x"].shape and y.dtype == jnp.bfloat16
  # bf16 operands and output: the Triton kernels' error on the same inputs bounds what is expected.
  err_tri = rel_err(y_tri, y_ref)
  assert rel_err(y, y_ref) < max(2 * err_tri, 1e-2)


def _ssd_kw(lowering, **cfg):
  cfg = dict(dict(block_t=64, target_programs=8), **cfg)
  return dict(dt_softplus=True, config=pt.SSDConfig(fwd_main_lowering=lowering, **cfg))


def _calls(fn, *args):
  """(Mosaic GPU calls, Triton calls) in jit(fn)'s CUDA lowering."""
  lines = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text().splitlines()
  return sum("stablehlo.custom_call @mosaic_gpu" in ln for ln in lines), sum("xla.gpu.triton" in ln for ln in lines)


@pytest.mark.parametrize("vjp_in_mosaic", [True, False])
def test_ssd_pallas_kernels_per_lowering(vjp_in_mosaic):
  """With the Mosaic GPU kernels chosen: the plain forward lowers to both; the forward under jax.vjp too (its main
  kernel storing transposed states), or with `mosaic_vjp_forward=False` only its segment-state kernel (the Triton
  main kernel stores the states); the backward's three kernels are Triton."""
  inp = _inputs()
  kw = _ssd_kw("mosaic", mosaic_vjp_forward=vjp_in_mosaic)
  fwd = lambda i: pt.ssd_pallas(**i, **kw)  # noqa: E731
  assert _calls(fwd, inp) == (2, 0)  # the segment states and the main kernel
  grad = jax.grad(lambda i: fwd(i).astype(jnp.float32).sum())
  assert _calls(grad, inp) == ((2, 3) if vjp_in_mosaic else (1, 4))
  assert _calls(lambda i: pt.ssd_pallas(**i, **_ssd_kw("triton")), inp) == (0, 2)


def test_one_segment_lowers_under_grad():
  """One segment (b * h programs already fill the GPU): no segment-state kernel, and the forward under jax.vjp is the
  Mosaic GPU main kernel alone, storing states from the initial state."""
  inp = _inputs()
  kw = _ssd_kw("mosaic", target_programs=1)
  assert pt._make_meta(kw["config"], 1, 300, 4, 2, True, True, False).S == 1
  fwd = lambda i: pt.ssd_pallas(**i, **kw)  # noqa: E731
  assert _calls(fwd, inp)[0] == 1
  mosaic, triton = _calls(jax.grad(lambda i: fwd(i).astype(jnp.float32).sum()), inp)
  assert mosaic == 1 and triton >= 3  # the backward's three kernels (and the final state's, if XLA keeps it)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="Mosaic GPU kernels run only on a GPU")
@pytest.mark.parametrize("vjp_in_mosaic,with_z", [(True, True), (True, False), (False, True)])
def test_gradients_with_mosaic_forward_match_triton_on_gpu(vjp_in_mosaic, with_z):
  """Under jax.vjp the Mosaic GPU forward stores transposed states for the backward (or its segment states feed the
  Triton forward): gradients equal the all-Triton ones to the bf16 operands' rounding, and both are close to the
  float64 reference."""
  inp = _inputs(with_z=with_z)
  names = [k for k, v in inp.items() if v is not None]
  ct = jax.random.normal(jax.random.PRNGKey(5), inp["x"].shape)

  def grads(fn, args, ct):
    loss = lambda *a: jnp.sum(fn(**dict(zip(names, a, strict=True))) * ct)  # noqa: E731
    return jax.grad(loss, argnums=tuple(range(len(names))))(*args)

  args = [inp[k] for k in names]
  pallas = lambda kw: lambda **i: pt.ssd_pallas(**i, **kw).astype(jnp.float32)  # noqa: E731
  got = grads(pallas(_ssd_kw("mosaic", mosaic_vjp_forward=vjp_in_mosaic)), args, ct)
  tri = grads(pallas(_ssd_kw("triton")), args, ct)
  with float64():
    f64 = [np.asarray(a, np.float64) for a in args]
    ref = grads(lambda **i: ssd_reference(**i, chunk_size=64, dt_softplus=True), f64, np.asarray(ct, np.float64))
  for k, a, t, r in zip(names, got, tri, ref, strict=True):
    assert rel_err(a, t) < 1e-2, k
    assert rel_err(a, np.asarray(r)) < max(1.5 * rel_err(t, np.asarray(r)), 1e-2), k


def test_lowering_choice_and_errors():
  bf16 = jnp.bfloat16
  assert not pt._use_mosaic_fwd(pt.SSDConfig(), 64, 64, 128, bf16, interpret=True)  # interpret: Triton
  assert not pt._use_mosaic_fwd(pt.SSDConfig(), 64, 64, 128, jnp.float32, interpret=False)  # float32: Triton
  assert not pt._use_mosaic_fwd(pt.SSDConfig(), 32, 64, 128, bf16, interpret=False)  # 32-token chunks
  auto = pt._use_mosaic_fwd(pt.SSDConfig(), 64, 64, 128, bf16, interpret=False)
  hopper = jax.default_backend() == "gpu" and jax.devices()[0].compute_capability.startswith("9.0")
  assert auto == hopper
  with pytest.raises(ValueError, match="block_t=64"):
    pt._use_mosaic_fwd(pt.SSDConfig(fwd_main_lowering="mosaic"), 64, 48, 128, bf16, interpret=False)
  with pytest.raises(ValueError, match="fwd_main_lowering must be"):
    pt._use_mosaic_fwd(pt.SSDConfig(fwd_main_lowering="cuda"), 64, 64, 128, bf16, interpret=False)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="Mosaic GPU kernels run only on a GPU")
def test_ssd_pallas_with_mosaic_states_match_reference_on_gpu():
  """Initial and final states through the Mosaic GPU forward (ssd_pallas), against the float64 reference."""
  inp = _inputs()
  S0 = jax.random.normal(jax.random.PRNGKey(3), (1, 4, 64, 64), jnp.float32)
  y, S = pt.ssd_pallas(**inp, initial_states=S0, return_final_states=True, **_ssd_kw("mosaic"))
  y_t, S_t = pt.ssd_pallas(**inp, initial_states=S0, return_final_states=True, **_ssd_kw("triton"))
  with float64():
    f64 = {k: None if v is None else np.asarray(v, np.float64) for k, v in inp.items()}
    y_ref, S_ref = ssd_reference(
      **f64, initial_states=np.asarray(S0, np.float64), chunk_size=64, dt_softplus=True, return_final_states=True
    )
  assert rel_err(y, y_ref) < max(2 * rel_err(y_t, y_ref), 1e-2)
  assert rel_err(S, S_ref) < max(2 * rel_err(S_t, S_ref), 1e-2)
