"""The residual add followed by the block's (or the final) RMSNorm, in plain XLA (the CPU path and the kernel's
backward).

Shape legend: d model width; any leading dims.
"""

import jax
import jax.numpy as jnp

F32 = jnp.float32


def add_residual(residual: jax.Array, hidden: jax.Array) -> jax.Array:
  """residual + hidden, added in float32 (float64 for float64 inputs) and kept in the residual's dtype (float32 when
  `residual_in_fp32`)."""
  acc = jnp.promote_types(residual.dtype, F32)
  return (residual.astype(acc) + hidden.astype(acc)).astype(residual.dtype)


def rms_norm_xla(x: jax.Array, weight: jax.Array, eps: float, out_dtype) -> jax.Array:
  """x / sqrt(mean(x^2) + eps) * weight in out_dtype; the math in float32 (float64 for float64 inputs), the weight
  applied before the cast, as mamba_ssm's RMSNorm."""
  acc = jnp.promote_types(x.dtype, F32)
  x32 = x.astype(acc)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * weight.astype(acc)).astype(out_dtype)


def add_rms_norm_xla(
  residual: jax.Array,  # (..., d)
  hidden: jax.Array,  # (..., d)
  weight: jax.Array,  # (d,)
  eps: float = 1e-5,
  out_dtype=None,
) -> tuple[jax.Array, jax.Array]:
  """(residual + hidden, rmsnorm(residual + hidden) * weight): the sum added in float32 and kept in the residual's
  dtype (float32 when `residual_in_fp32`), then normalised as stored, in `out_dtype` (default: hidden's dtype)."""
  total = add_residual(residual, hidden)
  return total, rms_norm_xla(total, weight, eps, out_dtype or hidden.dtype)
