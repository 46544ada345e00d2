"""The gated RMSNorm of mamba_ssm's Mamba2, in plain XLA (the CPU path and the Pallas kernel's backward).

Shape legend: e width (ngroups contiguous groups of e / ngroups channels); any leading dims.
"""

import jax
import jax.numpy as jnp

F32 = jnp.float32


def gated_rms_norm_xla(
  y: jax.Array,  # (..., e)
  z: jax.Array,  # (..., e)
  weight: jax.Array,  # (e,)
  ngroups: int = 1,
  eps: float = 1e-5,
  norm_before_gate: bool = False,
  z_start: int | None = None,
) -> jax.Array:
  """norm_before_gate=False: rmsnorm(y * silu(z)) * w; True: rmsnorm(y) * w * silu(z). In y's dtype; the math in
  float32 (float64 for float64 inputs). With `z_start`, z is wider and the gate is z[..., z_start : z_start + e]."""
  if z_start is not None:
    z = z[..., z_start : z_start + y.shape[-1]]
  acc = jnp.promote_types(y.dtype, F32)
  y32, gate = y.astype(acc), jax.nn.silu(z.astype(acc))
  if not norm_before_gate:
    y32 = y32 * gate
  grouped = y32.reshape(*y32.shape[:-1], ngroups, -1)
  grouped = grouped * jax.lax.rsqrt(jnp.mean(grouped * grouped, axis=-1, keepdims=True) + eps)
  out = grouped.reshape(y32.shape) * weight.astype(acc)
  if norm_before_gate:
    out = out * gate
  return out.astype(y.dtype)
