"""Attention and matmul kernels, shipped as ``corejax.kernels``: one op per file."""
