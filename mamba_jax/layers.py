"""Building blocks shared by both mixers: RMSNorm, grouped gated RMSNorm, causal depthwise conv.

Shape legend: b batch, l length, d model width, c conv channels, k conv width.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax import ops
from mamba_jax.ops.add_norm.reference import rms_norm_xla

F32 = jnp.float32


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x^2) + eps) * w, computed in float32 with the weight applied before the cast."""

  def __init__(self, dim: int, *, eps: float = 1e-5):
    self.weight = nnx.Param(jnp.ones((dim,), F32))
    self.eps = eps

  def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
    return rms_norm_xla(x, self.weight[...], self.eps, out_dtype or x.dtype)

  def add_and_norm(self, residual: jax.Array, hidden: jax.Array, out_dtype=None, impl: str = "auto"):
    """(residual + hidden, this norm of it): the residual stream's add fused with the norm after it (a Pallas
    kernel on GPU; `mamba_jax.ops.add_rms_norm`). The sum is added in float32 and kept in the residual's dtype."""
    return ops.add_rms_norm(residual, hidden, self.weight[...], self.eps, out_dtype or hidden.dtype, impl=impl)


class GatedRMSNorm(nnx.Module):
  """mamba_ssm's gated RMSNorm with `ngroups` contiguous groups of channels.

  norm_before_gate=False: norm(y * silu(z)); True: norm(y) * silu(z). Each group of `dim / ngroups`
  channels is normalised on its own (transformers' Mamba2 ignores groups; this follows mamba_ssm).
  """

  def __init__(self, dim: int, *, ngroups: int = 1, eps: float = 1e-5, norm_before_gate: bool = False):
    self.weight = nnx.Param(jnp.ones((dim,), F32))
    self.ngroups = ngroups
    self.eps = eps
    self.norm_before_gate = norm_before_gate

  def __call__(self, y: jax.Array, z: jax.Array, impl: str = "auto", z_start: int | None = None) -> jax.Array:
    """y, z (..., dim) -> (..., dim) in y's dtype; `impl` and `z_start` (z wider, the gate read in place) as in
    `mamba_jax.ops.gated_rms_norm` (a Pallas kernel on GPU)."""
    return ops.gated_rms_norm(
      y, z, self.weight[...], self.ngroups, self.eps, self.norm_before_gate, z_start=z_start, impl=impl
    )


class CausalConv1d(nnx.Module):
  """Depthwise causal conv over time, channels-last. `kernel` (k, c): kernel[k-1] multiplies the current step.

  torch's `Conv1d(groups=c)` weight (c, 1, k) maps to `kernel = weight[:, 0, :].T`; both are cross-correlations.
  """

  def __init__(self, channels: int, width: int, *, use_bias: bool, param_dtype, rngs: nnx.Rngs):
    bound = 1.0 / width**0.5  # torch's default Conv1d init for fan_in = width
    self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (width, channels), param_dtype, -bound, bound))
    self.bias = (
      nnx.Param(jax.random.uniform(rngs.params(), (channels,), param_dtype, -bound, bound)) if use_bias else None
    )
    self.width = width

  def __call__(
    self,
    src: jax.Array,
    *,
    start: int | None = None,
    splits: tuple[int, ...] | None = None,
    silu: bool = False,
    impl: str = "auto",
  ):
    """src (b, l, c) -> (b, l, c), zero history before t = 0; with `start`, the conv reads src's columns
    [start, start + c) (a wider src, e.g. the in_proj output, read in place); with `splits`, a tuple of consecutive
    channel windows; `silu` fused. See `mamba_jax.ops.causal_conv1d` (a Pallas kernel on GPU)."""
    bias = None if self.bias is None else self.bias[...]
    width = self.kernel.shape[1]
    return ops.causal_conv1d(src, self.kernel[...], bias, start=start, width=width, silu=silu, splits=splits, impl=impl)

  def step(self, x_t: jax.Array, conv_state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One step. x_t (b, c); conv_state (b, k, c) holds the last k inputs, oldest first."""
    conv_state = jnp.concatenate([conv_state[:, 1:], x_t[:, None].astype(conv_state.dtype)], axis=1)
    out = jnp.einsum("bkc,kc->bc", conv_state.astype(F32), self.kernel[...].astype(F32))
    if self.bias is not None:
      out = out + self.bias[...].astype(F32)
    return out.astype(x_t.dtype), conv_state

  @staticmethod
  def state_from_inputs(x: jax.Array, width: int) -> jax.Array:
    """The conv state after a prefill: the last `width` inputs (b, k, c), left zero-padded."""
    l = x.shape[1]
    if l >= width:
      return x[:, l - width :]
    return jnp.pad(x, ((0, 0), (width - l, 0), (0, 0)))
