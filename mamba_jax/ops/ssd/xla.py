"""Chunked SSD (state-space duality) in plain XLA: quadratic attention-like form inside each chunk,
a linear recurrence over chunk states between chunks.

Shape legend: b batch, l length, c chunks, s/t positions in a chunk, h heads, p head dim,
g groups, r heads per group (h = g * r), n state.
"""

import functools
import math

import jax
import jax.numpy as jnp

from mamba_jax.ops._dt import process_dt


def _pad_seq(a: jax.Array, pad: int) -> jax.Array:
  return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) if pad else a


@functools.partial(jax.jit, static_argnames=("chunk_size", "dt_softplus", "dt_limit", "return_final_states"))
def ssd_xla(
  x: jax.Array,  # (b, l, h, p)
  dt: jax.Array,  # (b, l, h)
  A: jax.Array,  # (h,)
  B: jax.Array,  # (b, l, g, n)
  C: jax.Array,  # (b, l, g, n)
  chunk_size: int,
  D: jax.Array | None = None,  # (h,) or (h, p)
  z: jax.Array | None = None,  # (b, l, h, p)
  dt_bias: jax.Array | None = None,  # (h,)
  dt_softplus: bool = False,
  dt_limit: tuple[float, float] = (0.0, math.inf),
  initial_states: jax.Array | None = None,  # (b, h, p, n)
  return_final_states: bool = False,
):
  """Same contract as `mamba_jax.ops.ssd`; see there."""
  b, l, h, p = x.shape
  g, n = B.shape[-2:]
  if h % g:
    raise ValueError(f"nheads={h} must be a multiple of ngroups={g}")
  r = h // g
  acc = jnp.promote_types(x.dtype, jnp.float32)
  hp = "highest"

  dt = process_dt(dt, dt_bias, dt_softplus, dt_limit).astype(acc)  # (b, l, h)
  # Pad the tail chunk with dt = 0 after the dt processing: decay exp(0) = 1 and input dt*x = 0, so
  # padded steps neither change the final state nor the real outputs.
  pad = (-l) % chunk_size
  c = (l + pad) // chunk_size
  cs = chunk_size
  x_c = _pad_seq(x.astype(acc), pad).reshape(b, c, cs, g, r, p)
  dt_c = _pad_seq(dt, pad).reshape(b, c, cs, g, r)
  B_c = _pad_seq(B.astype(acc), pad).reshape(b, c, cs, g, n)
  C_c = _pad_seq(C.astype(acc), pad).reshape(b, c, cs, g, n)
  A_gr = A.astype(acc).reshape(g, r)

  dA_cum = jnp.cumsum(dt_c * A_gr, axis=2)  # (b, c, s, g, r), log-decay from chunk start

  # 1. Intra-chunk (diagonal blocks): y[t] = sum_{s<=t} (C_t . B_s) exp(cum_t - cum_s) dt_s x_s.
  CB = jnp.einsum("bctgn,bcsgn->bcgts", C_c, B_c, precision=hp)  # (b, c, g, t, s)
  seg = dA_cum[:, :, :, None] - dA_cum[:, :, None, :]  # (b, c, t, s, g, r)
  causal = jnp.tril(jnp.ones((cs, cs), bool))[:, :, None, None]
  decay = jnp.exp(jnp.where(causal, seg, -jnp.inf))  # (b, c, t, s, g, r)
  M = CB.transpose(0, 1, 3, 4, 2)[..., None] * decay * dt_c[:, :, None]  # (b, c, t, s, g, r)
  y_diag = jnp.einsum("bctsgr,bcsgrp->bctgrp", M, x_c, precision=hp)

  # 2. State each chunk produces from its own inputs, decayed to the chunk end.
  decay_to_end = jnp.exp(dA_cum[:, :, -1:] - dA_cum) * dt_c  # (b, c, s, g, r)
  chunk_states = jnp.einsum("bcsgn,bcsgr,bcsgrp->bcgrpn", B_c, decay_to_end, x_c, precision=hp)

  # 3. Recurrence over chunks (sequential over c only; each step is one (b, h, p, n) update).
  chunk_decay = jnp.exp(dA_cum[:, :, -1])  # (b, c, g, r)
  S0 = jnp.zeros((b, g, r, p, n), acc) if initial_states is None else initial_states.astype(acc).reshape(b, g, r, p, n)

  def carry_over(S, inputs):
    new, dec = inputs
    return S * dec[..., None, None] + new, S

  S_final, S_prev = jax.lax.scan(carry_over, S0, (jnp.moveaxis(chunk_states, 1, 0), jnp.moveaxis(chunk_decay, 1, 0)))
  S_prev = jnp.moveaxis(S_prev, 0, 1)  # (b, c, g, r, p, n): state entering each chunk

  # 4. Contribution of the incoming state to each position.
  y_off = jnp.einsum("bctgn,bcgrpn->bctgrp", C_c, S_prev, precision=hp) * jnp.exp(dA_cum)[..., None]

  y = (y_diag + y_off).reshape(b, c * cs, h, p)[:, :l]
  if D is not None:
    Dp = D.astype(acc)
    y = y + x.astype(acc) * (Dp[:, None] if Dp.ndim == 1 else Dp)
  if z is not None:
    y = y * jax.nn.silu(z.astype(acc))
  y = y.astype(x.dtype)
  if return_final_states:
    return y, S_final.reshape(b, h, p, n)
  return y
