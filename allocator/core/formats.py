"""Sparse formats: the one registry of how every sparse option is stored and run.

For each SparsityPattern kind, FORMATS states the kernel format the pattern is exported to and that format's
compress parameters. From the kernel modules' own layouts (kernels.<format>.stored_nbytes and dot_elements, beside
the code that writes those bytes and the kernel that reads them) it gives the exact bytes a (rows, cols) linear
stores and the bytes and FLOPs its kernel moves per call. The export (allocator.model.sparse_export), the memory
model (allocator.core.memory), the roofline (profilers.roofline) and both profilers (which build their models
through the export and size them by the memory model) read it, so a plan is priced for the model that is exported.

A pattern's kept weights are taken to be non-zero, as the pruners leave them (a kept weight of exactly 0.0 is not a
value the bitmap stores)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from allocator.core.config import UnstructuredFormat, check_choice
from allocator.core.patterns import KINDS, SparsityPattern, kept_count
from allocator.core.space import ModelShape, unit_linear_shapes
from kernels import formats as kernel_formats
from kernels import issue_costs


@dataclass(frozen=True)
class ExportFormat:
    format: str  # a kernels.formats name
    params: Callable[[SparsityPattern], dict[str, Any]]  # its compress parameters for a pattern


FORMATS: dict[str, ExportFormat] = {
    "unstructured": ExportFormat("bitmap", lambda p: {}),
    "nm": ExportFormat("nm", lambda p: {"n": p.n, "m": p.m}),
    "block": ExportFormat("bsr", lambda p: {"block": p.block}),
}
assert set(FORMATS) == set(KINDS), "every pattern kind needs its export format"
# Other kernel formats that can store a pattern kind, chosen by `fmt=`: csr8 gives unstructured patterns
# per-stored-value decode work (kernels/csr8.py), while bitmap, the default, keeps the tensor-core path prefill
# needs. A plan exports unstructured units in the format resolve_unstructured_format picks (space.unstructured_format).
ALTERNATIVES: dict[str, dict[str, ExportFormat]] = {"unstructured": {"csr8": ExportFormat("csr8", lambda p: {})}}
UNSTRUCTURED_FORMATS = (FORMATS["unstructured"].format, *ALTERNATIVES["unstructured"])
# Formats whose kernels multiply with scalar FMAs at every M (kernels/csr8.py: no tl.dot path): their FLOPs run at
# the CUDA-core rate, which is what makes them lose at prefill.
SCALAR_FORMATS = frozenset({"csr8"})

def resolve_unstructured_format(choice: str, regime: str | None, cheaper: Callable[[str], str] | None = None) -> str:
    """The kernel format a plan exports its unstructured units in, from space.unstructured_format (`choice`) and the
    budget's regime: `bitmap` or `csr8` as asked; `auto` is `cheaper(regime)`, the format the latency model prices
    cheaper for that regime (profilers.roofline.cheaper_unstructured_format: so the rule and the pricing are one
    fact), and bitmap without a regime (a profile job plans nothing). Resolved once, then priced and exported alike."""
    check_choice("space.unstructured_format", choice, UnstructuredFormat)
    if choice != UnstructuredFormat.auto:
        return str(choice)
    if regime is None:
        return FORMATS["unstructured"].format
    if cheaper is None:
        raise ValueError("space.unstructured_format=auto with a regime needs the pricing that chooses (`cheaper`)")
    chosen = cheaper(regime)
    if chosen not in UNSTRUCTURED_FORMATS:
        raise ValueError(f"auto chose {chosen!r}; valid: {', '.join(UNSTRUCTURED_FORMATS)}")
    return chosen


def format_choice(pattern: SparsityPattern, unstructured_format: str) -> str | None:
    """The `fmt` argument for `pattern` in a plan exporting unstructured units as `unstructured_format`: that
    format for an unstructured pattern, the kind's export format (None) for the others."""
    return unstructured_format if pattern.kind == "unstructured" else None


@dataclass(frozen=True)
class KernelWork:
    """What one y = x W^T call moves and computes, ideally: every stored byte and every activation once."""

    weight_bytes: int  # the stored values and metadata the kernel reads
    activation_bytes: int  # x read, y written, in the weight's dtype
    flops: int  # 2 per weight element the kernel multiplies with each row of x
    tensor_cores: bool = True  # False: scalar FMAs on the CUDA cores (a roofline prices them at that rate)
    # Warp-instructions the sparse kernel issues for the call on the architecture asked for (kernels.issue_costs,
    # measured from its compiled SASS); 0 for a dense GEMM (cuBLAS: never issue-bound) or when not asked / measured.
    warp_instructions: float = 0.0

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes


def export_format(pattern: SparsityPattern, fmt: str | None = None) -> tuple[str, dict]:
    """(kernel format, its compress parameters) a pattern is stored and run in: its export format, or `fmt`, one of
    the pattern kind's ALTERNATIVES."""
    entry = FORMATS[pattern.kind]
    if fmt is not None and fmt != entry.format:
        others = ALTERNATIVES.get(pattern.kind, {})
        if fmt not in others:
            raise ValueError(f"format {fmt!r} cannot store {pattern.kind} patterns; valid: "
                             f"{', '.join([entry.format, *others])}")
        entry = others[fmt]
    return entry.format, entry.params(pattern)


def stored_bytes(pattern: SparsityPattern, rows: int, cols: int, dtype: torch.dtype, fmt: str | None = None) -> int:
    """Bytes one (rows, cols) linear pruned to `pattern` stores in its export format, or in `fmt`
    (SparseLinear.weight_nbytes)."""
    fmt, params = export_format(pattern, fmt)
    return kernel_formats.stored_nbytes(fmt, (rows, cols), kept_count(pattern, rows, cols), dtype, **params)


def linear_work(
    pattern: SparsityPattern | None, m: int, rows: int, cols: int, dtype: torch.dtype, fmt: str | None = None,
    arch: int = 0,
) -> KernelWork:
    """One call of a (rows, cols) linear on m rows of x: dense (`pattern` None, a GEMM over every element) or
    stored and run as `pattern` is exported (or in `fmt`, one of its kind's ALTERNATIVES); with `arch` (a SASS
    architecture, e.g. 90) the warp-instructions its sparse kernel issues there."""
    activations = dtype.itemsize * m * (rows + cols)
    if pattern is None:
        return KernelWork(dtype.itemsize * rows * cols, activations, 2 * m * rows * cols)
    fmt, params = export_format(pattern, fmt)
    kept = kept_count(pattern, rows, cols)
    multiplied = kernel_formats.dot_elements(fmt, (rows, cols), kept, **params)
    weights = stored_bytes(pattern, rows, cols, dtype, fmt)
    issued = issue_costs.warp_instructions(fmt, params, arch, (rows, cols), kept, m) if arch else None
    return KernelWork(weights, activations, 2 * m * multiplied, tensor_cores=fmt not in SCALAR_FORMATS,
                      warp_instructions=issued or 0.0)


def sparse_unit_bytes(
    shape: ModelShape, kind: str, pattern: SparsityPattern, dtype_bytes: int, unstructured_format: str = "bitmap"
) -> int:
    dtype = {2: torch.float16, 4: torch.float32}[dtype_bytes]  # fp16 and bf16 store alike
    fmt = format_choice(pattern, unstructured_format)
    return sum(stored_bytes(pattern, rows, cols, dtype, fmt) for rows, cols in unit_linear_shapes(shape, kind))
