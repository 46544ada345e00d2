"""`ops.ssd` and `ops.selective_scan` (XLA) against their sequential references run in float64."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax import ops
from tests.conftest import float64, rel_err


def _ssd_inputs(key, b=2, l=37, h=4, p=8, g=2, n=16, dtype=jnp.float32):
  k = jax.random.split(key, 9)
  r = lambda i, shape: jax.random.normal(k[i], shape, dtype)
  return dict(
    x=r(0, (b, l, h, p)),
    dt=r(1, (b, l, h)),
    A=-jnp.exp(r(2, (h,))),
    B=r(3, (b, l, g, n)),
    C=r(4, (b, l, g, n)),
    D=r(5, (h,)),
    z=r(6, (b, l, h, p)),
    dt_bias=r(7, (h,)),
    initial_states=r(8, (b, h, p, n)),
  )


def _f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


SSD_CASES = {
  "plain": dict(drop=("D", "z", "dt_bias", "initial_states"), softplus=False, limit=(0.0, math.inf)),
  "all": dict(drop=(), softplus=True, limit=(0.0, math.inf)),
  "dt_limit": dict(drop=("z",), softplus=True, limit=(0.05, 1.5)),
  "D_hdim": dict(drop=("z",), softplus=True, limit=(0.0, math.inf), D_hdim=True),
}


@pytest.mark.parametrize(
  "case,l,chunk",
  [
    ("plain", 1, 8),
    ("all", 7, 8),
    ("all", 8, 8),
    ("all", 37, 8),
    ("dt_limit", 17, 8),
    ("D_hdim", 9, 8),
    ("all", 64, 16),
  ],
)
def test_ssd_xla_matches_sequential_reference(case, l, chunk):
  spec = SSD_CASES[case]
  inp = _ssd_inputs(jax.random.PRNGKey(l), l=l)
  if spec.get("D_hdim"):
    inp["D"] = jax.random.normal(jax.random.PRNGKey(5), (4, 8))
  for name in spec["drop"]:
    inp[name] = None
  kw = dict(dt_softplus=spec["softplus"], dt_limit=spec["limit"], return_final_states=True)
  y, S = ops.ssd(chunk_size=chunk, impl="xla", **inp, **kw)
  with float64():
    y_ref, S_ref = ops.ssd(chunk_size=chunk, impl="reference", **_f64(inp), **kw)
    y_ref, S_ref = np.asarray(y_ref), np.asarray(S_ref)
  assert y.dtype == jnp.float32 and S.dtype == jnp.float32
  assert y.shape == inp["x"].shape and S.shape == (2, 4, 8, 16)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * np.abs(y_ref).max())
  np.testing.assert_allclose(S, S_ref, rtol=1e-5, atol=1e-5 * np.abs(S_ref).max())


def test_ssd_bf16_inputs_keep_float32_state():
  inp = _ssd_inputs(jax.random.PRNGKey(0), l=20)
  bf = {k: (v.astype(jnp.bfloat16) if k in ("x", "B", "C", "z") else v) for k, v in inp.items()}
  y, S = ops.ssd(chunk_size=8, dt_softplus=True, return_final_states=True, impl="xla", **bf)
  y_ref, S_ref = ops.ssd(chunk_size=8, dt_softplus=True, return_final_states=True, impl="reference", **bf)
  assert y.dtype == jnp.bfloat16 and S.dtype == jnp.float32
  assert rel_err(y, y_ref) < 1e-2 and rel_err(S, S_ref) < 1e-5


def test_ssd_chunk_size_does_not_change_result():
  inp = _ssd_inputs(jax.random.PRNGKey(3), l=50)
  ys = [ops.ssd(chunk_size=c, dt_softplus=True, impl="xla", **inp) for c in (4, 64)]
  assert rel_err(ys[0], ys[1]) < 1e-5


def test_ssd_split_sequence_with_states_equals_whole():
  inp = _ssd_inputs(jax.random.PRNGKey(4), l=40)
  inp["initial_states"] = None
  y, S = ops.ssd(chunk_size=8, dt_softplus=True, return_final_states=True, impl="xla", **inp)
  first = {k: (v[:, :17] if v is not None and v.ndim >= 3 else v) for k, v in inp.items()}
  second = {k: (v[:, 17:] if v is not None and v.ndim >= 3 else v) for k, v in inp.items()}
  y1, S1 = ops.ssd(chunk_size=8, dt_softplus=True, return_final_states=True, impl="xla", **first)
  second["initial_states"] = S1
  y2, S2 = ops.ssd(chunk_size=8, dt_softplus=True, return_final_states=True, impl="xla", **second)
  assert rel_err(jnp.concatenate([y1, y2], 1), y) < 1e-5 and rel_err(S2, S) < 1e-5


def test_ssd_gradients_match_reference():
  inp = _ssd_inputs(jax.random.PRNGKey(5), b=1, l=21, h=4, p=4, g=2, n=8)
  names = list(inp)
  cot = jax.random.normal(jax.random.PRNGKey(9), inp["x"].shape)

  def loss(impl, *vals):
    y, S = ops.ssd(
      chunk_size=8, dt_softplus=True, return_final_states=True, impl=impl, **dict(zip(names, vals, strict=True))
    )
    return jnp.sum(y * cot) + jnp.sum(S**2) * 0.01

  argnums = tuple(range(1, len(names) + 1))
  g_xla = jax.grad(loss, argnums=argnums)("xla", *inp.values())
  with float64():
    g_ref = jax.grad(loss, argnums=argnums)("reference", *_f64(list(inp.values())))
    g_ref = [np.asarray(g) for g in g_ref]
  for name, a, b in zip(names, g_xla, g_ref, strict=True):
    assert rel_err(a, b) < 1e-4, name


def _scan_inputs(key, b=2, l=45, e=12, n=8):
  k = jax.random.split(key, 8)
  r = lambda i, shape: jax.random.normal(k[i], shape)
  return dict(
    u=r(0, (b, l, e)),
    delta=r(1, (b, l, e)),
    A=-jnp.exp(r(2, (e, n))),
    B=r(3, (b, l, n)),
    C=r(4, (b, l, n)),
    D=r(5, (e,)),
    z=r(6, (b, l, e)),
    delta_bias=r(7, (e,)),
  )


@pytest.mark.parametrize("with_options,l", [(False, 7), (True, 1), (True, 64), (True, 150)])
def test_selective_scan_xla_matches_sequential_reference(with_options, l):
  inp = _scan_inputs(jax.random.PRNGKey(l), l=l)
  if with_options:
    inp["initial_state"] = jax.random.normal(jax.random.PRNGKey(99), (2, 12, 8))
    kw = dict(delta_softplus=True, return_last_state=True)
  else:
    inp.update(D=None, z=None, delta_bias=None)
    inp["delta"] = jnp.abs(inp["delta"])
    kw = dict(return_last_state=True)
  y, h = ops.selective_scan(impl="xla", **inp, **kw)
  with float64():
    y_ref, h_ref = ops.selective_scan(impl="reference", **_f64(inp), **kw)
    y_ref, h_ref = np.asarray(y_ref), np.asarray(h_ref)
  assert y.dtype == jnp.float32 and h.shape == (2, 12, 8)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * np.abs(y_ref).max())
  np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-5 * np.abs(h_ref).max())


def test_selective_scan_gradients_match_reference():
  inp = _scan_inputs(jax.random.PRNGKey(1), b=1, l=70, e=6, n=4)
  inp["initial_state"] = jax.random.normal(jax.random.PRNGKey(2), (1, 6, 4))
  names = list(inp)
  cot = jax.random.normal(jax.random.PRNGKey(3), inp["u"].shape)

  def loss(impl, *vals):
    y, h = ops.selective_scan(
      impl=impl, delta_softplus=True, return_last_state=True, **dict(zip(names, vals, strict=True))
    )
    return jnp.sum(y * cot) + 0.01 * jnp.sum(h**2)

  argnums = tuple(range(1, len(names) + 1))
  g_xla = jax.grad(loss, argnums=argnums)("xla", *inp.values())
  with float64():
    g_ref = [np.asarray(g) for g in jax.grad(loss, argnums=argnums)("reference", *_f64(list(inp.values())))]
  for name, a, b in zip(names, g_xla, g_ref, strict=True):
    assert rel_err(a, b) < 1e-4, name


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_selective_scan_gate_from_wider_z(impl):
  """z_start takes the gate from columns of a wider array (the in_proj output): the same y as the sliced gate."""
  inp = _scan_inputs(jax.random.PRNGKey(5), l=20)
  e = inp["u"].shape[-1]
  wide = jax.random.normal(jax.random.PRNGKey(6), (2, 20, 3 * e)).at[..., e : 2 * e].set(inp["z"])
  y = ops.selective_scan(impl=impl, delta_softplus=True, **inp)
  y_w = ops.selective_scan(impl=impl, delta_softplus=True, **{**inp, "z": wide}, z_start=e)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_w))
  with pytest.raises(ValueError, match="gate columns"):
    ops.selective_scan(impl=impl, **{**inp, "z": wide}, z_start=2 * e + 1)


def test_impl_names_are_checked():
  inp = _scan_inputs(jax.random.PRNGKey(0), l=4)
  with pytest.raises(ValueError, match="impl="):
    ops.selective_scan(impl="cuda", **inp)
  assert ops.resolve_impl("auto", "ssd") in ("xla", "pallas")
