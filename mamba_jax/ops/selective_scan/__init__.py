"""Mamba1 selective scan: sequential reference and chunked XLA implementation."""
