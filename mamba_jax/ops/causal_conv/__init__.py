"""Depthwise causal conv1d with an optional fused SiLU: the XLA formula and a Pallas GPU kernel."""
