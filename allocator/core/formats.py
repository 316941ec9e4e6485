"""Sparse formats: which stored format a sparsity pattern is exported to, and the bytes it stores.

The export (allocator.model.sparse_export), the memory model and the profilers read this module, so a plan is
priced for the model that is exported."""

from __future__ import annotations

from functools import lru_cache

import torch

from allocator.core.patterns import SparsityPattern, select_mask
from allocator.core.space import ModelShape, unit_linear_shapes


def export_format(pattern: SparsityPattern) -> tuple[str, dict]:
    """(kernel format, its compress parameters) a pattern is stored and run in."""
    if pattern.kind == "nm":
        return "nm", {"n": pattern.n, "m": pattern.m}
    if pattern.kind == "block":
        return "bsr", {"block": pattern.block}
    return "bitmap", {}


@lru_cache(maxsize=None)
def stored_bytes(pattern: SparsityPattern, rows: int, cols: int, dtype: torch.dtype) -> int:
    """Bytes one (rows, cols) linear pruned to `pattern` takes in its export format (a magnitude mask of a fixed
    random matrix: the format's size depends on the pattern's counts, not on which weights are kept)."""
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)).to(dtype)
    weight = torch.where(select_mask(weight.abs().float(), pattern), weight, 0.0)
    fmt, params = export_format(pattern)
    from kernels.sparse_linear import SparseLinear  # Triton loads only for sparse spaces

    return SparseLinear.from_dense(weight, None, fmt, **params).weight_nbytes


def sparse_unit_bytes(shape: ModelShape, kind: str, pattern: SparsityPattern, dtype_bytes: int) -> int:
    dtype = {2: torch.float16, 4: torch.float32}[dtype_bytes]
    return sum(stored_bytes(pattern, rows, cols, dtype) for rows, cols in unit_linear_shapes(shape, kind))
