"""Calibration of per-layer A / dt scales of a frozen Mamba model (SPSA or gradient), evaluation and export.

Entry point: `python -m calibrate` (see `calibrate.cli`). Library pieces: `calibrate.spsa.SPSA`,
`calibrate.gradient.Gradient`, `calibrate.objective` (chunked NLL), `calibrate.data`, `calibrate.evaluate`,
`calibrate.scales` (save / load / fold), `calibrate.checkpointing` (resume).
"""
