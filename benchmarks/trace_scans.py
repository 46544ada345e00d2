"""Where a scan's GPU time goes: the kernels of the Pallas forward and forward+backward (a given cotangent, as
bench_scans.py times it) at the benchmark shapes, summed per kernel over a few traced calls (a diagnostic; the
tables come from bench_scans.py).

PYTHONPATH=. python benchmarks/trace_scans.py --ops ssd --lens 65536 --configs '{}' '{"heads_per_program_bwd": 2}'
"""

import argparse
import dataclasses
import functools
import json

import jax

from benchmarks.bench_scans import _cotangent, _time_stream, make_ss, make_ssd, ss_inputs, ssd_inputs, with_cotangent
from benchmarks.profile_model import log_kernels
from mamba_jax.ops.selective_scan import pallas_triton as sp
from mamba_jax.ops.ssd import pallas_triton as pt


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--ops", default="ssd", help="ssd and/or selective_scan, comma-separated")
  ap.add_argument("--lens", default="65536")
  ap.add_argument("--top", type=int, default=14)
  ap.add_argument("--configs", nargs="*", default=["{}"], help="JSON overrides of the op's config, one per variant")
  a = ap.parse_args()
  log = lambda s: print(s, flush=True)
  log(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
  for op in a.ops.split(","):
    make, inputs, mod, impl = {
      "ssd": (make_ssd, ssd_inputs, pt, "ssd_pallas"),
      "selective_scan": (make_ss, ss_inputs, sp, "selective_scan_pallas"),
    }[op]
    for l in [int(s) for s in a.lens.split(",")]:
      args = inputs(l, jax.random.PRNGKey(0))
      for v in a.configs:
        cfg = dataclasses.replace(mod.DEFAULT_CONFIG, **json.loads(v))
        f = make(functools.partial(getattr(mod, impl), config=cfg))
        fwd, both = jax.jit(f), jax.jit(with_cotangent(f))
        g = _cotangent(f, args, jax.random.PRNGKey(1))
        log(f"{op} {l} {v} forward: stream {_time_stream(fwd, *args):.3f} ms")
        log_kernels(fwd, args, log, top=a.top, width=60)
        log(f"{op} {l} {v} forward+backward (jax.vjp, given cotangent): stream {_time_stream(both, g, *args):.3f} ms")
        log_kernels(both, (g, *args), log, top=a.top, width=60)


if __name__ == "__main__":
  main()
