"""N:M format and kernel: exact round trips, the torch reference against dense, the Triton kernel (interpreted
without a GPU) against the reference, and UnsupportedShape for everything the format does not handle."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from allocator.core.patterns import SparsityPattern
from kernels import nm
from kernels.errors import UnsupportedShape
from profilers.roofline import weight_bytes_per_element

from .kernel_checks import DTYPES, close, generated_on_cpu, kernel_device, on_cpu, same_bits  # noqa: F401

# On CUDA (compiled kernels) where present and TRITON_INTERPRET is unset, else on the CPU under the interpreter.
pytestmark = pytest.mark.usefixtures("kernel_device")



@generated_on_cpu
def nm_weight(rows: int, cols: int, n: int, m: int, dtype: torch.dtype, seed: int = 0,
              full: bool = False) -> torch.Tensor:
    """Random weight obeying n:m, exactly n non-zeros per group if `full`, else 0..n (so padding is exercised).
    Pruned entries are +0.0 (torch.where, not a product that would leave -0.0) so round trips are bitwise."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen).to(dtype)
    w = torch.where(w == 0, torch.ones((), dtype=dtype), w)  # no accidental zeros among the kept
    order = torch.rand(rows, cols // m, m, generator=gen).argsort(-1)
    groups = (rows, cols // m, 1)
    keep_count = torch.full(groups, n) if full else torch.randint(0, n + 1, groups, generator=gen)
    keep = order < keep_count
    return torch.where(keep.reshape(rows, cols), w, torch.zeros((), dtype=dtype))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("shape", [(7, 32), (33, 64), (65, 128)])
def test_round_trip_is_bitwise(shape, n, m, dtype):
    for full in (False, True):
        w = nm_weight(*shape, n, m, dtype, full=full)
        c = nm.compress(w, n, m)
        assert c.values.shape == (shape[0], shape[1] // m * n) and c.indices.dtype == torch.uint8
        assert same_bits(nm.decompress(c), w)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 3), (3, 6)])
def test_all_zero_and_densest_allowed(n, m):
    zero = torch.zeros(5, 6 * m, dtype=torch.float16)
    c = nm.compress(zero, n, m)
    assert same_bits(nm.decompress(c), zero)
    dense_groups = nm_weight(5, 6 * m, n, m, torch.float32, seed=3, full=True)
    assert same_bits(nm.decompress(nm.compress(dense_groups, n, m)), dense_groups)


def test_special_values_and_signed_zero():
    w = torch.tensor([[float("inf"), 0.0, -0.0, -3.5, 0.0, float("-inf"), 0.0, 0.0]], dtype=torch.bfloat16)
    out = nm.decompress(nm.compress(w, 2, 4))
    assert torch.equal(out, w)  # -0.0 among the zeros may come back as +0.0: equal, though not the same bits
    assert torch.isinf(out[0, 0]) and torch.isinf(out[0, 5])


def test_index_packing():
    assert [nm.index_bits(m) for m in (2, 3, 4, 5, 8, 9, 16)] == [1, 2, 2, 4, 4, 4, 4]
    w = nm_weight(3, 40, 2, 4, torch.float16, full=True)  # 20 indices per row: 5 bytes at 2 bits
    c = nm.compress(w, 2, 4)
    assert c.indices.shape == (3, 5)
    c8 = nm.compress(nm_weight(3, 24, 3, 8, torch.float16), 3, 8)  # 9 indices per row at 4 bits: 5 bytes
    assert c8.indices.shape == (3, 5)


def test_nbytes_match_the_roofline_model():
    c = nm.compress(nm_weight(64, 256, 2, 4, torch.float16), 2, 4)
    assert c.nbytes == 64 * 256 * weight_bytes_per_element(SparsityPattern.parse("2:4"), 64, 256) == 64 * 256 * 9 / 8
    c48 = nm.compress(nm_weight(64, 256, 4, 8, torch.float16), 4, 8)
    assert c48.nbytes == 64 * 256 // 2 * 2 + 64 * 256 // 2 // 2  # fp16 values + 4-bit indices
    assert c48.nbytes == 64 * 256 * weight_bytes_per_element(SparsityPattern.parse("4:8"), 64, 256)


def test_tensors_round_trip_through_safetensors(tmp_path, on_cpu):
    w = nm_weight(9, 64, 4, 8, torch.bfloat16)
    c = nm.compress(w, 4, 8)
    t = c.tensors()
    assert t["shape"].dtype == torch.int64 and t["nm"].tolist() == [4, 8]
    save_file({k: v.contiguous() for k, v in t.items()}, tmp_path / "w.safetensors")
    back = nm.NMWeight.from_tensors(load_file(tmp_path / "w.safetensors"))
    assert back.shape == (9, 64) and (back.n, back.m) == (4, 8)
    assert same_bits(nm.decompress(back), w)
    with pytest.raises(UnsupportedShape, match="missing"):
        nm.NMWeight.from_tensors({"values": t["values"]})
    with pytest.raises(UnsupportedShape, match="values shape"):
        nm.NMWeight.from_tensors({**t, "values": t["values"][:, 1:]})


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_dense(dtype):
    w = nm_weight(33, 64, 2, 4, dtype)
    c = nm.compress(w, 2, 4)
    x = torch.randn(2, 5, 64).to(dtype)
    bias = torch.randn(33).to(dtype)
    expect = (x.float() @ w.float().T + bias.float()).to(dtype)
    got = nm.reference_matmul(x, c, bias)
    assert got.dtype == dtype and got.shape == (2, 5, 33)
    close(got, expect)
    close(nm.reference_matmul(x, c), (x.float() @ w.float().T).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m,shape", [(2, 4, (33, 64)), (4, 8, (40, 96))])
def test_triton_matches_reference(n, m, shape, dtype):
    w = nm_weight(*shape, n, m, dtype, seed=1)
    c = nm.compress(w, n, m)
    bias = torch.randn(shape[0]).to(dtype)
    for rows in (1, 5, 33):
        x = torch.randn(rows, shape[1]).to(dtype)
        got = nm.triton_matmul(x, c, bias if rows != 5 else None)
        expect = nm.reference_matmul(x, c, bias if rows != 5 else None)
        assert got.dtype == dtype and got.shape == (rows, shape[0])
        close(got, expect)


def test_triton_split_k_batched_input_and_odd_m():
    # Split K (the decode path on GPU) adds fp32 partial tiles in the same launch; a 3-D x; m = 6 (not a power of
    # two, 8 slots per group with two masked); a transposed (strided) x.
    w = nm_weight(24, 96, 3, 6, torch.float16, seed=2)
    c = nm.compress(w, 3, 6)
    x = torch.randn(2, 3, 96).to(torch.float16)
    bias = torch.randn(24).to(torch.float16)
    expect = nm.reference_matmul(x, c, bias)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 3}
    for got in (nm.triton_matmul(x, c, bias), nm.triton_matmul(x, c, bias, config=cfg)):
        assert got.shape == (2, 3, 24)
        close(got, expect)
    xt = torch.randn(96, 4).to(torch.float16).T  # non-contiguous rows
    close(nm.triton_matmul(xt, c), nm.reference_matmul(xt, c))
    assert nm.triton_matmul(x[:0], c).shape == (0, 3, 24)


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_k_is_reduced_in_the_launch_deterministically(dtype):
    """The last split of each output tile adds the partials (and the bias) in the same launch: repeated calls agree
    bit for bit, the arrival counts are zero again after each launch, and the result matches the reference."""
    from kernels import splitk

    w = nm_weight(40, 256, 2, 4, dtype, seed=5)
    c = nm.compress(w, 2, 4)
    x = torch.randn(5, 256).to(dtype)
    bias = torch.randn(40).to(dtype)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 4}
    got = nm.triton_matmul(x, c, bias, config=cfg)
    assert torch.equal(got, nm.triton_matmul(x, c, bias, config=cfg))
    assert all(int(counts.abs().sum()) == 0 for counts in splitk.COUNTS.values())
    close(got, nm.reference_matmul(x, c, bias))
    out, ws, counts = nm.buffers(5, 40, dtype, x.device, cfg)
    assert ws.shape == (4, 5, 40) and ws.dtype == torch.float32 and counts.numel() >= 3
    # Autotuned: decode-sized M gets room for the largest split of any candidate, prefill-sized M none.
    largest = max(c.kwargs["SPLIT_K"] for c in nm._cuda_configs())
    assert nm.buffers(5, 40, dtype, x.device, None)[1].shape == (largest, 5, 40)
    out, ws, counts = nm.buffers(256, 40, dtype, x.device, None)
    assert ws is out and counts is out


@pytest.mark.parametrize("n,m,cols,config", [
    (2, 4, 40, None),  # 10 groups: the last step of 8 groups is partial
    (2, 4, 40, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 3}),  # partial step and split
    (4, 8, 56, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2}),
    (1, 16, 48, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 1}),  # half an index byte per step
    (3, 8, 64, None),  # n not a power of two: the per-slot path
])
def test_triton_partial_steps_and_both_paths(n, m, cols, config):
    w = nm_weight(20, cols, n, m, torch.float16, seed=4)
    c = nm.compress(w, n, m)
    x = torch.randn(3, cols).to(torch.float16)
    bias = torch.randn(20).to(torch.float16)
    close(nm.triton_matmul(x, c, bias, config=config), nm.reference_matmul(x, c, bias))


def test_errors_name_value_and_constraint():
    w = nm_weight(6, 32, 2, 4, torch.float16)
    bad = w.clone()
    bad[3, 20:23] = 1.0  # row 3, group 5: three non-zeros
    with pytest.raises(UnsupportedShape, match=r"row 3 group 5 has 3 non-zeros, 2:4 allows at most 2"):
        nm.compress(bad, 2, 4)
    with pytest.raises(UnsupportedShape, match=r"in_features=30 is not a multiple of m=4"):
        nm.compress(torch.zeros(4, 30), 2, 4)
    with pytest.raises(UnsupportedShape, match=r"n=4 must satisfy 1 <= n < m=4"):
        nm.compress(w, 4, 4)
    with pytest.raises(UnsupportedShape, match=r"m=32 must be in \[2, 16\]"):
        nm.compress(torch.zeros(4, 64), 2, 32)
    with pytest.raises(UnsupportedShape, match=r"dtype torch.int32"):
        nm.compress(torch.zeros(4, 32, dtype=torch.int32), 2, 4)
    with pytest.raises(UnsupportedShape, match=r"2-D"):
        nm.compress(torch.zeros(32), 2, 4)
    c = nm.compress(w, 2, 4)
    for fn in (nm.reference_matmul, nm.triton_matmul):
        with pytest.raises(UnsupportedShape, match=r"x last dim \(31,\) must equal in_features=32"):
            fn(torch.zeros(3, 31, dtype=torch.float16), c)
        with pytest.raises(UnsupportedShape, match=r"x dtype torch.int64"):
            fn(torch.zeros(3, 32, dtype=torch.int64), c)
        with pytest.raises(UnsupportedShape, match=r"differs from the weight's torch.float16"):
            fn(torch.zeros(3, 32), c)
        with pytest.raises(UnsupportedShape, match=r"bias must be a float vector of shape \(6,\)"):
            fn(torch.zeros(3, 32, dtype=torch.float16), c, torch.zeros(5, dtype=torch.float16))


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch, on_cpu):
    c = nm.compress(nm_weight(4, 32, 2, 4, torch.float16), 2, 4)
    monkeypatch.setattr(nm, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match=r"CUDA"):
        nm.triton_matmul(torch.zeros(1, 32, dtype=torch.float16), c)


def test_cuda_config_pruning():
    # Autotuning (CUDA only) may split K only for decode-sized M: _launch sizes the fp32 workspace on that rule.
    configs = nm._cuda_configs()
    assert all(c.num_stages >= 3 for c in configs)
    for m_bucket in (1, 16, 64, 128, 1024):
        kept = nm._prune(configs, {"M_BUCKET": m_bucket}, MM_P2=4)
        assert kept
        assert all(c.kwargs["BLOCK_M"] <= max(16, m_bucket) for c in kept)
        if m_bucket > nm.SPLIT_M_MAX:
            assert all(c.kwargs["SPLIT_K"] == 1 and c.kwargs["BLOCK_M"] >= 64 for c in kept)
        else:
            assert any(c.kwargs["SPLIT_K"] > 1 for c in kept)
    assert all(c.kwargs["BLOCK_K"] >= 16 for c in nm._prune(configs, {"M_BUCKET": 4}, MM_P2=16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m,shape", [(2, 4, (37, 300)), (4, 8, (19, 136)), (1, 4, (5, 12)), (2, 8, (21, 88))])
def test_decode_kernel_gathers_x_by_index(n, m, shape, dtype):
    """Decode-sized M (<= DECODE_MAX_M rows, one program for all) runs the per-stored-value kernel (x gathered at
    each value's column): exact against the reference on rows and steps that end part way, with a split K reduced
    in the launch, a bias, and a strided x."""
    w = nm_weight(*shape, n, m, dtype, seed=n + m)
    c = nm.compress(w, n, m)
    assert nm.decodes(nm.DECODE_MAX_M, n, c.bits) and not nm.decodes(nm.DECODE_MAX_M + 1, n, c.bits)
    bias = torch.randn(shape[0]).to(dtype)
    for rows in (1, 3, nm.DECODE_MAX_M):  # 3: a padded row in the (4-row) block
        x = torch.randn(rows, shape[1]).to(dtype)
        expect = nm.reference_matmul(x, c, bias)
        close(nm.triton_matmul(x, c, bias), expect)
        split = nm._decode(x, c, bias, split_k=3)
        assert torch.equal(split, nm._decode(x, c, bias, split_k=3))
        close(split, expect)
    xt = torch.randn(shape[1], 2).to(dtype).T  # strided rows of x
    close(nm.triton_matmul(xt, c), nm.reference_matmul(xt, c))
    assert not nm.decodes(1, 3, nm.index_bits(8))  # n = 3: not an arange of entries; the tl.dot kernel runs it


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 300), (16, 32), (33, 68)])
def test_pair_kernel_runs_2_4_at_5_to_16_rows(shape, dtype):
    """2:4 with 16-bit values at DECODE_MAX_M < M <= PAIR_MAX_M runs the pair kernel (a dense tile selected from
    one 32-bit load per group, then tl.dot): exact against the reference on rows, columns and steps that end part
    way, with a split K reduced in the launch, a bias, a padded x block and a strided x; fp32 runs the tl.dot
    kernel."""
    w = nm_weight(*shape, 2, 4, dtype, seed=7)
    c = nm.compress(w, 2, 4)
    assert nm.pairs(nm.PAIR_MAX_M, c) is (dtype != torch.float32)
    assert not nm.pairs(nm.DECODE_MAX_M, c) and not nm.pairs(nm.PAIR_MAX_M + 1, c)
    bias = torch.randn(shape[0]).to(dtype)
    for rows in (nm.DECODE_MAX_M + 1, 8, nm.PAIR_MAX_M):
        x = torch.randn(rows, shape[1]).to(dtype)
        expect = nm.reference_matmul(x, c, bias)
        close(nm.triton_matmul(x, c, bias), expect)
        if dtype != torch.float32:
            split = nm._pair(x, c, bias, split_k=3)
            assert torch.equal(split, nm._pair(x, c, bias, split_k=3))
            close(split, expect)
            close(nm._pair(x, c, None, split_k=1), nm.reference_matmul(x, c))
    xt = torch.randn(shape[1], 9).to(dtype).T  # strided rows of x
    close(nm.triton_matmul(xt, c), nm.reference_matmul(xt, c))
    assert not nm.pairs(8, nm.compress(nm_weight(8, 16, 4, 8, dtype), 4, 8))  # 4:8: the tl.dot kernel
