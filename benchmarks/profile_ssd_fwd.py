"""Sweeps the Pallas SSD forward's launch parameters and times its pieces on the GPU (a diagnostic, not a
benchmark table; benchmarks/bench_scans.py writes the table).

PYTHONPATH=. python benchmarks/profile_ssd_fwd.py --lens 8192,32768,65536
"""

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp

from benchmarks.bench_scans import _fastest, _safe, _time, fwd_bwd, make_ssd, ssd_inputs
from mamba_jax.ops.ssd import pallas_triton as pt

# Forward variants (SSDConfig fields over the defaults). Round 5 also built and swept, and then removed as slower
# on an H100 at 8K-64K (benchmarks/results/scans.md): head-dim blocks per program (32, 16), C B^T from one XLA
# product per group and chunk (read by the kernels), chunk tiles prefetched one step ahead in registers, 3 stages,
# 8 warps and 128-token chunks.
FWD_SWEEP = [dict(target_programs=132), dict(), dict(target_programs=528)]
# Backward variants over the best forward at --bwd-len.
BWD_SWEEP = [dict(), dict(target_programs_bwd=1056)]


def pieces(cfg, l, log):
  """Times the forward's pieces (XLA prep, segment-state kernel, main kernel with its chaining of the segments'
  states) for one config."""
  x, dt, A, B, C, D, z, dt_bias = ssd_inputs(l, jax.random.PRNGKey(0))
  b, _, h, p = x.shape
  g, n = B.shape[-2:]
  meta = pt._make_meta(cfg, b, l, h, g, True, True, False)
  Dp = jnp.broadcast_to(D[:, None], (h, p)).astype(jnp.float32)

  def prep(dt):
    dtp = jnp.swapaxes(jax.nn.softplus(dt + dt_bias).astype(jnp.float32), 1, 2)
    return dtp, pt._chunk_cumsum(meta, dtp * A[None, :, None])

  dtp, cs = jax.jit(prep)(dt)
  tag = f"[{l} T={meta.T} K={meta.K} S={meta.S}]"
  log(f"{tag} prep (softplus, transpose, cumsum): {_time(jax.jit(prep), dt, iters=20):.3f} ms")
  seg = jax.jit(lambda *r: pt._fwd_segment_states(meta, *r))
  log(f"{tag} segment-state kernel: {_time(seg, x, dtp, cs, B, iters=20):.3f} ms")
  S_loc = seg(x, dtp, cs, B)
  dec = jax.jit(lambda cs: pt._segment_decay(meta, cs))(cs)
  S0 = jnp.zeros((b, h, p, n), jnp.float32)
  chained = (S_loc, dec) if meta.S > 1 else (None, None)
  main = jax.jit(lambda *r: pt._fwd_main(meta, *r, *chained, save_states=False)[0])
  log(f"{tag} main kernel: {_time(main, x, dtp, cs, B, C, Dp, z, S0, iters=20):.3f} ms")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--lens", default="8192,32768,65536")
  ap.add_argument("--bwd-len", type=int, default=32768)
  a = ap.parse_args()
  log = lambda s: print(s, flush=True)
  log(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
  best = {}
  base = pt.SSDConfig()
  for l in [int(s) for s in a.lens.split(",")]:
    args = ssd_inputs(l, jax.random.PRNGKey(1))
    candidates = [dataclasses.replace(base, **kw) for kw in FWD_SWEEP]
    build = lambda cfg: jax.jit(make_ssd(functools.partial(pt.ssd_pallas, config=cfg)))
    best[l] = _fastest(f"ssd fwd {l}", candidates, build, args, 20, log)
    _safe(lambda l=l: pieces(best[l], l, log), log)
  l = a.bwd_len
  args = ssd_inputs(l, jax.random.PRNGKey(1))
  fwd_cfg = best.get(l, base)
  for kw in BWD_SWEEP:
    cfg = dataclasses.replace(fwd_cfg, **kw)
    for with_z in (True, False):
      fn = functools.partial(pt.ssd_pallas, config=cfg)
      if not with_z:
        fn = lambda *r, fn=fn: fn(*r[:7], None, *r[8:])  # noqa: E731
      f = jax.jit(fwd_bwd(make_ssd(fn)))
      t = _safe(lambda f=f: _time(f, *args, iters=10), log)
      log(f"fwd+bwd {l} z={with_z} {kw} over the best fwd: {t:.3f} ms")


if __name__ == "__main__":
  main()
