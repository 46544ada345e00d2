"""How many selective-scan kernel calls a rematerialised gradient step runs, at each stage: the jaxpr (and the
pallas_call equations' effects), the lowered module, XLA's optimised module, and the launches a profiler sees.

  PYTHONPATH=. python benchmarks/check_remat_calls.py [--no-barrier]   # on a Hopper GPU (Mosaic GPU forward kernels)

--no-barrier: without `SelectiveScanConfig.barrier_segment_states` (what rounds 16-19 ran).

A tiny Mamba1 model (d_inner 128, 2 layers, remat, the layer scan) and `calibrate.gradient.Gradient`'s step, with
the selective scan's default config but few target programs (several segments at 512 tokens).
"""

import argparse
import collections
import re
import tempfile

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.profile_model import kernel_times
from calibrate.gradient import Gradient
from calibrate.objective import frozen_layers
from calibrate.spsa import make_optimizer, make_schedule
from mamba_jax import MambaConfig, MambaLM
from mamba_jax.ops.selective_scan import pallas_triton as pt
from mamba_jax.scales import CalibrationScale, attach_scales


def _pallas_eqns(jaxpr, out):
  """(name, effects) of every pallas_call equation in `jaxpr` and the jaxprs nested in its equations."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      out.append((eqn.params.get("name_and_src_info", ""), eqn.effects))
    for v in eqn.params.values():
      inner = getattr(v, "jaxpr", v)
      if hasattr(inner, "eqns"):
        _pallas_eqns(inner, out)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--no-barrier", action="store_true", help="barrier_segment_states=False")
  args = ap.parse_args()
  with pt.default_config_overrides(target_programs=8, barrier_segment_states=not args.no_barrier):
    _check()


def _check():
  cfg = MambaConfig.tiny("mamba1", d_model=64, n_layer=2)
  model = MambaLM(cfg, param_dtype=jnp.bfloat16, remat=True, rngs=nnx.Rngs(0))
  attach_scales(model, "A", "linear", "layer")
  graphdef, scales, rest = nnx.split(model, CalibrationScale, ...)
  tx = make_optimizer("adamw", make_schedule("constant", 1e-2), clip=1.0)
  cal = Gradient(graphdef, tx, batch_size=1, accum=1, chunk=256)
  ids = jax.random.randint(jax.random.key(0), (1, 512), 0, cfg.vocab_size)
  args = (scales, cal.init(scales), jnp.asarray(0, jnp.int32), rest, ids, frozen_layers(model))
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
  eqns = _pallas_eqns(jax.make_jaxpr(cal.step)(*args).jaxpr, [])
  print(f"jaxpr pallas_call equations: {len(eqns)}")
  for name, eff in eqns:
    print(f"  {str(name)[:80]} effects={eff}")
  lowered = cal.step.lower(*args)
  text = lowered.as_text()
  mos = [ln for ln in text.splitlines() if "mosaic_gpu" in ln and "custom_call" in ln]
  print(f"lowered: {len(mos)} Mosaic GPU custom calls, has_side_effect in {sum('has_side_effect' in m for m in mos)}")
  compiled = lowered.compile()
  hlo = compiled.as_text()
  comp, per = None, collections.Counter()
  for ln in hlo.splitlines():
    m = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", ln)
    if m and "=" not in ln.split("{")[0]:
      comp = m.group(1)
    if 'custom_call_target="mosaic_gpu' in ln:
      per[comp] += 1
      print(f"  in {comp}: {ln.strip()[:240]}")
  print(f"optimised HLO: Mosaic GPU custom calls per computation {dict(per)}")
  jax.block_until_ready(compiled(*args))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      jax.block_until_ready(compiled(*args))
    counts = {}
    kernel_times(d, counts)
  print("launches per step:", {k: v for k, v in sorted(counts.items()) if "mosaic" in k or "selective" in k})


if __name__ == "__main__":
  main()
