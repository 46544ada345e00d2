"""Calibration scales: identity, where each target/mode/granularity acts (against numpy), decode, save/load, folding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from calibrate import scales as scales_lib
from mamba_jax import MambaConfig, MambaLM
from mamba_jax.scales import CalibrationScale, attach_scales

# (arch, target, mode, granularity): every combination the architectures offer.
COMBOS = [
  ("mamba1", "A", "linear", "layer"),
  ("mamba1", "A", "linear", "channel"),
  ("mamba1", "A", "linear", "entry"),
  ("mamba1", "A", "power", "layer"),
  ("mamba1", "A", "power", "channel"),
  ("mamba1", "A", "power", "entry"),
  ("mamba1", "dt", "linear", "layer"),
  ("mamba1", "dt", "linear", "channel"),
  ("mamba2", "A", "linear", "layer"),
  ("mamba2", "A", "linear", "head"),
  ("mamba2", "A", "power", "layer"),
  ("mamba2", "A", "power", "head"),
  ("mamba2", "dt", "linear", "layer"),
  ("mamba2", "dt", "linear", "head"),
]


def tiny(arch: str, n_layer: int = 2, seed: int = 0) -> MambaLM:
  model = MambaLM(MambaConfig.tiny(arch, n_layer=n_layer), rngs=nnx.Rngs(seed))
  # Spread A_log over negative and positive values so that linear and power scaling differ everywhere.
  rng = np.random.default_rng(seed)
  for layer in model.backbone.layers:
    a = layer.mixer.A_log
    a.set_value(jnp.asarray(rng.uniform(-1.0, 2.0, a.shape), jnp.float32))
    # Time steps of order 1 (the init gives ~0.01), so that A and dt matter within a few tokens.
    bias = layer.mixer.dt_bias if arch == "mamba2" else layer.mixer.dt_proj.bias
    bias.set_value(jnp.asarray(rng.uniform(-0.5, 1.0, bias.shape), jnp.float32))
  return model


# Jitted calls, cached per model structure: eager Mamba1 forwards cost seconds each on CPU.
FWD = nnx.jit(lambda model, x: model(x))
MIXER = nnx.jit(lambda mixer, u: mixer(u))
PREFILL = nnx.jit(lambda model, x: model.prefill(x))
STEP = nnx.jit(lambda model, tok, cache: model.step(tok, cache))


def random_scales(model, seed: int = 1) -> None:
  rng = np.random.default_rng(seed)
  scales_lib.set_stacked(
    model, {t: rng.uniform(0.5, 1.5, a.shape).astype(np.float32) for t, a in scales_lib.stacked(model).items()}
  )


def ids(b=2, l=24, seed=3, vocab=100):
  return jax.random.randint(jax.random.key(seed), (b, l), 0, vocab)


IDENTITY_CASES = {  # A and dt scales attached together; every mode and granularity appears once per arch
  "mamba1": [("linear", "entry", "channel"), ("power", "layer", "layer"), ("linear", "channel", "layer")],
  "mamba2": [("linear", "head", "head"), ("power", "layer", "layer")],
}


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_identity_scales_leave_logits_bitwise_unchanged(arch):
  x = ids()
  ref = np.asarray(FWD(tiny(arch), x))
  for mode, a_gran, dt_gran in IDENTITY_CASES[arch]:
    m = tiny(arch)
    attach_scales(m, "A", mode, a_gran)
    attach_scales(m, "dt", "linear", dt_gran)
    attach_scales(m, "A", mode, a_gran)  # the A mode is the mixer's scale_mode: set it last
    # A scales of 1 are bitwise neutral. A dt scale moves the softplus out of the fused scan into the mixer, and XLA
    # fuses the layer-scan body differently then, so those logits agree to float32 rounding (a few ulp), not bitwise.
    np.testing.assert_allclose(
      np.asarray(FWD(m, x)), ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max(), err_msg=f"A {mode} {a_gran}, dt {dt_gran}"
    )
    a_only = tiny(arch)
    attach_scales(a_only, "A", mode, a_gran)
    np.testing.assert_array_equal(np.asarray(FWD(a_only, x)), ref, err_msg=f"A {mode} {a_gran}")


def _softplus(x):
  return np.where(x > 20.0, x, np.logaddexp(0.0, x))


def _numpy_A(A_log, s, target, mode):
  A_log = np.asarray(A_log, np.float64)
  if target != "A":
    return -np.exp(A_log)
  return -np.exp(A_log) * s if mode == "linear" else -np.exp(A_log * s)


def _mamba1_by_hand(mixer, u, s, target, mode):
  """The one-layer Mamba1 mixer in numpy float64 from its projections, the scale put where the paper puts it."""
  x, z = jnp.split(mixer.in_proj(u), 2, axis=-1)
  xc = mixer.conv1d(x, silu=True)
  dt, B, C = (np.asarray(t, np.float64) for t in mixer._project(xc))
  xc, z = np.asarray(xc, np.float64), np.asarray(z, np.float64)
  delta = _softplus(dt + np.asarray(mixer.dt_proj.bias[...], np.float64))  # (b, l, e)
  if target == "dt":
    delta = delta * s
  A = _numpy_A(mixer.A_log[...], s, target, mode)  # (e, n)
  b, l, e = xc.shape
  h = np.zeros((b, e, A.shape[1]))
  ys = []
  for t in range(l):
    h = np.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * xc[:, t])[..., None] * B[:, t, None, :]
    ys.append(np.einsum("ben,bn->be", h, C[:, t]) + np.asarray(mixer.D[...], np.float64) * xc[:, t])
  y = np.stack(ys, 1) * (z / (1.0 + np.exp(-z)))
  return np.asarray(mixer.out_proj(jnp.asarray(y, jnp.float32)))


def _mamba2_by_hand(mixer, u, s, target, mode):
  """The one-layer Mamba2 mixer in numpy float64 (recurrent form), the scale put where the paper puts it."""
  cfg = mixer.cfg
  z0, x0, z, xBC, dt = mixer._split_in_proj(mixer.in_proj(u))
  x, B, C = (np.asarray(t, np.float64) for t in mixer._split_xBC(mixer.conv1d(xBC, silu=True)))
  delta = _softplus(np.asarray(dt, np.float64) + np.asarray(mixer.dt_bias[...], np.float64))  # (b, l, h)
  if target == "dt":
    delta = delta * s
  A = _numpy_A(mixer.A_log[...], s, target, mode)  # (h,)
  b, l, nh, p = x.shape
  r = nh // cfg.ngroups
  Bh, Ch = np.repeat(B, r, axis=2), np.repeat(C, r, axis=2)  # (b, l, h, n)
  S = np.zeros((b, nh, p, cfg.d_state))
  ys = []
  for t in range(l):
    dA = np.exp(delta[:, t] * A)  # (b, h)
    S = S * dA[..., None, None] + (delta[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
    ys.append(np.einsum("bhpn,bhn->bhp", S, Ch[:, t]) + np.asarray(mixer.D[...], np.float64)[:, None] * x[:, t])
  y = np.stack(ys, 1).reshape(b, l, cfg.ssm_width)
  return np.asarray(mixer._finish(jnp.asarray(y, jnp.float32), z, z0, x0))


@pytest.mark.parametrize("arch,target,mode,granularity", COMBOS)
def test_scale_acts_where_it_should(arch, target, mode, granularity):
  """One layer: the mixer output with random scales equals numpy with the scale applied by hand."""
  model = tiny(arch, n_layer=1)
  attach_scales(model, target, mode, granularity)
  random_scales(model)
  mixer = model.backbone.layers[0].mixer
  s = np.asarray(scales_lib.stacked(model)[target][0], np.float64)
  u = jax.random.normal(jax.random.key(5), (2, 12, model.cfg.d_model))
  out = np.asarray(MIXER(mixer, u))
  by_hand = (_mamba1_by_hand if arch == "mamba1" else _mamba2_by_hand)(mixer, u, s, target, mode)
  np.testing.assert_allclose(out, by_hand, rtol=2e-4, atol=2e-5)
  # And the scale matters: the unscaled mixer is far from it.
  unscaled = (_mamba1_by_hand if arch == "mamba1" else _mamba2_by_hand)(mixer, u, np.ones_like(s), target, mode)
  assert np.abs(unscaled - by_hand).max() > 100 * 2e-5


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("mode", ["linear", "power"])
def test_A_scales_equal_hand_edited_A_log(arch, mode):
  """Logits with A scales = logits of the unscaled model whose A_log was edited by hand."""
  granularity = "entry" if arch == "mamba1" else "head"
  x = ids()
  scaled = tiny(arch)
  attach_scales(scaled, "A", mode, granularity)
  random_scales(scaled)
  s = scales_lib.stacked(scaled)["A"]
  edited = tiny(arch)
  for i, layer in enumerate(edited.backbone.layers):
    a = np.asarray(layer.mixer.A_log[...])
    new = a + np.log(s[i]) if mode == "linear" else a * s[i]
    layer.mixer.A_log.set_value(jnp.asarray(new, jnp.float32))
  np.testing.assert_allclose(np.asarray(FWD(scaled, x)), np.asarray(FWD(edited, x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "arch,target",
  [("mamba1", "A"), pytest.param("mamba1", "dt", marks=pytest.mark.slow)]
  + [pytest.param("mamba2", "A", marks=pytest.mark.slow), ("mamba2", "dt")],  # each target and arch by default
)
def test_decode_with_scales_equals_forward(arch, target):
  model = tiny(arch)
  attach_scales(model, target, "power" if target == "A" else "linear", "layer")
  random_scales(model)
  x = ids(l=16)
  full = np.asarray(FWD(model, x))
  logits, cache = PREFILL(model, x[:, :6])
  steps = [np.asarray(logits[:, -1])]
  for t in range(6, 16):
    step_logits, cache = STEP(model, x[:, t], cache)
    steps.append(np.asarray(step_logits))
  np.testing.assert_allclose(np.stack(steps[:-1], 1), full[:, 5:15], rtol=1e-4, atol=1e-4)
  # The prefill-only switch (released-code behaviour) changes the decode steps only.
  for layer in model.backbone.layers:
    layer.mixer.scales_in_decode = False
  _, cache = PREFILL(model, x[:, :6])
  step_logits, _ = STEP(model, x[:, 6], cache)
  assert np.abs(np.asarray(step_logits) - full[:, 6]).max() > 1e-3


def test_save_load_round_trip(tmp_path):
  model = tiny("mamba1")
  attach_scales(model, "A", "power", "channel", apply_in_decode=False)
  random_scales(model)
  scales_lib.save_scales(model, tmp_path / "s", {"method": "test"})
  loaded = tiny("mamba1")
  scales_lib.load_scales(loaded, tmp_path / "s")
  np.testing.assert_array_equal(scales_lib.stacked(loaded)["A"], scales_lib.stacked(model)["A"])
  mixer = loaded.backbone.layers[0].mixer
  assert mixer.scale_mode == "power" and mixer.scales_in_decode is False
  x = ids()
  np.testing.assert_array_equal(np.asarray(FWD(loaded, x)), np.asarray(FWD(model, x)))
  # The loaded scales are a CalibrationScale collection apart from the checkpoint.
  assert len(jax.tree.leaves(nnx.state(loaded, CalibrationScale))) == 2
  assert not any("a_scale" in str(p) for p, _ in nnx.to_flat_state(nnx.state(loaded, nnx.Param)))


def test_load_scales_made_for_another_model_names_the_mismatch(tmp_path):
  model = tiny("mamba2")
  attach_scales(model, "A", "linear", "head")
  scales_lib.save_scales(model, tmp_path / "s")
  with pytest.raises(scales_lib.ScalesError, match="n_layer: scales made for 2, model has 3"):
    scales_lib.load_scales(tiny("mamba2", n_layer=3), tmp_path / "s")
  with pytest.raises(scales_lib.ScalesError, match="arch: scales made for 'mamba2', model has 'mamba1'"):
    scales_lib.load_scales(tiny("mamba1"), tmp_path / "s")
  with pytest.raises(scales_lib.ScalesError, match="is not a scales directory"):
    scales_lib.load_scales(model, tmp_path)
  with pytest.raises(scales_lib.ScalesError, match="does not exist"):
    scales_lib.load_scales(model, tmp_path / "nope")


def test_load_scales_with_wrong_tensor_shape(tmp_path):
  from safetensors.numpy import save_file

  model = tiny("mamba2")
  attach_scales(model, "A", "linear", "head")
  scales_lib.save_scales(model, tmp_path / "s")
  save_file({"A": np.ones((2, 3), np.float32)}, str(tmp_path / "s" / scales_lib.SCALES_FILE))
  with pytest.raises(scales_lib.ScalesError, match=r"has shape \(2, 3\), the model needs \(2, 4\)"):
    scales_lib.load_scales(tiny("mamba2"), tmp_path / "s")


@pytest.mark.parametrize("arch,granularity", [("mamba1", "entry"), ("mamba1", "channel"), ("mamba2", "head")])
@pytest.mark.parametrize("mode", ["linear", "power"])
def test_fold_gives_the_same_logits(arch, granularity, mode):
  model = tiny(arch)
  attach_scales(model, "A", mode, granularity)
  random_scales(model)
  folded = scales_lib.fold_model(model)
  assert not scales_lib.scale_vars(folded)
  x = ids()
  np.testing.assert_allclose(np.asarray(FWD(folded, x)), np.asarray(FWD(model, x)), rtol=1e-5, atol=1e-5)


def test_dt_scales_refuse_to_fold():
  model = tiny("mamba2")
  attach_scales(model, "dt", "linear", "head")
  with pytest.raises(scales_lib.ScalesError, match="dt scales cannot be folded"):
    scales_lib.fold_model(model)


@pytest.mark.parametrize(
  "arch,target,granularity,offered",
  [("mamba2", "A", "entry", "layer"), ("mamba2", "A", "channel", "head"), ("mamba1", "dt", "entry", "channel")],
)
def test_granularity_the_architecture_lacks(arch, target, granularity, offered):
  with pytest.raises(ValueError, match=f"does not exist for target '{target}' on {arch}.*{offered}"):
    attach_scales(tiny(arch), target, "linear", granularity)
