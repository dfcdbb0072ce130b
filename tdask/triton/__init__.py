"""The Triton room: a Triton Inference Server per worker, its HTTP client, and the operator on it."""
