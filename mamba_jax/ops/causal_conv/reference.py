"""Depthwise causal conv1d (+ SiLU) over a column window of a channels-last array, in plain XLA.

Shape legend: b batch, l length, d the source's width, c window channels, k conv width.
"""

import jax
import jax.numpy as jnp

F32 = jnp.float32


def window_bounds(src_width: int, start: int | None, width: int | None) -> tuple[int, int]:
  """(start, width) of a column window: start defaults to 0, width to the rest of the source's columns."""
  start = start or 0
  return start, src_width - start if width is None else width


def window(src: jax.Array, start: int | None, width: int | None) -> jax.Array:
  """src[..., start : start + width] (the whole last dim when both are None)."""
  if start is None and width is None:
    return src
  start, width = window_bounds(src.shape[-1], start, width)
  return src[..., start : start + width]


def causal_conv1d_xla(
  src: jax.Array,  # (b, l, d)
  weight: jax.Array,  # (k, c)
  bias: jax.Array | None = None,  # (c,)
  *,
  start: int | None = None,
  width: int | None = None,
  silu: bool = True,
) -> jax.Array:
  """out[t] = act(sum_i weight[i] x[t - k + 1 + i] + bias), x = src's columns [start, start + width), zero history
  before t = 0; float32 math (float64 for float64 inputs), out in src's dtype, (b, l, c)."""
  x = window(src, start, width)
  acc = jnp.promote_types(x.dtype, F32)
  k, l = weight.shape[0], x.shape[1]
  w = weight.astype(acc)
  xp = jnp.pad(x.astype(acc), ((0, 0), (k - 1, 0), (0, 0)))
  out = sum(xp[:, i : i + l] * w[i] for i in range(k))  # k shifted multiply-adds, fused by XLA
  if bias is not None:
    out = out + bias.astype(acc)
  if silu:
    out = jax.nn.silu(out)
  return out.astype(x.dtype)
