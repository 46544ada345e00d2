"""Mamba2 chunked state-space duality (SSD) scan: sequential reference and XLA implementation."""
