"""Where a scan's GPU time goes: the kernels of the Pallas forward and forward+backward (a given cotangent, as
bench_scans.py times it) at the benchmark shapes, summed per kernel over a few traced calls (a diagnostic; the
tables come from bench_scans.py).

PYTHONPATH=. python benchmarks/trace_scans.py --ops ssd --lens 65536 --configs '{}' '{"heads_per_program_bwd": 2}'

With --grad-err each variant's gradients are first compared with the XLA path's in float32 (bench_scans.py's
check), input by input, so that a faster variant's cost in accuracy is on the same page as its time.
"""

import argparse
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp

from benchmarks.bench_scans import (
  _cotangent,
  _rel,
  _time_stream,
  _upcast,
  make_ss,
  make_ssd,
  ss_inputs,
  ssd_inputs,
  with_cotangent,
)
from benchmarks.profile_model import log_kernels
from mamba_jax.ops import ssd_xla
from mamba_jax.ops.selective_scan import pallas_triton as sp
from mamba_jax.ops.selective_scan.xla import selective_scan_xla
from mamba_jax.ops.ssd import pallas_triton as pt


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--ops", default="ssd", help="ssd and/or selective_scan, comma-separated")
  ap.add_argument("--lens", default="65536")
  ap.add_argument("--top", type=int, default=14)
  ap.add_argument("--configs", nargs="*", default=["{}"], help="JSON overrides of the op's config, one per variant")
  ap.add_argument("--grad-err", action="store_true", help="first compare each variant's gradients with float32 XLA")
  ap.add_argument("--no-trace", action="store_true", help="stream times only, no per-kernel trace")
  a = ap.parse_args()
  log = lambda s: print(s, flush=True)
  log(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
  for op in a.ops.split(","):
    make, inputs, mod, impl, xla = {
      "ssd": (make_ssd, ssd_inputs, pt, "ssd_pallas", ssd_xla),
      "selective_scan": (make_ss, ss_inputs, sp, "selective_scan_pallas", selective_scan_xla),
    }[op]
    for l in [int(s) for s in a.lens.split(",")]:
      args = inputs(l, jax.random.PRNGKey(0))
      ref = None
      for v in a.configs:
        cfg = dataclasses.replace(mod.DEFAULT_CONFIG, **json.loads(v))
        f = make(functools.partial(getattr(mod, impl), config=cfg))
        fwd, both = jax.jit(f), jax.jit(with_cotangent(f))
        g = _cotangent(f, args, jax.random.PRNGKey(1))
        if a.grad_err:
          if ref is None:
            ref = jax.jit(with_cotangent(make(xla)))(g.astype(jnp.float32), *_upcast(args))
          errs = ", ".join(f"{_rel(p, r):.3e}" for p, r in zip(both(g, *args), ref, strict=True))
          log(f"{op} {l} {v} gradients' relative errors against float32 XLA, input by input: {errs}")
        log(f"{op} {l} {v} forward: stream {_time_stream(fwd, *args):.3f} ms")
        if not a.no_trace:
          log_kernels(fwd, args, log, top=a.top, width=60)
        log(f"{op} {l} {v} forward+backward (jax.vjp, given cotangent): stream {_time_stream(both, g, *args):.3f} ms")
        if not a.no_trace:
          log_kernels(both, (g, *args), log, top=a.top, width=60)
      del ref


if __name__ == "__main__":
  main()
