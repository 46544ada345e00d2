"""Where a calibration step's GPU time goes: a jax.profiler trace of a few calls, summed per kernel and per group.

  PYTHONPATH=. python benchmarks/profile_model.py --models mamba2-1.3b --length 8192 --methods forward,spsa
  PYTHONPATH=. python benchmarks/profile_model.py --tiny          # CPU smoke run (host plane, no GPU kernels)

For each (model, method): one warm-up call, then `--calls` calls under `jax.profiler.trace`; the device planes'
kernel events are summed by name and divided by the calls. Groups: the Pallas scan kernels (their `name=`),
matrix products (cuBLAS / cuBLASLt / XLA's Triton GEMMs), XLA fusions, copies and the rest. Printed as tables
(top kernels, groups); `--json` appends one line per (model, method) with the groups.
"""

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile

import jax
from flax import nnx

from benchmarks.bench_calibrate import (
  apply_kernel_switches,
  bench_one,
  kernel_switch_args,
  model_config,
  override_selective_scan_config,
)
from mamba_jax import MambaLM
from mamba_jax.scales import attach_scales

_GROUPS = [
  ("scan (Pallas)", re.compile(r"ssd_|selective_scan|ssm_")),
  ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|sm90_|cublas|dot|triton_gemm", re.I)),
  ("copy / transpose", re.compile(r"copy|transpose|memcpy|memset", re.I)),
  ("reduce / fusion", re.compile(r"fusion|reduce|loop_|input_|wrapped_", re.I)),
]


def _group(name: str) -> str:
  for label, pattern in _GROUPS:
    if pattern.search(name):
      return label
  return "other"


def kernel_times(trace_dir: str, counts: dict[str, int] | None = None) -> dict[str, float]:
  """Seconds per kernel name over the device planes of the newest trace under `trace_dir`; `counts`, when given,
  receives the number of launches per name."""
  from jax.profiler import ProfileData

  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f"no .xplane.pb under {trace_dir}")
  data = ProfileData.from_file(files[-1])
  totals: dict[str, float] = collections.defaultdict(float)
  for plane in data.planes:
    if not plane.name.startswith("/device:"):
      continue
    for line in plane.lines:
      # Stream lines hold the kernels; "XLA Ops" / "XLA Modules" / "Steps" lines are annotations of the same time.
      if not line.name.lower().startswith("stream"):
        continue
      for event in line.events:
        totals[event.name] += event.duration_ns * 1e-9
        if counts is not None:
          counts[event.name] = counts.get(event.name, 0) + 1
  if not totals:  # say what the trace holds instead of printing empty tables
    for plane in data.planes:
      print(f"  plane {plane.name}: lines {[line.name for line in plane.lines][:12]}", flush=True)
  return dict(totals)


def log_kernels(fn, args, log, calls=3, top=12, width=48):
  """Logs the GPU ms per call of the `top` kernels of `calls` traced calls of fn(*args) (summed by name), after
  one untraced call (compilation and XLA's autotuning, whose trial runs would otherwise be counted)."""
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(calls):
        jax.block_until_ready(fn(*args))
    ms = {k: 1e3 * v / calls for k, v in kernel_times(d).items()}
  log(f"  kernels, total {sum(ms.values()):.3f} ms: " + ", ".join(
    f"{k[:width]} {v:.3f}" for k, v in sorted(ms.items(), key=lambda kv: -kv[1])[:top]
  ))  # fmt: skip


def fusion_sources(hlo_text: str, names) -> dict[str, str]:
  """For each kernel name that is an HLO instruction: its op and the distinct source op_names it fuses."""
  comps, current = {}, None
  for line in hlo_text.splitlines():
    m = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if m and "=" not in line.split("{")[0]:
      current = comps.setdefault(m.group(1), [])
    elif current is not None:
      current.append(line)
  lines_by_name = {}
  for body in comps.values():
    for line in body:
      m = re.match(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = ", line)
      if m:  # kernel names spell HLO's "fusion.12" as "fusion_12"
        lines_by_name[m.group(1).replace(".", "_")] = line
  out = {}
  for name in names:
    line = lines_by_name.get(name)
    if line is None:
      continue
    called = re.search(r"calls=%([\w.\-]+)", line)  # the fused computation's own name keeps its dots
    body = comps.get(called.group(1), []) if called else [line]
    ops = []
    for b in body:
      for op in re.findall(r'op_name="([^"]+)"', b):
        short = "/".join(op.split("/")[-3:])
        src = re.search(r"source_line=(\d+)", b)
        f = re.search(r'source_file="([^"]+)"', b)
        tag = f"{short}@{os.path.basename(f.group(1)) if f else '?'}:{src.group(1) if src else '?'}"
        if tag not in ops:
          ops.append(tag)
    shape = re.search(r" = (\S+) ", line)
    out[name] = f"{shape.group(1) if shape else ''} {'; '.join(ops[:8])}"
  return out


def profile(model, method: str, length: int, calls: int, args) -> dict:
  """Per-call seconds of each kernel and group, from a trace of `calls` calls of one calibration step."""
  holder = {}

  def run_traced(fn, call_args):
    jax.block_until_ready(fn(*call_args))  # warm-up outside the trace
    with tempfile.TemporaryDirectory() as d:
      with jax.profiler.trace(d):
        for _ in range(calls):
          jax.block_until_ready(fn(*call_args))
      counts = {}
      holder["kernels"] = {k: v / calls for k, v in kernel_times(d, counts).items()}
      holder["launches"] = {k: c / calls for k, c in counts.items()}
    holder["hlo"] = fn.as_text() if args.hlo else ""

  timing = bench_one(model, method, length, args, after=run_traced)
  kernels = holder["kernels"]
  groups: dict[str, float] = collections.defaultdict(float)
  for name, sec in kernels.items():
    groups[_group(name)] += sec
  top = sorted(kernels, key=lambda k: -kernels[k])[: args.top]
  sources = fusion_sources(holder["hlo"], top) if args.hlo else {}
  return {
    **timing, "wall_s": timing["seconds"], "kernels": kernels, "launches": holder["launches"], "groups": dict(groups),
    "sources": sources,
  }  # fmt: skip


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true")
  p.add_argument("--models", default="mamba2-1.3b")
  p.add_argument("--length", type=int, default=8192)
  p.add_argument("--methods", default="forward,spsa")
  p.add_argument("--calls", type=int, default=3)
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--chunk", type=int, default=2048)
  p.add_argument("--json", default=None)
  p.add_argument("--hlo", action="store_true", help="name the source ops fused into each top kernel")
  p.add_argument("--layers", choices=("auto", "scan", "unroll"), default="auto", help="as python -m calibrate's")
  p.add_argument("--stack-per-step", action="store_true", help="as bench_calibrate.py's (rounds 2-10's layer scan)")
  p.add_argument("--selective-scan-config", default=None, help="as bench_calibrate.py's (JSON config overrides)")
  kernel_switch_args(p)
  args = p.parse_args(argv)
  override_selective_scan_config(args.selective_scan_config)
  apply_kernel_switches(args)
  args.iters, args.pair = 3, "vmap"
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  for name in args.models.split(","):
    model = MambaLM(model_config(name, args.tiny), param_dtype=jax.numpy.dtype(args.dtype), rngs=nnx.Rngs(0))
    attach_scales(model, "A", "linear", "layer")
    for method in args.methods.split(","):
      r = profile(model, method, args.length, args.calls, args)
      total = sum(r["kernels"].values())
      head = f"{name} {method} {args.length} tokens, layers={args.layers}"
      print(
        f"\n## {head}: wall {r['wall_s'] * 1e3:.1f} ms, kernels {total * 1e3:.1f} ms, compile {r['compile_s']:.1f} s"
      )
      print("| group | ms per call | share |\n|---|---|---|")
      for g, sec in sorted(r["groups"].items(), key=lambda kv: -kv[1]):
        print(f"| {g} | {sec * 1e3:.2f} | {sec / max(total, 1e-12):.0%} |")
      print("| kernel | group | ms per call | launches per call | us per launch |\n|---|---|---|---|---|")
      for k, sec in sorted(r["kernels"].items(), key=lambda kv: -kv[1])[: args.top]:
        n = r["launches"].get(k, 0)
        print(f"| `{k[:90]}` | {_group(k)} | {sec * 1e3:.3f} | {n:g} | {sec * 1e6 / max(n, 1e-9):.1f} |")
      for k, src in r["sources"].items():
        print(f"  {k}: {src[:400]}")
      if args.json:
        with open(args.json, "a") as f:
          row = {"model": name, "method": method, "length": args.length, "wall_s": r["wall_s"]}
          f.write(json.dumps({**row, "groups": r["groups"], "kernels_total_s": total}) + "\n")
    del model
  return 0


if __name__ == "__main__":
  sys.exit(main())
