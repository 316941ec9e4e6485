"""Bitmap sparse format: one bit per weight element plus the non-zero values packed, and its Triton matmul kernels.

Layout (format version 2). The (out_features N, in_features K) weight is zero-padded to whole tiles of (tile_n rows x
tile_k columns) (default 16 x 64) and stored as
  - `bitmap`  int32 (tiles_n, tiles_k, tile_k // 32, tile_n): bit j of word [.., w, r] is element (r, 32 * w + j) of the
              tile; 1 = stored. Word-major within a tile, so one word column of a tile's rows is contiguous: the decode
              kernel loads it with vector loads.
  - `offsets` int32 (tiles_n * tiles_k * tile_n + 1,): start in `values` of each tile row's values (tiles in row-major
              order, a tile's rows in order); the last entry is the number of stored values. A value's position is
              then its row's offset plus a popcount of the bits before it in that row: no scan at run time.
  - `values`  (nnz,) in the weight's dtype: stored elements, tile by tile, row-major within a tile.
  - `shape`   int64 (2,): (N, K) before padding.
The tile shape is read back from `bitmap.shape`, so `tensors()` carries everything needed to rebuild the weight.
Version 1 (row-major words, one offset per tile) is recognised by its offsets' length and converted on load
(`from_tensors`), so exports written before still load.

"Non-zero" is decided on the bit pattern, not on `!= 0`: -0.0 is stored, so decompress(compress(w)) is bitwise w.

Kernel (`_bitmap_matmul_kernel`). One warp per program: BLOCK_M rows of x, one tile row of W and a contiguous range of
K tiles (split-K up to about 8 programs per SM). It walks a tile one 32-column word at a time; lane j owns column j
of the word for every row of the tile, so per element it masks the row's word below its bit, takes the popcount,
adds the row's stored offset and loads the value there (predicated on its bit): no scans, barriers or layout
conversions in the loop. One row of x (decode) multiplies into a (tile_n, 32) fp32 accumulator reduced once at the
end; more rows pass the decoded (tile_n, 32) slice to `tl.dot` (tensor cores), so the decode work is shared by up to
64 rows. Accumulation is fp32; split-K programs write fp32 partial sums to a workspace, and the last split of each
output tile to finish adds them in split order, casts and stores, in the same launch (no sum or cast kernel after
it), so results are deterministic."""

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

DTYPES = FLOAT_DTYPES
# Same-width integer views, so "stored" is decided on bits (keeps -0.0 and NaN payloads exact).
_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
DEFAULT_TILE = (16, 64)
# Triton built this module's kernel for its interpreter (TRITON_INTERPRET=1 at import): it then runs on CPU tensors.
_MAX_INT32 = 2**31 - 1
FORMAT_VERSION = 2  # per tile-row offsets, word-major tiles; version 1 (per-tile offsets, row-major words) converts


@dataclass
class BitmapWeight(CompressedWeight):
    """A compressed (out_features, in_features) weight; see the module docstring for the layout."""

    DATA = ("bitmap", "offsets", "values")
    VALUES = "values"

    shape: tuple[int, int]
    bitmap: torch.Tensor
    offsets: torch.Tensor
    values: torch.Tensor

    @property
    def tile(self) -> tuple[int, int]:
        return self.bitmap.shape[3], self.bitmap.shape[2] * 32

    @property
    def tiles(self) -> tuple[int, int]:
        return self.bitmap.shape[0], self.bitmap.shape[1]

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        n, k = self.shape
        return self.nnz / (n * k) if n * k else 0.0


    def tensors(self) -> dict[str, torch.Tensor]:
        shape = torch.tensor(self.shape, dtype=torch.int64)
        return {"shape": shape, "bitmap": self.bitmap, "offsets": self.offsets, "values": self.values}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> BitmapWeight:
        """Rebuild from `tensors()`. Checks structure only (shapes, dtypes, devices): it reads no device memory
        but `shape`, so it stays cheap and CUDA-graph safe when `shape` lives on the CPU."""
        missing = {"shape", "bitmap", "offsets", "values"} - tensors.keys()
        if missing:
            raise UnsupportedShape(f"bitmap tensors: missing {sorted(missing)}; got {sorted(tensors)}")
        shape_t, bitmap, offsets, values = (tensors[k] for k in ("shape", "bitmap", "offsets", "values"))
        if shape_t.numel() != 2:
            raise UnsupportedShape(f"bitmap tensors: shape={tuple(shape_t.tolist())} must hold (out, in)")
        n, k = (int(v) for v in shape_t.tolist())
        if bitmap.dtype != torch.int32 or bitmap.dim() != 4:
            raise UnsupportedShape(
                f"bitmap tensors: bitmap {bitmap.dtype} {tuple(bitmap.shape)} must be int32 "
                "(tiles_n, tiles_k, tile_k // 32, tile_n)"
            )
        if offsets.dim() == 1 and offsets.shape[0] == bitmap.shape[0] * bitmap.shape[1] + 1 and bitmap.numel():
            bitmap, offsets = _from_version_1(bitmap, offsets)
        w = cls(shape=(n, k), bitmap=bitmap, offsets=offsets, values=values)
        (tn, tk), (rows, cols) = w.tile, w.tiles
        if rows != -(-n // tn) or cols != -(-k // tk):
            raise UnsupportedShape(
                f"bitmap tensors: {rows}x{cols} tiles of {tn}x{tk} do not cover shape {(n, k)} exactly"
            )
        expect = rows * cols * tn + 1
        if offsets.dtype != torch.int32 or tuple(offsets.shape) != (expect,):
            raise UnsupportedShape(
                f"bitmap tensors: offsets {offsets.dtype} {tuple(offsets.shape)} must be int32 ({expect},): one per "
                f"tile row plus the end (bitmap format version {FORMAT_VERSION})"
            )
        if values.dtype not in DTYPES or values.dim() != 1:
            raise UnsupportedShape(f"bitmap tensors: values {values.dtype} {tuple(values.shape)} must be 1-D {DTYPES}")
        if not (bitmap.device == offsets.device == values.device):
            raise UnsupportedShape(
                f"bitmap tensors: on different devices (bitmap {bitmap.device}, offsets {offsets.device}, "
                f"values {values.device})"
            )
        return w

    def to(self, device: torch.device | str) -> BitmapWeight:
        return BitmapWeight(self.shape, self.bitmap.to(device), self.offsets.to(device), self.values.to(device))


def _from_version_1(bitmap: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A version-1 bitmap (row-major words (.., tile_n, tile_k // 32), one offset per tile) in version 2's layout:
    words transposed, each tile row's offset its tile's plus the popcounts of the rows before it. Device ops only."""
    if offsets.dtype != torch.int32:
        raise UnsupportedShape(f"bitmap tensors: version-1 offsets {offsets.dtype} must be int32")
    words = bitmap.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(32, device=bitmap.device, dtype=torch.int64)
    row_counts = ((words[..., None] >> shifts) & 1).sum((-1, -2))  # (tiles_n, tiles_k, tile_n)
    before = row_counts.cumsum(-1) - row_counts
    rows = offsets[:-1].to(torch.int64).reshape(before.shape[:2])[..., None] + before
    new_offsets = torch.cat([rows.flatten(), offsets[-1:].to(torch.int64)]).to(torch.int32)
    return bitmap.transpose(2, 3).contiguous(), new_offsets


def _check_tile(tile: tuple[int, int]) -> tuple[int, int]:
    tn, tk = (int(v) for v in tile)
    # tl.dot needs every dimension >= 16 and tl.arange powers of two; words are 32 bits.
    if tn < 16 or tn & (tn - 1):
        raise UnsupportedShape(f"bitmap: tile_n={tn} must be a power of two >= 16")
    if tk < 32 or tk & (tk - 1):
        raise UnsupportedShape(f"bitmap: tile_k={tk} must be a power of two >= 32")
    return tn, tk


def _check_weight(dense: torch.Tensor) -> None:
    if dense.dim() != 2:
        raise UnsupportedShape(f"bitmap: weight shape {tuple(dense.shape)} must be 2-D (out_features, in_features)")
    if dense.dtype not in DTYPES:
        raise UnsupportedShape(f"bitmap: weight dtype {dense.dtype} must be one of {DTYPES}")


def _tiled(t: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """(N, K) → zero-padded (tiles_n, tiles_k, tile_n, tile_k)."""
    (n, k), (tn, tk) = t.shape, tile
    padded = F.pad(t, (0, -k % tk, 0, -n % tn))
    return padded.reshape(padded.shape[0] // tn, tn, padded.shape[1] // tk, tk).transpose(1, 2).contiguous()


def compress(dense: torch.Tensor, tile: tuple[int, int] = DEFAULT_TILE) -> BitmapWeight:
    """Bitmap-compress a 2-D fp16/bf16/fp32 weight on its device; exact bit for bit."""
    _check_weight(dense)
    tn, tk = _check_tile(tile)
    n, k = dense.shape
    tiles = _tiled(dense.detach(), (tn, tk))
    mask = tiles.view(_INT_VIEW[dense.dtype]) != 0
    # Boolean indexing walks C order: tile by tile, row-major within a tile — the packing order.
    values = tiles[mask]
    if values.numel() > _MAX_INT32:
        raise UnsupportedShape(f"bitmap: {values.numel()} stored values exceed the int32 offsets (2**31 - 1)")
    counts = mask.sum(-1, dtype=torch.int64).flatten()  # per tile row, in packing order
    offsets = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    weights = torch.ones(32, dtype=torch.int64, device=dense.device) << torch.arange(32, device=dense.device)
    words = (mask.reshape(*mask.shape[:3], tk // 32, 32).to(torch.int64) * weights).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement, no overflow cast
    return BitmapWeight(shape=(n, k), bitmap=words.transpose(2, 3).contiguous(), offsets=offsets, values=values)


def stored_nbytes(shape: tuple[int, int], kept: int, dtype: torch.dtype, tile: tuple[int, int] = DEFAULT_TILE) -> int:
    """Bytes `compress` stores (BitmapWeight.nbytes) for an (N, K) weight with `kept` stored elements, from the
    layout alone: one bit per element of every zero-padded tile, one int32 offset per tile row plus the end, the
    values."""
    n, k, value_bytes = check_layout_args("bitmap.stored_nbytes", shape, kept, dtype)
    tn, tk = _check_tile(tile)
    tiles = -(-n // tn) * -(-k // tk)
    return tiles * tn * (tk // 32) * 4 + (tiles * tn + 1) * 4 + kept * value_bytes


def dot_elements(shape: tuple[int, int], kept: int, tile: tuple[int, int] = DEFAULT_TILE) -> int:
    """Weight elements the kernel multiplies with each row of x: every element of every padded tile (each is
    decoded, multiplied or handed to tl.dot as zero or its value), however few are stored."""
    n, k, _ = check_layout_args("bitmap.dot_elements", shape, kept, torch.float32)
    tn, tk = _check_tile(tile)
    return -(-n // tn) * tn * -(-k // tk) * tk


def _mask(w: BitmapWeight) -> torch.Tensor:
    """(tiles_n, tiles_k, tile_n, tile_k) bool: which elements are stored."""
    shifts = torch.arange(32, device=w.bitmap.device, dtype=torch.int64)
    bits = (w.bitmap.transpose(2, 3).to(torch.int64)[..., None] >> shifts) & 1
    return bits.flatten(-2).bool()


def decompress(w: BitmapWeight) -> torch.Tensor:
    mask = _mask(w)
    tiles = torch.zeros(mask.shape, dtype=w.values.dtype, device=w.values.device)
    tiles[mask] = w.values  # raises if the bitmap's popcount and the number of values disagree
    rows, cols, tn, tk = tiles.shape
    n, k = w.shape
    return tiles.transpose(1, 2).reshape(rows * tn, cols * tk)[:n, :k].contiguous()


def reference_matmul(x: torch.Tensor, w: BitmapWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x[..., K] @ W.T + bias in pure torch, W expanded from the compressed tensors on every call (a bias of
    another float dtype is cast to x's)."""
    check_linear_call("bitmap.reference_matmul", x, w, bias)
    return F.linear(x, decompress(w), None if bias is None else bias.to(x.dtype))


@triton.jit
def _popc(v, NATIVE: tl.constexpr):
    """Set bits of each uint32, as int32: the POPC instruction compiled; a SWAR count in the interpreter, which has
    no libdevice."""
    if NATIVE:
        return tl.extra.cuda.libdevice.popc(v.to(tl.int32, bitcast=True))
    else:
        v = v - ((v >> 1) & 0x55555555)
        v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
        v = (v + (v >> 4)) & 0x0F0F0F0F
        return ((v * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _bitmap_matmul_kernel(
    x_ptr, bitmap_ptr, offsets_ptr, values_ptr, bias_ptr, out_ptr, ws_ptr, count_ptr,
    M, N, K, stride_xm, stride_xk, stride_om, stride_on,
    tiles_k, tiles_per_split, splits,
    TILE_N: tl.constexpr, TILE_K: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr, NATIVE_POPC: tl.constexpr,
):
    """BLOCK_M rows of x (program axis 0) against one tile row of W (axis 1) over a range of K tiles (axis 2), by one
    warp. The tile is walked one 32-column word at a time; lane j owns column j of the word for all TILE_N rows, so
    each element costs a mask, a popcount, an add and a predicated gather, with no scans, barriers or cross-lane
    traffic. BLOCK_M == 1 multiplies into a (TILE_N, 32) fp32 accumulator reduced once at the end; BLOCK_M >= 16
    hands the (TILE_N, 32) slice of W to tl.dot (tensor cores), so the decode work is shared by all the rows."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    WORDS: tl.constexpr = TILE_K // 32
    USE_DOT: tl.constexpr = BLOCK_M > 1

    rn = tl.arange(0, TILE_N)[:, None]
    lane = tl.arange(0, 32)[None, :]
    own = tl.full([1, 32], 1, tl.uint32) << lane.to(tl.uint32)
    below = own - 1  # the bits before this lane's
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]  # (BLOCK_M, 1)

    if USE_DOT:
        acc = tl.zeros((BLOCK_M, TILE_N), dtype=tl.float32)
    else:
        acc = tl.zeros((TILE_N, 32), dtype=tl.float32)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, tiles_k)
    for t in range(t_start, t_end):
        tile = pid_n * tiles_k + t
        rank = tl.load(offsets_ptr + tile * TILE_N + rn)  # (TILE_N, 1): where each row's values start
        for w in tl.static_range(WORDS):
            words = tl.load(bitmap_ptr + (tile * WORDS + w) * TILE_N + rn).to(tl.uint32, bitcast=True)
            stored = (words & own) != 0
            v_ptrs = values_ptr + (rank + _popc(words & below, NATIVE_POPC))
            if USE_DOT:
                v = tl.load(v_ptrs, mask=stored, other=0.0)
            else:  # a flat gather: Triton 3.6 would convert a 2-D one's layout every word (kernels.triton_compat)
                v = tl.reshape(tl.load(tl.reshape(v_ptrs, (TILE_N * 32,)), mask=tl.reshape(stored, (TILE_N * 32,)),
                                       other=0.0), (TILE_N, 32))
            if w + 1 < WORDS:
                rank += _popc(words, NATIVE_POPC)
            xk = t * TILE_K + w * 32 + lane
            x = tl.load(x_ptr + rm * stride_xm + xk * stride_xk, mask=(rm < M) & (xk < K), other=0.0)
            if USE_DOT:
                if UPCAST:  # the interpreter's tl.dot mishandles bf16: it multiplies fp32 copies
                    x = x.to(tl.float32)
                    v = v.to(tl.float32)
                acc = tl.dot(x, tl.trans(v), acc, input_precision=DOT_PRECISION)
            else:
                acc += v.to(tl.float32) * x.to(tl.float32)

    on = (pid_n * TILE_N + tl.arange(0, TILE_N))[None, :]
    if USE_DOT:
        total = acc
    else:
        total = tl.sum(acc, axis=1)[None, :]  # (1, TILE_N): the one reduction across lanes
    if HAS_BIAS:  # added once, by the first K split
        total += tl.load(bias_ptr + on, mask=(on < N) & (pid_k == 0), other=0.0).to(tl.float32)
    mask = (rm < M) & (on < N)
    out = out_ptr + rm * stride_om + on * stride_on
    if SPLIT:  # split-K reduced in this launch (kernels/splitk.py)
        store_split(total, out, mask, rm * N + on, ws_ptr, count_ptr + pid_m * tl.num_programs(1) + pid_n, pid_k,
                    splits, M, N)
    else:
        tl.store(out, total.to(out_ptr.dtype.element_ty), mask=mask)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _block_m(m: int) -> int:
    """One row of x: the multiply-add path. More: tl.dot, whose dimensions must be >= 16; past 64 rows, more
    programs along M (each decodes the tile again, which costs issue slots but keeps registers in bounds)."""
    if m <= 1:
        return 1
    return min(64, max(16, triton.next_power_of_2(m)))


def _default_split_k(programs: int, tiles_k: int, sms: int | None) -> int:
    """Split K until the grid has about PROGRAMS_PER_SM programs per SM (`sms` None: the interpreter), keeping at
    least two tiles per split."""
    if sms is None:
        return 1  # the interpreter runs programs one after another: splitting only adds work
    target = PROGRAMS_PER_SM * sms
    if programs >= target:
        return 1
    return max(1, min(-(-target // programs), tiles_k // 2))


NUM_WARPS = 1  # one warp per program: no barriers or shared memory in the loop
# One-warp programs per SM that split-K aims for, so enough warps wait on their dependent loads (bitmap words, then
# the values they rank) at once. Measured on an H200 (runs/bench/gpu/NVIDIA_H200-occupancy.json, 70 %, M=1 / 16):
# 8 → 0.38x / 0.39x cuBLAS, 32 → 0.54x / 0.63x, 64 → 0.63x / 0.57x, 128 → 0.66x / 0.45x on 4096x14336.
PROGRAMS_PER_SM = 64


@dataclass(frozen=True)
class Launch:
    """How `triton_matmul` launches the kernel for one call: grid (M blocks, tile rows, K splits), constexprs,
    warps. The static benchmark (allocator.benchmarks.kernel_static) compiles exactly this."""

    grid: tuple[int, int, int]
    block_m: int
    split: int
    tiles_per_split: int
    num_warps: int = NUM_WARPS

    @property
    def use_dot(self) -> bool:
        return self.block_m > 1

    @property
    def kernel(self) -> triton.runtime.JITFunction:
        return _bitmap_matmul_kernel


def launch_plan(m: int, tiles: tuple[int, int], sms: int | None, split_k: int | None = None) -> Launch:
    """The launch for m rows of x against a weight of `tiles` (tiles_n, tiles_k) on a device with `sms` SMs (None:
    the interpreter); `split_k` forces the number of K splits."""
    tiles_n, tiles_k = tiles
    block_m = _block_m(m)
    grid_m = triton.cdiv(m, block_m)
    split = split_k if split_k is not None else _default_split_k(grid_m * tiles_n, tiles_k, sms)
    if split < 1:
        raise UnsupportedShape(f"bitmap.triton_matmul: split_k={split} must be >= 1")
    per_split = triton.cdiv(tiles_k, split)
    split = triton.cdiv(tiles_k, per_split)  # no empty splits
    return Launch((grid_m, tiles_n, split), block_m, split, per_split)


def buffers(plan: Launch, m: int, n: int, dtype: torch.dtype, device: torch.device | str) -> Buffers:
    """What one launch writes (kernels/splitk.py): the output tiles are the grid's first two axes."""
    return splitk_buffers(plan.split, plan.grid[0] * plan.grid[1], m, n, dtype, device)


def kernel_arguments(
    x2: torch.Tensor, w: BitmapWeight, bias: torch.Tensor | None, bufs: Buffers, plan: Launch
) -> tuple[tuple, dict]:
    """The kernel's runtime arguments and constexprs for one launch on a 2-D x (what triton_matmul passes)."""
    m, k = x2.shape
    (tn, tk), tiles_k = w.tile, w.tiles[1]
    out = bufs.out
    args = (x2, w.bitmap, w.offsets, w.values, bias if bias is not None else w.values, out, bufs.workspace,
            bufs.counts, m, w.shape[0], k, x2.stride(0), x2.stride(1), out.stride(0), out.stride(1),
            tiles_k, plan.tiles_per_split, plan.split)
    constexprs = {"TILE_N": tn, "TILE_K": tk, "BLOCK_M": plan.block_m, "UPCAST": INTERPRETED,
                  "HAS_BIAS": bias is not None,
                  "DOT_PRECISION": "ieee" if x2.dtype == torch.float32 else "tf32",  # fp32: fp32, not TF32
                  "SPLIT": plan.split > 1, "NATIVE_POPC": not INTERPRETED}
    return args, constexprs


def triton_matmul(
    x: torch.Tensor, w: BitmapWeight, bias: torch.Tensor | None = None, *, split_k: int | None = None
) -> torch.Tensor:
    """x[..., K] @ W.T + bias by the Triton kernel; output in x's dtype, fp32 accumulation.

    `split_k` forces the number of K splits (default: enough programs to fill the GPU). CUDA tensors, or CPU
    tensors with TRITON_INTERPRET=1 set before this module was imported."""
    where = "bitmap.triton_matmul"
    check_linear_call(where, x, w, bias)
    check_kernel_device(where, "bitmap", INTERPRETED, x, w.bitmap, w.offsets, w.values, bias)
    n, k = w.shape
    tn, (tiles_n, tiles_k) = w.tile[0], w.tiles
    lead = x.shape[:-1]
    if x.numel() == 0 or n == 0:  # nothing to launch; an empty K sum is zero
        return F.linear(x, x.new_zeros(n, k), bias)
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if tiles_n > 65535:  # grid axis 1; CUDA caps it at 65535
        raise UnsupportedShape(f"{where}: out_features={n} needs {tiles_n} row tiles of {tn}, at most 65535")
    plan = launch_plan(m, (tiles_n, tiles_k), _sm_count(x.device) if x.device.type == "cuda" else None, split_k)
    bufs = buffers(plan, m, n, x.dtype, x.device)
    args, constexprs = kernel_arguments(x2, w, bias, bufs, plan)
    plan.kernel[plan.grid](*args, **constexprs, num_warps=plan.num_warps)
    out = bufs.out.to(x.dtype) if fp32_out(x.dtype) else bufs.out
    return out.reshape(*lead, n)
