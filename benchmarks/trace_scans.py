"""Where a scan's GPU time goes: the kernels of the Pallas forward and forward+backward (a given cotangent, as
bench_scans.py times it) at the benchmark shapes, summed per kernel over a few traced calls (a diagnostic; the
tables come from bench_scans.py).

PYTHONPATH=. python benchmarks/trace_scans.py --ops ssd --lens 65536
"""

import argparse

import jax

from benchmarks.bench_scans import _cotangent, make_ss, make_ssd, ss_inputs, ssd_inputs, with_cotangent
from benchmarks.profile_model import log_kernels
from mamba_jax.ops.selective_scan.pallas_triton import selective_scan_pallas
from mamba_jax.ops.ssd.pallas_triton import ssd_pallas


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--ops", default="ssd", help="ssd, selective_scan or both, comma-separated")
  ap.add_argument("--lens", default="65536")
  ap.add_argument("--top", type=int, default=14)
  a = ap.parse_args()
  log = lambda s: print(s, flush=True)
  log(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
  for op in a.ops.split(","):
    make, inputs, impl = {
      "ssd": (make_ssd, ssd_inputs, ssd_pallas),
      "selective_scan": (make_ss, ss_inputs, selective_scan_pallas),
    }[op]
    f = make(impl)
    for l in [int(s) for s in a.lens.split(",")]:
      args = inputs(l, jax.random.PRNGKey(0))
      log(f"{op} {l} forward")
      log_kernels(jax.jit(f), args, log, top=a.top, width=60)
      g = _cotangent(f, args, jax.random.PRNGKey(1))
      log(f"{op} {l} forward+backward (jax.vjp with a given cotangent)")
      log_kernels(jax.jit(with_cotangent(f)), (g, *args), log, top=a.top, width=60)


if __name__ == "__main__":
  main()
