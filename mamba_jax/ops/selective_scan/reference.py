"""Sequential Mamba1 selective scan, one time step at a time. Slow; the ground truth for tests.

Shape legend: b batch, l length, e inner channels (d_inner), n state.
"""

import functools

import jax
import jax.numpy as jnp

from mamba_jax.ops._dt import process_dt


@functools.partial(jax.jit, static_argnames=("delta_softplus", "return_last_state"))
def selective_scan_reference(
  u: jax.Array,  # (b, l, e)
  delta: jax.Array,  # (b, l, e)
  A: jax.Array,  # (e, n)
  B: jax.Array,  # (b, l, n)
  C: jax.Array,  # (b, l, n)
  D: jax.Array | None = None,  # (e,)
  z: jax.Array | None = None,  # (b, l, e)
  delta_bias: jax.Array | None = None,  # (e,)
  delta_softplus: bool = False,
  initial_state: jax.Array | None = None,  # (b, e, n)
  return_last_state: bool = False,
):
  """h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t;  y_t = h_t C_t + D u_t;  y *= silu(z). Channels-last."""
  b, l, e = u.shape
  n = A.shape[-1]
  acc = jnp.promote_types(u.dtype, jnp.float32)
  delta = process_dt(delta, delta_bias, delta_softplus).astype(acc)
  A = A.astype(acc)
  us = u.astype(acc)
  h0 = jnp.zeros((b, e, n), acc) if initial_state is None else initial_state.astype(acc)

  def step(h, inputs):
    u_t, d_t, B_t, C_t = inputs  # (b,e), (b,e), (b,n), (b,n)
    h = jnp.exp(d_t[..., None] * A) * h + (d_t * u_t)[..., None] * B_t[:, None, :]
    y_t = jnp.einsum("ben,bn->be", h, C_t, precision="highest")
    return h, y_t

  seq_first = lambda a: jnp.moveaxis(a, 1, 0)
  h, y = jax.lax.scan(step, h0, (seq_first(us), seq_first(delta), seq_first(B.astype(acc)), seq_first(C.astype(acc))))
  y = jnp.moveaxis(y, 0, 1)  # (b, l, e)
  if D is not None:
    y = y + us * D.astype(acc)
  if z is not None:
    y = y * jax.nn.silu(z.astype(acc))
  y = y.astype(u.dtype)
  return (y, h) if return_last_state else y


def check_gate_columns(z, z_start: int, u_shape: tuple[int, ...], op: str) -> None:
  """Raises unless a (b, l, width) z holds the e gate columns [z_start, z_start + e) for u (b, l, e)."""
  e = u_shape[-1]
  if z is None or z.shape[:-1] != tuple(u_shape[:-1]) or not 0 <= z_start <= z.shape[-1] - e:
    shape = None if z is None else z.shape
    raise ValueError(
      f"{op}: z {shape} with z_start={z_start} does not hold {e} gate columns for u {tuple(u_shape)}; pass "
      f"z of shape (batch, seqlen, width) with z_start + {e} <= width"
    )


def gate_columns(z: jax.Array, z_start: int, u_shape: tuple[int, ...], op: str) -> jax.Array:
  """z[..., z_start : z_start + e] of a wider (b, l, width) gate array, after `check_gate_columns`."""
  check_gate_columns(z, z_start, u_shape, op)
  return z[..., z_start : z_start + u_shape[-1]]
