"""Block-sparse (BSR) format and kernel: exact round trips, the blockwise torch reference against dense, the Triton
kernel (interpreted without a GPU) against the reference, and UnsupportedShape for what it does not handle."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from kernels import bsr
from kernels.errors import UnsupportedShape

from .kernel_checks import DTYPES, close, generated_on_cpu, kernel_device, on_cpu, same_bits  # noqa: F401

# On CUDA (compiled kernels) where present and TRITON_INTERPRET is unset, else on the CPU under the interpreter.
pytestmark = pytest.mark.usefixtures("kernel_device")



@generated_on_cpu
def block_weight(rows: int, cols: int, block: tuple[int, int], dtype: torch.dtype, keep: float = 0.5,
                 seed: int = 0) -> torch.Tensor:
    """Random weight whose blocks are kept with probability `keep`; kept blocks also hold scattered zeros (so a
    block is dropped only when all of it is zero). Dropped entries are +0.0, so round trips are bitwise."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen).to(dtype)
    w = torch.where(torch.rand(rows, cols, generator=gen) < 0.2, torch.zeros((), dtype=dtype), w)
    kept = torch.rand(rows // block[0], cols // block[1], generator=gen) < keep
    mask = kept.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return torch.where(mask, w, torch.zeros((), dtype=dtype))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [(16, 16), (32, 16), (16, 32)])
@pytest.mark.parametrize("shape", [(48, 64), (96, 32)])
def test_round_trip_is_bitwise(shape, block, dtype):
    if shape[0] % block[0] or shape[1] % block[1]:  # (48, 64) in (32, 16) blocks: refused, naming both
        with pytest.raises(UnsupportedShape, match=rf"shape \({shape[0]}, {shape[1]}\) is not a multiple of "
                                                   rf"block \({block[0]}, {block[1]}\)"):
            bsr.compress(torch.zeros(shape, dtype=dtype), block)
        return
    for keep in (0.0, 0.5, 1.0):  # all zero, partial, every block stored
        w = block_weight(*shape, block, dtype, keep=keep)
        c = bsr.compress(w, block)
        total = (shape[0] // block[0]) * (shape[1] // block[1])
        assert c.nnz_blocks == {0.0: 0, 1.0: total}.get(keep, c.nnz_blocks)
        assert c.row_ptr.tolist()[-1] == c.nnz_blocks == c.col_idx.numel()
        assert same_bits(bsr.decompress(c), w)


def test_layout_and_nbytes():
    w = torch.zeros(48, 64, dtype=torch.float16)
    w[0, 20] = 1.0  # block (0, 1)
    w[40, 63] = 2.0  # block (2, 3)
    w[36, 0] = 3.0  # block (2, 0)
    c = bsr.compress(w, (16, 16))
    assert c.row_ptr.tolist() == [0, 1, 1, 3] and c.col_idx.tolist() == [1, 0, 3]
    assert c.blocks[0, 0, 4] == 1.0 and c.blocks[1, 4, 0] == 3.0 and c.blocks[2, 8, 15] == 2.0
    assert c.nbytes == 3 * 16 * 16 * 2 + 4 * 4 + 3 * 4
    assert c.density == 3 / 12


def test_tensors_round_trip_through_safetensors(tmp_path, on_cpu):
    w = block_weight(96, 32, (32, 16), torch.bfloat16)
    c = bsr.compress(w, (32, 16))
    t = c.tensors()
    assert t["block"].tolist() == [32, 16] and t["shape"].dtype == torch.int64
    save_file({k: v.contiguous() for k, v in t.items()}, tmp_path / "w.safetensors")
    back = bsr.BSRWeight.from_tensors(load_file(tmp_path / "w.safetensors"))
    assert back.shape == (96, 32) and back.block == (32, 16)
    assert same_bits(bsr.decompress(back), w)
    broken = t["row_ptr"].clone()
    broken[1] = broken[-1] + 1
    with pytest.raises(UnsupportedShape, match="row_ptr must rise"):
        bsr.BSRWeight.from_tensors({**t, "row_ptr": broken})
    with pytest.raises(UnsupportedShape, match="col_idx must lie"):
        bsr.BSRWeight.from_tensors({**t, "col_idx": t["col_idx"] + 2})


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_dense(dtype):
    w = block_weight(96, 32, (32, 16), dtype, seed=1)
    c = bsr.compress(w, (32, 16))
    x = torch.randn(2, 5, 32).to(dtype)
    bias = torch.randn(96).to(dtype)
    got = bsr.reference_matmul(x, c, bias)
    assert got.dtype == dtype and got.shape == (2, 5, 96)
    expect = (x.float() @ w.float().T + bias.float()).to(dtype)
    close(got, expect)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block,shape", [((16, 16), (48, 64)), ((32, 16), (96, 32))])
def test_triton_matches_reference(block, shape, dtype):
    w = block_weight(*shape, block, dtype, keep=0.6, seed=2)
    c = bsr.compress(w, block)
    bias = torch.randn(shape[0]).to(dtype)
    for rows in (1, 5, 33):
        x = torch.randn(rows, shape[1]).to(dtype)
        b = bias if rows != 5 else None
        got = bsr.triton_matmul(x, c, b)
        assert got.dtype == dtype and got.shape == (rows, shape[0])
        close(got, bsr.reference_matmul(x, c, b))


def test_triton_configs_batched_strided_and_empty():
    w = block_weight(64, 128, (16, 32), torch.float16, keep=0.7, seed=3)
    c = bsr.compress(w, (16, 32))
    x = torch.randn(3, 7, 128).to(torch.float16)
    expect = bsr.reference_matmul(x, c)
    for cfg in (None, {"BLOCK_M": 32, "GROUP": 1}, {"BLOCK_M": 16, "GROUP": 4}):
        close(bsr.triton_matmul(x, c, config=cfg), expect)
    xt = torch.randn(128, 4).to(torch.float16).T
    close(bsr.triton_matmul(xt, c), bsr.reference_matmul(xt, c))
    zero = bsr.compress(torch.zeros(32, 64, dtype=torch.float16))
    bias = torch.randn(32).to(torch.float16)
    assert torch.equal(bsr.triton_matmul(torch.randn(2, 64).to(torch.float16), zero, bias), bias.expand(2, 32))
    with pytest.raises(UnsupportedShape, match=r"GROUP a power of two"):
        bsr.triton_matmul(x, c, config={"BLOCK_M": 16, "GROUP": 3})


def test_errors_name_value_and_constraint():
    with pytest.raises(UnsupportedShape, match=r"shape \(50, 64\) is not a multiple of block \(16, 16\)"):
        bsr.compress(torch.zeros(50, 64))
    for block, match in (((8, 16), "got 8"), ((16, 24), "got 24"), ((256, 16), "got 256"), ((16,), "pair")):
        with pytest.raises(UnsupportedShape, match=match):
            bsr.compress(torch.zeros(64, 64), block)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedShape, match=r"dtype torch.int8"):
        bsr.compress(torch.zeros(32, 32, dtype=torch.int8))
    with pytest.raises(UnsupportedShape, match=r"2-D"):
        bsr.compress(torch.zeros(2, 32, 32))
    c = bsr.compress(block_weight(48, 64, (16, 16), torch.float16))
    for fn in (bsr.reference_matmul, bsr.triton_matmul):
        with pytest.raises(UnsupportedShape, match=r"x last dim \(60,\) must equal in_features=64"):
            fn(torch.zeros(2, 60, dtype=torch.float16), c)
        with pytest.raises(UnsupportedShape, match=r"x dtype torch.int32"):
            fn(torch.zeros(2, 64, dtype=torch.int32), c)
        with pytest.raises(UnsupportedShape, match=r"differs from the weight's"):
            fn(torch.zeros(2, 64, dtype=torch.bfloat16), c)


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch, on_cpu):
    c = bsr.compress(block_weight(32, 32, (16, 16), torch.float16, keep=1.0))
    monkeypatch.setattr(bsr, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match=r"CUDA"):
        bsr.triton_matmul(torch.zeros(1, 32, dtype=torch.float16), c)


def test_cuda_config_pruning():
    configs = bsr._cuda_configs()
    assert all(c.num_stages >= 3 for c in configs)
    for bc in (16, 32, 64, 128):
        for m_bucket in (1, 16, 256, 1024):
            kept = bsr._prune(configs, {"M_BUCKET": m_bucket}, BC=bc)
            assert kept and all(16 <= c.kwargs["GROUP"] * bc for c in kept)
            assert all(c.kwargs["BLOCK_M"] <= max(16, m_bucket) for c in kept)
