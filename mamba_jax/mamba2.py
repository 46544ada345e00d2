"""Mamba2 mixer (mamba_ssm `Mamba2`): in_proj -> causal conv on [x|B|C] -> SSD -> gated RMSNorm -> out_proj.

Shape legend: b batch, l length, d model width, e inner channels, h heads, p head dim, g groups, n state,
c conv channels (d_ssm + 2 g n), k conv width.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax import ops
from mamba_jax.cache import MixerCache
from mamba_jax.config import MambaConfig
from mamba_jax.layers import F32, CausalConv1d, GatedRMSNorm
from mamba_jax.ops._dt import process_dt
from mamba_jax.scales import ScaleHooks


class Mamba2Mixer(ScaleHooks, nnx.Module):
  """SSD mixer with parameter names as in mamba_ssm (`A_log`, `D`, `dt_bias`, `norm`, ...)."""

  def __init__(self, cfg: MambaConfig, *, dtype=None, param_dtype=F32, scan_impl: str = "auto", rngs: nnx.Rngs):
    lin = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    h = cfg.nheads
    self.in_proj = nnx.Linear(cfg.d_model, cfg.d_in_proj, use_bias=cfg.bias, **lin)
    self.conv1d = CausalConv1d(cfg.conv_dim, cfg.d_conv, use_bias=cfg.conv_bias, param_dtype=param_dtype, rngs=rngs)
    # Checkpoints overwrite these; float32 like every reference computation of them.
    self.dt_bias = nnx.Param(jnp.full((h,), jnp.log(jnp.expm1(0.01)), F32))
    self.A_log = nnx.Param(jnp.log(jnp.linspace(1.0, 16.0, h, dtype=F32)))
    self.D = nnx.Param(jnp.ones((cfg.ssm_width,) if cfg.D_has_hdim else (h,), F32))
    if cfg.rmsnorm:
      self.norm = GatedRMSNorm(
        cfg.ssm_width, ngroups=cfg.ngroups, eps=cfg.norm_epsilon, norm_before_gate=cfg.norm_before_gate
      )
    else:
      self.norm = None
    self.out_proj = nnx.Linear(cfg.d_inner, cfg.d_model, use_bias=cfg.bias, **lin)
    self.cfg = cfg
    self.init_scale_hooks()
    self.scan_impl = scan_impl

  def _dt(self, dt: jax.Array, dt_scale: jax.Array | None) -> jax.Array:
    """clamp(softplus(dt + dt_bias), dt_limit) [* dt_scale], float32."""
    dt = process_dt(dt, self.dt_bias[...], True, self.cfg.dt_limit)
    return dt if dt_scale is None else dt * dt_scale.astype(F32)

  def _D(self) -> jax.Array:  # (h,) or (h, p)
    D = self.D[...].astype(F32)
    return D.reshape(self.cfg.nheads, self.cfg.headdim) if self.cfg.D_has_hdim else D

  def _split_in_proj(self, zxbcdt: jax.Array):
    cfg = self.cfg
    m, es, c = cfg.d_mlp, cfg.ssm_width, cfg.conv_dim
    z0, x0, z, xBC, dt = jnp.split(zxbcdt, [m, 2 * m, 2 * m + es, 2 * m + es + c], axis=-1)
    return z0, x0, z, xBC, dt

  def _split_xBC(self, xBC: jax.Array):
    cfg = self.cfg
    es, gn = cfg.ssm_width, cfg.ngroups * cfg.d_state
    x, B, C = jnp.split(xBC, [es, es + gn], axis=-1)
    lead = x.shape[:-1]
    return (
      x.reshape(*lead, cfg.nheads, cfg.headdim),
      B.reshape(*lead, cfg.ngroups, cfg.d_state),
      C.reshape(*lead, cfg.ngroups, cfg.d_state),
    )

  def _finish(self, y: jax.Array, z: jax.Array, z0: jax.Array, x0: jax.Array, z_start: int | None = None):
    """y (..., e_ssm) -> gated norm -> optional MLP branch -> out_proj. With `z_start`, z is the whole in_proj
    output and the gate its columns from z_start (the norm kernel reads them in place, without a copy)."""
    if self.norm is not None:
      y = self.norm(y, z, impl=self.scan_impl, z_start=z_start)
    if self.cfg.d_mlp:
      y = jnp.concatenate([(jax.nn.silu(z0.astype(F32)) * x0.astype(F32)).astype(y.dtype), y], axis=-1)
    return self.out_proj(y)

  @jax.named_scope("mamba2_mixer")
  def __call__(self, u: jax.Array, *, return_cache: bool = False):
    """u (b, l, d) -> (b, l, d); with `return_cache`, also the MixerCache after the last step."""
    cfg = self.cfg
    b, l, _ = u.shape
    zxbcdt = self.in_proj(u)
    z0, x0, z, xBC_in, dt = self._split_in_proj(zxbcdt)
    # The conv reads [x | B | C] in place from the in_proj output and writes x, B and C as separate arrays.
    gn = cfg.ngroups * cfg.d_state
    x, B, C = self.conv1d(
      zxbcdt, start=2 * cfg.d_mlp + cfg.ssm_width, splits=(cfg.ssm_width, gn, gn), silu=True, impl=self.scan_impl
    )
    x = x.reshape(b, l, cfg.nheads, cfg.headdim)
    B = B.reshape(b, l, cfg.ngroups, cfg.d_state)
    C = C.reshape(b, l, cfg.ngroups, cfg.d_state)
    dt_scale = self._scale("dt_scale", decode=False)
    if dt_scale is None:  # bias, softplus and clamp fused into the scan
      dt_args = dict(dt_bias=self.dt_bias[...], dt_softplus=True, dt_limit=cfg.dt_limit)
    else:  # MambaExtend: scale after the softplus, before discretisation
      dt, dt_args = self._dt(dt, dt_scale), {}
    y, S = ops.ssd(
      x,
      dt,
      self._A(),
      B,
      C,
      cfg.chunk_size,
      D=self._D(),
      z=None if self.norm is not None else z.reshape(x.shape),
      **dt_args,
      return_final_states=True,
      impl=self.scan_impl,
    )
    if self.norm is not None:
      z, z_start = zxbcdt, 2 * cfg.d_mlp
    else:
      z_start = None
    out = self._finish(y.reshape(b, l, cfg.ssm_width), z, z0, x0, z_start)
    if return_cache:
      return out, MixerCache(CausalConv1d.state_from_inputs(xBC_in, cfg.d_conv), S)
    return out

  def init_cache(self, batch: int, dtype=F32) -> MixerCache:
    cfg = self.cfg
    return MixerCache(
      jnp.zeros((batch, cfg.d_conv, cfg.conv_dim), dtype),
      jnp.zeros((batch, cfg.nheads, cfg.headdim, cfg.d_state), F32),
    )

  @jax.named_scope("mamba2_step")
  def step(self, u_t: jax.Array, cache: MixerCache) -> tuple[jax.Array, MixerCache]:
    """One token: u_t (b, d) -> (b, d). Applies dt_limit and supports ngroups > 1 and D_has_hdim."""
    cfg = self.cfg
    z0, x0, z, xBC, dt = self._split_in_proj(self.in_proj(u_t))
    xBC, conv_state = self.conv1d.step(xBC, cache.conv_state)
    x, B, C = self._split_xBC(jax.nn.silu(xBC))  # (b,h,p), (b,g,n), (b,g,n)
    dt = self._dt(dt, self._scale("dt_scale", decode=True))  # (b, h) float32
    r = cfg.nheads // cfg.ngroups
    Bh = jnp.repeat(B.astype(F32), r, axis=1)  # (b, h, n): head h reads group h // r
    Ch = jnp.repeat(C.astype(F32), r, axis=1)
    x32 = x.astype(F32)
    dA = jnp.exp(dt * self._A(decode=True))  # (b, h)
    S = cache.ssm_state * dA[..., None, None] + (dt[..., None] * x32)[..., None] * Bh[:, :, None, :]
    y = jnp.einsum("bhpn,bhn->bhp", S, Ch, precision="highest")
    D = self._D()
    y = y + x32 * (D[:, None] if D.ndim == 1 else D)
    if self.norm is None:
      y = y * jax.nn.silu(z.astype(F32).reshape(y.shape))
    y = y.reshape(y.shape[0], cfg.ssm_width).astype(x.dtype)
    return self._finish(y, z, z0, x0), MixerCache(conv_state, S)
