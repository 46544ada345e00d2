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
from tests.conftest import float64, rel_err

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


# (b, l, source width, window start, window width): the whole array; an inner window (as in Mamba2's x | B | C);
# lengths below, at and past the kernel's 64-row block (ragged tail); conv width 2.
CASES = [
  (2, 5, 32, 0, 32, 4),
  (2, 64, 112, 32, 48, 4),
  (1, 150, 96, 16, 64, 4),
  (3, 70, 64, 0, 32, 2),
]


@pytest.mark.parametrize("b,l,d,start,width,k", CASES)
@pytest.mark.parametrize("silu", [True, False])
def test_pallas_and_xla_match_float64_reference(b, l, d, start, width, k, silu):
  src, weight, bias = _inputs(b, l, d, width, k)
  want = _numpy_reference(src, weight, bias, start, width, silu)
  got = pt.causal_conv1d_pallas(src, weight, bias, start=start, width=width, silu=silu, interpret=INTERPRET)
  assert got.shape == (b, l, width) and got.dtype == src.dtype
  assert rel_err(got, want) < 1e-5
  assert rel_err(causal_conv1d_xla(src, weight, bias, start=start, width=width, silu=silu), want) < 1e-5


def test_no_bias_and_bf16():
  src, weight, _ = _inputs(2, 33, 64, 64, dtype=jnp.bfloat16)
  got = pt.causal_conv1d_pallas(src, weight, None, interpret=INTERPRET)
  assert got.dtype == jnp.bfloat16
  assert rel_err(got, _numpy_reference(src, weight, None, 0, 64, True)) < 1e-2


def test_pallas_gradients_match_finite_differences():
  with float64():
    src, weight, bias = (a.astype(jnp.float64) for a in _inputs(2, 9, 48, 16, seed=1))
    fn = lambda s, w, b: pt.causal_conv1d_pallas(s, w, b, start=16, width=16, interpret=INTERPRET)
    check_grads(fn, (src, weight, bias), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_dispatch_and_bad_input():
  src, weight, bias = _inputs(1, 8, 40, 24)
  assert not pt.supported(8, 24)  # start 8, width 24: no common power-of-two block of 16 channels
  with pytest.raises(ValueError, match="impl='xla'"):
    pt.causal_conv1d_pallas(src, weight, bias, start=8, width=24, interpret=True)
  got = ops.causal_conv1d(src, weight, bias, start=8, width=24, impl="pallas")  # falls back to XLA
  assert rel_err(got, _numpy_reference(src, weight, bias, 8, 24, True)) < 1e-5
  with pytest.raises(ValueError, match="do not match"):
    pt.causal_conv1d_pallas(src, weight, bias, start=32, width=24, interpret=True)  # past the last column
