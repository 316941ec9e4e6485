"""Errors raised by the sparse formats and kernels, and the input checks the N:M and BSR kernels share."""

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
