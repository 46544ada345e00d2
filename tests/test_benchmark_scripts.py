"""The GPU benchmark scripts' command lines, run on tiny shapes on the CPU, so that a change to the code they drive
cannot break them unnoticed until a device session (their timings are not checked: no timing thresholds in tests)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args) -> str:
  proc = subprocess.run(
    [sys.executable, f"benchmarks/{script}", *map(str, args)],
    cwd=ROOT,
    env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.parametrize("layers", ["scan", "unroll", "generate"])
def test_lower_time_tiny(layers):
  stdout = _run("lower_time.py", layers, "--tiny", "--length", 64)
  assert f"mamba-1.4b 64 {layers}: trace" in stdout and "MB of StableHLO" in stdout


def test_bench_calibrate_tiny(tmp_path):
  out = tmp_path / "rows.jsonl"
  stdout = _run("bench_calibrate.py", "--tiny", "--models", "mamba-1.4b", "--lengths", 32, "--methods", "forward,spsa",
                "--iters", 1, "--json", out, "--selective-scan-config", '{"mosaic_chunk": 8}')  # fmt: skip
  assert "mosaic_chunk=8" in stdout  # the overridden config, as the script prints it
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["method"] for r in rows] == ["forward", "spsa"]
  for r in rows:
    assert "error" not in r, r
    assert r["seconds"] > 0 and r["stack_per_step"] is False
    assert r["selective_scan_config"] == {"mosaic_chunk": 8}


@pytest.mark.slow  # a smoke test of a profiling script; bench_calibrate's runs by default
def test_profile_model_tiny():
  """Also the old layer scan (`--stack-per-step`), which profile_model passes through to bench_calibrate."""
  stdout = _run(
    "profile_model.py", "--tiny", "--models", "mamba2-1.3b", "--length", 32, "--methods", "forward", "--stack-per-step",
    "--selective-scan-config", '{"fwd_lowering": "triton"}',
  )  # fmt: skip
  assert "## mamba2-1.3b forward 32 tokens" in stdout
  assert "fwd_lowering='triton'" in stdout
