"""Parity with transformers/PyTorch on the same weights: the PyTorch twins of the model inputs and the DRO
loss, the figures they are compared by, and their float32 tolerances (`dro-jax compare-torch`, the tests)."""
