"""Times the Pallas scans against this project's XLA fallback on a GPU and writes a markdown table.

Run on the GPU machine from the repository root:
  GIT_COMMIT=$(git rev-parse HEAD) PYTHONPATH=. python benchmarks/bench_scans.py --out $OUT/scans.md

Each case first checks the Pallas output (and gradients at the shortest length) against the XLA path in
float32, then times forward and forward+backward (median of many synchronised calls). Shapes follow issue 4:
batch 1, inputs bf16, dt float32; SSD 64 heads x headdim 64, dstate 128, 1 group, chunk 256; selective scan
d_inner 4096, dstate 16, with z and D.
"""

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import sys

import jax
import jax.numpy as jnp

from benchmarks.timing import stream_ms, wall_ms
from mamba_jax.ops import ssd_xla
from mamba_jax.ops.selective_scan.xla import selective_scan_xla

# Official kernels on an H100, measured by the project lead (ms), tokens -> time.
OFFICIAL = {
  ("ssd", "fwd"): {2048: 0.95, 8192: 0.95, 32768: 1.31, 65536: 2.83},
  ("ssd", "fwd+bwd"): {2048: 4.98, 8192: 3.91, 32768: 5.92, 65536: 12.05},
  ("selective_scan", "fwd"): {2048: 0.16, 8192: 0.77, 32768: 3.03, 65536: 6.00},
  ("selective_scan", "fwd+bwd"): {2048: 0.94, 8192: 4.09, 32768: 14.1, 65536: 28.6},
}
H, P, N, G, CHUNK = 64, 64, 128, 1, 256
E, NS = 4096, 16


def _time(fn, *args, iters=30, warmup=3):
  """Median wall time (ms) of synchronised calls (benchmarks/timing.py)."""
  return wall_ms(lambda: fn(*args), jax.block_until_ready, iters, warmup)


def _time_stream(fn, *args, calls=20, reps=5):
  """Device time (ms) per call of back-to-back calls (benchmarks/timing.py)."""
  return stream_ms(lambda: fn(*args), jax.block_until_ready, calls, reps)


def _safe(thunk, log):
  """thunk(), or NaN when it fails (the XLA fallback can run out of memory at long lengths)."""
  try:
    return thunk()
  except Exception as e:  # noqa: BLE001
    log(f"failed: {type(e).__name__}: {str(e)[:200]}")
    return float("nan")


def _rel(a, b):
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm((a - b).ravel()) / (jnp.linalg.norm(b.ravel()) + 1e-30))


def ssd_inputs(l, key, dtype=jnp.bfloat16):
  ks = jax.random.split(key, 8)
  x = jax.random.normal(ks[0], (1, l, H, P), dtype)
  dt = jax.random.normal(ks[1], (1, l, H), jnp.float32) - 2.0
  A = -jnp.exp(jax.random.uniform(ks[2], (H,), jnp.float32, 0.0, 2.5))
  B = jax.random.normal(ks[3], (1, l, G, N), dtype)
  C = jax.random.normal(ks[4], (1, l, G, N), dtype)
  D = jax.random.normal(ks[5], (H,), jnp.float32)
  z = jax.random.normal(ks[6], (1, l, H, P), dtype)
  dt_bias = jax.random.normal(ks[7], (H,), jnp.float32) * 0.5
  return (x, dt, A, B, C, D, z, dt_bias)


def ss_inputs(l, key, dtype=jnp.bfloat16):
  ks = jax.random.split(key, 8)
  u = jax.random.normal(ks[0], (1, l, E), dtype)
  delta = jax.random.normal(ks[1], (1, l, E), jnp.float32) - 2.0
  A = -jnp.exp(jax.random.uniform(ks[2], (E, NS), jnp.float32, 0.0, 2.5))
  B = jax.random.normal(ks[3], (1, l, NS), dtype)
  C = jax.random.normal(ks[4], (1, l, NS), dtype)
  D = jax.random.normal(ks[5], (E,), jnp.float32)
  z = jax.random.normal(ks[6], (1, l, E), dtype)
  delta_bias = jax.random.normal(ks[7], (E,), jnp.float32) * 0.5
  return (u, delta, A, B, C, D, z, delta_bias)


def make_ssd(impl_fn):
  def f(x, dt, A, B, C, D, z, dt_bias):
    return impl_fn(x, dt, A, B, C, CHUNK, D, z, dt_bias, True, (0.0, math.inf), None, False)

  return f


def make_ss(impl_fn):
  def f(u, delta, A, B, C, D, z, delta_bias):
    return impl_fn(u, delta, A, B, C, D, z, delta_bias, True, None, False)

  return f


def fwd_bwd(f):
  """Gradients of a scalar loss of f's output w.r.t. all 8 inputs (rounds 2-8's forward+backward timing; the
  loss's reduction and its broadcast cotangent run with it). `with_cotangent` times what the official figures time;
  on an H200 the two differed by at most 1.3% for the SSD (benchmarks/results/scans.md, round 9)."""

  def loss(*args):
    y = f(*args)
    return jnp.sum(y.astype(jnp.float32) * jnp.cos(jnp.arange(y.shape[-1], dtype=jnp.float32)))

  return jax.grad(loss, argnums=tuple(range(8)))


def with_cotangent(f):
  """(g, *args) -> the gradients of f at args for the output cotangent g: forward + backward and nothing else, as
  `torch.autograd.grad(y, inputs, g)` in benchmarks/bench_official.py."""

  def h(g, *args):
    y, pullback = jax.vjp(f, *args)
    return pullback(g.astype(y.dtype))

  return h


def _cotangent(f, args, key):
  """A random cotangent of f's output (its shape and dtype), drawn once, outside the timed calls."""
  y = jax.eval_shape(f, *args)
  return jax.random.normal(key, y.shape, jnp.float32).astype(y.dtype)


def _upcast(args):
  return tuple(a.astype(jnp.float32) for a in args)


def run_op(op, lens, pallas_fn, xla_fn, make, inputs, floor_bytes, log, skip_xla_bwd_above, loss_bwd=False):
  rows = []
  pf, xf = make(pallas_fn), make(xla_fn)
  pf_j, xf_j = jax.jit(pf), jax.jit(xf)
  pg_j, xg_j = jax.jit(with_cotangent(pf)), jax.jit(with_cotangent(xf))
  pl_j = jax.jit(fwd_bwd(pf))  # rounds 2-8's timing, with `loss_bwd`
  for i, l in enumerate(lens):
    args = inputs(l, jax.random.PRNGKey(100 + l))
    g = _cotangent(pf, args, jax.random.PRNGKey(l))
    y = pf_j(*args)
    y_ref = jax.jit(xf)(*_upcast(args))
    err = _rel(y, y_ref)
    grad_err = None
    if i == 0:
      gp = pg_j(g, *args)
      gr = xg_j(g.astype(jnp.float32), *_upcast(args))
      grad_err = max(_rel(a, b) for a, b in zip(gp, gr, strict=True))
      log(f"{op} l={l} grad rel errs: " + ", ".join(f"{_rel(a, b):.2e}" for a, b in zip(gp, gr, strict=True)))
    del y, y_ref
    t_pf = _time(pf_j, *args)
    t_pg = _time(pg_j, g, *args, iters=20)
    t_xf = _safe(lambda args=args: _time(xf_j, *args, iters=10), log)
    t_xg = float("nan")
    if l <= skip_xla_bwd_above:
      t_xg = _safe(lambda args=args, g=g: _time(xg_j, g, *args, iters=5), log)
    s_pf = _time_stream(pf_j, *args)
    s_pg = _time_stream(pg_j, g, *args, calls=10)
    s_xg = float("nan")
    if l <= skip_xla_bwd_above:
      s_xg = _safe(lambda args=args, g=g: _time_stream(xg_j, g, *args, calls=3, reps=3), log)
    row = dict(
      op=op,
      l=l,
      err=err,
      grad_err=grad_err,
      pallas_fwd=t_pf,
      pallas_fwdbwd=t_pg,
      xla_fwd=t_xf,
      xla_fwdbwd=t_xg,
      stream_fwd=s_pf,
      stream_fwdbwd=s_pg,
      stream_xla_fwdbwd=s_xg,
      floor=floor_bytes(l) / 3.0e12 * 1e3,
    )
    if loss_bwd:  # rounds 2-8 timed this: the gradient of a loss, its reduction and broadcast included
      row["stream_fwdbwd_loss"] = _time_stream(pl_j, *args, calls=10)
    rows.append(row)
    log(json.dumps(row))
  return rows


def check_256k(op, pallas_fn, xla_fn, make, inputs, l, pieces, log):
  """Pallas (bf16 inputs) vs the XLA path in float32, run piecewise with carried states (fits in memory)."""
  args = inputs(l, jax.random.PRNGKey(7))
  y = jax.jit(make(pallas_fn))(*args)
  up = _upcast(args)
  step = l // pieces
  state = None
  ys = []
  for k in range(pieces):
    sl = [a[:, k * step : (k + 1) * step] if j in (0, 1, 3, 4, 6) else a for j, a in enumerate(up)]
    if op == "ssd":
      x, dt, A, B, C, D, z, db = sl
      yk, state = jax.jit(xla_fn, static_argnums=(5, 9, 10, 12))(
        x, dt, A, B, C, CHUNK, D, z, db, True, (0.0, math.inf), state, True
      )
    else:
      u, d, A, B, C, D, z, db = sl
      yk, state = jax.jit(xla_fn, static_argnums=(8, 10))(u, d, A, B, C, D, z, db, True, state, True)
    ys.append(yk)
  err = _rel(y, jnp.concatenate(ys, axis=1))
  log(f"{op} {l} tokens: rel err vs float32 XLA = {err:.2e}, finite={bool(jnp.all(jnp.isfinite(y)))}")
  return err


# (block_t, warps, stages, target_programs); rounds 2-5 swept 132-1056 programs, 4-8 warps, T 32-128, 2-3 stages
SSD_FWD_SWEEP = [(64, 4, 2, 132), (64, 4, 2, 264)]
# (block_t_bwd, warps, stages, target_programs_bwd, heads_per_program_bwd). Round 4 (chunk-parallel backward)
# also swept heads per program 2-8 (slower), 8 warps (slower), T 32 (slower): see benchmarks/profile_ssd_bwd.py.
SSD_BWD_SWEEP = [
  (64, 4, 1, 264, 1),
  (64, 4, 1, 528, 1),
  (64, 4, 1, 1056, 1),
]
SS_FWD_SWEEP = [(256, 16, 8, 1056)]  # (block_e, unroll, warps, target_programs); round 3 swept 32-512 channels
SS_BWD_SWEEP = [  # (block_e_bwd, unroll_bwd, warps, rows layout); round 2 swept (32|64|16, 8|16, 2|4) without rows
  (32, 8, 2, False),
  (64, 8, 2, True),
  (32, 8, 1, True),
  (128, 8, 4, True),
  (64, 16, 2, True),
]


def tune(l, ops, log):
  """Times config variants at one length; returns the best SSD and selective-scan configs (None: not tuned)."""
  from mamba_jax.ops.selective_scan import pallas_triton as sp  # noqa: PLC0415
  from mamba_jax.ops.ssd import pallas_triton as pt  # noqa: PLC0415

  ssd_cfg = ss_cfg = None
  if "ssd" in ops:
    args = ssd_inputs(l, jax.random.PRNGKey(1))
    build = lambda cfg, grad: jax.jit(
      (fwd_bwd if grad else lambda f: f)(make_ssd(functools.partial(pt.ssd_pallas, config=cfg)))
    )
    fwd_candidates = [
      pt.SSDConfig(block_t=T, num_warps=w, num_stages=st, target_programs=tp) for T, w, st, tp in SSD_FWD_SWEEP
    ]
    best_fwd = _fastest("ssd fwd", fwd_candidates, lambda c: build(c, False), args, 15, log)
    bwd_candidates = [
      dataclasses.replace(
        best_fwd, block_t_bwd=T, num_warps_bwd=w, num_stages_bwd=st, target_programs_bwd=tp, heads_per_program_bwd=H
      )
      for T, w, st, tp, H in SSD_BWD_SWEEP
    ]
    ssd_cfg = _fastest("ssd fwd+bwd", bwd_candidates, lambda c: build(c, True), args, 5, log)
    # The model's call has no gate (Mamba2 gates in its norm), which the backward exploits.
    no_z = lambda x, dt, A, B, C, D, z, dt_bias: make_ssd(functools.partial(pt.ssd_pallas, config=ssd_cfg))(
      x, dt, A, B, C, D, None, dt_bias
    )
    t = _safe(lambda: _time(jax.jit(fwd_bwd(no_z)), *args, iters=5), log)
    log(f"ssd fwd+bwd without z (the model's call), chosen config: {t:.3f} ms")
  if "selective_scan" in ops:
    args = ss_inputs(l, jax.random.PRNGKey(2))
    build = lambda cfg, grad: jax.jit(
      (fwd_bwd if grad else lambda f: f)(make_ss(functools.partial(sp.selective_scan_pallas, config=cfg)))
    )
    fwd_candidates = [
      sp.SelectiveScanConfig(block_e=eb, unroll=un, num_warps=w, target_programs=tp) for eb, un, w, tp in SS_FWD_SWEEP
    ]
    best_fwd = _fastest("selective_scan fwd", fwd_candidates, lambda c: build(c, False), args, 15, log)
    bwd_candidates = [
      dataclasses.replace(best_fwd, block_e_bwd=eb, unroll_bwd=K, num_warps_bwd=w, bwd_rows=rows)
      for eb, K, w, rows in SS_BWD_SWEEP
    ]
    ss_cfg = _fastest("selective_scan fwd+bwd", bwd_candidates, lambda c: build(c, True), args, 5, log)
  log(f"chosen: {ssd_cfg} {ss_cfg}")
  return ssd_cfg, ss_cfg


def _fastest(label, candidates, build, args, iters, log):
  """Times `build(cfg)(*args)` for each candidate config (median of `iters`) and returns the fastest config."""
  best = None
  for cfg in candidates:
    f = build(cfg)
    t = _safe(lambda f=f: _time(f, *args, iters=iters), log)
    log(f"tune {label} {cfg}: {t:.3f} ms")
    if best is None or t < best[0]:
      best = (t, cfg)
  return best[1]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--ops", default="ssd,selective_scan")
  ap.add_argument("--lens", default="2048,8192,32768,65536")
  ap.add_argument("--check-len", type=int, default=262144)
  ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "scans.md"))
  ap.add_argument("--tune", type=int, default=0, help="sweep block sizes at this length first and use the best")
  ap.add_argument("--no-xla-bwd-above", type=int, default=65536, help="skip timing XLA fwd+bwd above this length")
  ap.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU smoke test of this script)")
  ap.add_argument("--loss-bwd", action="store_true", help="also time rounds 2-8's loss-gradient forward+backward")
  ap.add_argument(
    "--official-json",
    help="official kernels timed on this device (benchmarks/bench_official.py); default: the issue's H100 figures",
  )
  a = ap.parse_args()
  lens = [int(s) for s in a.lens.split(",")]
  lines = []

  def log(s):
    print(s, flush=True)
    lines.append(s)

  dev = jax.devices()[0]
  log(f"device {dev.device_kind}, jax {jax.__version__}, python {sys.version.split()[0]}")
  rows, checks = [], {}
  ops = a.ops.split(",")
  ssd_cfg = ss_cfg = None
  if a.tune:
    ssd_cfg, ss_cfg = tune(a.tune, ops, log)
  if "ssd" in ops:
    from mamba_jax.ops.ssd.pallas_triton import ssd_pallas  # noqa: PLC0415

    if a.interpret:
      ssd_pallas = functools.partial(ssd_pallas, interpret=True)
    if ssd_cfg is not None:
      ssd_pallas = functools.partial(ssd_pallas, config=ssd_cfg)

    floor = lambda l: l * H * P * 2 * 2 + l * G * N * 2 * 2 + l * H * 4
    rows += run_op("ssd", lens, ssd_pallas, ssd_xla, make_ssd, ssd_inputs, floor, log, a.no_xla_bwd_above, a.loss_bwd)
    if a.check_len:
      checks["ssd"] = check_256k("ssd", ssd_pallas, ssd_xla, make_ssd, ssd_inputs, a.check_len, 8, log)
  if "selective_scan" in ops:
    from mamba_jax.ops.selective_scan.pallas_triton import selective_scan_pallas  # noqa: PLC0415

    if a.interpret:
      selective_scan_pallas = functools.partial(selective_scan_pallas, interpret=True)
    if ss_cfg is not None:
      selective_scan_pallas = functools.partial(selective_scan_pallas, config=ss_cfg)

    floor = lambda l: l * E * (2 * 3 + 4) + l * NS * 2 * 2
    rows += run_op(
      "selective_scan",
      lens,
      selective_scan_pallas,
      selective_scan_xla,
      make_ss,
      ss_inputs,
      floor,
      log,
      a.no_xla_bwd_above,
      a.loss_bwd,
    )
    if a.check_len:
      checks["selective_scan"] = check_256k(
        "selective_scan", selective_scan_pallas, selective_scan_xla, make_ss, ss_inputs, a.check_len, 8, log
      )
  official, official_note = load_official(a.official_json)
  write_md(a.out, dev, rows, checks, lines, official, official_note)


def load_official(path):
  """{(op, "fwd" | "fwd+bwd"): {tokens: (wall ms, stream ms)}} and a sentence saying where the figures come from."""
  if not path:
    table = {k: {l: (t, t) for l, t in v.items()} for k, v in OFFICIAL.items()}
    return table, "the official kernels on an H100, measured by the project lead (one figure for both timings)"
  with open(path) as f:
    d = json.load(f)
  table = {}
  for op in ("ssd", "selective_scan"):
    rows = d.get(op, {})
    table[(op, "fwd")] = {int(l): (r["fwd"], r["stream_fwd"]) for l, r in rows.items()}
    table[(op, "fwd+bwd")] = {int(l): (r["fwd_bwd"], r["stream_fwd_bwd"]) for l, r in rows.items()}
  note = (
    f"the official kernels timed on this device ({d['device']}, torch {d['torch']}, {d['date']}) by "
    "benchmarks/bench_official.py with the same two timings; ratios are wall/wall and stream/stream"
  )
  return table, note


def write_md(path, dev, rows, checks, lines, official, official_note):
  date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
  commit = os.environ.get("GIT_COMMIT", "unknown")
  out = [
    "# Scan kernels: Pallas vs XLA fallback vs official kernels",
    "",
    f"Device: {dev.device_kind}; date: {date}; jax {jax.__version__}; git commit {commit} (plus uncommitted work).",
    "Batch 1, inputs bf16, dt float32, dt_bias + softplus, D and z. Times are medians of synchronised calls",
    "(wall clock around `block_until_ready`, so each includes the host's dispatch and synchronisation, ~0.1 ms on",
    "the lent machines); `stream` columns: back-to-back calls with one synchronisation at the end (the device's",
    "time, as event-based timing measures it). `official` = the official Triton (SSD) / CUDA (selective scan)",
    f"kernels: {official_note}. `floor` = x, B, C, dt",
    "read once and y written once at 3 TB/s (SSD); u, delta, z, B, C read and y written (selective scan).",
    "`err` = ||pallas - xla_f32|| / ||xla_f32|| on the same bf16 inputs (XLA run in float32);",
    "`grad err` = max over inputs of the same for the gradients (first length only). fwd+bwd = the forward and",
    "the gradients w.r.t. all 8 inputs for a given random output cotangent (`jax.vjp`), as bench_official.py times",
    "the official kernels (`torch.autograd.grad(y, inputs, g)`).",
    "",
    "| op | tokens | err | grad err | Pallas fwd ms | official fwd | ratio | XLA fwd | XLA/Pallas | floor ms "
    "| Pallas/floor | Pallas fwd+bwd ms | official fwd+bwd | ratio | XLA fwd+bwd | XLA/Pallas "
    "| stream fwd ms | ratio | stream fwd+bwd ms | ratio | stream XLA/Pallas fwd+bwd |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    nan = (float("nan"), float("nan"))
    (of, sof), (ob, sob) = (official.get((r["op"], k), {}).get(r["l"], nan) for k in ("fwd", "fwd+bwd"))
    ge = "" if r["grad_err"] is None else f"{r['grad_err']:.1e}"
    out.append(
      f"| {r['op']} | {r['l']} | {r['err']:.1e} | {ge} | {r['pallas_fwd']:.3f} | {_ms(of, sof)} "
      f"| {r['pallas_fwd'] / of:.2f} "
      f"| {r['xla_fwd']:.2f} | {r['xla_fwd'] / r['pallas_fwd']:.1f} | {r['floor']:.3f} "
      f"| {r['pallas_fwd'] / r['floor']:.1f} "
      f"| {r['pallas_fwdbwd']:.3f} | {_ms(ob, sob)} | {r['pallas_fwdbwd'] / ob:.2f} | {r['xla_fwdbwd']:.2f} "
      f"| {r['xla_fwdbwd'] / r['pallas_fwdbwd']:.1f} "
      f"| {r['stream_fwd']:.3f} | {r['stream_fwd'] / sof:.2f} | {r['stream_fwdbwd']:.3f} "
      f"| {r['stream_fwdbwd'] / sob:.2f} | {r['stream_xla_fwdbwd'] / r['stream_fwdbwd']:.1f} |"
    )
  out.append("")
  for r in rows:
    if "stream_fwdbwd_loss" in r:
      out.append(
        f"- {r['op']} at {r['l']} tokens, stream fwd+bwd of a loss's gradient (rounds 2-8's timing, the loss's "
        f"reduction and broadcast included): {r['stream_fwdbwd_loss']:.3f} ms"
      )
  for op, err in checks.items():
    out.append(
      f"- {op} at 262144 tokens: relative error vs float32 XLA (run in 8 pieces with carried state) = {err:.2e}"
    )
  out += ["", "<details><summary>log</summary>", "", "```", *lines, "```", "</details>", ""]
  with open(path, "w") as f:
    f.write("\n".join(out))
  print("\n".join(out[: -len(lines) - 5]))


def _ms(wall, stream):
  """An official time: one figure, or wall / stream when the two timings differ."""
  return f"{wall:.3g}" if wall == stream else f"{wall:.3f} / {stream:.3f}"


if __name__ == "__main__":
  main()
