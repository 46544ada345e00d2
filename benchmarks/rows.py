"""What the JAX benchmark scripts share besides their timings (benchmarks/timing.py): the relative error they print
beside each timed kernel, and the JSON-lines file they append their rows to."""

import json

import numpy as np


def rel_err(a, b) -> float:
  """|a - b| / |b| (Frobenius norms, float64)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def append_jsonl(path: str | None, rows: list[dict]) -> None:
  """Appends one JSON line per row to `path` (nothing when None)."""
  if path:
    with open(path, "a") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")
