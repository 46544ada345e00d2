"""Objective (chunked NLL), gradients against finite differences, SPSA and gradient calibrators on a tiny model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from calibrate.gradient import Gradient
from calibrate.objective import frozen_layers, mean_nll, scale_loss, token_nll
from calibrate.spsa import SPSA, SPSAConfig, make_optimizer, make_schedule
from mamba_jax import MambaConfig, MambaLM, generate
from mamba_jax.scales import CalibrationScale, attach_scales
from tests.conftest import kernel_call_results, result_types


def tiny(arch: str, n_layer: int = 1, seed: int = 0) -> MambaLM:
  model = MambaLM(MambaConfig.tiny(arch, n_layer=n_layer), rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for layer in model.backbone.layers:  # time steps of order 1, so that the scales matter within a few tokens
    bias = layer.mixer.dt_bias if arch == "mamba2" else layer.mixer.dt_proj.bias
    bias.set_value(jnp.asarray(rng.uniform(-0.5, 1.0, bias.shape), jnp.float32))
  return model


def test_chunked_nll_equals_full_logits():
  model = tiny("mamba2", n_layer=2)
  x = jax.random.randint(jax.random.key(0), (3, 23), 0, 100)
  logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, x), np.float64)[:, :-1]
  logp = (
    logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1)[..., None]
  )
  want = -np.take_along_axis(logp, np.asarray(x)[:, 1:, None], -1)[..., 0].mean(-1)  # (b,)
  f = nnx.jit(lambda m, x: token_nll(m, x, chunk=5))  # 22 targets: 5 slices, the last padded
  np.testing.assert_allclose(np.asarray(f(model, x)), want, rtol=1e-5)
  np.testing.assert_allclose(float(nnx.jit(lambda m, x: mean_nll(m, x, 3, 64))(model, x)), want.mean(), rtol=1e-5)


@pytest.mark.parametrize(
  "arch,target,mode,granularity",
  [
    pytest.param("mamba1", "A", "linear", "channel", marks=pytest.mark.slow),  # A: mamba2's case runs by default
    ("mamba1", "dt", "linear", "layer"),
    ("mamba2", "A", "power", "head"),
  ],
)
def test_gradient_matches_finite_differences(arch, target, mode, granularity):
  """Directional derivatives of the mean NLL along random directions: jax.grad against central differences.

  float32 end to end (A is computed in float32 whatever the model dtype): with eps = 1e-2 the rounding error of
  a difference quotient is ~1e-5, the truncation error ~1e-5, against derivatives of order 1e-2 to 1. Matrix
  products at full float32 precision: on a GPU the default is TF32, whose rounding put the quotients 9% off on an
  H200 (round 21; with "highest" both cases passed there).
  """
  with jax.default_matmul_precision("highest"):
    _check_gradient_against_finite_differences(arch, target, mode, granularity)


def _check_gradient_against_finite_differences(arch, target, mode, granularity):
  model = tiny(arch)
  attach_scales(model, target, mode, granularity, init=0.7)
  graphdef, scales, rest = nnx.split(model, CalibrationScale, ...)
  x = jax.random.randint(jax.random.key(1), (2, 32), 0, 100)
  loss = jax.jit(scale_loss(graphdef, batch_size=2, chunk=8))
  grad = jax.jit(jax.grad(scale_loss(graphdef, batch_size=2, chunk=8)))(scales, rest, x)
  eps = 1e-2
  for seed in range(3):
    leaves, treedef = jax.tree.flatten(scales)
    keys = jax.random.split(jax.random.key(10 + seed), len(leaves))
    v = jax.tree.unflatten(treedef, [jax.random.normal(k, jnp.shape(a)) for k, a in zip(keys, leaves, strict=True)])
    plus = jax.tree.map(lambda s, d: s + eps * d, scales, v)
    minus = jax.tree.map(lambda s, d: s - eps * d, scales, v)
    fd = (float(loss(plus, rest, x)) - float(loss(minus, rest, x))) / (2 * eps)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(v), strict=True))
    assert abs(analytic) > 1e-3, "the loss does not depend on the scales: the test would prove nothing"
    assert analytic == pytest.approx(fd, rel=2e-2, abs=2e-4), (seed, analytic, fd)


@pytest.fixture(scope="module")
def self_generated():
  """A model and 8 samples drawn from it: identity scales are the truth, scales of 0.2 are far from it."""
  model = tiny("mamba2")
  ids = generate(model, jnp.zeros((8, 1), jnp.int32), 47, temperature=1.0, seed=0)  # (8, 48)
  attach_scales(model, "A", "linear", "head", init=0.2)
  return model, ids


def test_spsa_reduces_the_calibration_loss(self_generated):
  model, ids = self_generated
  graphdef, scales, rest = nnx.split(model, CalibrationScale, ...)
  spsa = SPSA(
    graphdef, make_optimizer("adam", make_schedule("constant", 0.1)), SPSAConfig(objective="nll"), batch_size=8
  )
  start = float(spsa.evaluate(scales, rest, ids))
  truth = float(spsa.evaluate(jax.tree.map(jnp.ones_like, scales), rest, ids))
  assert start - truth > 0.03  # the setup leaves something to recover
  opt_state = spsa.init(scales)
  for k in range(20):
    scales, opt_state, metrics = spsa.step(scales, opt_state, k, rest, ids)
    assert bool(metrics["finite"])
  end = float(spsa.evaluate(scales, rest, ids))
  assert end < start - 0.5 * (start - truth), (start, end, truth)
  assert all(float(jnp.min(s)) >= 0.01 for s in jax.tree.leaves(scales))  # projected onto the clamp range


def test_spsa_pairing_and_perturbations(self_generated):
  """vmap-paired and sequential evaluation give the same step; Gaussian perturbations are used when asked."""
  model, ids = self_generated
  graphdef, scales, rest = nnx.split(model, CalibrationScale, ...)
  tx = make_optimizer("sgd", make_schedule("constant", 0.01))
  out = {}
  for pair in ("vmap", "sequential"):
    spsa = SPSA(graphdef, tx, SPSAConfig(pair=pair), batch_size=8)
    out[pair] = spsa.step(scales, spsa.init(scales), 3, rest, ids)
  for a, b in zip(jax.tree.leaves(out["vmap"]), jax.tree.leaves(out["sequential"]), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)
  assert float(out["vmap"][2]["c_k"]) == pytest.approx(0.1 / 4**0.1)
  gauss = SPSA(graphdef, tx, SPSAConfig(perturbation="gaussian", pair="sequential"), batch_size=8)
  new, _, _ = gauss.step(scales, gauss.init(scales), 3, rest, ids)
  delta = np.abs(np.asarray(jax.tree.leaves(new)[0]) - 0.2)
  assert len(np.unique(np.round(delta / delta.max(), 4))) > 1  # Rademacher steps would all have one size


def test_gradient_calibrator_trains_scales_only(self_generated):
  model, ids = self_generated
  params_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  graphdef, scales, rest = nnx.split(model, CalibrationScale, ...)
  calib = Gradient(graphdef, make_optimizer("adamw", make_schedule("constant", 0.1), clip=1.0), batch_size=2, accum=2)
  opt_state = calib.init(scales)
  # Optimizer state exists for the scales only: every array in it is a step count or has a scale's shape.
  shapes = {jnp.shape(s) for s in jax.tree.leaves(scales)}
  assert all(jnp.shape(a) in shapes | {()} for a in jax.tree.leaves(opt_state))
  start = float(calib.evaluate(scales, rest, ids))
  for k in range(6):
    scales, opt_state, metrics = calib.step(scales, opt_state, k, rest, ids)
    assert bool(metrics["finite"])
  assert float(calib.evaluate(scales, rest, ids)) < start - 0.02
  after = nnx.merge(graphdef, scales, rest)
  for a, b in zip(
    jax.tree.leaves(nnx.state(after, nnx.Param)), jax.tree.leaves(params_before), strict=True
  ):  # frozen weights bit-identical
    np.testing.assert_array_equal(np.asarray(a), b)
  # Every sample is seen once per epoch of 8 samples (2 steps x 2 micro-batches x 2 samples = 8).
  seen = np.concatenate([np.asarray(calib.sample_indices(k, 8)).ravel() for k in range(2)])
  assert sorted(seen.tolist()) == list(range(8))


def test_released_schedules():
  cos = make_schedule("cosine", 0.001)
  assert float(cos(0)) == pytest.approx(0.001)
  assert float(cos(49)) == pytest.approx(0.001 * math.cos(49 * math.pi / 198))
  assert float(cos(99)) == pytest.approx(0.0, abs=1e-12)
  assert float(cos(150)) == 0.0  # held at 0 instead of turning negative
  assert float(make_schedule("constant", 0.005)(77)) == 0.005
  assert isinstance(make_optimizer("adamw", cos, clip=1.0), optax.GradientTransformation)


def test_remat_gives_the_same_loss_and_gradient():
  """Rematerialised blocks (what long-context gradient calibration uses) change memory, not values."""
  out = []
  for remat in (False, True):
    model = tiny("mamba2", n_layer=2)
    attach_scales(model, "dt", "linear", "head", init=0.7)
    model.remat = remat
    graphdef, scales, rest = nnx.split(model, CalibrationScale, ...)
    x = jax.random.randint(jax.random.key(0), (2, 16), 0, 100)
    out.append(jax.jit(jax.value_and_grad(scale_loss(graphdef, 1, 8)))(scales, rest, x))
  np.testing.assert_allclose(float(out[1][0]), float(out[0][0]), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(out[1][1]), jax.tree.leaves(out[0][1]), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
  "arch,target,granularity",
  [("mamba1", "A", "channel"), pytest.param("mamba2", "dt", "head", marks=pytest.mark.slow)],
)
def test_weights_stacked_once_give_the_inlined_loss_gradient_and_spsa_step(arch, target, granularity):
  """The calibrators' frozen block weights stacked once outside the step (`frozen_layers`) against the inlined
  blocks (no stacking at all): the scales must still be read live on every call, per layer, under vmap and grad.
  (Mamba2, the same code path with another mixer, runs with the slow tests.)"""
  model = tiny(arch, n_layer=3)
  attach_scales(model, target, "linear", granularity)
  rng = np.random.default_rng(5)
  for layer in model.backbone.layers:  # a different scale per layer, so that a stale or shuffled one shows
    scale = layer.mixer.a_scale if target == "A" else layer.mixer.dt_scale
    scale.set_value(jnp.asarray(rng.uniform(0.3, 1.5, scale.shape), jnp.float32))
  x = jax.random.randint(jax.random.key(2), (2, 24), 0, 100)
  results = {}
  for name in ("inlined", "stacked once"):
    model.scan_layers = name != "inlined"
    graphdef, scales, rest = nnx.split(model, CalibrationScale, ...)
    stacked = frozen_layers(model) if name == "stacked once" else None
    loss = scale_loss(graphdef, batch_size=2, chunk=8)
    value, grad = jax.jit(jax.value_and_grad(loss))(scales, rest, x, stacked)
    spsa = SPSA(graphdef, make_optimizer("sgd", make_schedule("constant", 0.05)), SPSAConfig(c=0.2), seed=1)
    new, _, metrics = spsa.step(scales, spsa.init(scales), 0, rest, x, stacked)
    results[name] = [value, metrics["loss_plus"], metrics["loss_minus"], new, grad]
  assert float(results["inlined"][1]) != pytest.approx(float(results["inlined"][2]), rel=1e-4)  # scales matter
  once, inlined = (jax.tree.leaves(results[k]) for k in ("stacked once", "inlined"))
  for a, b in zip(once, inlined, strict=True):  # another op order: float32 rounding, relative to each leaf's size
    b = np.asarray(b)
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-4 * np.abs(b).max())


def test_stacked_layers_need_the_layer_scan():
  model = tiny("mamba2", n_layer=2)
  model.scan_layers = True
  stacked = model.stack_layers()
  assert jax.tree.leaves(stacked)[0].shape[0] == 2
  model.scan_layers = False
  assert frozen_layers(model) is None
  with pytest.raises(ValueError, match="does not run"):
    model.hidden_states(jnp.zeros((1, 4), jnp.int32), stacked)


def test_remat_gradient_step_stores_scan_states_once():
  """The gradient calibrator's step with rematerialised blocks in the layer scan, on the Pallas kernels (lowered
  for CUDA: CI has no GPU): the forward pass runs the selective scan's plain forward, and only the backward's
  recomputation stores its states (the kernels' `optimize_remat`), so one state-storing launch per block copy in
  the program, not two: the first block, which runs before the layer scan, and the scan's body."""
  from mamba_jax.ops.selective_scan.pallas_triton import DEFAULT_CONFIG  # noqa: PLC0415

  model = MambaLM(MambaConfig.tiny("mamba1", n_layer=2, d_model=64), scan_impl="pallas", remat=True, rngs=nnx.Rngs(0))
  attach_scales(model, "A", "linear", "layer")
  assert model.uses_layer_scan
  graphdef, scales, rest = nnx.split(model, CalibrationScale, ...)
  x = jnp.zeros((1, 256), jnp.int32)
  results = kernel_call_results(jax.value_and_grad(scale_loss(graphdef, 1, 128)), scales, rest, x)
  cfg = model.cfg
  stored = f"tensor<1x{256 // DEFAULT_CONFIG.unroll_bwd}x{cfg.d_state}x{cfg.d_inner}xf32>"  # (b, l / K, n, e)
  assert sum(result_types(r)[-1] == stored for r in results) == 2, results


def test_vmapped_pair_aims_the_selective_scan_at_the_launch_not_one_point(monkeypatch):
  """The vmapped pair traces its Pallas selective scans with half the target programs (each launch runs both
  points) and 8-step Mosaic GPU chunks; the sequential pair and anything traced after keep the defaults."""
  from mamba_jax.ops.selective_scan import pallas_triton as pt  # noqa: PLC0415

  seen = []
  real = pt._segments

  def spy(l, b, e, cfg):
    seen.append((cfg.target_programs, pt.DEFAULT_CONFIG.mosaic_chunk))
    return real(l, b, e, cfg)

  monkeypatch.setattr(pt, "_segments", spy)
  default = pt.DEFAULT_CONFIG
  model = MambaLM(MambaConfig.tiny("mamba1", n_layer=1), scan_impl="pallas", rngs=nnx.Rngs(0))
  attach_scales(model, "A", "linear", "layer")
  graphdef, scales, rest = nnx.split(model, CalibrationScale, ...)
  ids = jax.random.randint(jax.random.key(0), (1, 32), 0, 100)
  tx = make_optimizer("sgd", make_schedule("constant", 0.01))
  by_pair = {}
  for pair in ("vmap", "sequential"):
    spsa = SPSA(graphdef, tx, SPSAConfig(pair=pair))
    jax.eval_shape(spsa._step, scales, spsa.init(scales), 0, rest, ids)
    by_pair[pair], seen[:] = set(seen), []
  assert by_pair["vmap"] == {(default.target_programs // 2, 8)}, by_pair
  assert by_pair["sequential"] == {(default.target_programs, default.mosaic_chunk)}, by_pair
  assert pt.DEFAULT_CONFIG is default
