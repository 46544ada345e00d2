"""Pictures of a calibration: perplexity against context length, and a run's curve with its scales per layer.

Each PNG is drawn with matplotlib's Agg backend (no screen) and written to a temporary file beside the target,
then renamed, so a failed or interrupted plot never leaves a half-written file.

Shape legend: L layers.
"""

import math
import os
import pathlib
import tempfile

import numpy as np


def _pyplot():
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  return plt


def _save(fig, out_png: str | os.PathLike) -> pathlib.Path:
  out = pathlib.Path(out_png)
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".png")
  os.close(fd)
  try:
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return out


def plot_ppl(curves: dict[str, list[dict]], out_png: str | os.PathLike, title: str = "") -> pathlib.Path:
  """Perplexity against context length (log-log), one line per label in `curves` (rows with `length`, `ppl`)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, rows in curves.items():
    pts = [(r["length"], r["ppl"]) for r in rows if r["ppl"] is not None]
    if pts:
      ax.plot(*zip(*pts, strict=True), marker="o", label=label)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("perplexity")
  if title:
    ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  try:
    return _save(fig, out_png)
  finally:
    plt.close(fig)


def per_layer_summary(scales: np.ndarray) -> dict[str, np.ndarray]:
  """(L, ...) scales -> {"median", "min", "max"}, each (L,), over every entry of a layer."""
  flat = np.asarray(scales, np.float64).reshape(scales.shape[0], -1)  # (L, entries)
  return {"median": np.median(flat, axis=1), "min": flat.min(axis=1), "max": flat.max(axis=1)}


def curve_points(log: list[dict]) -> dict[str, list[tuple[int, float]]]:
  """The points a calibration plot draws, from `log.jsonl` records.

  {"objective": (step, calibration objective) for every finite step, "held_ppl": (step, exp(held-out NLL)) where
  the held-out split was evaluated (step 0 included), "identity_ppl": [(0, exp(NLL of the unscaled model))]}.
  """
  pts = {"objective": [], "held_ppl": [], "identity_ppl": []}
  for r in log:
    if "error" in r:
      continue
    if "loss" in r:
      pts["objective"].append((r["step"], r["loss"]))
    if "held_nll" in r:
      pts["held_ppl"].append((r["step"], math.exp(r["held_nll"])))
    if "held_nll_identity" in r:
      pts["identity_ppl"].append((r["step"], math.exp(r["held_nll_identity"])))
  return pts


def plot_calibration(
  log: list[dict],
  scales: dict[str, np.ndarray],
  out_png: str | os.PathLike,
  *,
  best_step: int | None = None,
  objective: str = "objective",
  title: str = "",
) -> pathlib.Path:
  """A calibration run: held-out perplexity and the calibration objective per step (left), and the scales
  per layer (right: the value itself at layer granularity, else the median with the min-max band).

  log: `log.jsonl` records; scales: {target: (L, ...)} as `calibrate.scales.stacked` gives them.
  """
  plt = _pyplot()
  from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

  pts = curve_points(log)
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
  if pts["held_ppl"]:
    ax.plot(*zip(*pts["held_ppl"], strict=True), marker="o", color="C0", label="held-out perplexity")
  if pts["identity_ppl"]:
    ax.axhline(pts["identity_ppl"][0][1], color="C0", ls=":", label="uncalibrated (held-out)")
  if best_step is not None:
    ax.axvline(best_step, color="grey", ls="--", lw=0.8, label=f"kept: step {best_step}")
  ax.set_xlabel("step")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_ylabel("held-out perplexity")
  ax.grid(True, alpha=0.3)
  handles, labels = ax.get_legend_handles_labels()
  if pts["objective"]:
    tx = ax.twinx()
    tx.plot(*zip(*pts["objective"], strict=True), color="C1", alpha=0.8, label=f"calibration {objective}")
    tx.set_ylabel(f"calibration {objective}")
    tx.ticklabel_format(axis="y", useOffset=False)
    h2, l2 = tx.get_legend_handles_labels()
    handles, labels = handles + h2, labels + l2
  if handles:
    ax.legend(handles, labels, fontsize=8)
  for i, (target, values) in enumerate(sorted(scales.items())):
    s = per_layer_summary(values)
    layers = np.arange(values.shape[0])
    color = f"C{i + 2}"
    if values[0].size == 1:
      bx.plot(layers, s["median"], marker="o", color=color, label=f"{target} scale")
    else:
      bx.plot(layers, s["median"], marker="o", color=color, label=f"{target} scale (median)")
      bx.fill_between(layers, s["min"], s["max"], color=color, alpha=0.2, label=f"{target} scale (min-max)")
  bx.axhline(1.0, color="grey", ls=":", lw=0.8)
  n_layers = max((v.shape[0] for v in scales.values()), default=1)
  bx.set_xlim(-0.5, n_layers - 0.5)
  if n_layers <= 16:
    bx.set_xticks(range(n_layers))
  else:
    bx.xaxis.set_major_locator(MaxNLocator(integer=True))
  bx.set_xlabel("layer")
  bx.set_ylabel("scale")
  bx.grid(True, alpha=0.3)
  if scales:
    bx.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  try:
    return _save(fig, out_png)
  finally:
    plt.close(fig)
