"""Triton kernels for sparse weight formats, each beside its pure-torch reference.

The structured options of the search space need no custom kernel: pruned layers are smaller dense matrices
that run on the stock GEMMs. Sparse formats (bitmap, 2:4, block-sparse) and their kernels arrive with the
unstructured and N:M options."""
