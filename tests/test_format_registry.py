"""One source of truth for sparse formats (allocator.core.formats): the bytes the registry states are the bytes the
compressed weights hold, and the roofline prices every option of a mixed space at the bytes its export stores."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from allocator.core import memory
from allocator.core.config import SpaceConfig
from allocator.core.formats import (
    ALTERNATIVES,
    FORMATS,
    export_format,
    linear_work,
    stored_bytes,
)
from allocator.core.patterns import KINDS, SparsityPattern, kept_count, select_mask
from allocator.core.space import ATTN, build_space
from allocator.model.export import WEIGHTS_FILE, export_checkpoint
from allocator.model.sparse_export import build_deployable
from allocator.model.surgery import BLOCK_ATTRIBUTE, leading_levels
from kernels import formats as kernel_formats
from kernels.errors import UnsupportedShape
from kernels.sparse_linear import SparseLinear
from profilers import roofline

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Irregular shapes per pattern: rows and columns that are no multiple of the bitmap's 16x64 tiles, N:M groups
# that are not powers of two, blocks that are not square.
CASES = [
    *((f"unstructured{p}", shape) for p in (0, 10, 50, 73, 90, 100) for shape in ((33, 100), (1, 7), (64, 130))),
    *((label, shape) for label in ("2:4", "1:4", "4:8", "3:8", "2:3", "5:16")
      for shape in ((7, 48), (13, 96), (1, 144))),
    *((f"block{b}-{p}", shape) for b in ("16x16", "32x16", "16x64") for p in (0, 25, 50, 75, 100)
      for shape in ((32, 64), (96, 128))),
]


def pruned(pattern: SparsityPattern, rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A random weight pruned to `pattern` (by magnitude, its exact counts), no kept weight zero."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)
    w = torch.where(w == 0, torch.ones_like(w), w)
    return torch.where(select_mask(w.abs().float(), pattern), w, torch.zeros_like(w))


def test_every_pattern_kind_has_one_export_format():
    assert set(FORMATS) == set(KINDS)
    exported = {entry.format for entry in FORMATS.values()}
    alternatives = {fmt for others in ALTERNATIVES.values() for fmt in others}
    # Every kernel format is either a kind's export format or an alternative one (priced on request), not both.
    assert exported | alternatives == set(kernel_formats.FORMATS) and not exported & alternatives
    assert export_format(SparsityPattern.parse("unstructured70"), "csr8") == ("csr8", {})
    with pytest.raises(ValueError, match="cannot store nm patterns; valid: nm"):
        export_format(SparsityPattern.parse("2:4"), "csr8")


@pytest.mark.parametrize("label, shape", CASES)
def test_stored_bytes_equal_the_compressed_weight(label, shape):
    pattern = SparsityPattern.parse(label)
    rows, cols = shape
    for alternative in (None, *ALTERNATIVES.get(pattern.kind, {})):  # the export format, then the others
        fmt, params = export_format(pattern, alternative)
        for seed, dtype in enumerate(DTYPES):
            module = SparseLinear.from_dense(pruned(pattern, rows, cols, dtype, seed), None, fmt, **params)
            assert stored_bytes(pattern, rows, cols, dtype, alternative) == module.weight_nbytes
            work = linear_work(pattern, 3, rows, cols, dtype, alternative)
            assert work.weight_bytes == module.weight_nbytes
            assert work.activation_bytes == 3 * (rows + cols) * dtype.itemsize


@pytest.mark.parametrize("seed", range(4))
def test_layouts_count_any_stored_set(seed):
    """The kernel formats' stored_nbytes on weights no pattern made: any non-zeros (bitmap), fewer than n per group
    (N:M stores n anyway), any set of blocks (BSR)."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = (int(v) for v in torch.randint(1, 90, (2,), generator=gen))
    # torch.where, not a product: -0.0 is a bit pattern the bitmap stores
    dense = torch.where(torch.rand(rows, cols, generator=gen) < 0.4, torch.randn(rows, cols, generator=gen), 0.0)
    for dtype in DTYPES:
        w = dense.to(dtype)
        nnz = int((w != 0).sum())
        assert kernel_formats.stored_nbytes("bitmap", (rows, cols), nnz, dtype) == kernel_formats.compress("bitmap", w).nbytes
        assert kernel_formats.stored_nbytes("csr8", (rows, cols), nnz, dtype) == kernel_formats.compress("csr8", w).nbytes
        for tile in ((32, 32), (16, 128)):
            got = kernel_formats.stored_nbytes("bitmap", (rows, cols), nnz, dtype, tile=tile)
            assert got == kernel_formats.compress("bitmap", w, tile=tile).nbytes
        groups = w[:, : cols // 8 * 8].reshape(rows, -1, 8)
        top3 = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().float().topk(3, dim=-1).indices, True)
        nm_w = torch.where(top3, groups, 0.0).reshape(rows, -1)  # at most 3 non-zeros per group of 8, often fewer
        if nm_w.numel():
            stored = kernel_formats.stored_nbytes("nm", tuple(nm_w.shape), int((nm_w != 0).sum()), dtype, n=3, m=8)
            assert stored == kernel_formats.compress("nm", nm_w, n=3, m=8).nbytes
        blocks = torch.rand(3, 5, generator=gen) < 0.5
        keep = blocks.repeat_interleave(16, 0).repeat_interleave(16, 1)
        bsr_w = torch.where(keep, torch.randn(48, 80, generator=gen), 0.0).to(dtype)
        stored = kernel_formats.stored_nbytes("bsr", (48, 80), int(blocks.sum()) * 256, dtype, block=(16, 16))
        assert stored == kernel_formats.compress("bsr", bsr_w, block=(16, 16)).nbytes


def test_layout_counts_refuse_what_the_format_cannot_hold():
    with pytest.raises(UnsupportedShape, match="whole blocks"):
        kernel_formats.stored_nbytes("bsr", (32, 32), 100, torch.float16, block=(16, 16))
    with pytest.raises(UnsupportedShape, match="exceeds 2 per group of 4"):
        kernel_formats.stored_nbytes("nm", (4, 8), 17, torch.float16, n=2, m=4)
    with pytest.raises(UnsupportedShape, match=r"kept=65 must be an int in \[0, 64\]"):
        kernel_formats.stored_nbytes("bitmap", (8, 8), 65, torch.float16)
    with pytest.raises(UnsupportedShape, match="fp16, bf16 or fp32 only"):
        kernel_formats.stored_nbytes("bitmap", (8, 8), 1, torch.int8)


def test_kernel_flops_follow_what_each_kernel_multiplies():
    """Bitmap multiplies its padded tiles, CSR8 its entries, N:M its groups widened to a power of two, BSR its stored blocks."""
    m = 5
    dense = linear_work(None, m, 40, 96, torch.bfloat16)
    assert dense.flops == 2 * m * 40 * 96 and dense.weight_bytes == 2 * 40 * 96
    assert linear_work(SparsityPattern.parse("unstructured70"), m, 40, 96, torch.bfloat16).flops == 2 * m * 48 * 128
    # CSR8 multiplies its stored values and at most 3 padding entries per (row, 256-column segment).
    csr8_work = linear_work(SparsityPattern.parse("unstructured70"), m, 40, 300, torch.bfloat16, "csr8")
    assert csr8_work.flops == 2 * m * (kept_count(SparsityPattern.parse("unstructured70"), 40, 300) + 3 * 40 * 2)
    assert linear_work(SparsityPattern.parse("2:4"), m, 40, 96, torch.bfloat16).flops == dense.flops
    assert linear_work(SparsityPattern.parse("2:3"), m, 40, 96, torch.bfloat16).flops == 2 * m * 40 * 32 * 4
    block = SparsityPattern.parse("block16x16-50")
    assert linear_work(block, m, 32, 96, torch.bfloat16).flops == 2 * m * kept_count(block, 32, 96)


def unit_stored_bytes(state: dict[str, torch.Tensor], layer: int, kind: str) -> int:
    """Bytes the checkpoint stores for one unit's weights: its norm and its linears, dense or compressed. A
    compressed linear's integer headers (shape, N:M, block, layout) are host metadata the kernel never reads; every
    other tensor of the unit is counted, so nothing stored goes unpriced."""
    norm = f"model.layers.{layer}.{'input_layernorm' if kind == ATTN else 'post_attention_layernorm'}."
    block = f"model.layers.{layer}.{BLOCK_ATTRIBUTE[kind]}."
    keys = [k for k in state if k.startswith((norm, block))]
    headers: set[str] = set()
    for key in keys:
        if key.endswith(".layout"):
            linear = key[: -len("layout")]
            spec = kernel_formats.spec(kernel_formats.format_of(int(state[key][0])))
            header = {key, *(linear + "weight_" + h for h in spec.header_keys)}
            data = {linear + "weight_" + d for d in spec.data_keys}
            assert {k for k in keys if k.startswith(linear)} == header | data
            headers |= header
    return sum(state[k].numel() * state[k].element_size() for k in keys if k not in headers)


def test_roofline_weight_bytes_equal_the_exported_checkpoint(tiny, tmp_path):
    """Every option of a mixed space, exported for real (16-bit, as the roofline prices it): the roofline's weight
    bytes for the unit, the memory model's, and the checkpoint's stored bytes agree exactly."""
    loaded, space = tiny
    shape = space.shape
    space = build_space(shape, SpaceConfig(kind="mixed", mlp_step=32))
    units = space.units
    dense = copy.deepcopy(loaded.model).to(roofline.DTYPE)
    source = leading_levels(dense, shape)
    layers = shape.num_layers
    options = {u.kind: u.options for u in units[:2]}
    assert {SparsityPattern.parse(o).kind for opts in options.values() for o in opts if isinstance(o, str)} == set(KINDS)
    checked = []
    for start in range(0, max(map(len, options.values())), layers):
        allocation, placed = {}, []
        for u in units:
            opts = options[u.kind]
            option = opts[start + u.layer] if start + u.layer < len(opts) else u.full
            allocation[u.name] = option
            placed.append((u.layer, u.kind, option))
        out = tmp_path / f"export{start}"
        export_checkpoint(build_deployable(dense, shape, allocation, source), loaded.tokenizer, out, None)
        state = load_file(out / WEIGHTS_FILE)
        for layer, kind, option in placed:
            stored = unit_stored_bytes(state, layer, kind)
            assert roofline.unit_weight_bytes(shape, kind, option) == stored, (kind, option)
            assert memory.unit_weight_bytes(shape, kind, option, roofline.ELEMENT_BYTES) == stored, (kind, option)
            checked.append((kind, option))
    assert {(k, o) for k, opts in options.items() for o in opts} <= set(checked)
