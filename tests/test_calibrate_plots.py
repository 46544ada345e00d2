"""calibrate.plots: the points and per-layer summaries a plot draws, and atomic PNG writes."""

import math

import numpy as np
import pytest

from calibrate import plots

LOG = [
  {"step": 0, "held_nll": 2.0, "held_nll_identity": 2.5},
  {"step": 1, "loss": 9.0, "seconds": 0.1},
  {"step": 2, "loss": 8.0, "held_nll": 1.5, "seconds": 0.1},
  {"step": 3, "loss": float("nan"), "error": "non-finite loss"},
]


def test_curve_points_from_log():
  pts = plots.curve_points(LOG)
  assert pts["objective"] == [(1, 9.0), (2, 8.0)]  # the failed step is not drawn
  assert pts["held_ppl"] == [(0, math.exp(2.0)), (2, math.exp(1.5))]
  assert pts["identity_ppl"] == [(0, math.exp(2.5))]


def test_per_layer_summary():
  rng = np.random.default_rng(0)
  scales = rng.uniform(0.5, 2.0, (3, 4, 5))  # (L, e, n): entry granularity
  s = plots.per_layer_summary(scales)
  for layer in range(3):
    vals = sorted(scales[layer].ravel())
    assert s["min"][layer] == vals[0] and s["max"][layer] == vals[-1]
    assert s["median"][layer] == pytest.approx(0.5 * (vals[9] + vals[10]))


def _is_png(path):
  return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_calibration_and_ppl_write_pngs(tmp_path):
  scales = {"A": np.linspace(0.8, 1.2, 4)[:, None], "dt": np.ones((4, 6))}
  out = plots.plot_calibration(LOG, scales, tmp_path / "sub" / "cal.png", best_step=2, objective="ppl", title="t")
  assert out == tmp_path / "sub" / "cal.png" and _is_png(out)
  ppl = plots.plot_ppl({"base": [{"length": 16, "ppl": 3.0}, {"length": 32, "ppl": None}]}, tmp_path / "p.png")
  assert _is_png(ppl)
  assert sorted(p.name for p in tmp_path.rglob("*")) == ["cal.png", "p.png", "sub"]  # no temporary files


def test_failed_plot_leaves_nothing(tmp_path, monkeypatch):
  import matplotlib.figure  # noqa: PLC0415

  target = tmp_path / "cal.png"
  target.write_bytes(b"old")

  def broken(self, *a, **k):
    with open(a[0], "wb") as f:
      f.write(b"half")  # a partial file, then the failure
    raise OSError("disk full")

  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
  with pytest.raises(OSError, match="disk full"):
    plots.plot_calibration(LOG, {"A": np.ones((2, 1))}, target)
  assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["cal.png"]
