"""Benchmarks that print figures, with the PyTorch/transformers baseline measured in the same run."""
