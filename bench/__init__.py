"""tdask benchmarks (python -m bench)."""
