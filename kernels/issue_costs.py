"""Instruction-issue cost of the sparse kernels: warp-instructions each issues per dense weight element.

A fact of the compiled kernel, not of its bytes: bitmap's decode loop issues ~0.37 warp-instructions per weight
element whatever the sparsity, csr8's ~0.17 at 70%, so at decode bitmap is issue-bound and csr8 is not, though
bitmap stores fewer bytes. The numbers come from one place, the static kernel benchmark (python -m
allocator.benchmarks.kernel_static --issue-costs: every kernel compiled for sm_90 / sm_89 / sm_80 with the installed
Triton and counted in its SASS), which writes ISSUE_COSTS beside this module; the roofline (profilers.roofline, through
allocator.core.formats.linear_work) reads them here. Nothing here is typed by hand.

The file holds, per architecture and kernel (format and its parameters), points (density, shape (N, K), M,
instructions per element). `warp_instructions` prices any call from them:
  - shape: the measured shape nearest in element count (on a log scale); the loop's cost per element barely
    depends on the shape, the code outside the loop (per program) does a little;
  - M: exact at a measured M, linear between two, and above the largest M in proportion to M (every kernel tiles
    M in blocks, so its work grows with the row count);
  - density: linear between measured densities, clamped to the measured range (bitmap is measured at one: its code
    and loop trips do not depend on the sparsity)."""

from __future__ import annotations

import bisect
import json
import logging
import math
from functools import cache
from pathlib import Path

ISSUE_COSTS = Path(__file__).with_name("issue_costs.json")

log = logging.getLogger(__name__)


def kernel_key(fmt: str, params: dict) -> str:
    """The file's name for a kernel: its format, and its compress parameters when it has any ("nm:n=2,m=4",
    "bsr:block=16x16")."""
    if not params:
        return fmt
    items = (f"{k}={'x'.join(map(str, v)) if isinstance(v, (tuple, list)) else v}" for k, v in sorted(params.items()))
    return f"{fmt}:{','.join(items)}"


@cache
def load(path: Path = ISSUE_COSTS) -> dict:
    """The issue-cost file, read once."""
    return json.loads(path.read_text())


@cache
def _warn_unmeasured(arch: int, key: str) -> None:
    log.warning("no instruction-issue cost measured for kernel %s on sm_%d (kernels/issue_costs.json): priced by "
                "bytes and FLOPs only; add it to the static benchmark's --issue-costs sweep", key, arch)


def _at_m(points: list[dict], m: int) -> float:
    """Instructions per element at M rows from one (shape, density)'s points over M."""
    by_m = sorted((p["m"], p["per_element"]) for p in points)
    ms = [q[0] for q in by_m]
    if m <= ms[0]:
        return by_m[0][1]
    if m >= ms[-1]:
        return by_m[-1][1] * m / ms[-1]
    hi = bisect.bisect_left(ms, m)
    (m0, v0), (m1, v1) = by_m[hi - 1], by_m[hi]
    return v0 + (v1 - v0) * (m - m0) / (m1 - m0)


def per_element(fmt: str, params: dict, arch: int, shape: tuple[int, int], density: float, m: int,
                path: Path = ISSUE_COSTS) -> float | None:
    """Warp-instructions per dense weight element of one call of `fmt`'s kernel (with `params`) on `arch` for an
    (N, K) = `shape` weight of `density` kept and M = `m` rows of x; None when none are measured for that kernel
    and architecture."""
    key = kernel_key(fmt, params)
    points = load(path)["archs"].get(str(arch), {}).get(key)
    if not points:
        if arch:
            _warn_unmeasured(arch, key)
        return None
    size = math.log(shape[0] * shape[1])
    nearest = min({tuple(p["shape"]) for p in points}, key=lambda s: (abs(math.log(s[0] * s[1]) - size), s))
    points = [p for p in points if tuple(p["shape"]) == nearest]
    densities = sorted({p["density"] for p in points})
    d = min(max(density, densities[0]), densities[-1])
    hi = min(bisect.bisect_left(densities, d), len(densities) - 1)
    lo = hi if densities[hi] == d else hi - 1
    v_lo = _at_m([p for p in points if p["density"] == densities[lo]], m)
    if lo == hi:
        return v_lo
    v_hi = _at_m([p for p in points if p["density"] == densities[hi]], m)
    return v_lo + (v_hi - v_lo) * (d - densities[lo]) / (densities[hi] - densities[lo])


def warp_instructions(fmt: str, params: dict, arch: int, shape: tuple[int, int], kept: int, m: int,
                      path: Path = ISSUE_COSTS) -> float | None:
    """Warp-instructions one call issues (per_element x N x K), or None when unmeasured."""
    rate = per_element(fmt, params, arch, shape, kept / (shape[0] * shape[1]), m, path)
    return None if rate is None else rate * shape[0] * shape[1]
