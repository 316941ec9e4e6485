"""torch.library custom ops, one per sparse format: `torch.ops.sparsity_allocator.<fmt>_linear`.

Schema: (Tensor x, Tensor[] data, int[] headers, Tensor? bias) -> Tensor, where `data` are the format's device
tensors in `formats.SPECS[fmt].data_keys` order and `headers` its integer headers encoded by
`formats.split_tensors`. The ops are opaque to torch.compile (a fake kernel gives the output's shape and dtype) and
do no host reads, so they can be captured in CUDA graphs. Inference only: no autograd formula.

Dispatch (`backend`): CUDA tensors run the format's Triton kernel. Triton has no CPU backend, so CPU tensors run
the format's pure-torch reference_matmul — unless the kernels were built for Triton's interpreter
(TRITON_INTERPRET=1 set before import), in which case CPU tensors run the Triton kernel interpreted (how the tests
check the kernel path without a GPU; slow)."""

from __future__ import annotations

from typing import Literal

import torch
import triton

from kernels import formats

# How the kernel modules (imported by `formats` just above) were built: @triton.jit reads this at definition time.
INTERPRETED = bool(triton.knobs.runtime.interpret)

Backend = Literal["triton", "torch-reference"]


def backend(device: torch.device | str) -> Backend:
    """Which implementation the ops run for tensors on `device`."""
    kind = torch.device(device).type
    if (kind == "cuda" and not INTERPRETED) or (kind == "cpu" and INTERPRETED):
        return "triton"
    return "torch-reference"


def _define(fmt: str) -> torch.library.CustomOpDef:
    module = formats.get(fmt)

    def impl(x: torch.Tensor, data: list[torch.Tensor], headers: list[int], bias: torch.Tensor | None) -> torch.Tensor:
        w = formats.build(fmt, list(data), list(headers))
        if backend(x.device) == "triton":
            return module.triton_matmul(x, w, bias)
        return module.reference_matmul(x, w, bias)

    op = torch.library.custom_op(
        f"sparsity_allocator::{fmt}_linear",
        impl,
        mutates_args=(),
        schema="(Tensor x, Tensor[] data, int[] headers, Tensor? bias) -> Tensor",
    )

    @op.register_fake
    def _(x: torch.Tensor, data: list[torch.Tensor], headers: list[int], bias: torch.Tensor | None) -> torch.Tensor:
        n, _k = formats.shape_of(fmt, list(headers))
        return x.new_empty((*x.shape[:-1], n))

    return op


OPS: dict[str, torch.library.CustomOpDef] = {fmt: _define(fmt) for fmt in formats.FORMATS}


def sparse_linear(
    fmt: str, x: torch.Tensor, data: list[torch.Tensor], headers: list[int], bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x[..., K] @ W.T + bias through the format's custom op."""
    formats.get(fmt)  # the unknown-format error
    return OPS[fmt](x, data, headers, bias)


def linear(fmt: str, x: torch.Tensor, w: object, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Same, from a compressed weight object (e.g. bitmap.compress(dense))."""
    data, headers = formats.split_tensors(fmt, w.tensors())  # type: ignore[attr-defined]
    return sparse_linear(fmt, x, data, headers, bias)
