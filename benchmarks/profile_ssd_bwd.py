"""Times the pieces of the Pallas SSD backward separately on the GPU (a diagnostic, not a benchmark table).

PYTHONPATH=. python benchmarks/profile_ssd_bwd.py --len 32768
"""

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from benchmarks.bench_scans import _time, ssd_inputs
from mamba_jax.ops.ssd import pallas_triton as pt


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--len", type=int, default=32768)
  a = ap.parse_args()
  l = a.len
  x, dt, A, B, C, D, z, dt_bias = ssd_inputs(l, jax.random.PRNGKey(0))
  b, _, h, p = x.shape
  g, n = B.shape[-2:]
  print(jax.devices()[0].device_kind, "tokens", l, flush=True)

  def prep(cfg, with_z):
    meta = pt._make_meta(cfg, b, l, h, g, True, with_z, False, dtype=x.dtype)  # l: a multiple of the chunk
    dtp = jnp.swapaxes(jax.nn.softplus(dt + dt_bias).astype(jnp.float32), 1, 2)
    da = dtp * A[None, :, None]
    Dp = jnp.broadcast_to(D[:, None], (h, p)).astype(jnp.float32)
    S0 = jnp.zeros((b, h, p, n), jnp.float32)
    return meta, dtp, da, Dp, S0

  def report(label, fn, *args):
    t = _time(jax.jit(fn), *args, iters=10)
    print(f"{label}: {t:.3f} ms", flush=True)

  def profile(cfg, with_z):
    meta, dtp, da, Dp, S0 = prep(cfg, with_z)
    zz = z if with_z else None
    mv = meta.for_vjp()
    cs = pt._chunk_cumsum(mv, da)
    tag = f"[z={with_z} warps_bwd={cfg.num_warps_bwd} T={cfg.block_t_bwd} H={cfg.heads_per_program_bwd}]"
    report(f"{tag} fwd (plain)", lambda *r: pt._core(meta, *r)[0], x, dtp, da, B, C, Dp, zz, S0)
    fwd_vjp = lambda *r: pt._core_fwd_impl(mv, *r, save_states=True)[2]
    report(f"{tag} fwd under vjp", fwd_vjp, x, dtp, cs, B, C, Dp, zz, S0)
    states, _ = jax.jit(fwd_vjp)(x, dtp, cs, B, C, Dp, zz, S0)
    mb = meta.for_bwd()
    dout = jax.random.normal(jax.random.PRNGKey(1), x.shape, x.dtype)
    seg = lambda *r: pt._bwd_segment_states(mb, *r, h)
    report(f"{tag} adjoint pass 1 (segments)", seg, dout, cs, C)
    G_seg = jnp.zeros((b, h, mb.S, p, n), jnp.float32)
    adj = lambda *r: pt._bwd_adjoints(mb, *r)
    report(f"{tag} adjoint pass 2 (chunks)", adj, dout, cs, C, states, G_seg)
    G, GS = jax.jit(adj)(dout, cs, C, states, G_seg)
    chunks = lambda *r: pt._bwd_chunks(mb, *r)
    report(f"{tag} chunk kernel", chunks, x, dtp, cs, B, C, Dp, dout, states, G, GS)
    vjp = jax.jit(lambda *r: jax.vjp(lambda *q: pt._core(meta, *q)[0], *r)[1](dout))
    report(f"{tag} fwd+bwd of the core", vjp, x, dtp, da, B, C, Dp, zz, S0)

  base = pt.SSDConfig()
  for cfg, with_z in [
    (base, True),
    (base, False),
    (dataclasses.replace(base, target_programs_bwd=1056), False),
  ]:
    profile(cfg, with_z)


if __name__ == "__main__":
  main()
