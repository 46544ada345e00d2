"""The causal conv's backward on a GPU: the Pallas kernel (`causal_conv/pallas_triton._bwd_kernel`) against XLA's
derivative of the formula (what rounds 2-20 ran), at the mixers' shapes, bf16 as the models give them.

Each case: the gradients of both against each other, then stream times (benchmarks/timing.py) of the forward alone
and of forward+backward (jax.vjp applied to a fixed cotangent), each jitted with the source's other columns'
gradient added in the same function (what the Mamba1 mixer's in_proj gradient does with the gate's).

  PYTHONPATH=. python benchmarks/bench_causal_conv.py --lens 8192 --out $OUT/causal_conv.jsonl

With --fwd-variants, the forward alone instead: each "kernel:rows:n" variant of the Pallas forward (tile: rows per
program and num_warps; walk: rows per program and channels per thread; mosaic, the Mosaic GPU forward on Hopper:
rows per program and rows per TMA copy; see pallas_triton.FWD_KERNEL) timed and
checked against XLA's forward, a table printed and one JSON row per variant and case appended to --out:

  PYTHONPATH=. python benchmarks/bench_causal_conv.py --lens 8192 --batches 2 --out $OUT/conv_fwd.jsonl \
    --fwd-variants tile:64:4,tile:128:4,tile:32:4,tile:64:8,walk:128:4,walk:128:2,walk:256:4,walk:64:4
  PYTHONPATH=. python benchmarks/bench_causal_conv.py --lens 8192 --batches 1,2 --out $OUT/conv_fwd.jsonl \
    --fwd-variants tile:64:4,mosaic:256:32,mosaic:512:32,mosaic:256:16,mosaic:128:32

(--interpret runs the kernels in Pallas' interpreter: a CPU smoke test at tiny lengths, e.g. --lens 8, not a timing.)
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


# the module constants a forward variant sets (read when the conv is traced)
FWD_KNOBS = (
  "FWD_KERNEL",
  "BLOCK_T",
  "FWD_TILE_WARPS",
  "FWD_BLOCK_T",
  "FWD_CHANNELS_PER_THREAD",
  "MOSAIC_ROWS",
  "MOSAIC_CHUNK",
)


def parse_fwd_variant(v: str) -> tuple[str, int, int]:
  """ "kernel:rows:n" -> (kernel, rows per program, n): n is num_warps for "tile", channels per thread for "walk",
  rows per TMA copy for "mosaic" (the Mosaic GPU forward, Hopper)."""
  kernel, rows, n = v.split(":")
  if kernel not in ("tile", "walk", "mosaic"):
    raise ValueError(f"forward variant {v!r}: the kernel is 'tile', 'walk' or 'mosaic'")
  return kernel, int(rows), int(n)


def _set_fwd_variant(kernel, rows, n):
  pt.FWD_KERNEL = kernel
  if kernel == "tile":
    pt.BLOCK_T, pt.FWD_TILE_WARPS = rows, n
  elif kernel == "walk":
    pt.FWD_BLOCK_T, pt.FWD_CHANNELS_PER_THREAD = rows, n
  else:
    pt.MOSAIC_ROWS, pt.MOSAIC_CHUNK = rows, n


def _fwd_case(name, d, start, width, l, b, variants, interpret=False):
  """The forward-only rows of one shape: XLA's forward, then each Pallas forward variant (its error against XLA's
  output)."""
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  src = jax.random.normal(k[0], (b, l, d), jnp.float32).astype(jnp.bfloat16)
  w = 0.5 * jax.random.normal(k[1], (4, width), jnp.float32)
  bias = 0.1 * jax.random.normal(k[2], (width,), jnp.float32)
  kw = dict(start=start, width=width)
  moved = 2 * b * l * width * src.dtype.itemsize  # the window read once, the output written once
  sync = jax.block_until_ready
  xla = jax.jit(lambda s, w_, b_: causal_conv1d_xla(s, w_, b_, **kw))
  want = xla(src, w, bias)
  ms = stream_ms(lambda: xla(src, w, bias), sync)
  rows = [dict(variant="xla", shape=name, l=l, b=b, ms=ms, tb_s=moved / ms / 1e9, err=0.0)]
  print(json.dumps(rows[-1]), flush=True)
  defaults = {n: getattr(pt, n) for n in FWD_KNOBS}
  try:
    for v in variants:
      _set_fwd_variant(*parse_fwd_variant(v))
      # a fresh function per variant, traced (on its first call, just below) while the variant's constants are set
      fwd = jax.jit(lambda s, w_, b_: pt.causal_conv1d_pallas(s, w_, b_, **kw, interpret=interpret))
      err = rel_err(fwd(src, w, bias), want)
      ms = stream_ms(lambda fwd=fwd: fwd(src, w, bias), sync)
      rows.append(dict(variant=v, shape=name, l=l, b=b, ms=ms, tb_s=moved / ms / 1e9, err=err))
      print(json.dumps(rows[-1]), flush=True)
  finally:
    for n, val in defaults.items():
      setattr(pt, n, val)
  return rows


def _table(rows):
  head = f"{'shape':<16} {'l':>6} {'b':>3} {'variant':<12} {'ms':>9} {'TB/s':>6} {'vs xla':>7} {'err':>9}"
  lines = [head, "-" * len(head)]
  base = {}
  for r in rows:
    key = (r["shape"], r["l"], r["b"])
    base.setdefault(key, r["ms"])  # the case's first row is XLA's
    lines.append(
      f"{r['shape']:<16} {r['l']:>6} {r['b']:>3} {r['variant']:<12} {r['ms']:>9.4f} {r['tb_s']:>6.2f} "
      f"{base[key] / r['ms']:>6.2f}x {r['err']:>9.2e}"
    )
  return "\n".join(lines)


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
  ap.add_argument(
    "--fwd-variants",
    default=None,
    help="forward only: comma-separated kernel:rows:n (tile:64:4 = 64 rows per program, 4 warps; walk:128:4 = 128 "
    "rows per program, 4 channels per thread; mosaic:256:32 = 256 rows per program, 32 per TMA copy), each timed "
    "against XLA's forward instead of the backward cases",
  )
  ap.add_argument(
    "--interpret", action="store_true", help="with --fwd-variants: Pallas' interpreter (a CPU smoke test, not a timing)"
  )
  a = ap.parse_args()
  fwd_variants = tuple(a.fwd_variants.split(",")) if a.fwd_variants else ()
  for v in fwd_variants:
    parse_fwd_variant(v)  # a bad variant fails before anything runs
  rows = []
  for name, (d, start, width) in SHAPES.items():
    for l in map(int, a.lens.split(",")):
      for b in map(int, a.batches.split(",")):
        if fwd_variants:
          rows += _fwd_case(name, d, start, width, l, b, fwd_variants, a.interpret)
        else:
          rows += _case(name, d, start, width, l, b, tuple(a.bwd_variants.split(",")))
  if fwd_variants:
    print(_table(rows), flush=True)
  append_jsonl(a.out, rows)


if __name__ == "__main__":
  main()
