"""The selective scan's forward kernels, Triton against Mosaic GPU (`ops/selective_scan/pallas_mosaic.py`), on a GPU.

For each length and batch: each kernel's outputs against the Triton kernel's (same padded inputs), then stream times
(benchmarks/timing.py) of pass 1, pass 2 and the two together, for the Triton kernels and each Mosaic (T, stages).
Inputs at mamba-1.4b's shapes (d_inner 4096, d_state 16), bf16 u / delta / z / B / C as the model gives them.

  PYTHONPATH=. python benchmarks/profile_selective_scan_mosaic.py --lens 8192 --batches 1,2 --variants 32:2,16:2
"""

import argparse
import functools
import json
import math

import jax
import jax.numpy as jnp

from benchmarks.rows import append_jsonl, rel_err
from benchmarks.timing import stream_ms
from mamba_jax.ops.selective_scan import pallas_mosaic as pm
from mamba_jax.ops.selective_scan import pallas_triton as pt


def _inputs(b, l, e, n, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 9)
  r = lambda i, shape, s=1.0: jax.random.normal(k[i], shape, jnp.float32) * s  # noqa: E731
  return dict(
    u=r(0, (b, l, e)).astype(jnp.bfloat16),
    delta=(r(1, (b, l, e), 0.5) - 2.0).astype(jnp.bfloat16),
    A=-jnp.exp(r(2, (e, n), 0.5)),
    B=r(3, (b, l, n)).astype(jnp.bfloat16),
    C=r(4, (b, l, n)).astype(jnp.bfloat16),
    D=r(5, (e,)),
    z=r(6, (b, l, 2 * e)).astype(jnp.bfloat16),  # the in_proj output; the gate is its second half
    delta_bias=r(7, (e,), 0.3),
  )


def _meta(l, b, e, cfg):
  seg, S = pt._segments(l, b, e, cfg)
  assert seg * S == l, (seg, S, l)
  return pt._Meta(
    l, seg, S, cfg.unroll, cfg.block_e, cfg.unroll_bwd, cfg.block_e_bwd, True, True, True, True, cfg.num_warps,
    cfg.num_stages, cfg.num_warps_bwd, cfg.bwd_rows, cfg.prefetch, cfg.pack_bc, e, False, cfg.fast_math,
  )  # fmt: skip


def _sync(out):
  return jax.block_until_ready(out)


def _time(pass1, pass2, args1, args2, pass1_args):
  """Stream ms of pass 1, of pass 2 (given pass 1's outputs) and of both in one jit; and both passes' outputs.
  args2 ends with pass 1's outputs; pass1_args(args2[:-1]) gives pass 1's arguments."""
  p1, p2 = jax.jit(pass1), jax.jit(pass2)
  seg = p1(*args1)
  out = p2(*args2[:-1], seg)
  both = jax.jit(lambda *a: p2(*a, p1(*pass1_args(a))))
  times = dict(
    pass1_ms=stream_ms(lambda: p1(*args1), _sync),
    pass2_ms=stream_ms(lambda: p2(*args2), _sync),
    both_ms=stream_ms(lambda: both(*args2[:-1]), _sync),
  )
  return times, seg, out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--lens", default="8192")
  ap.add_argument("--batches", default="1,2")
  ap.add_argument(
    "--variants",
    default="32:2,16:2,64:2,32:3",
    help="Mosaic T:stages[:channels per thread[:pass 1's FMA decays[:pass 2's]]] (exp2_fma for the last states)",
  )
  ap.add_argument("--out", default=None, help="append JSON rows here")
  a = ap.parse_args()
  e, n = 4096, 16
  cfg = pt.DEFAULT_CONFIG
  rows = []
  for l in map(int, a.lens.split(",")):
    for b in map(int, a.batches.split(",")):
      x = _inputs(b, l, e, n)
      meta = _meta(l, b, e, cfg)
      A2 = x["A"].T * math.log2(math.e)
      h0 = jnp.zeros((b, e, n), jnp.float32)
      args1 = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["delta_bias"])
      seg_t = jax.jit(functools.partial(pt._segment_states, meta))(*args1)
      args2 = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], h0, seg_t)
      times, seg_t, (y_t, h_t) = _time(
        functools.partial(pt._segment_states, meta),
        lambda *a, meta=meta: pt._forward(meta, False, *a)[:2],
        args1,
        args2,
        lambda a: (a[0], a[1], a[2], a[3], a[4], a[7]),
      )
      row = dict(l=l, b=b, impl="triton", S=meta.S, seg_len=meta.seg_len, **times)
      print(json.dumps(row), flush=True)
      rows.append(row)
      margs1 = (x["u"], x["delta"], A2, pm.bc_rows(x["B"], x["C"]), x["delta_bias"])
      margs2 = (x["u"], x["delta"], A2, x["B"], x["C"], x["D"], x["z"], x["delta_bias"], jnp.swapaxes(h0, 1, 2), seg_t)
      for v in a.variants.split(","):
        T, st, cpt, poly1, poly2 = (list(map(int, v.split(":"))) + [1, 0, 0][len(v.split(":")) - 2 :])[:5]
        name = f"mosaic T={T} stages={st} channels/thread={cpt}" + (
          f" fma decays={poly1}/{poly2}" if poly1 or poly2 else ""
        )
        try:
          times, seg_m, (y_m, hl_m) = _time(
            functools.partial(pm.segment_states, meta, T=T, stages=st, cpt=cpt, poly=poly1),
            functools.partial(pm.fwd_main, meta, T=T, stages=st, cpt=cpt, poly=poly2),
            margs1,
            margs2,
            lambda a: (a[0], a[1], a[2], pm.bc_rows(a[3], a[4]), a[7]),  # one conversion of B and C for both
          )
          errs = dict(
            err_seg_vs_triton=max(rel_err(seg_m[0], seg_t[0]), rel_err(seg_m[1], seg_t[1])),
            err_y_vs_triton=rel_err(y_m, y_t),
            err_h_vs_triton=rel_err(jnp.swapaxes(hl_m, 1, 2), h_t),
          )
          row = dict(l=l, b=b, impl=name, **times, **errs)
        except Exception as exc:  # noqa: BLE001 (a variant that does not compile is reported, the sweep goes on)
          row = dict(l=l, b=b, impl=name, error=f"{type(exc).__name__}: {str(exc)[:3000]}")
        print(json.dumps(row), flush=True)
        rows.append(row)
  append_jsonl(a.out, rows)


if __name__ == "__main__":
  main()
