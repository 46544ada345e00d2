"""Time-step preprocessing shared by every scan implementation (bias, softplus, clamp, float32)."""

import math

import jax
import jax.numpy as jnp

SOFTPLUS_THRESHOLD = 20.0  # mamba_ssm (CUDA and Triton) and torch return x unchanged above 20.


def softplus(x: jax.Array) -> jax.Array:
  """Softplus with the official kernels' threshold; `jax.nn.softplus` keeps the unused branch finite for grads."""
  return jnp.where(x > SOFTPLUS_THRESHOLD, x, jax.nn.softplus(x))


def process_dt(
  dt: jax.Array,
  dt_bias: jax.Array | None,
  dt_softplus: bool,
  dt_limit: tuple[float, float] = (0.0, math.inf),
) -> jax.Array:
  """Returns the effective time step in float32 (or float64 when given float64).

  Args:
    dt: raw time step, `(b, l, h)` for SSD or `(b, l, e)` for the selective scan.
    dt_bias: `(h,)` or `(e,)`, added before the softplus.
    dt_softplus: apply the softplus.
    dt_limit: clamp applied after the softplus; `(0, inf)` is a no-op and is skipped.
  """
  acc = jnp.promote_types(dt.dtype, jnp.float32)
  dt = dt.astype(acc)
  if dt_bias is not None:
    dt = dt + dt_bias.astype(acc)
  if dt_softplus:
    dt = softplus(dt)
  lo, hi = dt_limit
  if lo > 0.0 or hi != math.inf:
    dt = jnp.clip(dt, lo, hi)
  return dt
