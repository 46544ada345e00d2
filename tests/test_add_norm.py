"""The residual add + RMSNorm: the Pallas kernel (interpret mode on CPU, compiled on GPU) and the XLA formula
against a float64 NumPy reference written from mamba_ssm's fused add + RMSNorm; gradients against finite
differences and against the formula's own derivative; the model's lowering on CUDA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from mamba_jax import MambaConfig, MambaLM, ops
from mamba_jax.ops.add_norm import pallas_triton as pt
from mamba_jax.ops.add_norm.reference import add_rms_norm_xla
from tests.conftest import _cuda_lowering, float64, kernel_calls, rel_err

INTERPRET = jax.default_backend() != "gpu"


def _numpy_reference(residual, hidden, w, eps):
  """s = residual + hidden (in the residual's dtype as stored), y = s / sqrt(mean(s^2) + eps) * w, float64."""
  s = np.asarray((residual.astype(jnp.float32) + hidden.astype(jnp.float32)).astype(residual.dtype), np.float64)
  y = s / np.sqrt((s * s).mean(-1, keepdims=True) + eps) * np.asarray(w, np.float64)
  return s, y


def _inputs(shape, res_dtype, hid_dtype, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  residual = (3.0 * jax.random.normal(k[0], shape, jnp.float32)).astype(res_dtype)
  hidden = jax.random.normal(k[1], shape, jnp.float32).astype(hid_dtype)
  w = 1.0 + 0.3 * jax.random.normal(k[2], shape[-1:], jnp.float32)
  return residual, hidden, w


# (leading shape, width): one power-of-two chunk; 48 = 3 chunks of 16 (the chunked path); rows not a power of two
# (one row per program); 768 = 3 chunks of 256 (mamba-130m's width).
SHAPES = [((2, 8), 64), ((3, 5), 48), ((1, 33), 256), ((2, 3), 768)]
DTYPES = [(jnp.float32, jnp.bfloat16), (jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16)]


@pytest.mark.parametrize("lead,d", SHAPES)
@pytest.mark.parametrize("res_dtype,hid_dtype", DTYPES)
def test_pallas_and_xla_match_float64_reference(lead, d, res_dtype, hid_dtype):
  residual, hidden, w = _inputs((*lead, d), res_dtype, hid_dtype)
  want_s, want_y = _numpy_reference(residual, hidden, w, 1e-5)
  tol = 1e-5 if hid_dtype == jnp.float32 else 1e-2  # the normalised output is in the block output's dtype
  for s, y in (
    pt.add_rms_norm_pallas(residual, hidden, w, 1e-5, interpret=INTERPRET),
    add_rms_norm_xla(residual, hidden, w, 1e-5),
  ):
    assert s.dtype == residual.dtype and y.dtype == hidden.dtype and y.shape == residual.shape
    np.testing.assert_array_equal(np.asarray(s, np.float64), want_s)  # the sum is one float32 add, rounded as stored
    assert rel_err(y, want_y) < tol


def test_output_dtype_is_selectable():
  residual, hidden, w = _inputs((2, 4, 64), jnp.float32, jnp.float32)
  _, y = pt.add_rms_norm_pallas(residual, hidden, w, 1e-5, jnp.bfloat16, interpret=INTERPRET)
  assert y.dtype == jnp.bfloat16
  assert rel_err(y, _numpy_reference(residual, hidden, w, 1e-5)[1]) < 1e-2


@pytest.mark.parametrize("d", [64, 48])
def test_pallas_gradients_match_finite_differences(d):
  with float64():
    residual, hidden, w = (a.astype(jnp.float64) for a in _inputs((2, 3, d), jnp.float32, jnp.float32, seed=1))
    # Both outputs used, with different weights, so that each one's cotangent reaches the inputs.
    fn = lambda r, h, w_: pt.add_rms_norm_pallas(r, h, w_, 1e-5, interpret=INTERPRET)  # noqa: E731
    check_grads(fn, (residual, hidden, w), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_pallas_gradients_in_mixed_dtypes_match_the_formulas_derivative():
  """A float32 residual and a bf16 block output, as the models run: the same cotangents as jax's derivative of the
  XLA formula, in the same dtypes."""
  residual, hidden, w = _inputs((2, 8, 128), jnp.float32, jnp.bfloat16, seed=2)
  k = jax.random.split(jax.random.PRNGKey(5), 2)
  g_s = jax.random.normal(k[0], residual.shape, jnp.float32)
  g_y = jax.random.normal(k[1], residual.shape, jnp.float32).astype(jnp.bfloat16)
  got = jax.vjp(lambda *a: pt.add_rms_norm_pallas(*a, interpret=INTERPRET), residual, hidden, w)[1]((g_s, g_y))
  want = jax.vjp(add_rms_norm_xla, residual, hidden, w)[1]((g_s, g_y))
  for a, e in zip(got, want, strict=True):
    assert a.dtype == e.dtype and a.shape == e.shape
    assert rel_err(a, e) < (1e-2 if a.dtype == jnp.bfloat16 else 1e-5)


def test_dispatch_falls_back_to_xla_and_bad_input_is_refused():
  residual, hidden, w = _inputs((2, 3, 24), jnp.float32, jnp.bfloat16)  # 24 = 3 x 8: no power-of-two factor >= 16
  assert not pt.supported(24)
  with pytest.raises(ValueError, match="impl='xla'"):
    pt.add_rms_norm_pallas(residual, hidden, w, interpret=True)
  s, y = ops.add_rms_norm(residual, hidden, w, impl="pallas")
  want_s, want_y = _numpy_reference(residual, hidden, w, 1e-5)
  np.testing.assert_array_equal(np.asarray(s, np.float64), want_s)
  assert rel_err(y, want_y) < 1e-2
  with pytest.raises(ValueError, match="do not match"):
    pt.add_rms_norm_pallas(residual, hidden[..., :16], w, interpret=True)


def _tiny_lm(remat: bool):
  cfg = MambaConfig(arch="mamba1", d_model=64, n_layer=3, vocab_size=64, d_state=8, pad_vocab_size_multiple=8)
  model = MambaLM(cfg, dtype=jnp.bfloat16, scan_impl="pallas", remat=remat, rngs=nnx.Rngs(0))
  return model, jnp.zeros((1, 64), jnp.int32)


def test_model_forward_lowers_one_add_norm_kernel_per_block_copy_and_one_final():
  """On CUDA the first block (run before the layer scan) holds one add + norm kernel, the layer scan's body another
  (every other block's) and the final norm a third; with remat the blocks keep XLA's add and norm (their
  checkpoint saves the sum alone), only the final one is the kernel (CI has no GPU: the CUDA lowering runs on the
  CPU)."""
  for remat, want in ((False, 3), (True, 1)):
    model, ids = _tiny_lm(remat)
    graphdef, state = nnx.split(model)
    calls = kernel_calls(lambda s, i, g=graphdef: nnx.merge(g, s)(i), state, ids)["triton"]
    norms = [c for c in calls if "tensor<64x64xf32>" in c and "tensor<64x64xbf16>" in c]
    assert len(norms) == want, calls


def test_the_sum_is_written_over_the_residual():
  """The kernel's first output aliases its residual operand (so a loop carry stays in its buffer), and the caller
  still sees functional semantics: the input array is unchanged after the call."""
  residual, hidden, w = _inputs((2, 8, 64), jnp.float32, jnp.bfloat16)
  lines = [ln for ln in _cuda_lowering(pt.add_rms_norm_pallas, residual, hidden, w).splitlines() if "triton" in ln]
  assert len(lines) == 1
  assert "output_operand_alias<output_tuple_indices = [0], operand_index = 0" in lines[0]
  before = np.asarray(residual)
  s, _ = jax.jit(lambda r, h, w_: pt.add_rms_norm_pallas(r, h, w_, interpret=INTERPRET))(residual, hidden, w)
  np.testing.assert_array_equal(np.asarray(residual), before)
  assert not np.array_equal(np.asarray(s), before)


def test_vmapped_kernel_equals_the_per_example_calls():
  """The SPSA pair vmaps the model over its two points: the batched kernel (with its alias) gives each point's
  result."""
  residual, hidden, w = _inputs((2, 3, 8, 64), jnp.float32, jnp.bfloat16, seed=4)
  fn = lambda r, h: pt.add_rms_norm_pallas(r, h, w, 1e-5, interpret=INTERPRET)  # noqa: E731
  s, y = jax.jit(jax.vmap(fn))(residual, hidden)
  for i in range(2):
    s_i, y_i = fn(residual[i], hidden[i])
    np.testing.assert_array_equal(np.asarray(s[i]), np.asarray(s_i))
    np.testing.assert_array_equal(np.asarray(y[i], np.float32), np.asarray(y_i, np.float32))
