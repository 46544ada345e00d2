"""Runs the Pallas SSD forward and forward+backward once each at one length, for Nsight Compute (a diagnostic).

ncu --clock-control none --kernel-name regex:ssd --section LaunchStats --section Occupancy \\
  python benchmarks/ncu_ssd.py --len 32768
"""

import argparse

import jax

from benchmarks.bench_scans import fwd_bwd, make_ssd, ssd_inputs
from mamba_jax.ops.ssd import pallas_triton as pt


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--len", type=int, default=32768)
  a = ap.parse_args()
  args = ssd_inputs(a.len, jax.random.PRNGKey(1))
  fwd = jax.jit(make_ssd(pt.ssd_pallas))
  both = jax.jit(fwd_bwd(make_ssd(pt.ssd_pallas)))
  jax.block_until_ready(fwd(*args))
  jax.block_until_ready(both(*args))


if __name__ == "__main__":
  main()
