"""Times `python -m convert` on a random-weight checkpoint at the real mamba2-1.3b shapes and reports peak memory.

Run from the repository root (CPU only; needs ~2.7 GB free disk for the checkpoint plus as much for one output):
  PYTHONPATH=. python benchmarks/bench_convert.py --out benchmarks/results/convert.md

The checkpoint is the state-spaces format as released: config.json + an fp16 `pytorch_model.bin` (written without
torch by `convert.torch_bin.save_state_dict`) holding both `backbone.embedding.weight` and the tied `lm_head.weight`.
Each conversion runs the CLI in a child process; its wall time includes the interpreter and jax start-up, and its
peak resident set (`ru_maxrss` from `os.wait4`) counts the memory-mapped checkpoint pages it touched. "cold" runs
first evict the checkpoint from the page cache (posix_fadvise DONTNEED on that file only).
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
D_MODEL, N_LAYER, VOCAB, PADDED_VOCAB = 2048, 48, 50277, 50288
D_STATE, HEADDIM, NGROUPS, D_CONV = 128, 64, 1, 4


def mamba2_1_3b_shapes() -> dict[str, tuple[int, ...]]:
  d_inner = 2 * D_MODEL
  nheads = d_inner // HEADDIM
  conv_dim = d_inner + 2 * NGROUPS * D_STATE
  d_in_proj = 2 * d_inner + 2 * NGROUPS * D_STATE + nheads
  shapes = {"backbone.embedding.weight": (PADDED_VOCAB, D_MODEL)}
  for i in range(N_LAYER):
    m = f"backbone.layers.{i}.mixer."
    shapes |= {
      f"{m}dt_bias": (nheads,),
      f"{m}A_log": (nheads,),
      f"{m}D": (nheads,),
      f"{m}in_proj.weight": (d_in_proj, D_MODEL),
      f"{m}conv1d.weight": (conv_dim, 1, D_CONV),
      f"{m}conv1d.bias": (conv_dim,),
      f"{m}norm.weight": (d_inner,),
      f"{m}out_proj.weight": (D_MODEL, d_inner),
      f"backbone.layers.{i}.norm.weight": (D_MODEL,),
    }
  shapes["backbone.norm_f.weight"] = (D_MODEL,)
  return shapes


def write_checkpoint(directory: Path) -> int:
  """Writes config.json + an fp16 pytorch_model.bin with random finite weights; returns the file size."""
  from convert.torch_bin import save_state_dict

  rng = np.random.default_rng(0)
  # Random fp16 bit patterns below 0x3C00 are finite values in [0, 1): fast to make, and never NaN/Inf.
  tensors = {
    k: rng.integers(0, 0x3C00, size=s, dtype=np.uint16).view(np.float16) for k, s in mamba2_1_3b_shapes().items()
  }
  tensors["lm_head.weight"] = tensors["backbone.embedding.weight"]  # tied: the same storage, as torch.save writes it
  save_state_dict(tensors, directory / "pytorch_model.bin")
  config = {
    "d_model": D_MODEL,
    "d_intermediate": 0,
    "n_layer": N_LAYER,
    "vocab_size": VOCAB,
    "ssm_cfg": {"layer": "Mamba2"},
    "attn_layer_idx": [],
    "attn_cfg": {},
    "rms_norm": True,
    "residual_in_fp32": True,
    "fused_add_norm": True,
    "pad_vocab_size_multiple": 16,
    "tie_embeddings": True,
  }
  (directory / "config.json").write_text(json.dumps(config))
  return (directory / "pytorch_model.bin").stat().st_size


def evict(path: Path) -> None:
  with open(path, "rb") as f:
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def run_cli(args: list[str]) -> tuple[float, float, str]:
  """Runs `python -m convert ARGS`; returns (wall seconds, peak RSS in bytes, output)."""
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
  start = time.perf_counter()
  proc = subprocess.Popen(
    [sys.executable, "-m", "convert", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  out = proc.stdout.read()
  _, status, usage = os.wait4(proc.pid, 0)
  seconds = time.perf_counter() - start
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode != 0:
    raise RuntimeError(f"convert {args} failed ({proc.returncode}):\n{out}")
  return seconds, usage.ru_maxrss * 1024, out  # ru_maxrss is in KiB on Linux


def dir_size(path: Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def machine() -> str:
  cpu = "unknown CPU"
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", type=Path, help="markdown file for the results (default: print only)")
  parser.add_argument("--workdir", type=Path, default=None, help="where the temporary checkpoint goes (default /tmp)")
  parser.add_argument("--write-checkpoint", type=Path, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.write_checkpoint:
    write_checkpoint(args.write_checkpoint)
    return

  work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.workdir))
  rows = []
  try:
    source = work / "mamba2-1.3b"
    source.mkdir()
    start = time.perf_counter()
    # In a child process: Linux carries a parent's peak RSS into a forked child's ru_maxrss, so the parent must
    # never hold the 2.7 GB of weights itself.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, __file__, "--write-checkpoint", str(source)], env=env, check=True)
    size = (source / "pytorch_model.bin").stat().st_size
    print(f"wrote {size / 1e9:.2f} GB checkpoint in {time.perf_counter() - start:.1f} s", flush=True)
    cases = [("orbax", "warm"), ("safetensors", "warm"), ("orbax", "cold"), ("safetensors", "cold")]
    for fmt, cache in cases:
      if cache == "cold":
        evict(source / "pytorch_model.bin")
      out = work / f"out-{fmt}"
      seconds, rss, log = run_cli([str(source), "--out", str(out), "--dtype", "keep", "--format", fmt, "--quiet"])
      out_size = dir_size(out)
      rows.append((fmt, cache, seconds, rss, out_size))
      print(log.strip().splitlines()[-1] if log.strip() else "", flush=True)
      print(f"{fmt} {cache}: {seconds:.1f} s, peak RSS {rss / 1e9:.2f} GB ({rss / size:.2f}x)", flush=True)
      shutil.rmtree(out)
  finally:
    shutil.rmtree(work, ignore_errors=True)

  commit = (
    os.environ.get("GIT_COMMIT")
    or subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
    ).stdout.strip()
  )
  lines = [
    "# `python -m convert` on mamba2-1.3b shapes",
    "",
    f"Measured {datetime.date.today().isoformat()} on {machine()}; commit {commit} (plus the working tree).",
    "",
    f"Source: random fp16 weights at the mamba2-1.3b shapes (48 layers, d_model 2048, vocab 50288, tied), state-spaces "
    f"format, `pytorch_model.bin` {size / 1e9:.2f} GB. Command: `python -m convert DIR --dtype keep --format FMT`, "
    "run as a child process. Time is the child's wall time, start-up included; peak RSS is its `ru_maxrss` "
    "(memory-mapped checkpoint pages it touched count). Warm: the checkpoint is in the page cache (as right after a "
    "download); cold: evicted first.",
    "",
    "| format | page cache | seconds | peak RSS (GB) | peak RSS / checkpoint | output (GB) |",
    "|---|---|---|---|---|---|",
  ]
  for fmt, cache, seconds, rss, out_size in rows:
    lines.append(f"| {fmt} | {cache} | {seconds:.1f} | {rss / 1e9:.2f} | {rss / size:.2f}x | {out_size / 1e9:.2f} |")
  lines += ["", "Target (issue 3): under 60 s and peak RSS under 1.5x the checkpoint size."]
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
  main()
