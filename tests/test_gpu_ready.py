"""What the first GPU run needs, checked on a CPU: the GPU profiler's device copy casts SparseLinear's values and
bias to the run's dtype (metadata untouched), the bytes one step reads count SparseLinear's biases, and the kernel
tests pick CUDA where present (else the CPU under the interpreter)."""

import os

import pytest
import torch
from torch import nn

from kernels.sparse_linear import SparseLinear
from profilers.gpu import device_copy, weight_copies, weight_read_bytes

FORMATS = {"bitmap": {}, "nm": {"n": 2, "m": 4}, "bsr": {"block": (16, 16)}}


def _weight(fmt: str, out_features: int = 32, in_features: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=g)
    if fmt == "bitmap":
        w[torch.rand(w.shape, generator=g) < 0.7] = 0
    elif fmt == "nm":  # keep the two largest of every four
        groups = w.reshape(out_features, -1, 4)
        keep = groups.abs().topk(2, dim=-1).indices
        w = torch.zeros_like(groups).scatter(-1, keep, groups.gather(-1, keep)).reshape(out_features, in_features)
    else:  # whole 16x16 blocks, every other one
        blocks = w.reshape(out_features // 16, 16, in_features // 16, 16)
        blocks[:, :, 1::2] = 0
    return w


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_device_copy_casts_sparse_values_and_bias_not_metadata(fmt):
    w = _weight(fmt)
    bias = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(1))
    model = nn.Sequential(SparseLinear.from_dense(w, bias, fmt, **FORMATS[fmt]))
    layer = model[0]
    metadata = {name: b.dtype for name, b in layer.named_buffers() if name not in layer.value_buffer_names()}
    assert layer.value_buffer_names() == (f"weight_{type(layer.compressed()).VALUES}", "bias")
    assert all(getattr(layer, n).dtype == torch.float32 for n in layer.value_buffer_names())

    copied = device_copy(model, torch.device("cpu"), torch.bfloat16)
    moved = copied[0]
    assert all(getattr(moved, n).dtype == torch.bfloat16 for n in moved.value_buffer_names())
    assert {name: b.dtype for name, b in moved.named_buffers() if name not in moved.value_buffer_names()} == metadata
    assert all(getattr(layer, n).dtype == torch.float32 for n in layer.value_buffer_names())  # original untouched

    x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    y = copied(x)  # fp32 values against bf16 activations would raise UnsupportedShape here
    assert y.dtype == torch.bfloat16
    expect = torch.nn.functional.linear(x.float(), w.to(torch.bfloat16).float(), bias.to(torch.bfloat16).float())
    torch.testing.assert_close(y.float(), expect, atol=6e-2, rtol=1.6e-2)


class _Model(nn.Module):
    """An untied embedding, one SparseLinear, an output head: what weight_read_bytes and weight_copies expect."""

    def __init__(self, layer: SparseLinear) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, layer.in_features)
        self.layer = layer
        self.head = nn.Linear(layer.out_features, 10, bias=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def test_weight_read_bytes_counts_sparse_biases_and_copies_own_them():
    w = _weight("bitmap")
    bias = torch.randn(w.shape[0])
    with_bias = _Model(SparseLinear.from_dense(w, bias, "bitmap"))
    without = _Model(SparseLinear.from_dense(w, None, "bitmap"))
    head = with_bias.head.weight.numel() * 4
    assert weight_read_bytes(without) == without.layer.weight_nbytes + head
    assert weight_read_bytes(with_bias) == weight_read_bytes(without) + bias.numel() * bias.element_size()
    first, second = weight_copies(with_bias, 2)
    assert first.layer.bias.data_ptr() != second.layer.bias.data_ptr()
    assert torch.equal(first.layer.bias, second.layer.bias)


def test_kernel_tests_pick_cuda_unless_interpreted():
    from .kernel_checks import DEVICE, kernel_test_device

    assert kernel_test_device(True, None) == torch.device("cuda")
    assert kernel_test_device(True, "1") == torch.device("cpu")
    assert kernel_test_device(False, None) == torch.device("cpu")
    assert DEVICE == kernel_test_device(torch.cuda.is_available(), os.environ.get("TRITON_INTERPRET"))


def test_kernel_test_data_is_drawn_on_cpu_and_lands_on_the_default_device():
    """What the kernel tests do on a GPU, with the meta device standing in for CUDA: data drawn from CPU
    generators (the same numbers everywhere), returned on the default device; tensors made in the test follow it."""
    from .kernel_checks import default_device, generated_on_cpu

    @generated_on_cpu
    def draw(seed: int) -> torch.Tensor:
        return torch.randn(4, generator=torch.Generator().manual_seed(seed))

    on_cpu = draw(0)
    with default_device(torch.device("meta")):
        elsewhere = draw(0)
        made_here = torch.zeros(3)
    assert on_cpu.device.type == "cpu" and elsewhere.device.type == "meta" and made_here.device.type == "meta"
    assert torch.get_default_device().type == "cpu" and torch.equal(draw(0), on_cpu)


def test_kernel_tests_use_the_device_fixture():
    """Every kernel test module runs its tests under `kernel_device` (pytestmark) and draws its data through a
    generated_on_cpu helper."""
    from pathlib import Path

    here = Path(__file__).parent
    for name in ("test_kernels_bitmap.py", "test_kernels_nm.py", "test_kernels_bsr.py", "test_sparse_linear.py"):
        text = (here / name).read_text()
        assert 'pytestmark = pytest.mark.usefixtures("kernel_device")' in text, name
        assert "@generated_on_cpu" in text, name
