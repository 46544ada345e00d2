"""Triton vs Mosaic GPU for the SSD forward's main kernel, on the GPU (a diagnostic for the choice of lowering;
benchmarks/results/scans.md has the figures).

Checks each Mosaic GPU forward against float32 XLA and the Triton forward first, then times, at each length: the
whole forward (all Triton; the Mosaic GPU main kernel with the Triton or the Mosaic GPU segment-state kernel) and
each lowering's segment-state and main kernels alone on the same inputs; `--trace` adds each whole forward's GPU
time per kernel.

PYTHONPATH=. python benchmarks/profile_ssd_mosaic.py --lens 8192,32768,65536 --stages 1 --state-stages 1,2,3 --trace
"""

import argparse
import dataclasses
import functools
import traceback

import jax
import jax.numpy as jnp

from benchmarks.bench_scans import _rel, _time, _time_stream, make_ssd, ssd_inputs
from benchmarks.profile_model import log_kernels
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


def profile(l, stages, state_stages, trace, log):
  """Checks and times both lowerings at one length."""
  args = ssd_inputs(l, jax.random.PRNGKey(1))
  x, dt, A, B, C, D, z, dt_bias = args
  triton_cfg = dataclasses.replace(pt.DEFAULT_CONFIG, fwd_main_lowering="triton")
  triton = jax.jit(make_ssd(functools.partial(pt.ssd_pallas, config=triton_cfg)))
  y_t = triton(*args)
  f32 = [v.astype(jnp.float32) if v.dtype == jnp.bfloat16 else v for v in args]
  y_x = jax.jit(make_ssd(ssd_xla))(*f32)
  log(f"[{l}] triton fwd err vs float32 XLA {_rel(y_t, y_x):.2e}; ms wall / stream {_both(triton, args)}")
  if trace:
    log_kernels(triton, args, log, top=8, width=40)
  meta = pt._make_meta(pt.DEFAULT_CONFIG, 1, l, x.shape[2], B.shape[2], True, True, False)
  # Whole forwards: Mosaic GPU main kernel with the Triton segment states (round 13's default), then with the
  # Mosaic GPU segment states at each of `state_stages`.
  variants = [(st, None) for st in stages] + [(stages[0], ss) for ss in state_stages]
  for st, ss in variants:
    cfg = dataclasses.replace(
      pt.DEFAULT_CONFIG, fwd_main_lowering="mosaic", mosaic_stages=st, mosaic_segment_states=ss is not None,
      mosaic_state_stages=ss or 1,
    )  # fmt: skip
    label = f"[{l}] mosaic stages={st} segment states " + ("triton" if ss is None else f"mosaic stages={ss}")
    mosaic = jax.jit(make_ssd(functools.partial(pt.ssd_pallas, config=cfg)))
    y_m = _try(label, lambda mosaic=mosaic: jax.block_until_ready(mosaic(*args)), log)
    if y_m is None:
      continue
    log(f"{label} err vs float32 XLA {_rel(y_m, y_x):.2e}, vs triton {_rel(y_m, y_t):.2e}; ms wall / stream "
        f"{_both(mosaic, args)}")  # fmt: skip
    if trace:
      log_kernels(mosaic, args, log, top=8, width=40)
  # The kernels alone, on the same preprocessed inputs.
  dtp = jnp.swapaxes(jax.nn.softplus(dt + dt_bias).astype(jnp.float32), 1, 2)
  cs = pt._chunk_cumsum(meta, dtp * A[None, :, None])
  h, p, n = x.shape[2], x.shape[3], B.shape[-1]
  Dp = jnp.broadcast_to(D[:, None], (h, p)).astype(jnp.float32)
  S0 = jnp.zeros((1, h, p, n), jnp.float32)
  tag = f"[{l} T={meta.T} K={meta.K} S={meta.S}]"
  bt = pm.transposed_b(B)
  if meta.S > 1:
    tstates = jax.jit(lambda *r: pt._fwd_segment_states(meta, *r))
    S_loc = tstates(x, dtp, cs, B)
    log(f"{tag} triton segment-state kernel {_both(tstates, (x, dtp, cs, B))}")
    for ss in state_stages:
      mstates = jax.jit(lambda *r, ss=ss: pm.segment_states(meta, *r, stages=ss))
      r = _try(f"{tag} mosaic states stages={ss}", lambda mstates=mstates: mstates(x, dtp, cs, bt), log)
      if r is not None:
        err = _rel(jnp.swapaxes(r, -1, -2), S_loc)
        log(f"{tag} mosaic segment-state kernel stages={ss} (vs triton {err:.2e}) {_both(mstates, (x, dtp, cs, bt))}")
    dec = pt._segment_decay(meta, cs)
    chained = (S_loc, dec)
  else:
    chained = (None, None)
  tmain = jax.jit(lambda *r: pt._fwd_main(meta, *r, *chained, save_states=False)[0])
  log(f"{tag} triton main kernel (chains in kernel) {_both(tmain, (x, dtp, cs, B, C, Dp, z, S0))}")
  S_in = S0[:, :, None] if meta.S == 1 else jax.jit(pt._over_segments)(S0, *chained)[0]
  S_in_t = jnp.swapaxes(S_in, -1, -2)
  for st in stages:
    mmain = jax.jit(lambda *r, st=st: pm.fwd_main(meta, *r, stages=st))
    margs = (x, dtp, cs, bt, C, Dp, z, S_in_t)
    r = _try(f"[{l}] mosaic main stages={st}", lambda mmain=mmain, margs=margs: _both(mmain, margs), log)
    if r is not None:
      log(f"[{l}] mosaic main kernel stages={st} (given incoming states) {r}")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--lens", default="8192,32768,65536")
  ap.add_argument("--stages", default="1", help="main-kernel stages")
  ap.add_argument("--state-stages", default="1,2,3", help="Mosaic GPU segment-state kernel stages")
  ap.add_argument("--trace", action="store_true", help="also print GPU time per kernel of each whole forward")
  a = ap.parse_args()
  log = lambda s: print(s, flush=True)
  log(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
  stages = [int(s) for s in a.stages.split(",")]
  for l in [int(s) for s in a.lens.split(",")]:
    profile(l, stages, [int(s) for s in a.state_stages.split(",")], a.trace, log)


if __name__ == "__main__":
  main()
