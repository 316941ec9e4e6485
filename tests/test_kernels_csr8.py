"""CSR8 format: exact round trips, stored bytes from the layout alone, the torch reference against a dense matmul, the
Triton kernel (interpreted without a GPU) against the reference at decode and batch sizes, split-K, the custom op,
and UnsupportedShape on bad input."""

import pytest
import torch
import torch.nn.functional as F

from kernels import csr8, formats, ops
from kernels.errors import UnsupportedShape

from .kernel_checks import generated_on_cpu, kernel_device  # noqa: F401 (fixtures)

# On CUDA (compiled kernels) where present and TRITON_INTERPRET is unset, else on the CPU under the interpreter.
pytestmark = pytest.mark.usefixtures("kernel_device")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (7, 33), (37, 300), (64, 515)]  # K below, at and across 256-column segments; rows past a group
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
EPS = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@generated_on_cpu
def sparse(shape: tuple[int, int], density: float, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w[torch.rand(shape, generator=g) >= density] = 0
    return w.to(dtype)


def assert_close_to(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """y within a few output ulps of the fp64 product, scaled by the magnitudes that enter each sum."""
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    scale = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    assert y.dtype == x.dtype and y.shape == exact.shape
    err = (y.double() - exact).abs()
    bound = 2 * EPS[x.dtype] * (scale + 1e-3)
    assert bool((err <= bound).all()), f"max err {err.max().item()} (bound there {bound.flatten()[err.argmax()]})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_round_trip_is_bitwise_and_bytes_follow_the_layout(dtype, shape, density):
    w = sparse(shape, density, dtype)
    c = csr8.compress(w)
    nnz = int((w != 0).sum())
    assert c.nbytes == csr8.stored_nbytes(shape, nnz, dtype) == formats.stored_nbytes("csr8", shape, nnz, dtype)
    offsets = c.offsets.tolist()
    assert offsets[0] == 0 and all(o % csr8.VEC == 0 for o in offsets) and offsets == sorted(offsets)
    assert offsets[-1] <= c.values.numel() and int(c.values[offsets[-1]:].abs().sum()) == 0
    back = csr8.decompress(csr8.CSR8Weight.from_tensors(c.tensors()))
    assert back.dtype == dtype and back.shape == w.shape
    assert torch.equal(back.view(INT_VIEW[dtype]), w.view(INT_VIEW[dtype]))


def test_signed_zero_and_nan_survive_and_columns_are_in_segment():
    w = torch.zeros(2, 600, dtype=torch.float16)
    w[0, [0, 255, 256, 599]] = torch.tensor([-0.0, float("nan"), 1.5, -2.0], dtype=torch.float16)
    w[1, 300] = 3.0
    c = csr8.compress(w)
    assert torch.equal(csr8.decompress(c).view(torch.int16), w.view(torch.int16))
    # Row 0: segment 0 holds columns 0 and 255 (+2 padding), segment 1 column 0 (256), segment 2 column 87 (599).
    assert c.offsets.tolist() == [0, 4, 8, 12, 12, 16, 16]
    assert c.cols[:12].tolist() == [0, 255, 0, 0, 0, 0, 0, 0, 87, 0, 0, 0] and c.cols[12].item() == 44


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_dense(dtype, shape):
    w = sparse(shape, 0.4, dtype, seed=1)
    x = torch.randn(2, 5, shape[1]).to(dtype)
    b = torch.randn(shape[0]).to(dtype)
    c = csr8.compress(w)
    torch.testing.assert_close(csr8.reference_matmul(x, c, b), F.linear(x, w, b), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 17])
def test_triton_matches_reference(dtype, shape, m):
    w = sparse(shape, 0.3, dtype, seed=m)
    c = csr8.compress(w)
    x = torch.randn(m, shape[1]).to(dtype)
    b = torch.randn(shape[0]).to(dtype)
    y = csr8.triton_matmul(x, c, b)
    assert_close_to(y, x, w, b)
    ref = csr8.reference_matmul(x, c, b)
    torch.testing.assert_close(y, ref, rtol=2 * EPS[dtype], atol=2 * EPS[dtype] * ref.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split_k", [2, 3, 7])
@pytest.mark.parametrize("lead", [(1,), (2, 3)])  # one row of x: 4 lanes per row of W; six: one lane per row
def test_split_k_is_reduced_in_the_launch(dtype, split_k, lead):
    shape = (33, 1100)  # 5 segments: splits of 3 + 2, 2 + 2 + 1, and 7 → 5 splits of one segment
    w = sparse(shape, 0.2, dtype, seed=split_k)
    c = csr8.compress(w)
    x = torch.randn(*lead, shape[1]).to(dtype)
    b = torch.randn(shape[0]).to(dtype)
    y = csr8.triton_matmul(x, c, b, split_k=split_k)
    assert y.shape == (*lead, 33)
    assert_close_to(y, x, w, b)
    again = csr8.triton_matmul(x, c, b, split_k=split_k)
    assert torch.equal(y, again)  # partials added in split order: deterministic
    m = x.numel() // shape[1]
    plan = csr8.launch_plan(m, 33, 1100, None, split_k)
    assert plan.split == min(split_k, 5) and plan.segs_per_split * (plan.split - 1) < 5
    assert plan.lanes == (csr8.DECODE_LANES if m == 1 else 1) and plan.grid[1] == -(-33 // plan.rows)


def test_all_zero_empty_and_non_contiguous_inputs():
    c = csr8.compress(torch.zeros(20, 70, dtype=torch.float16))
    x = torch.randn(4, 70, dtype=torch.float16)
    b = torch.randn(20, dtype=torch.float16)
    assert torch.equal(csr8.triton_matmul(x, c, b), b.expand(4, 20))
    assert csr8.triton_matmul(x[:0], c).shape == (0, 20)
    no_k = csr8.compress(torch.zeros(5, 0))
    assert torch.equal(csr8.triton_matmul(torch.randn(3, 0), no_k, torch.ones(5)), torch.ones(3, 5))
    w = sparse((24, 300), 0.5, torch.float32)
    xt = torch.randn(300, 6).t()  # strides (1, 6)
    torch.testing.assert_close(csr8.triton_matmul(xt, csr8.compress(w)), F.linear(xt, w))


def test_custom_op_and_registry():
    w = sparse((40, 300), 0.3, torch.float32)
    c = csr8.compress(w)
    x = torch.randn(2, 300)
    torch.testing.assert_close(ops.linear("csr8", x, c), F.linear(x, w))
    assert formats.format_of(formats.spec("csr8").code) == "csr8"
    assert formats.dot_elements("csr8", (40, 300), 10) == 10 + (csr8.VEC - 1) * 40 * 2


def test_unsupported_inputs_name_the_value():
    with pytest.raises(UnsupportedShape, match="2-D"):
        csr8.compress(torch.zeros(2, 3, 4))
    with pytest.raises(UnsupportedShape, match="int8"):
        csr8.compress(torch.zeros(2, 3, dtype=torch.int8))
    t = csr8.compress(sparse((5, 300), 0.5, torch.float16)).tensors()
    with pytest.raises(UnsupportedShape, match="offsets"):
        csr8.CSR8Weight.from_tensors({**t, "offsets": t["offsets"][:-1]})
    with pytest.raises(UnsupportedShape, match="uint8"):
        csr8.CSR8Weight.from_tensors({**t, "cols": t["cols"].to(torch.int32)})
    with pytest.raises(UnsupportedShape, match="as long as cols"):
        csr8.CSR8Weight.from_tensors({**t, "values": t["values"][:-1]})
    with pytest.raises(UnsupportedShape, match="missing"):
        csr8.CSR8Weight.from_tensors({"shape": t["shape"]})
    with pytest.raises(UnsupportedShape, match="kept"):
        csr8.stored_nbytes((4, 4), 17, torch.float16)
