"""Sequential Mamba2 SSD recurrence, one time step at a time. Slow; the ground truth for tests.

Shape legend: b batch, l length, h heads, p head dim, g groups, n state.
"""

import functools
import math

import jax
import jax.numpy as jnp

from mamba_jax.ops._dt import process_dt


@functools.partial(jax.jit, static_argnames=("chunk_size", "dt_softplus", "dt_limit", "return_final_states"))
def ssd_reference(
  x: jax.Array,  # (b, l, h, p)
  dt: jax.Array,  # (b, l, h)
  A: jax.Array,  # (h,)
  B: jax.Array,  # (b, l, g, n)
  C: jax.Array,  # (b, l, g, n)
  chunk_size: int | None = None,  # unused: kept so the signature matches `ssd`.
  D: jax.Array | None = None,  # (h,) or (h, p)
  z: jax.Array | None = None,  # (b, l, h, p)
  dt_bias: jax.Array | None = None,  # (h,)
  dt_softplus: bool = False,
  dt_limit: tuple[float, float] = (0.0, math.inf),
  initial_states: jax.Array | None = None,  # (b, h, p, n)
  return_final_states: bool = False,
):
  """S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T;  y_t = S_t C_t + D x_t;  y *= silu(z).

  Accumulates in float32, or float64 when the inputs are float64 (tests use that as the reference).
  """
  del chunk_size
  b, l, h, p = x.shape
  g, n = B.shape[-2:]
  acc = jnp.promote_types(x.dtype, jnp.float32)
  dt = process_dt(dt, dt_bias, dt_softplus, dt_limit).astype(acc)
  A = A.astype(acc)
  # Head h reads group h // (h / g): consecutive heads share a group.
  Bh = jnp.repeat(B.astype(acc), h // g, axis=2)  # (b, l, h, n)
  Ch = jnp.repeat(C.astype(acc), h // g, axis=2)  # (b, l, h, n)
  xs = x.astype(acc)
  S0 = jnp.zeros((b, h, p, n), acc) if initial_states is None else initial_states.astype(acc)

  def step(S, inputs):
    x_t, dt_t, B_t, C_t = inputs  # (b,h,p), (b,h), (b,h,n), (b,h,n)
    S = S * jnp.exp(dt_t * A)[:, :, None, None] + (dt_t[:, :, None] * x_t)[..., None] * B_t[:, :, None, :]
    y_t = jnp.einsum("bhpn,bhn->bhp", S, C_t, precision="highest")
    return S, y_t

  seq_first = lambda a: jnp.moveaxis(a, 1, 0)
  S, y = jax.lax.scan(step, S0, (seq_first(xs), seq_first(dt), seq_first(Bh), seq_first(Ch)))
  y = jnp.moveaxis(y, 0, 1)  # (b, l, h, p)
  if D is not None:
    Dp = D.astype(acc)
    y = y + xs * (Dp[:, None] if Dp.ndim == 1 else Dp)
  if z is not None:
    y = y * jax.nn.silu(z.astype(acc))
  y = y.astype(x.dtype)
  return (y, S) if return_final_states else y
