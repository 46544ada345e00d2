"""Chunked selective scan in plain XLA: an associative scan inside each chunk of `chunk_size` steps,
a sequential carry between chunks. Each chunk is rematerialised in the backward pass, so memory
stays O(chunk_size * e * n) at any length instead of O(l * e * n).

Shape legend: b batch, l length, c chunks, t positions in a chunk, e inner channels, n state.
"""

import functools

import jax
import jax.numpy as jnp

from mamba_jax.ops._dt import process_dt

DEFAULT_CHUNK = 64


def _combine(left, right):
  # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2.
  a1, b1 = left
  a2, b2 = right
  return a1 * a2, a2 * b1 + b2


@functools.partial(jax.jit, static_argnames=("delta_softplus", "return_last_state", "chunk_size"))
def selective_scan_xla(
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
  chunk_size: int = DEFAULT_CHUNK,
):
  """Same contract as `mamba_jax.ops.selective_scan`; see there."""
  b, l, e = u.shape
  n = A.shape[-1]
  acc = jnp.promote_types(u.dtype, jnp.float32)
  delta = process_dt(delta, delta_bias, delta_softplus).astype(acc)
  T = min(chunk_size, l)
  pad = (-l) % T
  c = (l + pad) // T

  def chunks(a):  # (b, l, ...) -> (c, b, T, ...); padded steps have delta = 0: identity updates.
    a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) if pad else a
    return jnp.moveaxis(a.reshape(b, c, T, *a.shape[2:]), 1, 0)

  A = A.astype(acc)

  @jax.checkpoint
  def chunk_step(h, inputs):
    u_t, d_t, B_t, C_t = inputs  # (b,T,e), (b,T,e), (b,T,n), (b,T,n)
    dA = jnp.exp(d_t[..., None] * A)  # (b, T, e, n)
    dBu = (d_t * u_t)[..., None] * B_t[:, :, None, :]  # (b, T, e, n)
    a_cum, b_cum = jax.lax.associative_scan(_combine, (dA, dBu), axis=1)
    hs = a_cum * h[:, None] + b_cum  # (b, T, e, n)
    y = jnp.einsum("bten,btn->bte", hs, C_t, precision="highest")
    return hs[:, -1], y

  h0 = jnp.zeros((b, e, n), acc) if initial_state is None else initial_state.astype(acc)
  h_last, y = jax.lax.scan(
    chunk_step, h0, (chunks(u.astype(acc)), chunks(delta), chunks(B.astype(acc)), chunks(C.astype(acc)))
  )
  y = jnp.moveaxis(y, 0, 1).reshape(b, c * T, e)[:, :l]
  if D is not None:
    y = y + u.astype(acc) * D.astype(acc)
  if z is not None:
    y = y * jax.nn.silu(z.astype(acc))
  y = y.astype(u.dtype)
  return (y, h_last) if return_last_state else y
