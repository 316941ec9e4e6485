"""Bitmap format: exact round trips, the torch reference against a dense matmul, the Triton kernel (interpreted
without a GPU) against the reference, split-K, the custom op, and UnsupportedShape on bad input."""

import pytest
import torch
import torch.nn.functional as F

from kernels import bitmap, formats, ops, splitk
from kernels.errors import UnsupportedShape

from .kernel_checks import generated_on_cpu, kernel_device, on_cpu  # noqa: F401 (fixtures)

# On CUDA (compiled kernels) where present and TRITON_INTERPRET is unset, else on the CPU under the interpreter.
pytestmark = pytest.mark.usefixtures("kernel_device")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (7, 33), (65, 100), (128, 96)]
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
@pytest.mark.parametrize("density", [0.0, 0.3, 0.7, 1.0])
def test_round_trip_is_bitwise(dtype, shape, density):
    w = sparse(shape, density, dtype)
    c = bitmap.compress(w)
    assert c.nnz == int((w != 0).sum())
    back = bitmap.decompress(c)
    assert back.dtype == dtype and back.shape == w.shape
    assert torch.equal(back.view(INT_VIEW[dtype]), w.view(INT_VIEW[dtype]))
    again = bitmap.BitmapWeight.from_tensors(c.tensors())
    assert torch.equal(bitmap.decompress(again).view(INT_VIEW[dtype]), w.view(INT_VIEW[dtype]))


def test_signed_zero_and_nan_survive():
    w = torch.tensor([[0.0, -0.0, float("nan"), 1.5], [-0.0, 0.0, 0.0, -2.0]], dtype=torch.float16)
    back = bitmap.decompress(bitmap.compress(w))
    assert torch.equal(back.view(torch.int16), w.view(torch.int16))


def test_storage_is_smaller_than_dense_when_sparse():
    w = sparse((256, 256), 0.3, torch.float16)
    c = bitmap.compress(w)
    dense_bytes = w.numel() * w.element_size()
    # 30 % values (0.6 B/elem) + the bitmap (1/8 B/elem) + a 4-byte offset per 16x64 tile
    assert c.nbytes < 0.75 * dense_bytes
    assert c.nbytes == sum(t.numel() * t.element_size() for t in (c.bitmap, c.offsets, c.values))


def test_custom_tile():
    w = sparse((40, 70), 0.5, torch.float32)
    c = bitmap.compress(w, tile=(32, 32))
    assert c.tile == (32, 32) and c.tiles == (2, 3)
    assert torch.equal(bitmap.decompress(c), w)
    x = torch.randn(3, 70)
    torch.testing.assert_close(bitmap.triton_matmul(x, c), bitmap.reference_matmul(x, c))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_dense(dtype, shape):
    w = sparse(shape, 0.4, dtype, seed=1)
    x = torch.randn(2, 5, shape[1]).to(dtype)
    b = torch.randn(shape[0]).to(dtype)
    c = bitmap.compress(w)
    torch.testing.assert_close(bitmap.reference_matmul(x, c, b), F.linear(x, w, b), rtol=0, atol=0)
    assert_close_to(bitmap.reference_matmul(x, c), x, w, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 17])
def test_triton_matches_reference(dtype, shape, m):
    w = sparse(shape, 0.5, dtype, seed=m)
    c = bitmap.compress(w)
    x = torch.randn(m, shape[1]).to(dtype)
    b = torch.randn(shape[0]).to(dtype)
    y = bitmap.triton_matmul(x, c, b)
    assert_close_to(y, x, w, b)
    ref = bitmap.reference_matmul(x, c, b)
    torch.testing.assert_close(y, ref, rtol=2 * EPS[dtype], atol=2 * EPS[dtype] * ref.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split_k", [2, 3, 7])
def test_split_k(dtype, split_k):
    shape = (33, 300)  # 5 K tiles of 64: splits of 2, 1 (and 7 → 5 splits of one tile)
    w = sparse(shape, 0.6, dtype, seed=split_k)
    c = bitmap.compress(w)
    x = torch.randn(2, 3, shape[1]).to(dtype)
    b = torch.randn(shape[0]).to(dtype)
    y = bitmap.triton_matmul(x, c, b, split_k=split_k)
    assert y.shape == (2, 3, 33)
    assert_close_to(y, x, w, b)
    torch.testing.assert_close(y, bitmap.triton_matmul(x, c, b, split_k=1), rtol=2 * EPS[dtype], atol=1e-2)


def test_all_zero_and_empty_inputs():
    c = bitmap.compress(torch.zeros(20, 70, dtype=torch.float16))
    assert c.nnz == 0
    x = torch.randn(4, 70, dtype=torch.float16)
    b = torch.randn(20, dtype=torch.float16)
    assert torch.equal(bitmap.triton_matmul(x, c, b), b.expand(4, 20))
    assert bitmap.triton_matmul(x[:0], c).shape == (0, 20)
    no_k = bitmap.compress(torch.zeros(5, 0))
    assert torch.equal(bitmap.triton_matmul(torch.randn(3, 0), no_k, torch.ones(5)), torch.ones(3, 5))


def test_prefill_sized_m():
    """M beyond one 64-row block: several programs along M."""
    w = sparse((16, 40), 0.5, torch.float16)
    x = torch.randn(70, 40).half()
    assert_close_to(bitmap.triton_matmul(x, bitmap.compress(w)), x, w, None)


def test_non_contiguous_x():
    w = sparse((24, 40), 0.5, torch.float32)
    c = bitmap.compress(w)
    x = torch.randn(40, 6).t()  # strides (1, 6)
    torch.testing.assert_close(bitmap.triton_matmul(x, c), F.linear(x, w))


def test_custom_op_matches_reference_and_opchecks():
    w = sparse((19, 45), 0.5, torch.float32)
    c = bitmap.compress(w)
    x = torch.randn(2, 4, 45)
    b = torch.randn(19)
    y = ops.linear("bitmap", x, c, b)
    torch.testing.assert_close(y, bitmap.reference_matmul(x, c, b))
    data, headers = formats.split_tensors("bitmap", c.tensors())
    torch.library.opcheck(torch.ops.sparsity_allocator.bitmap_linear.default, (x, data, headers, b))
    torch.library.opcheck(torch.ops.sparsity_allocator.bitmap_linear.default, (x[0, :1], data, headers, None))


def test_backend_names():
    assert ops.backend("cpu") == ("triton" if ops.INTERPRETED else "torch-reference")
    assert ops.backend(torch.device("meta")) == "torch-reference"


def test_unsupported_inputs_name_the_value():
    with pytest.raises(UnsupportedShape, match=r"\(2, 3, 4\)"):
        bitmap.compress(torch.zeros(2, 3, 4))
    with pytest.raises(UnsupportedShape, match="torch.int32"):
        bitmap.compress(torch.zeros(4, 4, dtype=torch.int32))
    with pytest.raises(UnsupportedShape, match="tile_k=48"):
        bitmap.compress(torch.zeros(4, 4), tile=(16, 48))
    with pytest.raises(UnsupportedShape, match="tile_n=8"):
        bitmap.compress(torch.zeros(4, 4), tile=(8, 64))
    c = bitmap.compress(torch.randn(8, 12))
    with pytest.raises(UnsupportedShape, match="in_features=12"):
        bitmap.triton_matmul(torch.randn(3, 13), c)
    with pytest.raises(UnsupportedShape, match="in_features=12"):
        bitmap.reference_matmul(torch.randn(3, 13), c)
    with pytest.raises(UnsupportedShape, match="torch.float16"):
        bitmap.triton_matmul(torch.randn(3, 12, dtype=torch.float16), c)
    with pytest.raises(UnsupportedShape, match="torch.int64"):
        bitmap.triton_matmul(torch.ones(3, 12, dtype=torch.int64), c)
    with pytest.raises(UnsupportedShape, match=r"\(9,\)"):
        bitmap.triton_matmul(torch.randn(3, 12), c, torch.randn(9))
    with pytest.raises(UnsupportedShape, match="split_k=0"):
        bitmap.triton_matmul(torch.randn(3, 12), c, split_k=0)
    bad = c.tensors()
    bad["offsets"] = bad["offsets"][:-1]
    with pytest.raises(UnsupportedShape, match="offsets"):
        bitmap.BitmapWeight.from_tensors(bad)
    bad = c.tensors()
    bad["shape"] = torch.tensor([40, 12])
    with pytest.raises(UnsupportedShape, match=r"\(40, 12\)"):
        bitmap.BitmapWeight.from_tensors(bad)


def test_cpu_without_interpreter_runs_the_reference(monkeypatch, on_cpu):
    """How a CPU-only deployment runs: Triton has no CPU backend, so the op falls back to the torch reference."""
    w = sparse((10, 70), 0.5, torch.float16)
    c = bitmap.compress(w)
    x = torch.randn(3, 70, dtype=torch.float16)
    monkeypatch.setattr(ops, "INTERPRETED", False)
    monkeypatch.setattr(bitmap, "INTERPRETED", False)
    assert ops.backend("cpu") == "torch-reference" and ops.backend("cuda:0") == "triton"
    assert torch.equal(ops.linear("bitmap", x, c), bitmap.reference_matmul(x, c))
    with pytest.raises(RuntimeError, match="reference_matmul"):
        bitmap.triton_matmul(x, c)


@pytest.mark.parametrize("module", ["bitmap", "nm", "bsr"])
def test_the_kernels_share_their_input_checks(module):
    """Bitmap, N:M and BSR refuse the same bad calls with the same words (kernels.errors), bar the caller's name."""
    from kernels import bsr, nm

    w = torch.zeros(16, 32, dtype=torch.float16)
    w[:, ::4] = 1.0  # 1:4, so every format compresses it
    mod = {"bitmap": bitmap, "nm": nm, "bsr": bsr}[module]
    c = nm.compress(w, 2, 4) if module == "nm" else mod.compress(w)
    x = torch.zeros(2, 32, dtype=torch.float16)
    bad = [(torch.zeros(2, 31, dtype=torch.float16), None), (torch.zeros(2, 32), None),
           (torch.zeros(2, 32, dtype=torch.int64), None), (x, torch.zeros(5, dtype=torch.float16))]
    for fn in (mod.reference_matmul, mod.triton_matmul):
        for xs, bias in bad:
            with pytest.raises(UnsupportedShape) as err:
                fn(xs, c, bias)
            assert str(err.value).startswith(f"{module}.{fn.__name__}: ")
            assert str(err.value).split(": ", 1)[1] == _shared_message(xs, c, bias)
    with pytest.raises(RuntimeError, match="several devices"):
        mod.triton_matmul(x, c, torch.zeros(16, dtype=torch.float16, device="meta"))


def _shared_message(x: torch.Tensor, w: object, bias: torch.Tensor | None) -> str:
    from kernels.errors import check_linear_call

    with pytest.raises(UnsupportedShape) as err:
        check_linear_call("where", x, w, bias)
    return str(err.value).split(": ", 1)[1]


def test_bias_of_another_dtype():
    """The shared check admits any float bias (as N:M and BSR do): the kernel adds it in fp32, the reference in x's
    dtype."""
    w = sparse((24, 70), 0.5, torch.float16)
    c = bitmap.compress(w)
    x = torch.randn(20, 70).to(torch.float16)
    b = torch.randn(24)
    y = bitmap.triton_matmul(x, c, b)
    assert_close_to(y, x, w, b)
    torch.testing.assert_close(y, bitmap.reference_matmul(x, c, b), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_k_is_reduced_in_the_launch_deterministically(dtype):
    """Split-K partials are added by the last split of each tile in the same launch: repeated calls agree bit for
    bit, the arrival counts are back to zero after each launch, and the result matches the reference."""
    w = sparse((40, 640), 0.5, dtype, seed=4)  # 10 K tiles
    c = bitmap.compress(w)
    x = torch.randn(3, 640).to(dtype)
    b = torch.randn(40).to(dtype)
    first = bitmap.triton_matmul(x, c, b, split_k=4)
    assert torch.equal(first, bitmap.triton_matmul(x, c, b, split_k=4))
    assert all(int(counts.abs().sum()) == 0 for counts in splitk.COUNTS.values())
    assert_close_to(first, x, w, b)
    plan = bitmap.launch_plan(3, c.tiles, None, split_k=4)
    bufs = bitmap.buffers(plan, 3, 40, dtype, x.device)
    assert plan.split == 4 and bufs.workspace.shape == (4, 3, 40) and bufs.workspace.dtype == torch.float32
    assert bufs.counts.dtype == torch.int32 and bufs.counts.numel() >= plan.grid[0] * plan.grid[1]


def test_version_1_tensors_still_load():
    """Exports written by bitmap format version 1 (row-major words, one offset per tile) convert on load to
    version 2 (word-major tiles, one offset per tile row) and decompress and multiply the same."""
    w = sparse((37, 150), 0.4, torch.float16, seed=3)
    c = bitmap.compress(w)
    tn = c.tile[0]
    v1 = {"shape": torch.tensor(w.shape), "bitmap": c.bitmap.transpose(2, 3).contiguous(),
          "offsets": torch.cat([c.offsets[:-1:tn], c.offsets[-1:]]), "values": c.values}
    assert v1["offsets"].shape[0] == c.tiles[0] * c.tiles[1] + 1
    back = bitmap.BitmapWeight.from_tensors(v1)
    assert torch.equal(back.bitmap, c.bitmap) and torch.equal(back.offsets, c.offsets)
    assert torch.equal(bitmap.decompress(back), w)


@pytest.mark.parametrize("m", [1, 2, 16])
def test_offsets_are_per_tile_row_and_every_path_is_exact(m):
    """Offsets index each tile row's first value; the one-row (multiply-add) and tl.dot paths agree with the
    reference on an irregular shape that leaves partial tiles on both axes."""
    w = sparse((29, 97), 0.3, torch.float32, seed=m)
    c = bitmap.compress(w)
    tn, tk = c.tile
    rows = torch.nn.functional.pad(w, (0, -97 % tk, 0, -29 % tn)) != 0
    per_row = rows.reshape(c.tiles[0], tn, c.tiles[1], tk).transpose(1, 2).sum(-1).flatten()
    assert c.offsets.tolist() == [0, *per_row.cumsum(0).tolist()]
    x = torch.randn(m, 97)
    assert bitmap.launch_plan(m, c.tiles, None).use_dot == (m > 1)
    torch.testing.assert_close(bitmap.triton_matmul(x, c), bitmap.reference_matmul(x, c), rtol=1e-5, atol=1e-5)
