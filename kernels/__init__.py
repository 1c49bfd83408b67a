"""Triton kernels (installed as ``sparsellm.kernels``)."""
