"""Seconds per SPSA iteration / gradient step and peak memory of calibration, random weights, batch 1.

  python benchmarks/bench_calibrate.py                       # mamba2-1.3b and mamba-1.4b shapes, bf16, 4K/16K/64K
  python benchmarks/bench_calibrate.py --tiny                # tiny shapes, a CPU smoke run
  python benchmarks/bench_calibrate.py --models mamba2-1.3b --lengths 8192 --methods forward,spsa,grad

Per (model, length, method): compile seconds, the median of `--iters` timed runs, XLA's planned memory for the
compiled step (arguments + temporaries + outputs - aliased), and the device's peak bytes in use so far (monotone
over the process, so run one model per process for exact peaks). "forward" is one NLL forward (the unit of the
PyTorch reference timings); "spsa" is one SPSA iteration (two forwards, s+ and s-, as one vmapped batch unless
--pair sequential); "grad" is one gradient step with rematerialised blocks (accum 1).
Reference (official PyTorch stack, H100, bf16, batch 1): mamba2-1.3b forward 89 ms at 8K, 351 ms at 32K,
forward+backward 347 ms and 33.8 GiB at 8K; mamba-1.4b forward 93 ms at 8K, 363 ms at 32K, f+b 351 ms, 36.5 GiB.
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from calibrate.cli import scan_layers
from calibrate.gradient import Gradient
from calibrate.objective import frozen_layers, scale_loss
from calibrate.spsa import SPSA, SPSAConfig, make_optimizer, make_schedule
from mamba_jax import MambaConfig, MambaLM
from mamba_jax.mamba1 import Mamba1Mixer
from mamba_jax.ops.add_norm import pallas_triton as add_norm_pallas
from mamba_jax.ops.causal_conv import pallas_triton as causal_conv_pallas
from mamba_jax.ops.selective_scan import pallas_triton
from mamba_jax.scales import CalibrationScale, attach_scales

GIB = 1024**3
SHAPES = {
  "mamba2-1.3b": dict(arch="mamba2", d_model=2048, n_layer=48, d_state=128, headdim=64, ngroups=1, chunk_size=256),
  "mamba-1.4b": dict(arch="mamba1", d_model=2048, n_layer=48, d_state=16),
}


def model_config(name: str, tiny: bool) -> MambaConfig:
  if tiny:
    return MambaConfig.tiny(SHAPES[name]["arch"])
  return MambaConfig(vocab_size=50277, pad_vocab_size_multiple=16, expand=2, d_conv=4, **SHAPES[name])


def _planned_bytes(compiled) -> int | None:
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)
  except Exception:  # not every backend reports it
    return None


def _peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _time(fn, iters: int) -> list[float]:
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times


def bench_one(model, method: str, length: int, args, after=None) -> dict:
  """Compile and time one step; `after(compiled, call_args)`, if given, runs once after the timing."""
  model.remat = method == "grad"
  model.scan_layers = scan_layers(args.layers)
  graphdef, scales, rest = nnx.split(model, CalibrationScale, ...)
  # The frozen block weights stacked once, as python -m calibrate does (--stack-per-step: inside every step).
  stacked = None if args.stack_per_step else frozen_layers(model)
  ids = jax.random.randint(jax.random.key(0), (1, length), 0, model.cfg.vocab_size)
  step = jnp.asarray(0, jnp.int32)
  sgd = make_optimizer("sgd", make_schedule("cosine", 1e-3))
  if method == "forward":
    fn = jax.jit(scale_loss(graphdef, 1, args.chunk))
    call_args = (scales, rest, ids, stacked)
  elif method == "spsa":
    cal = SPSA(graphdef, sgd, SPSAConfig(pair=args.pair), batch_size=1, chunk=args.chunk)
    fn, call_args = cal.step, (scales, cal.init(scales), step, rest, ids, stacked)
  elif method == "grad":
    tx = make_optimizer("adamw", make_schedule("constant", 1e-2), clip=1.0)
    cal = Gradient(graphdef, tx, batch_size=1, accum=1, chunk=args.chunk)
    fn, call_args = cal.step, (scales, cal.init(scales), step, rest, ids, stacked)
  else:
    raise ValueError(f"unknown method {method!r}")
  t0 = time.perf_counter()
  compiled = fn.lower(*call_args).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(*call_args))  # warm-up
  times = _time(lambda: compiled(*call_args), args.iters)
  planned, peak = _planned_bytes(compiled), _peak_bytes()
  if after is not None:
    after(compiled, call_args)
  return {
    "seconds": statistics.median(times),
    "compile_s": compile_s,
    "planned_gib": None if planned is None else planned / GIB,
    "peak_gib": None if peak is None else peak / GIB,
  }


def override_selective_scan_config(text: str | None) -> dict | None:
  """Applies `--selective-scan-config` (JSON overrides of the selective scan's default config); returns them."""
  overrides = json.loads(text) if text else None
  if overrides:
    pallas_triton.DEFAULT_CONFIG = dataclasses.replace(pallas_triton.DEFAULT_CONFIG, **overrides)
    print(f"selective scan config: {pallas_triton.DEFAULT_CONFIG}", flush=True)
  return overrides


KERNEL_SWITCHES = {  # the switches' defaults
  "conv_forward": "default",
  "conv_tile": "default",
  "conv_backward": "pallas",
  "add_norm": "pallas",
  "split_in_proj": False,
  "layer_unroll": 1,
}


def kernel_switch_args(p: argparse.ArgumentParser) -> None:
  """The A/B switches of the kernels that are read when a step is traced (bench_calibrate.py and profile_model.py)."""
  p.add_argument(
    "--conv-forward",
    choices=("default", "tile", "walk", "mosaic", "auto"),
    default="default",
    help="the causal conv's forward kernel on GPU (causal_conv.pallas_triton.FWD_KERNEL); default: its own setting",
  )
  p.add_argument(
    "--conv-tile",
    default="default",
    help="ROWS:WARPS of the causal conv's tile forward (causal_conv.pallas_triton.BLOCK_T, FWD_TILE_WARPS)",
  )
  p.add_argument(
    "--conv-backward",
    choices=("pallas", "xla"),
    default="pallas",
    help="the causal conv's backward on GPU: its kernel (default) or XLA's derivative of the formula (rounds 2-20)",
  )
  p.add_argument(
    "--add-norm",
    choices=("pallas", "xla"),
    default="pallas",
    help="the residual add + RMSNorm on GPU: its kernel (default) or XLA's two passes (rounds 2-21)",
  )
  p.add_argument("--layer-unroll", type=int, default=1, help="blocks per layer-scan iteration (layer_scan_unroll)")
  p.add_argument(
    "--split-in-proj",
    action="store_true",
    help="Mamba1's in_proj as two products (Mamba1Mixer.split_in_proj), so its input gradient takes the halves apart",
  )


def apply_kernel_switches(args) -> dict:
  """Applies the `kernel_switch_args`; returns the ones that differ from the defaults (for the JSON rows)."""
  if args.conv_forward != "default":
    causal_conv_pallas.FWD_KERNEL = args.conv_forward
  if args.conv_tile != "default":
    causal_conv_pallas.BLOCK_T, causal_conv_pallas.FWD_TILE_WARPS = map(int, args.conv_tile.split(":"))
  causal_conv_pallas.BWD_KERNEL = args.conv_backward == "pallas"
  add_norm_pallas.ENABLED = args.add_norm == "pallas"
  Mamba1Mixer.split_in_proj = args.split_in_proj
  MambaLM.layer_scan_unroll = args.layer_unroll
  changed = {k: v for k, default in KERNEL_SWITCHES.items() if (v := getattr(args, k)) != default}
  if changed:
    print(f"kernel switches: {changed}", flush=True)
  return changed


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true", help="tiny shapes and lengths (CPU smoke run)")
  p.add_argument("--models", default="mamba2-1.3b,mamba-1.4b")
  p.add_argument("--lengths", default=None, help="default 4096,16384,65536 (tiny: 64,128)")
  p.add_argument("--methods", default="forward,spsa,grad")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--chunk", type=int, default=2048, help="positions per LM-head slice")
  p.add_argument("--pair", choices=("vmap", "sequential"), default="vmap")
  p.add_argument("--json", default=None, help="append one JSON line per measurement to this file")
  p.add_argument("--layers", choices=("auto", "scan", "unroll"), default="auto", help="as python -m calibrate's")
  p.add_argument(
    "--stack-per-step",
    action="store_true",
    help="stack the block weights for the layer scan inside every step (rounds 2-10) instead of once outside it",
  )
  p.add_argument(
    "--selective-scan-config",
    default=None,
    help="JSON overrides of the selective scan's default SelectiveScanConfig (A/B runs of its kernels in a model)",
  )
  kernel_switch_args(p)
  args = p.parse_args(argv)
  scan_overrides = override_selective_scan_config(args.selective_scan_config)
  switches = apply_kernel_switches(args)
  lengths = [int(v) for v in (args.lengths or ("64,128" if args.tiny else "4096,16384,65536")).split(",")]
  dtype = jnp.dtype(args.dtype)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, dtype {dtype.name}", flush=True)
  print(
    f"{'model':<12} {'length':>7} {'method':<8} {'ms/iter':>9} {'compile s':>9} {'planned GiB':>11} {'peak GiB':>9}"
  )
  for name in args.models.split(","):
    cfg = model_config(name, args.tiny)
    model = MambaLM(cfg, param_dtype=dtype, rngs=nnx.Rngs(0))
    attach_scales(model, "A", "linear", "layer")
    for length in lengths:
      for method in args.methods.split(","):
        try:
          r = bench_one(model, method, length, args)
        except Exception as e:  # e.g. out of memory at 64K: report it and go on with the next shape
          r = {"error": f"{e.__class__.__name__}: {str(e).splitlines()[0][:200]}"}
        row = {
          "model": name,
          "length": length,
          "method": method,
          "dtype": dtype.name,
          "layers": args.layers,
          "stack_per_step": args.stack_per_step,
          **switches,
          **({"xla_flags": os.environ["XLA_FLAGS"]} if os.environ.get("XLA_FLAGS") else {}),
          **({"selective_scan_config": scan_overrides} if scan_overrides else {}),
          **r,
        }
        if "error" in r:
          print(f"{name:<12} {length:>7} {method:<8} error: {r['error']}", flush=True)
        else:
          fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
          print(
            f"{name:<12} {length:>7} {method:<8} {r['seconds'] * 1e3:>9.1f} {r['compile_s']:>9.1f} "
            f"{fmt(r['planned_gib']):>11} {fmt(r['peak_gib']):>9}",
            flush=True,
          )
        if args.json:
          with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    del model
  return 0


if __name__ == "__main__":
  sys.exit(main())
