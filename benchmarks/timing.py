"""The two timings every scan benchmark reports, for any framework (`sync(out)` waits for the device's work).

- wall: the median of synchronised calls (each includes the host's dispatch and synchronisation).
- stream: back-to-back calls with one synchronisation at the end, the mean per call, median over `reps` runs (the
  host's dispatch overlaps the device's work, as in event-based GPU timing such as triton's do_bench).

bench_scans.py (JAX) and bench_official.py (the official PyTorch kernels) share them, so that their figures
compare like with like.
"""

import statistics
import time


def wall_ms(call, sync, iters=30, warmup=3):
  """Median wall time (ms) of `iters` synchronised calls of `call()`, after `warmup` of them."""
  for _ in range(warmup):
    sync(call())
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    sync(call())
    ts.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(ts)


def stream_ms(call, sync, calls=20, reps=5):
  """Median over `reps` of the mean time (ms) of `calls` back-to-back calls with one synchronisation."""
  for _ in range(2):
    sync(call())
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = call()
    sync(out)
    ts.append((time.perf_counter() - t0) * 1e3 / calls)
    del out
  return statistics.median(ts)
