"""Mamba1 mixer (mamba_ssm `Mamba`): in_proj -> causal conv -> selective scan -> gate -> out_proj.

Shape legend: b batch, l length, d model width, e inner channels (d_inner), n state, r dt rank, k conv width.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax import ops
from mamba_jax.cache import MixerCache
from mamba_jax.config import MambaConfig
from mamba_jax.layers import F32, CausalConv1d
from mamba_jax.ops._dt import softplus
from mamba_jax.scales import ScaleHooks


class Mamba1Mixer(ScaleHooks, nnx.Module):
  """Selective SSM mixer with parameter names as in mamba_ssm (`A_log`, `D`, `dt_proj`, ...)."""

  # The in_proj as two products, x = u W[:, :e] and z = u W[:, e:], instead of one (b, l, 2e) output that the conv
  # and the scan read in place. Under a gradient the halves' cotangents then never meet: each product takes its
  # own, where the one product's input gradient needs them padded and added into a (b, l, 2e) array first (a
  # 3.9 ms fusion of mamba-1.4b's 8K gradient step on an H200, calibrate.md round 21). Read when tracing. Off: timed
  # in round 22, the step took 245.3 ms and 0.77 GiB more against 242.5 ms without it (`benchmarks/bench_calibrate.py
  # --split-in-proj` for the A/B). The weights and their names are the same.
  split_in_proj = False

  def __init__(self, cfg: MambaConfig, *, dtype=None, param_dtype=F32, scan_impl: str = "auto", rngs: nnx.Rngs):
    e, n, r, d = cfg.d_inner, cfg.d_state, cfg.dt_rank_value, cfg.d_model
    lin = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.in_proj = nnx.Linear(d, 2 * e, use_bias=cfg.bias, **lin)
    self.conv1d = CausalConv1d(e, cfg.d_conv, use_bias=cfg.conv_bias, param_dtype=param_dtype, rngs=rngs)
    self.x_proj = nnx.Linear(e, r + 2 * n, use_bias=False, **lin)
    self.dt_proj = nnx.Linear(r, e, use_bias=True, **lin)
    # S4D-real init, overwritten by any checkpoint. Kept in float32 like mamba_ssm.
    self.A_log = nnx.Param(jnp.log(jnp.broadcast_to(jnp.arange(1, n + 1, dtype=F32), (e, n))))
    self.D = nnx.Param(jnp.ones((e,), F32))
    self.out_proj = nnx.Linear(e, d, use_bias=cfg.bias, **lin)
    self.cfg = cfg
    self.init_scale_hooks()
    self.dtype = dtype
    self.scan_impl = scan_impl

  def _delta(self, dt: jax.Array, dt_scale: jax.Array | None) -> jax.Array:
    """softplus(dt + dt_proj.bias) [* dt_scale], float32."""
    delta = softplus(dt.astype(F32) + self.dt_proj.bias[...].astype(F32))
    return delta if dt_scale is None else delta * dt_scale.astype(F32)

  def _project(self, xc: jax.Array):
    """xc (..., e) -> dt_low-projected dt (..., e) without bias, B (..., n), C (..., n)."""
    r, n = self.cfg.dt_rank_value, self.cfg.d_state
    x_dbl = self.x_proj(xc)
    dt_low, B, C = jnp.split(x_dbl, [r, r + n], axis=-1)
    dt = dt_low @ self.dt_proj.kernel[...].astype(dt_low.dtype)  # the bias is added in float32 by the scan
    return dt, B, C

  def _in_proj_halves(self, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x, z), each (b, l, e): the in_proj as two products (`split_in_proj`), in the dtype nnx.Linear computes in."""
    lin, e = self.in_proj, self.cfg.d_inner
    kernel = lin.kernel[...]
    bias = lin.bias[...] if lin.bias is not None else None
    dt = self.dtype or jnp.result_type(u, kernel, *([] if bias is None else [bias]))
    halves = []
    for cols in (slice(0, e), slice(e, 2 * e)):
      y = jnp.dot(u.astype(dt), kernel[:, cols].astype(dt), precision=lin.precision)
      halves.append(y if bias is None else y + bias[cols].astype(dt))
    return halves[0], halves[1]

  @jax.named_scope("mamba1_mixer")
  def __call__(self, u: jax.Array, *, return_cache: bool = False):
    """u (b, l, d) -> (b, l, d); with `return_cache`, also the MixerCache after the last step."""
    e = self.cfg.d_inner
    if self.split_in_proj:
      x, z = self._in_proj_halves(u)  # (b, l, e) each
      z_start = None
    else:
      x = z = self.in_proj(u)  # (b, l, 2e): x, then the gate z, both read in place by the conv and the scan
      z_start = e
    xc = self.conv1d(x, start=0, silu=True, impl=self.scan_impl)  # x's first e columns
    dt, B, C = self._project(xc)
    dt_scale = self._scale("dt_scale", decode=False)
    if dt_scale is None:  # bias and softplus fused into the scan
      delta_bias, delta_softplus = self.dt_proj.bias[...], True
    else:  # MambaExtend: scale after the softplus, before discretisation
      dt, delta_bias, delta_softplus = self._delta(dt, dt_scale), None, False
    y, h = ops.selective_scan(
      xc,
      dt,
      self._A(),
      B,
      C,
      D=self.D[...],
      z=z,
      z_start=z_start,  # the Pallas scan reads the gate in place from the in_proj output (unless split)
      delta_bias=delta_bias,
      delta_softplus=delta_softplus,
      return_last_state=True,
      impl=self.scan_impl,
    )
    out = self.out_proj(y)
    if return_cache:
      return out, MixerCache(CausalConv1d.state_from_inputs(x[..., :e], self.cfg.d_conv), h)
    return out

  def init_cache(self, batch: int, dtype=F32) -> MixerCache:
    cfg = self.cfg
    return MixerCache(
      jnp.zeros((batch, cfg.d_conv, cfg.d_inner), dtype), jnp.zeros((batch, cfg.d_inner, cfg.d_state), F32)
    )

  @jax.named_scope("mamba1_step")
  def step(self, u_t: jax.Array, cache: MixerCache) -> tuple[jax.Array, MixerCache]:
    """One token: u_t (b, d) -> (b, d)."""
    x, z = jnp.split(self.in_proj(u_t), 2, axis=-1)  # (b, e)
    xc, conv_state = self.conv1d.step(x, cache.conv_state)
    xc = jax.nn.silu(xc)
    dt, B, C = self._project(xc)
    dt = self._delta(dt, self._scale("dt_scale", decode=True))  # (b, e)
    dA = jnp.exp(dt[..., None] * self._A(decode=True))  # (b, e, n)
    h = cache.ssm_state * dA + (dt * xc.astype(F32))[..., None] * B.astype(F32)[:, None, :]
    y = jnp.einsum("ben,bn->be", h, C.astype(F32), precision="highest") + self.D[...] * xc.astype(F32)
    y = (y * jax.nn.silu(z.astype(F32))).astype(xc.dtype)
    return self.out_proj(y), MixerCache(conv_state, h)
