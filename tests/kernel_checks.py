"""What the kernel tests share: tolerances per output dtype, bitwise equality, and the device they run on."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

import pytest
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


# The device the kernel tests run on: CUDA (the compiled kernels) where present and TRITON_INTERPRET is unset, else
# the CPU under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 on a machine without CUDA).
def kernel_test_device(cuda_available: bool, interpret: str | None) -> torch.device:
    return torch.device("cuda" if cuda_available and not interpret else "cpu")


DEVICE = kernel_test_device(torch.cuda.is_available(), os.environ.get("TRITON_INTERPRET"))


@contextlib.contextmanager
def default_device(device: torch.device) -> Iterator[torch.device]:
    """torch's default device set to `device` inside, restored after."""
    previous = torch.get_default_device()
    torch.set_default_device(device)
    try:
        yield device
    finally:
        torch.set_default_device(previous)


@pytest.fixture
def kernel_device(request):
    """Tensors a test creates without naming a device land on DEVICE (torch's default device for the test), unless
    the test asks for the `on_cpu` fixture (a CPU-only behaviour: the torch-reference fallback, a file round trip)."""
    with default_device(torch.device("cpu") if "on_cpu" in request.fixturenames else DEVICE) as device:
        yield device


@pytest.fixture
def on_cpu():
    """Requested by tests that check CPU behaviour: their tensors stay on the CPU whatever DEVICE is."""
    return torch.device("cpu")


def generated_on_cpu(make: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap a test-data helper: it draws on the CPU (CPU generators, so the data is the same on every machine) and
    returns its tensor on torch's current default device (DEVICE inside `kernel_device`)."""

    @functools.wraps(make)
    def wrapper(*args, **kwargs) -> torch.Tensor:
        target = torch.get_default_device()
        with torch.device("cpu"):
            out = make(*args, **kwargs)
        return out.to(target)

    return wrapper
