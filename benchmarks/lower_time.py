"""How long JAX takes to trace and lower (for CUDA, on any machine) mamba-1.4b's SPSA step at 8K: the layer scan
against inlined blocks (`--layers unroll`), with the selective scan's Mosaic GPU kernels as on Hopper; or
`mamba_jax.generate` (prefill of --length tokens, then 64 decode steps), whose blocks are always inlined.

The Python side of compiling only: XLA's GPU compilation comes after it. Random-free: the model is abstract
(`nnx.eval_shape`), so no weights are allocated. On a 2-core CPU, round 23 (each inlined block traced on its own):
scan 1.3 s + 0.7 s, unroll 39.1 s + 28.7 s; round 24 (`model._BlockPrograms`, one trace per block structure):
unroll 1.1 s + 1.1 s; generate at 2048 tokens 23.2 s + 23.9 s (22.1 MB), then 0.5 s + 0.6 s (0.6 MB).

  PYTHONPATH=. python benchmarks/lower_time.py scan
  PYTHONPATH=. python benchmarks/lower_time.py unroll
  PYTHONPATH=. python benchmarks/lower_time.py generate --length 2048
"""

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.bench_calibrate import model_config
from calibrate.objective import frozen_layers
from calibrate.spsa import SPSA, SPSAConfig, make_optimizer, make_schedule
from mamba_jax import MambaLM
from mamba_jax.generate import _generate
from mamba_jax.ops.selective_scan import pallas_triton
from mamba_jax.scales import CalibrationScale, attach_scales


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("layers", choices=("scan", "unroll", "generate"))
  ap.add_argument("--model", default="mamba-1.4b")
  ap.add_argument("--length", type=int, default=8192)
  ap.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke run)")
  ap.add_argument("--dump", help="write the StableHLO text to this file")
  a = ap.parse_args()
  cfg = model_config(a.model, a.tiny)
  model = nnx.eval_shape(lambda: MambaLM(cfg, param_dtype=jnp.bfloat16, scan_impl="pallas", rngs=nnx.Rngs(0)))
  attach_scales(model, "A", "linear", "layer")
  model.scan_layers = a.layers == "scan"
  graphdef, state = nnx.split(model)
  ids = jax.ShapeDtypeStruct((1, a.length), jnp.int32)
  # The SPSA step as `python -m calibrate` and bench_calibrate.py run it: the pair vmapped over the scales alone,
  # the frozen block weights stacked once outside it (abstract here).
  cal_graphdef, scales, rest = nnx.split(model, CalibrationScale, ...)
  stacked = nnx.eval_shape(frozen_layers, model)
  spsa = SPSA(cal_graphdef, make_optimizer("sgd", make_schedule("cosine", 1e-3)), SPSAConfig(), batch_size=1)
  step = jax.ShapeDtypeStruct((), jnp.int32)
  opt_state = jax.eval_shape(spsa.init, scales)

  # The tiny shapes are too small for the Mosaic GPU kernels (128 channels per program): Triton's there.
  mosaic = {} if a.tiny else dict(fwd_lowering="mosaic", vjp_fwd_lowering="mosaic", adjoint_lowering="mosaic")
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  gen = dict(max_new_tokens=64, temperature=0.0, vocab_size=cfg.vocab_size, top_k=None, top_p=None)
  with pallas_triton.default_config_overrides(**mosaic):
    t0 = time.perf_counter()
    if a.layers == "generate":
      traced = _generate.trace(graphdef, state, ids, key, **gen)
    else:
      traced = spsa.step.trace(scales, opt_state, step, rest, ids, stacked)
    t1 = time.perf_counter()
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    t2 = time.perf_counter()
  if a.dump:
    with open(a.dump, "w") as f:
      f.write(text)
  print(
    f"{a.model} {a.length} {a.layers}: trace {t1 - t0:.1f} s, lower {t2 - t1:.1f} s, "
    f"{len(text) / 1e6:.1f} MB of StableHLO"
  )


if __name__ == "__main__":
  main()
