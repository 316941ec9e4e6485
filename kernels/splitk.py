"""Split-K reduced inside the kernel launch (bitmap, N:M): each K split stores its fp32 partial sums to a (splits, M, N)
workspace and counts itself in on its output tile with an acq_rel atomic after a barrier; the last split to arrive
adds the partials in split order (deterministic), adds the bias, casts and stores the output, and resets the tile's
count. So a split-K linear is one kernel, with no zeroing, sum or cast kernels around it.

The counts live here, one int32 buffer per device, zero between launches (each launch leaves them as it found them),
so no launch zeroes them: launches that share them must not run concurrently (one stream; a CUDA graph replays its
kernels in order)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import triton_compat

INTERPRETED = bool(triton.knobs.runtime.interpret)
triton_compat.patch()  # Triton 3.6's interpreter with NumPy >= 2.4 (bitmap, csr8 and N:M import this module)


@triton.jit
def store_split(total, out, mask, part, ws_ptr, counter, pid_k, splits, M, N):
    """One K split's end (bitmap, csr8 and the N:M decode and pair kernels): its fp32 partial `total` (bias already
    added by split 0) goes to the workspace at `part`, the program counts itself in on its output tile's `counter`
    after a barrier (so the whole program's partials are written before the release), and the last split to arrive
    adds all partials in split order, casts, stores to `out` and resets the count."""
    tl.store(ws_ptr + pid_k * M * N + part, total, mask=mask)
    tl.debug_barrier()
    arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    if arrived == splits - 1:
        reduced = tl.zeros_like(total)
        for s in range(splits):
            reduced += tl.load(ws_ptr + s * M * N + part, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(out, reduced.to(out.dtype.element_ty), mask=mask)
        tl.atomic_xchg(counter, 0)

COUNTS: dict[str, torch.Tensor] = {}


def arrival_counts(tiles: int, device: torch.device | str) -> torch.Tensor:
    """An int32 buffer of at least `tiles` zeros on `device` (the same one every call, grown when too small)."""
    key = str(torch.device(device))
    if key not in COUNTS or COUNTS[key].numel() < tiles:
        COUNTS[key] = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
    return COUNTS[key]


def fp32_out(dtype: torch.dtype) -> bool:
    # bf16 in the interpreter: its fp32 → bf16 cast truncates where the GPU (and torch) round to nearest even, so
    # the kernel stores fp32 and torch casts.
    return INTERPRETED and dtype == torch.bfloat16


@dataclass
class Buffers:
    out: torch.Tensor  # (m, n) in x's dtype (fp32 for bf16 in the interpreter)
    workspace: torch.Tensor  # (split, m, n) fp32 partial sums; a placeholder when not split
    counts: torch.Tensor  # int32 arrivals per output tile; a placeholder when not split


def buffers(split: int, output_tiles: int, m: int, n: int, dtype: torch.dtype, device: torch.device | str) -> Buffers:
    """What one launch writes: the output and, for split-K, the fp32 partials and the tiles' arrival counts."""
    out = torch.empty((m, n), dtype=torch.float32 if fp32_out(dtype) else dtype, device=device)
    if split == 1:
        return Buffers(out, out, out)
    workspace = torch.empty((split, m, n), dtype=torch.float32, device=device)
    return Buffers(out, workspace, arrival_counts(output_tiles, device))
