"""Mamba2's gated RMSNorm: the Pallas kernel (interpret mode on CPU, compiled on GPU) and the XLA formula against a
float64 NumPy reference written from mamba_ssm's definition; gradients against finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mamba_jax import ops
from mamba_jax.ops.gated_norm import pallas_triton as pt
from mamba_jax.ops.gated_norm.reference import gated_rms_norm_xla
from tests.conftest import float64, rel_err

INTERPRET = jax.default_backend() != "gpu"


def _numpy_reference(y, z, w, ngroups, eps, norm_before_gate):
  """mamba_ssm's RMSNormGated: x = y * silu(z) (before the norm unless norm_before_gate), per-group RMS."""
  y, z, w = (np.asarray(a, np.float64) for a in (y, z, w))
  gate = z / (1.0 + np.exp(-z))
  x = y if norm_before_gate else y * gate
  xg = x.reshape(*x.shape[:-1], ngroups, -1)
  xg = xg / np.sqrt((xg * xg).mean(-1, keepdims=True) + eps)
  out = xg.reshape(x.shape) * w
  return out * gate if norm_before_gate else out


def _inputs(shape, dtype, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  y = jax.random.normal(k[0], shape, jnp.float32).astype(dtype)
  z = (2.0 * jax.random.normal(k[1], shape, jnp.float32)).astype(dtype)
  w = 1.0 + 0.3 * jax.random.normal(k[2], shape[-1:], jnp.float32)
  return y, z, w


# (leading shape, width, ngroups): one power-of-two group; 2 groups; groups of 48 = 3 chunks of 16 (the chunked
# path); rows not a multiple of the row block.
SHAPES = [((2, 9), 64, 1), ((3, 5), 64, 2), ((2, 7), 96, 2), ((1, 33), 256, 4)]


@pytest.mark.parametrize("lead,e,g", SHAPES)
@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_pallas_and_xla_match_float64_reference(lead, e, g, norm_before_gate):
  y, z, w = _inputs((*lead, e), jnp.float32)
  want = _numpy_reference(y, z, w, g, 1e-5, norm_before_gate)
  got_pallas = pt.gated_rms_norm_pallas(y, z, w, g, 1e-5, norm_before_gate, interpret=INTERPRET)
  got_xla = gated_rms_norm_xla(y, z, w, g, 1e-5, norm_before_gate)
  assert got_pallas.shape == y.shape and got_pallas.dtype == y.dtype
  assert rel_err(got_pallas, want) < 1e-5
  assert rel_err(got_xla, want) < 1e-5


def test_bf16_inputs_give_bf16_output_within_rounding():
  y, z, w = _inputs((4, 16, 128), jnp.bfloat16)
  got = pt.gated_rms_norm_pallas(y, z, w, 2, 1e-5, False, interpret=INTERPRET)
  assert got.dtype == jnp.bfloat16
  assert rel_err(got, _numpy_reference(y, z, w, 2, 1e-5, False)) < 1e-2


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_pallas_gradients_match_finite_differences(norm_before_gate):
  with float64():
    y, z, w = (a.astype(jnp.float64) for a in _inputs((2, 5, 48), jnp.float32, seed=1))
    fn = lambda y, z, w: pt.gated_rms_norm_pallas(y, z, w, 3, 1e-5, norm_before_gate, interpret=INTERPRET)
    check_grads(fn, (y, z, w), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_dispatch_falls_back_to_xla_for_unsupported_widths():
  y, z, w = _inputs((2, 3, 24), jnp.float32)  # groups of 24 = 3 x 8: no power-of-two factor >= 16
  assert not pt.supported(24, 1)
  with pytest.raises(ValueError, match="impl='xla'"):
    pt.gated_rms_norm_pallas(y, z, w, 1, interpret=True)
  got = ops.gated_rms_norm(y, z, w, 1, impl="pallas")
  assert rel_err(got, _numpy_reference(y, z, w, 1, 1e-5, False)) < 1e-5


@pytest.mark.parametrize("z_start", [64, 40])  # a multiple of the group width (read in place), and not (sliced)
def test_gate_read_from_a_wider_array(z_start):
  """The model passes the whole in_proj output as z with the gate's first column; the extra columns are ignored."""
  y, _, w = _inputs((2, 7, 64), jnp.float32)
  wide = jax.random.normal(jax.random.PRNGKey(3), (2, 7, 200), jnp.float32)
  gate = wide[..., z_start : z_start + 64]
  want = _numpy_reference(y, gate, w, 2, 1e-5, False)
  got = pt.gated_rms_norm_pallas(y, wide, w, 2, 1e-5, False, z_start=z_start, interpret=INTERPRET)
  assert rel_err(got, want) < 1e-5
  assert rel_err(ops.gated_rms_norm(y, wide, w, 2, z_start=z_start, impl="xla"), want) < 1e-5
  with float64():
    y64, wide64, w64 = (a.astype(jnp.float64) for a in (y, wide, w))
    fn = lambda y, z, w: pt.gated_rms_norm_pallas(y, z, w, 2, 1e-5, False, z_start=z_start, interpret=INTERPRET)
    check_grads(fn, (y64, wide64, w64), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_mismatched_shapes_are_refused():
  y, z, w = _inputs((2, 3, 64), jnp.float32)
  with pytest.raises(ValueError, match="do not match"):
    pt.gated_rms_norm_pallas(y, z, w, 1, z_start=8, interpret=True)  # the gate would run past z's last column
