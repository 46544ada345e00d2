"""Times Pallas selective-scan config variants on the GPU, forward and forward+backward (a diagnostic, not a
benchmark table; benchmarks/bench_scans.py writes the table).

PYTHONPATH=. python benchmarks/profile_selective_scan.py --lens 8192,32768,65536 \\
  --fwd '{}' '{"prefetch": true, "unroll": 8}' --bwd '{}'

With --ncu, each variant's forward (and forward+backward with --bwd) runs once, for Nsight Compute:
ncu --clock-control none --kernel-name regex:selective_scan --section LaunchStats --section Occupancy \\
  python benchmarks/profile_selective_scan.py --ncu --lens 32768 --fwd '{}'
"""

import argparse
import dataclasses
import functools
import importlib
import json

import jax
import jax.numpy as jnp

from benchmarks.bench_scans import _rel, _safe, _time, _time_stream, fwd_bwd, make_ss, ss_inputs
from benchmarks.profile_model import log_kernels
from mamba_jax.ops.selective_scan import pallas_triton as sp
from mamba_jax.ops.selective_scan.xla import selective_scan_xla


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--lens", default="8192,32768,65536")
  ap.add_argument("--fwd", nargs="*", default=["{}"], help="forward variants: JSON SelectiveScanConfig overrides")
  ap.add_argument("--bwd", nargs="*", default=[], help="forward+backward variants (JSON overrides)")
  ap.add_argument(
    "--bwd-module", nargs="*", default=[], help="also time --bwd variants with these modules' kernels (A/B)"
  )
  ap.add_argument("--ncu", action="store_true", help="run each variant once (for Nsight Compute), no timing")
  ap.add_argument("--check", action="store_true", help="check each forward variant against float32 XLA first")
  ap.add_argument("--trace", action="store_true", help="also print each variant's GPU time per kernel (profiler)")
  ap.add_argument("--batch", type=int, default=1, help="batch size (the inputs repeated; SPSA's pair is 2)")
  a = ap.parse_args()
  log = lambda s: print(s, flush=True)
  log(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
  for l in [int(x) for x in a.lens.split(",")]:
    args = ss_inputs(l, jax.random.PRNGKey(2))
    args = tuple(jnp.tile(x, (a.batch, 1, 1)) if x.ndim == 3 else x for x in args)
    ref = None
    mods = [(sp, False, v) for v in a.fwd] + [(sp, True, v) for v in a.bwd]
    for m in a.bwd_module:
      mods += [(importlib.import_module(m), True, v) for v in a.bwd]
    for mod, grad, v in mods:
      over = json.loads(v)
      # "_pad_segments": true cuts the sequence as rounds 3-7 did (the aimed segment count, l padded up to it)
      pad_segments = over.pop("_pad_segments", False)
      sp._segments = _padded_segments if pad_segments else _SEGMENTS
      cfg = dataclasses.replace(mod.DEFAULT_CONFIG, **over)
      f = make_ss(functools.partial(mod.selective_scan_pallas, config=cfg))
      fn = jax.jit(fwd_bwd(f) if grad else f)
      seg, S = sp._segments(l, a.batch, args[0].shape[-1], dataclasses.replace(cfg, block_e=min(cfg.block_e, 4096)))
      tag = f"{'fwd+bwd' if grad else 'fwd'} b={a.batch} {l} {mod.__name__.split('.')[-1]} {v} (S={S}, seg={seg})"
      if a.ncu:
        jax.block_until_ready(fn(*args))
        log(f"ran {tag}")
        continue
      if a.check and not grad:
        if ref is None:
          ref = jax.jit(make_ss(selective_scan_xla))(*[x.astype("float32") for x in args])
        log(f"{tag} err {_rel(fn(*args), ref):.2e}")
      reps = 10 if grad else 20
      wall = _safe(lambda fn=fn, args=args, reps=reps: _time(fn, *args, iters=reps), log)
      stream = _safe(lambda fn=fn, args=args, reps=reps: _time_stream(fn, *args, calls=reps), log)
      log(f"{tag}: wall {wall:.3f} ms, stream {stream:.3f} ms")
      if a.trace:
        log_kernels(fn, args, log)


_SEGMENTS = sp._segments


def _padded_segments(l, b, e, cfg):
  """Rounds 3-7's cut: the aimed segment count, each a multiple of `unroll`, l padded to their total."""
  return sp._padded_segments(l, sp._aimed_segments(l, b, e, cfg), cfg.unroll)


if __name__ == "__main__":
  main()
