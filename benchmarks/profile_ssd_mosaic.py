"""Triton vs Mosaic GPU for the SSD forward's main kernel, on the GPU (a diagnostic for the choice of lowering;
benchmarks/results/scans.md has the figures).

Checks the Mosaic GPU forward against float32 XLA and the Triton forward first, then times, at each length: the
whole forward (Triton / Mosaic main kernel, the rest shared) and the two main kernels alone on the same inputs.

PYTHONPATH=. python benchmarks/profile_ssd_mosaic.py --lens 8192,32768,65536 --stages 1,2
"""

import argparse
import dataclasses
import functools
import traceback

import jax
import jax.numpy as jnp

from benchmarks.bench_scans import _rel, _time, _time_stream, make_ssd, ssd_inputs
from mamba_jax.ops import ssd_xla
from mamba_jax.ops.ssd import pallas_mosaic as pm
from mamba_jax.ops.ssd import pallas_triton as pt


def _try(label, thunk, log):
  try:
    return thunk()
  except Exception as e:  # noqa: BLE001
    log(f"{label} failed: {type(e).__name__}: {str(e)[:3000]}")
    log("".join(traceback.format_exception(e))[-3000:])
    return None


def _both(f, args):
  return f"{_time(f, *args, iters=20):.3f} / {_time_stream(f, *args):.3f}"


def profile(l, stages, log):
  """Checks and times both lowerings at one length."""
  args = ssd_inputs(l, jax.random.PRNGKey(1))
  x, dt, A, B, C, D, z, dt_bias = args
  triton_cfg = dataclasses.replace(pt.DEFAULT_CONFIG, fwd_main_lowering="triton")
  triton = jax.jit(make_ssd(functools.partial(pt.ssd_pallas, config=triton_cfg)))
  y_t = triton(*args)
  f32 = [v.astype(jnp.float32) if v.dtype == jnp.bfloat16 else v for v in args]
  y_x = jax.jit(make_ssd(ssd_xla))(*f32)
  log(f"[{l}] triton fwd err vs float32 XLA {_rel(y_t, y_x):.2e}; ms wall / stream {_both(triton, args)}")
  meta = pt._make_meta(pt.DEFAULT_CONFIG, 1, l, x.shape[2], B.shape[2], True, True, False)
  for st in stages:
    cfg = dataclasses.replace(pt.DEFAULT_CONFIG, fwd_main_lowering="mosaic", mosaic_stages=st)
    mosaic = jax.jit(make_ssd(functools.partial(pt.ssd_pallas, config=cfg)))
    margs = args
    y_m = _try(
      f"[{l}] mosaic stages={st}", lambda mosaic=mosaic, margs=margs: jax.block_until_ready(mosaic(*margs)), log
    )
    if y_m is None:
      continue
    log(
      f"[{l}] mosaic stages={st} err vs float32 XLA {_rel(y_m, y_x):.2e}, vs triton {_rel(y_m, y_t):.2e}; "
      f"ms wall / stream {_both(mosaic, margs)}"
    )
  # The main kernels alone, on the same preprocessed inputs.
  dtp = jnp.swapaxes(jax.nn.softplus(dt + dt_bias).astype(jnp.float32), 1, 2)
  cs = pt._chunk_cumsum(meta, dtp * A[None, :, None])
  h, p, n = x.shape[2], x.shape[3], B.shape[-1]
  Dp = jnp.broadcast_to(D[:, None], (h, p)).astype(jnp.float32)
  S0 = jnp.zeros((1, h, p, n), jnp.float32)
  if meta.S > 1:
    S_loc = jax.jit(lambda *r: pt._fwd_segment_states(meta, *r))(x, dtp, cs, B)
    dec = pt._segment_decay(meta, cs)
    chained = (S_loc, dec)
  else:
    chained = (None, None)
  tmain = jax.jit(lambda *r: pt._fwd_main(meta, *r, *chained, save_states=False)[0])
  tag = f"[{l} T={meta.T} K={meta.K} S={meta.S}]"
  log(f"{tag} triton main kernel (chains in kernel) {_both(tmain, (x, dtp, cs, B, C, Dp, z, S0))}")
  S_in = S0[:, :, None] if meta.S == 1 else jax.jit(pt._over_segments)(S0, *chained)[0]
  for st in stages:
    mmain = jax.jit(lambda *r, st=st: pm.fwd_main(meta, *r, stages=st))
    margs = (x, dtp, cs, B, C, Dp, z, S_in)
    r = _try(f"[{l}] mosaic main stages={st}", lambda mmain=mmain, margs=margs: _both(mmain, margs), log)
    if r is not None:
      log(f"[{l}] mosaic main kernel stages={st} (given incoming states) {r}")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--lens", default="8192,32768,65536")
  ap.add_argument("--stages", default="1,2")
  a = ap.parse_args()
  log = lambda s: print(s, flush=True)
  log(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
  stages = [int(s) for s in a.stages.split(",")]
  for l in [int(s) for s in a.lens.split(",")]:
    profile(l, stages, log)


if __name__ == "__main__":
  main()
