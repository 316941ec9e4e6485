"""What every compressed-weight class (bitmap, N:M, BSR) exposes alike, derived from which tensors it holds."""

from __future__ import annotations

from typing import ClassVar

import torch


class CompressedWeight:
    """Base of the compressed-weight dataclasses. DATA names the device tensors the kernel reads, in the order the
    custom op takes them; VALUES names the one holding the weight's values (its dtype is the weight's)."""

    DATA: ClassVar[tuple[str, ...]]
    VALUES: ClassVar[str]

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self, self.VALUES).dtype

    @property
    def device(self) -> torch.device:
        return getattr(self, self.VALUES).device

    @property
    def nbytes(self) -> int:
        """Bytes of the device tensors the kernel reads; the integer headers of tensors() are host metadata and not
        counted."""
        return sum(t.numel() * t.element_size() for t in (getattr(self, key) for key in self.DATA))
