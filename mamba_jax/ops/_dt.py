"""Time-step preprocessing shared by every scan implementation (bias, softplus, clamp, float32)."""

import math

import jax
import jax.numpy as jnp

SOFTPLUS_THRESHOLD = 20.0  # mamba_ssm (CUDA and Triton) and torch return x unchanged above 20.


def softplus(x: jax.Array) -> jax.Array:
  """Softplus with the official kernels' threshold; `jax.nn.softplus` keeps the unused branch finite for grads."""
  return jnp.where(x > SOFTPLUS_THRESHOLD, x, jax.nn.softplus(x))


_SERIES_BELOW = -3.0  # `softplus_from_exp2`: ln(1 + t) from its series where t = e^x < e^-3


def softplus_from_exp2(x: jax.Array, exp2, log2) -> jax.Array:
  """Softplus from base-2 exponential and logarithm functions (the kernels pass their approximate hardware ones,
  `ex2.approx` and `lg2.approx`): ~12 instructions where libdevice's log1pf alone is ~30. ln(1 + t), t = e^x, is
  lg2(1 + t) ln 2 where softplus is at least ~0.05 (lg2.approx's absolute error, ~2^-22, is then under 4e-6 of it)
  and the series t - t^2/2 + ... - t^6/6 below (truncation under 1e-7 of t): relative error within ~4e-6 at any x."""
  xc = jnp.minimum(x, SOFTPLUS_THRESHOLD)
  t = exp2(xc * math.log2(math.e))  # e^x
  lg = log2(1.0 + t)
  # Constant coefficients, no division: under Mosaic GPU's approx_math `t / 6` became a `div.full.f32` (a
  # special-function reciprocal) in every step of both forward passes (their PTX, round 19).
  series = t * (1.0 - t * (1 / 2 - t * (1 / 3 - t * (1 / 4 - t * (1 / 5 - t * (1 / 6))))))
  return jnp.where(x > SOFTPLUS_THRESHOLD, x, jnp.where(xc < _SERIES_BELOW, series, lg * math.log(2.0)))


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
