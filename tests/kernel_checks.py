"""Comparisons the N:M and BSR kernel tests share: tolerances per output dtype and bitwise equality."""

from __future__ import annotations

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
TOL = {torch.float16: (1e-2, 2e-3), torch.bfloat16: (6e-2, 1.6e-2), torch.float32: (1e-4, 1e-5)}


def close(got: torch.Tensor, expect: torch.Tensor) -> None:
    """Within about two ulps of the output dtype (outputs of K <= 128 sums reach ~20): the kernel's fp32 summation
    order differs from torch's, and each rounds once to the output dtype."""
    atol, rtol = TOL[expect.dtype]
    torch.testing.assert_close(got.float(), expect.float(), atol=atol, rtol=rtol)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))
