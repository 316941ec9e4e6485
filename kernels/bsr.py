"""Block-sparse rows (BSR): the (out_features, in_features) weight cut into (block_rows x block_cols) blocks; only
blocks with a non-zero are stored.

Storage (R = out_features / block_rows block-rows, C = in_features / block_cols block-columns, B stored blocks):
- row_ptr: (R + 1,) int32: block-row r owns stored blocks row_ptr[r] .. row_ptr[r+1]-1;
- col_idx: (B,) int32: each stored block's block-column, ascending within a block-row;
- blocks:  (B, block_rows, block_cols), the weight's dtype, each block row-major.

The Triton kernel gives each program one block-row of W and one tile of x's rows; it walks that block-row's stored
blocks GROUP at a time, gathering the matching GROUP * block_cols columns of x so that one tl.dot spans several
blocks (a single 16-wide block would leave the tensor cores mostly idle), and pipelines the walk over several
stages on Hopper. Block sides are powers of two from 16 to 128: tl.dot needs >= 16, tl.arange powers of two.
All-zero blocks (-0.0 included) are dropped and decompress as +0.0."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import triton_compat
from kernels.compressed import CompressedWeight
from kernels.errors import FLOAT_DTYPES, UnsupportedShape, check_kernel_device, check_layout_args, check_linear_call

MIN_BLOCK, MAX_BLOCK = 16, 128
INTERPRETED = bool(triton.knobs.runtime.interpret)  # see kernels.nm: the kernel was built for the interpreter
triton_compat.patch()  # Triton 3.6's interpreter with NumPy >= 2.4
INT32_LIMIT = 2**31  # the kernel indexes with 32-bit offsets


def _check_block(where: str, block: tuple[int, int]) -> tuple[int, int]:
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in block)):
        raise UnsupportedShape(f"{where}: block={block!r} must be a pair of ints (block_rows, block_cols)")
    for side in block:
        if not MIN_BLOCK <= side <= MAX_BLOCK or side & (side - 1):
            raise UnsupportedShape(f"{where}: block={tuple(block)}: each side must be a power of two in "
                                   f"[{MIN_BLOCK}, {MAX_BLOCK}], got {side}")
    return int(block[0]), int(block[1])


@dataclass
class BSRWeight(CompressedWeight):
    DATA = ("blocks", "row_ptr", "col_idx")
    VALUES = "blocks"

    shape: tuple[int, int]  # (out_features, in_features) of the dense weight
    block: tuple[int, int]  # (block_rows, block_cols)
    row_ptr: torch.Tensor  # (out_features // block_rows + 1,) int32
    col_idx: torch.Tensor  # (stored blocks,) int32
    blocks: torch.Tensor  # (stored blocks, block_rows, block_cols)

    @property
    def nnz_blocks(self) -> int:
        return int(self.blocks.shape[0])

    @property
    def density(self) -> float:
        """Stored share of the weight's blocks (1.0 for an empty weight)."""
        total = (self.shape[0] // self.block[0]) * (self.shape[1] // self.block[1])
        return self.nnz_blocks / total if total else 1.0


    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "blocks": self.blocks,
            "row_ptr": self.row_ptr,
            "col_idx": self.col_idx,
            "shape": torch.tensor(self.shape, dtype=torch.int64),
            "block": torch.tensor(self.block, dtype=torch.int64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "BSRWeight":
        missing = {"blocks", "row_ptr", "col_idx", "shape", "block"} - set(tensors)
        if missing:
            raise UnsupportedShape(f"BSRWeight.from_tensors: missing {sorted(missing)}; got {sorted(tensors)}")
        shape = [int(v) for v in tensors["shape"].tolist()]
        block = [int(v) for v in tensors["block"].tolist()]
        if len(shape) != 2 or len(block) != 2:
            raise UnsupportedShape(f"BSRWeight.from_tensors: shape={shape} and block={block} need 2 entries each")
        weight = cls((shape[0], shape[1]), (block[0], block[1]), tensors["row_ptr"], tensors["col_idx"],
                     tensors["blocks"])
        weight.validate(check_indices=True)
        return weight

    def validate(self, check_indices: bool = False) -> None:
        """Consistency of the fields; `check_indices` also checks the row pointers and column indices' values
        (a device sync, so done on load rather than per call)."""
        where = "BSRWeight"
        br, bc = _check_block(where, self.block)
        out_features, in_features = self.shape
        if out_features < 0 or in_features < 0 or out_features % br or in_features % bc:
            raise UnsupportedShape(f"{where}: shape={self.shape} is not a multiple of block={self.block}")
        if self.blocks.dtype not in FLOAT_DTYPES:
            raise UnsupportedShape(f"{where}: blocks dtype {self.blocks.dtype} is not one of fp16/bf16/fp32")
        nnzb = self.blocks.shape[0] if self.blocks.dim() == 3 else -1
        if self.blocks.dim() != 3 or tuple(self.blocks.shape[1:]) != (br, bc):
            raise UnsupportedShape(f"{where}: blocks shape {tuple(self.blocks.shape)} is not (B, {br}, {bc})")
        rows = out_features // br
        if self.row_ptr.dtype != torch.int32 or tuple(self.row_ptr.shape) != (rows + 1,):
            raise UnsupportedShape(f"{where}: row_ptr must be int32 of shape ({rows + 1},), got "
                                   f"{self.row_ptr.dtype} {tuple(self.row_ptr.shape)}")
        if self.col_idx.dtype != torch.int32 or tuple(self.col_idx.shape) != (nnzb,):
            raise UnsupportedShape(f"{where}: col_idx must be int32 of shape ({nnzb},), got "
                                   f"{self.col_idx.dtype} {tuple(self.col_idx.shape)}")
        if len({self.blocks.device, self.row_ptr.device, self.col_idx.device}) > 1:
            raise UnsupportedShape(f"{where}: blocks, row_ptr and col_idx are on different devices")
        if check_indices:
            ptr = self.row_ptr.long()
            if int(ptr[0]) != 0 or int(ptr[-1]) != nnzb or bool((ptr[1:] < ptr[:-1]).any()):
                raise UnsupportedShape(f"{where}: row_ptr must rise from 0 to {nnzb} stored blocks")
            cols = in_features // bc
            if nnzb and (int(self.col_idx.min()) < 0 or int(self.col_idx.max()) >= cols):
                raise UnsupportedShape(f"{where}: col_idx must lie in [0, {cols})")


def compress(dense: torch.Tensor, block: tuple[int, int] = (16, 16)) -> BSRWeight:
    """Exact: decompress(compress(w)) == w. Blocks whose elements are all zero are dropped."""
    where = "bsr.compress"
    br, bc = _check_block(where, block)
    if dense.dim() != 2:
        raise UnsupportedShape(f"{where}: weight must be 2-D (out_features, in_features), got shape "
                               f"{tuple(dense.shape)}")
    if dense.dtype not in FLOAT_DTYPES:
        raise UnsupportedShape(f"{where}: dtype {dense.dtype} is not supported; fp16, bf16 or fp32 only")
    out_features, in_features = dense.shape
    if out_features % br or in_features % bc:
        raise UnsupportedShape(f"{where}: shape ({out_features}, {in_features}) is not a multiple of block "
                               f"({br}, {bc}); pad the weight or pick a block that divides it")
    rows, cols = out_features // br, in_features // bc
    tiles = dense.reshape(rows, br, cols, bc).transpose(1, 2)  # (rows, cols, br, bc)
    keep = (tiles != 0).any(dim=-1).any(dim=-1)  # NaN is kept, -0.0 is a zero
    counts = keep.sum(dim=1)
    row_ptr = torch.zeros(rows + 1, dtype=torch.int32, device=dense.device)
    row_ptr[1:] = counts.cumsum(0).to(torch.int32)
    col_idx = keep.nonzero()[:, 1].to(torch.int32)  # nonzero() is row-major: block-rows in order, columns ascending
    blocks = tiles[keep].contiguous()  # (B, br, bc) in the same order
    return BSRWeight((out_features, in_features), (br, bc), row_ptr, col_idx, blocks)


def _stored_blocks(where: str, shape: tuple[int, int], kept: int, dtype: torch.dtype,
                   block: tuple[int, int]) -> tuple[int, int, int]:
    """(block rows, stored blocks, bytes per value): `kept` elements fill whole blocks."""
    br, bc = _check_block(where, block)
    rows, cols, value_bytes = check_layout_args(where, shape, kept, dtype)
    if rows % br or cols % bc or kept % (br * bc):
        raise UnsupportedShape(f"{where}: shape {(rows, cols)} and kept={kept} must be whole blocks of {(br, bc)}")
    return rows // br, kept // (br * bc), value_bytes


def stored_nbytes(shape: tuple[int, int], kept: int, dtype: torch.dtype, block: tuple[int, int] = (16, 16)) -> int:
    """Bytes `compress` stores (BSRWeight.nbytes) for an (out, in) weight whose `kept` elements fill whole blocks,
    from the layout alone: the stored blocks, an int32 column index each, int32 row pointers per block row plus
    the end."""
    block_rows, stored, value_bytes = _stored_blocks("bsr.stored_nbytes", shape, kept, dtype, block)
    return stored * (block[0] * block[1] * value_bytes + 4) + (block_rows + 1) * 4


def dot_elements(shape: tuple[int, int], kept: int, block: tuple[int, int] = (16, 16)) -> int:
    """Weight elements the kernel multiplies with each row of x: those of the stored blocks only (ideally: a block
    row's last tl.dot step masks, rather than skips, the slots past its last stored block)."""
    _, stored, _ = _stored_blocks("bsr.dot_elements", shape, kept, torch.float32, block)
    return stored * block[0] * block[1]


def decompress(w: BSRWeight) -> torch.Tensor:
    out_features, in_features = w.shape
    br, bc = w.block
    rows, cols = out_features // br, in_features // bc
    counts = (w.row_ptr[1:] - w.row_ptr[:-1]).long()
    block_rows = torch.repeat_interleave(torch.arange(rows, device=w.device), counts)
    tiles = torch.zeros(rows, cols, br, bc, dtype=w.dtype, device=w.device)
    tiles[block_rows, w.col_idx.long()] = w.blocks
    return tiles.transpose(1, 2).reshape(out_features, in_features)


def reference_matmul(x: torch.Tensor, w: BSRWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x[..., K] @ W^T + bias block by block from the stored blocks (no dense weight is built), accumulated in fp32,
    returned in x's dtype."""
    check_linear_call("bsr.reference_matmul", x, w, bias)
    out_features, in_features = w.shape
    br, bc = w.block
    x2d = x.reshape(-1, in_features).float()
    rows = out_features // br
    block_rows = torch.repeat_interleave(torch.arange(rows, device=w.device),
                                         (w.row_ptr[1:] - w.row_ptr[:-1]).long())
    # Each stored block multiplies its bc columns of x into its br outputs: (M, B, bc) x (B, br, bc) -> (M, B, br),
    # summed into the block's row. Chunks of x's rows bound the (M, B, bc) gather to ~2^26 elements.
    cols = w.col_idx.long()
    weights = w.blocks.float()
    out = torch.zeros(x2d.shape[0], rows, br, dtype=torch.float32, device=x.device)
    step = max(1, 2**26 // max(1, w.nnz_blocks * max(br, bc)))
    for lo in range(0, x2d.shape[0], step):
        xs = x2d[lo:lo + step].reshape(-1, in_features // bc, bc)[:, cols]
        out[lo:lo + step].index_add_(1, block_rows, torch.einsum("mbc,brc->mbr", xs, weights))
    out = out.reshape(x2d.shape[0], out_features)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], out_features)


@triton.jit
def _bsr_matmul_kernel(
    x_ptr, blocks_ptr, row_ptr_ptr, col_ptr, bias_ptr, out_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_om, stride_on,
    BR: tl.constexpr, BC: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, GROUP: tl.constexpr,
):
    BLOCK_K: tl.constexpr = GROUP * BC
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m  # M tiles fastest: programs that read the same block-row run side by side
    brow = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_r = tl.arange(0, BR)
    kk = tl.arange(0, BLOCK_K)
    which = kk // BC  # the stored block (of the GROUP in flight) that step column kk belongs to
    within = kk % BC
    start = tl.load(row_ptr_ptr + brow)
    end = tl.load(row_ptr_ptr + brow + 1)

    acc = tl.zeros((BLOCK_M, BR), dtype=tl.float32)
    for j in range(start, end, GROUP):
        b = j + which
        mask_b = b < end
        col = tl.load(col_ptr + b, mask=mask_b, other=0)
        k = col * BC + within
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_b[None, :], other=0.0)
        # W^T tile (BLOCK_K, BR): element (kk, r) of block b is blocks[b, r, within].
        w = tl.load(blocks_ptr + b[:, None] * (BR * BC) + offs_r[None, :] * BC + within[:, None],
                    mask=mask_b[:, None], other=0.0)
        if UPCAST:  # the interpreter's tl.dot mishandles bf16: it multiplies fp32 copies
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)

    offs_n = brow * BR + offs_r
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_n < N)[None, :])


def _cuda_configs() -> list[triton.Config]:
    """Step widths (GROUP * block_cols) of 32-128 columns, M tiles 16-128, 3-4 stages: Hopper hides the gathered,
    index-dependent loads behind the MMAs only with several loads in flight."""
    configs = []
    for block_m in (16, 32, 64, 128):
        for group in (1, 2, 4, 8):
            for stages in (3, 4):
                warps = 8 if block_m == 128 else 4
                configs.append(triton.Config({"BLOCK_M": block_m, "GROUP": group}, num_warps=warps,
                                             num_stages=stages))
    return configs


def _prune(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """M tiles no wider than the M bucket (wasted MMA rows) and, for large M, not narrower than 64; step widths
    from 32 to 128 columns (at least 16 for tl.dot)."""
    m_bucket = int(named_args["M_BUCKET"])
    bc = int(kwargs["BC"])  # type: ignore[call-overload]
    kept = [c for c in configs
            if 32 <= c.kwargs["GROUP"] * bc <= 128
            and c.kwargs["BLOCK_M"] <= max(16, m_bucket)
            and (m_bucket < 256 or c.kwargs["BLOCK_M"] >= 64)]
    return kept or [c for c in configs if c.kwargs["GROUP"] * bc >= 16][:1]


def candidate_configs(m: int, block: tuple[int, int]) -> list[triton.Config]:
    """The configs the CUDA autotuner times for m rows of x and (rows, cols) blocks: the kernel runs the fastest
    of these (the static benchmark, allocator.benchmarks.kernel_static, compiles each)."""
    return _prune(_cuda_configs(), {"M_BUCKET": triton.next_power_of_2(m)}, BR=block[0], BC=block[1])


_tuned_kernel = triton.autotune(configs=_cuda_configs(), key=["M_BUCKET", "N", "K", "BR", "BC"],
                                prune_configs_by={"early_config_prune": _prune})(_bsr_matmul_kernel)
INTERPRETER_CONFIG = {"BLOCK_M": 16, "GROUP": 2}  # a fixed config: autotuning would only multiply the runtime


def kernel_arguments(x2d: torch.Tensor, w: BSRWeight, bias: torch.Tensor | None,
                     out: torch.Tensor) -> tuple[tuple, dict]:
    """The kernel's runtime arguments and constexprs (all but the config's) for one launch on a 2-D x."""
    M, in_features = x2d.shape
    args = (x2d, w.blocks, w.row_ptr, w.col_idx, bias if bias is not None else out, out,
            M, w.shape[0], in_features, triton.next_power_of_2(M),
            x2d.stride(0), x2d.stride(1), out.stride(0), out.stride(1))
    # fp32 weights get fp32 products ("ieee"), not TF32's 10-bit mantissas; 16-bit operands are exact either way.
    meta = dict(BR=w.block[0], BC=w.block[1], HAS_BIAS=bias is not None, UPCAST=INTERPRETED,
                DOT_PRECISION="ieee" if x2d.dtype == torch.float32 else "tf32")
    return args, meta


def triton_matmul(x: torch.Tensor, w: BSRWeight, bias: torch.Tensor | None = None,
                  config: dict[str, int] | None = None) -> torch.Tensor:
    """x[..., K] @ W^T + bias on the Triton kernel, fp32 accumulation, output in x's dtype. `config` (BLOCK_M,
    GROUP: stored blocks per tl.dot) overrides the autotuned (CUDA) or fixed (interpreter) choice."""
    where = "bsr.triton_matmul"
    check_linear_call(where, x, w, bias)
    check_kernel_device(where, "bsr", INTERPRETED, x, w.blocks, w.row_ptr, w.col_idx, bias)
    out_features, in_features = w.shape
    for name, t in (("x", x), ("blocks", w.blocks)):
        if t.numel() >= INT32_LIMIT:
            raise UnsupportedShape(f"{where}: {name} has {t.numel()} elements; the kernel's 32-bit offsets "
                                   f"allow fewer than {INT32_LIMIT}")
    x2d = x.reshape(-1, in_features)
    M = x2d.shape[0]
    if M * out_features >= INT32_LIMIT:
        raise UnsupportedShape(f"{where}: output {M}x{out_features} needs 64-bit offsets")
    if M == 0 or out_features == 0 or w.nnz_blocks == 0:  # nothing to launch: W is zero (or there are no rows)
        out = x.new_zeros(M, out_features)
        if bias is not None:
            out = (out.float() + bias.float()).to(x.dtype)
        return out.reshape(*x.shape[:-1], out_features)
    # The interpreter casts fp32 to bf16 by truncation where GPUs (and torch) round to nearest even: there the
    # kernel stores fp32 and torch casts.
    fp32_out = INTERPRETED and x.dtype == torch.bfloat16
    out = torch.empty(M, out_features, dtype=torch.float32 if fp32_out else x.dtype, device=x.device)
    br, bc = w.block
    args, meta = kernel_arguments(x2d, w, bias.contiguous() if bias is not None else None, out)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(M, meta["BLOCK_M"]) * (out_features // br),)

    if config is None and INTERPRETED:
        config = INTERPRETER_CONFIG
    if config is None:
        _tuned_kernel[grid](*args, **meta)
    else:
        if config["BLOCK_M"] < 16 or config["GROUP"] * bc < 16 or config["GROUP"] & (config["GROUP"] - 1):
            raise UnsupportedShape(f"bsr: config {config} needs BLOCK_M >= 16 and GROUP a power of two with "
                                   f"GROUP * block_cols >= 16 (block_cols={bc})")
        _bsr_matmul_kernel[grid](*args, **meta, **config)
    return out.to(x.dtype).reshape(*x.shape[:-1], out_features)
