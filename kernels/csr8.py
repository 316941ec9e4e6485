"""CSR8 sparse format: every stored value with its column as one byte, in short row segments, and its Triton matmul
kernel for decode (few rows of x), which works per stored value rather than per weight element.

Layout (format version 1). The (out_features N, in_features K) weight is cut into row segments of SEG = 256 columns
(the last one shorter when K is not a multiple), so a column within its segment fits in a uint8. Each (row, segment)
keeps its stored values in column order, padded with zero entries to a multiple of VEC = 4, so the kernel loads four
values and four columns at a time with aligned vector loads:
  - `offsets` int32 (N * segments + 1,): start of each (row, segment)'s entries, rows in order and a row's segments
              in order; each a multiple of VEC; the last entry is the end of the entries in use.
  - `cols`    uint8 (capacity,): each entry's column within its segment (padding: 0).
  - `values`  (capacity,) in the weight's dtype: each entry's value (padding: +0.0, which is never a stored value).
  - `shape`   int64 (2,): (N, K).
capacity = stored values + (VEC - 1) per (row, segment): the most padding any pattern needs, so the bytes stored
depend only on the shape and the number of stored values (`stored_nbytes`), as the memory model prices them; the
tail past offsets[-1] is zeros.

"Stored" is decided on the bit pattern, as for bitmap: -0.0 is stored, so decompress(compress(w)) is bitwise w.

Bytes per weight element at density d in bf16: 3 d + (3 * 3 + 4) / 256 ≈ 3 d + 0.05 (bitmap: 2 d + 0.19), so CSR8 stores
more than bitmap above ~14% density; its point is the kernel's work, which falls with the number of stored values.

Kernel (`_csr8_matmul_kernel`). One warp per program, over a group of rows of W and a range of segments (split-K up
to about 8 programs per SM, reduced in the same launch as kernels/splitk.py describes). At one row of x (decode) a
row has 4 lanes and a warp 8 rows: per segment each row's lanes walk its entries 16 at a time (the loop runs to the
group's longest row, shorter rows masked), each lane one 8-byte load of 4 values, one 4-byte load of their columns,
4 gathers of x (the segment's 512 bytes of x stay in L1) and 4 fp32 multiply-adds: about 12 thread-instructions per
stored value, so the issue time stays below the time to read the bytes, and a warp's value load touches 8 rows'
32-byte sectors, not 32 rows' 8 bytes. More rows of x (BLOCK_M up to 16) use one lane per row and reuse each entry
BLOCK_M times; that path is correct at any M but uses no tensor cores: past a few rows of x bitmap is faster,
and prefill belongs to it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.compressed import CompressedWeight
from kernels.errors import (
    FLOAT_DTYPES,
    UnsupportedShape,
    check_kernel_device,
    check_layout_args,
    check_linear_call,
)
from kernels.splitk import INTERPRETED, Buffers, fp32_out, store_split
from kernels.splitk import buffers as splitk_buffers
from kernels.triton_compat import FLAT_GATHER as _FLAT_GATHER

DTYPES = FLOAT_DTYPES
_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
SEG = 256  # columns per row segment: an in-segment column fits in a uint8
VEC = 4  # entries per vector load; every (row, segment) is padded to a multiple
WARP = 32
# Lanes per row of W at one row of x: each of a row's LANES lanes loads VEC consecutive entries a trip, so a warp's
# value load touches 8 rows' 32-byte sectors rather than 32 rows' 8 bytes (fewer L1 wavefronts). With more rows of x
# one lane per row: Triton 3.7's code for the wider layout splits the loop (see `lanes_per_row`).
DECODE_LANES = 4
FORMAT_VERSION = 1
FLAT_GATHER = tl.constexpr(_FLAT_GATHER)  # the decode loop's loads under Triton < 3.7 (kernels.triton_compat)
_MAX_INT32 = 2**31 - 1


@dataclass
class CSR8Weight(CompressedWeight):
    """A compressed (out_features, in_features) weight; see the module docstring for the layout."""

    DATA = ("offsets", "cols", "values")
    VALUES = "values"

    shape: tuple[int, int]
    offsets: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor

    @property
    def segments(self) -> int:
        return -(-self.shape[1] // SEG)

    def tensors(self) -> dict[str, torch.Tensor]:
        shape = torch.tensor(self.shape, dtype=torch.int64)
        return {"shape": shape, "offsets": self.offsets, "cols": self.cols, "values": self.values}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> CSR8Weight:
        """Rebuild from `tensors()`. Checks structure only (shapes, dtypes, devices), reading no device memory but
        `shape`."""
        missing = {"shape", "offsets", "cols", "values"} - tensors.keys()
        if missing:
            raise UnsupportedShape(f"csr8 tensors: missing {sorted(missing)}; got {sorted(tensors)}")
        shape_t, offsets, cols, values = (tensors[k] for k in ("shape", "offsets", "cols", "values"))
        if shape_t.numel() != 2:
            raise UnsupportedShape(f"csr8 tensors: shape={tuple(shape_t.tolist())} must hold (out, in)")
        n, k = (int(v) for v in shape_t.tolist())
        w = cls(shape=(n, k), offsets=offsets, cols=cols, values=values)
        expect = n * w.segments + 1
        if offsets.dtype != torch.int32 or tuple(offsets.shape) != (expect,):
            raise UnsupportedShape(
                f"csr8 tensors: offsets {offsets.dtype} {tuple(offsets.shape)} must be int32 ({expect},): one per "
                f"(row, {SEG}-column segment) plus the end (csr8 format version {FORMAT_VERSION})"
            )
        if cols.dtype != torch.uint8 or cols.dim() != 1:
            raise UnsupportedShape(f"csr8 tensors: cols {cols.dtype} {tuple(cols.shape)} must be 1-D uint8")
        if values.dtype not in DTYPES or tuple(values.shape) != tuple(cols.shape):
            raise UnsupportedShape(
                f"csr8 tensors: values {values.dtype} {tuple(values.shape)} must be 1-D {DTYPES} as long as cols "
                f"{tuple(cols.shape)}"
            )
        if not (offsets.device == cols.device == values.device):
            raise UnsupportedShape(
                f"csr8 tensors: on different devices (offsets {offsets.device}, cols {cols.device}, "
                f"values {values.device})"
            )
        return w

    def to(self, device: torch.device | str) -> CSR8Weight:
        return CSR8Weight(self.shape, self.offsets.to(device), self.cols.to(device), self.values.to(device))


def _capacity(n: int, k: int, stored: int) -> int:
    """Entries allocated: the stored values plus the most padding any (row, segment) can need."""
    return stored + (VEC - 1) * n * -(-k // SEG)


def compress(dense: torch.Tensor) -> CSR8Weight:
    """CSR8-compress a 2-D fp16/bf16/fp32 weight on its device; exact bit for bit."""
    if dense.dim() != 2:
        raise UnsupportedShape(f"csr8: weight shape {tuple(dense.shape)} must be 2-D (out_features, in_features)")
    if dense.dtype not in DTYPES:
        raise UnsupportedShape(f"csr8: weight dtype {dense.dtype} must be one of {DTYPES}")
    n, k = dense.shape
    segs = -(-k // SEG)
    padded = F.pad(dense.detach(), (0, segs * SEG - k)).reshape(n, segs, SEG)
    mask = padded.view(_INT_VIEW[dense.dtype]) != 0
    counts = mask.sum(-1, dtype=torch.int64).flatten()  # per (row, segment), in storage order
    starts = F.pad((-(-counts // VEC) * VEC).cumsum(0), (1, 0))
    stored = int(counts.sum())
    capacity = _capacity(n, k, stored)
    if capacity > _MAX_INT32:
        raise UnsupportedShape(f"csr8: {capacity} entries exceed the int32 offsets (2**31 - 1)")
    # Boolean indexing walks C order (row, segment, column): each entry goes to its slot's start plus its rank there.
    rank = mask.cumsum(-1) - 1
    where = (starts[:-1].reshape(n, segs, 1) + rank)[mask]
    values = torch.zeros(capacity, dtype=dense.dtype, device=dense.device)
    cols = torch.zeros(capacity, dtype=torch.uint8, device=dense.device)
    values[where] = padded[mask]
    cols[where] = torch.arange(SEG, device=dense.device).expand_as(mask)[mask].to(torch.uint8)
    return CSR8Weight((n, k), starts.to(torch.int32), cols, values)


def stored_nbytes(shape: tuple[int, int], kept: int, dtype: torch.dtype) -> int:
    """Bytes `compress` stores (CSR8Weight.nbytes) for an (N, K) weight with `kept` stored values, from the layout
    alone: one int32 offset per (row, segment) plus the end, and a value and a uint8 column per entry of the
    capacity (the stored values plus the most padding)."""
    n, k, value_bytes = check_layout_args("csr8.stored_nbytes", shape, kept, dtype)
    return (n * -(-k // SEG) + 1) * 4 + _capacity(n, k, kept) * (value_bytes + 1)


def dot_elements(shape: tuple[int, int], kept: int) -> int:
    """Weight entries the kernel multiplies with each row of x: the stored values and, at most, their padding."""
    n, k, _ = check_layout_args("csr8.dot_elements", shape, kept, torch.float32)
    return _capacity(n, k, kept)


def decompress(w: CSR8Weight) -> torch.Tensor:
    n, k = w.shape
    segs = w.segments
    used = int(w.offsets[-1])
    slot = torch.repeat_interleave(torch.arange(n * segs, device=w.values.device), w.offsets.diff().to(torch.int64))
    values = w.values[:used]
    real = values.view(_INT_VIEW[values.dtype]) != 0  # padding is +0.0, which is never stored
    slot, cols = slot[real], w.cols[:used][real].to(torch.int64)
    dense = torch.zeros(n, segs * SEG, dtype=values.dtype, device=values.device)
    dense[slot // segs, slot % segs * SEG + cols] = values[real]
    return dense[:, :k].contiguous()


def reference_matmul(x: torch.Tensor, w: CSR8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x[..., K] @ W.T + bias in pure torch, W expanded from the compressed tensors on every call (a bias of
    another float dtype is cast to x's)."""
    check_linear_call("csr8.reference_matmul", x, w, bias)
    return F.linear(x, decompress(w), None if bias is None else bias.to(x.dtype))


@triton.jit
def _csr8_matmul_kernel(
    x_ptr, offsets_ptr, cols_ptr, values_ptr, bias_ptr, out_ptr, ws_ptr, count_ptr,
    M, N, stride_xm, stride_xk, stride_om, stride_on,
    segs, segs_per_split, splits,
    LANES: tl.constexpr, VEC: tl.constexpr, SEG: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
):
    """BLOCK_M rows of x (program axis 0) against 32 / LANES rows of W (axis 1, LANES lanes per row) over a range
    of segments (axis 2). Per segment each lane walks its row's entries VEC at a time (a row's lanes on consecutive
    chunks): aligned vector loads of values and columns, a gather of x per entry and row of x, fp32 multiply-adds
    into a (BLOCK_M, rows, LANES * VEC) accumulator reduced once at the end. Padding entries (value 0) and rows past
    their entries add nothing."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    ROWS: tl.constexpr = 32 // LANES
    rows = pid_n * ROWS + tl.arange(0, ROWS)
    live = rows < N
    STEP: tl.constexpr = LANES * VEC  # entries of a row per trip: LANES lanes load VEC consecutive entries each
    FLAT: tl.constexpr = BLOCK_M * ROWS * STEP
    entry = tl.arange(0, STEP)[None, None, :]
    part = entry // VEC  # which of the row's lanes (its VEC-entry chunk of the trip)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Rows past M read row M - 1 (their outputs are masked at the store): the gathers need no mask.
    x_rows = x_ptr + tl.minimum(rm, M - 1).to(tl.int64)[:, None, None] * stride_xm  # (BLOCK_M, 1, 1)

    acc = tl.zeros((BLOCK_M, ROWS, STEP), dtype=tl.float32)
    s_start = pid_k * segs_per_split
    s_end = tl.minimum(s_start + segs_per_split, segs)
    for s in range(s_start, s_end):
        slot = rows * segs + s
        start = tl.multiple_of(tl.load(offsets_ptr + slot, mask=live, other=0), VEC)  # compress pads to VEC
        chunks = (tl.load(offsets_ptr + slot + 1, mask=live, other=0) - start) // VEC
        x_seg = x_rows + s * SEG * stride_xk
        start3 = start[None, :, None] + entry  # (1, ROWS, STEP)
        chunks3 = chunks[None, :, None]
        for j in range(tl.cdiv(tl.max(chunks), LANES)):  # to the group's longest segment; shorter rows masked
            ok = j * LANES + part < chunks3  # whole VEC-entry chunks: the loads stay vectors
            if LANES == 1 or not FLAT_GATHER:
                v = tl.load(values_ptr + (start3 + j * STEP), mask=ok, other=0.0)
                col = tl.load(cols_ptr + (start3 + j * STEP), mask=ok, other=0)
            else:  # Triton < 3.7 (kernels.triton_compat): all three loads flat, so the loop keeps one layout
                v = tl.reshape(tl.load(tl.reshape(values_ptr + (start3 + j * STEP), (FLAT,)),
                                       mask=tl.reshape(ok, (FLAT,)), other=0.0), (BLOCK_M, ROWS, STEP))
                col = tl.reshape(tl.load(tl.reshape(cols_ptr + (start3 + j * STEP), (FLAT,)),
                                         mask=tl.reshape(ok, (FLAT,)), other=0), (BLOCK_M, ROWS, STEP))
            x_ptrs = x_seg + col.to(tl.int32) * stride_xk  # padding: column 0 of the segment, in bounds
            if LANES == 1 or FLAT_GATHER:  # a flat gather (kernels.triton_compat; no worse under Triton 3.7)
                x = tl.reshape(tl.load(tl.reshape(x_ptrs, (FLAT,))), (BLOCK_M, ROWS, STEP))
            else:
                x = tl.load(x_ptrs)
            acc += v.to(tl.float32) * x.to(tl.float32)

    total = tl.sum(acc, axis=2)  # (BLOCK_M, ROWS)
    on = rows[None, :]
    om = rm[:, None]
    if HAS_BIAS:  # added once, by the first K split
        total += tl.load(bias_ptr + on, mask=(on < N) & (pid_k == 0), other=0.0).to(tl.float32)
    mask = (om < M) & (on < N)
    out = out_ptr + om.to(tl.int64) * stride_om + on * stride_on
    if SPLIT:  # split-K reduced in this launch (kernels/splitk.py)
        counter = count_ptr + pid_m * tl.num_programs(1) + pid_n
        store_split(total, out, mask, om.to(tl.int64) * N + on, ws_ptr, counter, pid_k, splits, M, N)
    else:
        tl.store(out, total.to(out_ptr.dtype.element_ty), mask=mask)


NUM_WARPS = 1  # one warp per program: no barriers or shared memory in the loop
# Split-K aims for this many one-warp programs per SM, to hide the gathers' latency. Measured on an H200
# (runs/bench/gpu/NVIDIA_H200-occupancy.json, 4096x14336, M=1, 70 / 90 %): 8 → 0.37x / 0.88x cuBLAS, 32 → 0.74x /
# 1.56x, 64 → 0.68x / 1.45x, 128 → 0.66x / 1.32x.
PROGRAMS_PER_SM = 32
MAX_BLOCK_M = 16  # rows of x per program; more rows run more programs along M (no tensor cores here)

_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def lanes_per_row(block_m: int) -> int:
    """DECODE_LANES at one row of x; one otherwise (a (BLOCK_M, 8, 16) accumulator compiles, with Triton 3.7 for
    sm_90, to a split loop with layout conversions; (BLOCK_M, 32, 4) does not)."""
    return DECODE_LANES if block_m == 1 else 1


@dataclass(frozen=True)
class Launch:
    """How `triton_matmul` launches the kernel: grid (M blocks, row groups, K splits), BLOCK_M, lanes per row,
    segments per split. The static benchmark (allocator.benchmarks.kernel_static) compiles exactly this."""

    grid: tuple[int, int, int]
    block_m: int
    lanes: int
    split: int
    segs_per_split: int
    num_warps: int = NUM_WARPS

    @property
    def rows(self) -> int:
        """Rows of W per program."""
        return WARP // self.lanes

    @property
    def kernel(self) -> triton.runtime.JITFunction:
        return _csr8_matmul_kernel


def launch_plan(m: int, n: int, k: int, sms: int | None, split_k: int | None = None) -> Launch:
    """The launch for m rows of x against an (n, k) weight on a device with `sms` SMs (None: the interpreter, which
    runs programs in series, so no split); `split_k` forces the number of K splits."""
    block_m = min(MAX_BLOCK_M, triton.next_power_of_2(max(m, 1)))
    lanes = lanes_per_row(block_m)
    segs = max(1, -(-k // SEG))
    programs = triton.cdiv(m, block_m) * triton.cdiv(n, WARP // lanes)
    if split_k is not None:
        split = split_k
    elif sms is None or programs >= PROGRAMS_PER_SM * sms:
        split = 1
    else:
        split = max(1, min(-(-PROGRAMS_PER_SM * sms // programs), segs // 2))
    if split < 1:
        raise UnsupportedShape(f"csr8.triton_matmul: split_k={split} must be >= 1")
    per_split = triton.cdiv(segs, split)
    split = triton.cdiv(segs, per_split)  # no empty splits
    return Launch((triton.cdiv(m, block_m), triton.cdiv(n, WARP // lanes), split), block_m, lanes, split, per_split)


def buffers(plan: Launch, m: int, n: int, dtype: torch.dtype, device: torch.device | str) -> Buffers:
    """What one launch writes (kernels/splitk.py): the output tiles are the grid's first two axes."""
    return splitk_buffers(plan.split, plan.grid[0] * plan.grid[1], m, n, dtype, device)


def kernel_arguments(
    x2: torch.Tensor, w: CSR8Weight, bias: torch.Tensor | None, bufs: Buffers, plan: Launch
) -> tuple[tuple, dict]:
    """The kernel's runtime arguments and constexprs for one launch on a 2-D x (what triton_matmul passes)."""
    m = x2.shape[0]
    out = bufs.out
    args = (x2, w.offsets, w.cols, w.values, bias if bias is not None else w.values, out, bufs.workspace,
            bufs.counts, m, w.shape[0], x2.stride(0), x2.stride(1), out.stride(0), out.stride(1),
            w.segments, plan.segs_per_split, plan.split)
    constexprs = {"LANES": plan.lanes, "VEC": VEC, "SEG": SEG, "BLOCK_M": plan.block_m, "HAS_BIAS": bias is not None,
                  "SPLIT": plan.split > 1}
    return args, constexprs


def triton_matmul(
    x: torch.Tensor, w: CSR8Weight, bias: torch.Tensor | None = None, *, split_k: int | None = None
) -> torch.Tensor:
    """x[..., K] @ W.T + bias by the Triton kernel; output in x's dtype, fp32 accumulation.

    `split_k` forces the number of K splits (default: enough programs to fill the GPU). CUDA tensors, or CPU
    tensors with TRITON_INTERPRET=1 set before this module was imported."""
    where = "csr8.triton_matmul"
    check_linear_call(where, x, w, bias)
    check_kernel_device(where, "csr8", INTERPRETED, x, w.offsets, w.cols, w.values, bias)
    n, k = w.shape
    lead = x.shape[:-1]
    if x.numel() == 0 or n == 0 or k == 0:  # nothing to launch; an empty K sum is zero
        return F.linear(x, x.new_zeros(n, k), bias)
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    plan = launch_plan(m, n, k, _sm_count(x.device) if x.device.type == "cuda" else None, split_k)
    if plan.grid[1] > 65535:  # grid axis 1; CUDA caps it at 65535
        raise UnsupportedShape(f"{where}: out_features={n} needs {plan.grid[1]} row groups of {plan.rows}, at most 65535")
    bufs = buffers(plan, m, n, x.dtype, x.device)
    args, constexprs = kernel_arguments(x2, w, bias, bufs, plan)
    plan.kernel[plan.grid](*args, **constexprs, num_warps=plan.num_warps)
    out = bufs.out.to(x.dtype) if fp32_out(x.dtype) else bufs.out
    return out.reshape(*lead, n)
