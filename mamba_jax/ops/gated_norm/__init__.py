"""Mamba2's grouped, gated RMSNorm: the XLA formula and a Pallas GPU kernel."""
