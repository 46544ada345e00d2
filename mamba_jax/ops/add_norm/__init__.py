"""The residual add and the next RMSNorm in one pass: the XLA formula and a Pallas GPU kernel."""
