"""Errors raised by the sparse formats and kernels, and the input checks the bitmap, N:M and BSR kernels share."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class UnsupportedShape(ValueError):
    """A kernel or format got a shape, dtype or pattern it does not handle. The message names the offending value
    and the constraint, so nothing runs silently on input it would compute wrongly."""


def check_linear_call(where: str, x: torch.Tensor, w, bias: torch.Tensor | None) -> None:
    """x[..., in_features] of the weight's dtype, and a bias vector of out_features, or UnsupportedShape."""
    if x.dtype not in FLOAT_DTYPES:
        raise UnsupportedShape(f"{where}: x dtype {x.dtype} is not supported; fp16, bf16 or fp32 only")
    if x.dtype != w.dtype:
        raise UnsupportedShape(f"{where}: x dtype {x.dtype} differs from the weight's {w.dtype}")
    if x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise UnsupportedShape(f"{where}: x last dim {tuple(x.shape)[-1:] or '(scalar)'} must equal "
                               f"in_features={w.shape[1]} of weight shape {w.shape}")
    if bias is not None:
        if bias.dtype not in FLOAT_DTYPES or tuple(bias.shape) != (w.shape[0],):
            raise UnsupportedShape(f"{where}: bias must be a float vector of shape ({w.shape[0]},), got "
                                   f"{bias.dtype} {tuple(bias.shape)}")


def check_kernel_device(where: str, fmt: str, interpreted: bool, x: torch.Tensor, *tensors: torch.Tensor | None) -> None:
    """All tensors on one device, and one the Triton kernel can run on: CUDA, or CPU in Triton's interpreter."""
    devices = {t.device for t in (x, *tensors) if t is not None}
    if len(devices) > 1:
        raise RuntimeError(f"{where}: tensors on several devices {sorted(map(str, devices))}; move them to one")
    if interpreted:
        if x.device.type != "cpu":
            raise RuntimeError(f"{where}: Triton's interpreter (TRITON_INTERPRET=1) runs on CPU tensors, x is on "
                               f"{x.device}")
    elif x.device.type != "cuda":
        raise RuntimeError(f"{where}: x is on {x.device}; the Triton kernel runs on CUDA tensors, or on CPU in "
                           f"Triton's interpreter (set TRITON_INTERPRET=1 before kernels.{fmt} is imported), or use "
                           f"{fmt}.reference_matmul")


def check_layout_args(where: str, shape: tuple[int, int], kept: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(rows, cols, bytes per value) of a `stored_nbytes` / `dot_elements` call, or UnsupportedShape: a 2-D
    (out_features, in_features) shape, 0 <= kept <= its elements, a float dtype the formats store."""
    if len(shape) != 2 or any(isinstance(v, bool) or int(v) != v or v < 0 for v in shape):
        raise UnsupportedShape(f"{where}: shape={shape!r} must be (out_features, in_features), non-negative ints")
    rows, cols = int(shape[0]), int(shape[1])
    if isinstance(kept, bool) or int(kept) != kept or not 0 <= kept <= rows * cols:
        raise UnsupportedShape(f"{where}: kept={kept!r} must be an int in [0, {rows * cols}] for shape {(rows, cols)}")
    if dtype not in FLOAT_DTYPES:
        raise UnsupportedShape(f"{where}: dtype {dtype} is not supported; fp16, bf16 or fp32 only")
    return rows, cols, dtype.itemsize
