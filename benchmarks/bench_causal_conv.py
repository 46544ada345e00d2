"""The causal conv's backward on a GPU: the Pallas kernel (`causal_conv/pallas_triton._bwd_kernel`) against XLA's
derivative of the formula (what rounds 2-20 ran), at the mixers' shapes, bf16 as the models give them.

Each case: the gradients of both against each other, then stream times (benchmarks/timing.py) of the forward alone
and of forward+backward (jax.vjp applied to a fixed cotangent), each jitted with the source's other columns'
gradient added in the same function (what the Mamba1 mixer's in_proj gradient does with the gate's).

  PYTHONPATH=. python benchmarks/bench_causal_conv.py --lens 8192 --out $OUT/causal_conv.jsonl
"""

import argparse
import json

import jax
import jax.numpy as jnp

from benchmarks.rows import append_jsonl, rel_err
from benchmarks.timing import stream_ms
from mamba_jax.ops.causal_conv import pallas_triton as pt
from mamba_jax.ops.causal_conv.reference import causal_conv1d_xla

# name -> (source width, window start, window width): mamba-1.4b's x window of its in_proj output (x | z), and
# mamba2-1.3b's x | B | C in one window (columns [4096, 8448) of its 8512-wide z | x | B | C | dt output; the mixer
# convolves the three as separate calls).
SHAPES = {"mamba-1.4b x": (8192, 0, 4096), "mamba2-1.3b xBC": (8512, 4096, 4352)}


DEFAULT_VARIANT = f"{pt.BWD_BLOCK_T}:{pt.BWD_CHANNELS_PER_THREAD}"  # the kernel's own setting


def _case(name, d, start, width, l, b, variants=(DEFAULT_VARIANT,)):
  """The rows of one shape: each implementation's times (the Pallas backward for each "rows per program:channels
  per thread" variant), then their gradients' differences."""
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  src = jax.random.normal(k[0], (b, l, d), jnp.float32).astype(jnp.bfloat16)
  w = 0.5 * jax.random.normal(k[1], (4, width), jnp.float32)
  bias = 0.1 * jax.random.normal(k[2], (width,), jnp.float32)
  g = jax.random.normal(k[3], (b, l, width), jnp.float32).astype(jnp.bfloat16)
  other = jnp.ones((b, l, d), jnp.bfloat16)  # the source's gradient from its other users
  kw = dict(start=start, width=width)
  # a fresh function per variant: jax caches traces by function, and the variant is read when tracing
  impls = {f"pallas {v}": (lambda s, w_, b_: pt.causal_conv1d_pallas(s, w_, b_, **kw)) for v in variants[1:]}
  impls["pallas"] = lambda s, w_, b_: pt.causal_conv1d_pallas(s, w_, b_, **kw)  # the default, last: the errors'
  impls["xla"] = lambda s, w_, b_: causal_conv1d_xla(s, w_, b_, **kw)
  default = (pt.BWD_BLOCK_T, pt.BWD_CHANNELS_PER_THREAD)
  rows, grads = [], {}
  for impl, fn in impls.items():
    T, cpt = map(int, (impl.split(" ")[1] if " " in impl else variants[0]).split(":"))
    pt.BWD_BLOCK_T, pt.BWD_CHANNELS_PER_THREAD = T, cpt

    def fwd_bwd(s, w_, b_, g_, o_, fn=fn):
      out, vjp = jax.vjp(fn, s, w_, b_)
      ds, dw, db = vjp(g_)
      return out, ds + o_, dw, db

    fwd, both = jax.jit(fn), jax.jit(fwd_bwd)
    grads[impl] = jax.jit(lambda s, w_, b_, g_, fn=fn: jax.vjp(fn, s, w_, b_)[1](g_))(src, w, bias, g)
    sync = jax.block_until_ready
    rows.append(
      dict(
        shape=name,
        l=l,
        b=b,
        impl=impl,
        fwd_ms=stream_ms(lambda fwd=fwd: fwd(src, w, bias), sync),
        fwd_bwd_ms=stream_ms(lambda both=both: both(src, w, bias, g, other), sync),
      )
    )
    print(json.dumps(rows[-1]), flush=True)
  pt.BWD_BLOCK_T, pt.BWD_CHANNELS_PER_THREAD = default
  pairs = zip(("src", "w", "b"), grads["pallas"], grads["xla"], strict=True)
  rows.append(dict(shape=name, l=l, b=b, impl="pallas vs xla", **{f"err_{n}": rel_err(p, x) for n, p, x in pairs}))
  print(json.dumps(rows[-1]), flush=True)
  return rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--lens", default="8192")
  ap.add_argument("--batches", default="1")
  ap.add_argument("--out", default=None, help="append JSON rows here")
  ap.add_argument(
    "--bwd-variants",
    default=DEFAULT_VARIANT,
    help="rows per program:channels per thread; the first is the 'pallas' row, which the error row compares",
  )
  a = ap.parse_args()
  rows = []
  for name, (d, start, width) in SHAPES.items():
    for l in map(int, a.lens.split(",")):
      for b in map(int, a.batches.split(",")):
        rows += _case(name, d, start, width, l, b, tuple(a.bwd_variants.split(",")))
  append_jsonl(a.out, rows)


if __name__ == "__main__":
  main()
