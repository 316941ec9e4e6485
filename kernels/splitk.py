"""Split-K reduced inside the kernel launch (bitmap, N:M): each K split stores its fp32 partial sums to a (splits, M, N)
workspace and counts itself in on its output tile with an acq_rel atomic after a barrier; the last split to arrive
adds the partials in split order (deterministic), adds the bias, casts and stores the output, and resets the tile's
count. So a split-K linear is one kernel, with no zeroing, sum or cast kernels around it.

The counts live here, one int32 buffer per device, zero between launches (each launch leaves them as it found them),
so no launch zeroes them: launches that share them must not run concurrently (one stream; a CUDA graph replays its
kernels in order)."""

from __future__ import annotations

import torch

COUNTS: dict[str, torch.Tensor] = {}


def arrival_counts(tiles: int, device: torch.device | str) -> torch.Tensor:
    """An int32 buffer of at least `tiles` zeros on `device` (the same one every call, grown when too small)."""
    key = str(torch.device(device))
    if key not in COUNTS or COUNTS[key].numel() < tiles:
        COUNTS[key] = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
    return COUNTS[key]
