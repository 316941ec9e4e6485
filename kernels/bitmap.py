"""Bitmap sparse format: one bit per weight element plus the non-zero values packed, and its Triton matmul kernel.

Layout. The (out_features N, in_features K) weight is zero-padded to whole tiles of (tile_n rows x tile_k columns)
(default 16 x 64) and stored as
  - `bitmap`  int32 (tiles_n, tiles_k, tile_n, tile_k // 32): bit j of word w in row r of a tile is element
              (r, 32 * w + j) of the tile; 1 = stored. Tile-major so one tile's bits are one contiguous 128 bytes.
  - `offsets` int32 (tiles_n * tiles_k + 1,): start of each tile's values in `values`, tiles in row-major order;
              the last entry is the number of stored values. A program finds its tile's values without a prefix sum
              over the whole matrix.
  - `values`  (nnz,) in the weight's dtype: stored elements, tile by tile, row-major within a tile.
  - `shape`   int64 (2,): (N, K) before padding.
The tile shape is read back from `bitmap.shape`, so `tensors()` carries everything needed to rebuild the weight.

"Non-zero" is decided on the bit pattern, not on `!= 0`: -0.0 is stored, so decompress(compress(w)) is bitwise w.

Kernel. Each program owns BLOCK_M rows of x, one tile row of W (tile_n outputs) and a contiguous range of K tiles
(split-K). Per tile it loads the bitmap words, turns each element's bit into its rank among the tile's stored values
(a row-wise cumsum plus the exclusive cumsum of row counts), gathers the values from `offsets[tile] + rank`, and
multiplies with x by `tl.dot` (BLOCK_M >= 16) or a broadcast multiply-reduce (M <= 4, decode). Accumulation is fp32;
split-K programs write fp32 partial sums to a workspace, and the last split of each output tile to finish adds them in
split order, casts and stores, in the same launch (no sum or cast kernel after it), so results are deterministic."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.compressed import CompressedWeight
from kernels.errors import FLOAT_DTYPES, UnsupportedShape, check_kernel_device, check_layout_args, check_linear_call
from kernels.splitk import arrival_counts

DTYPES = FLOAT_DTYPES
# Same-width integer views, so "stored" is decided on bits (keeps -0.0 and NaN payloads exact).
_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
DEFAULT_TILE = (16, 64)
# Triton built this module's kernel for its interpreter (TRITON_INTERPRET=1 at import): it then runs on CPU tensors.
INTERPRETED = bool(triton.knobs.runtime.interpret)
_MAX_INT32 = 2**31 - 1


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
        return self.bitmap.shape[2], self.bitmap.shape[3] * 32

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
                "(tiles_n, tiles_k, tile_n, tile_k // 32)"
            )
        w = cls(shape=(n, k), bitmap=bitmap, offsets=offsets, values=values)
        (tn, tk), (rows, cols) = w.tile, w.tiles
        if rows != -(-n // tn) or cols != -(-k // tk):
            raise UnsupportedShape(
                f"bitmap tensors: {rows}x{cols} tiles of {tn}x{tk} do not cover shape {(n, k)} exactly"
            )
        if offsets.dtype != torch.int32 or tuple(offsets.shape) != (rows * cols + 1,):
            raise UnsupportedShape(
                f"bitmap tensors: offsets {offsets.dtype} {tuple(offsets.shape)} must be int32 ({rows * cols + 1},)"
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
    counts = mask.flatten(2).sum(-1, dtype=torch.int64).flatten()
    offsets = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    weights = torch.ones(32, dtype=torch.int64, device=dense.device) << torch.arange(32, device=dense.device)
    words = (mask.reshape(*mask.shape[:3], tk // 32, 32).to(torch.int64) * weights).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement, no overflow cast
    return BitmapWeight(shape=(n, k), bitmap=words, offsets=offsets, values=values)


def stored_nbytes(shape: tuple[int, int], kept: int, dtype: torch.dtype, tile: tuple[int, int] = DEFAULT_TILE) -> int:
    """Bytes `compress` stores (BitmapWeight.nbytes) for an (N, K) weight with `kept` stored elements, from the
    layout alone: one bit per element of every zero-padded tile, one int32 offset per tile plus the end, the
    values."""
    n, k, value_bytes = check_layout_args("bitmap.stored_nbytes", shape, kept, dtype)
    tn, tk = _check_tile(tile)
    tiles = -(-n // tn) * -(-k // tk)
    return tiles * tn * (tk // 32) * 4 + (tiles + 1) * 4 + kept * value_bytes


def dot_elements(shape: tuple[int, int], kept: int, tile: tuple[int, int] = DEFAULT_TILE) -> int:
    """Weight elements the kernel multiplies with each row of x: every element of every padded tile (a tile is
    expanded to dense in registers before tl.dot), however few are stored."""
    n, k, _ = check_layout_args("bitmap.dot_elements", shape, kept, torch.float32)
    tn, tk = _check_tile(tile)
    return -(-n // tn) * tn * -(-k // tk) * tk


def _mask(w: BitmapWeight) -> torch.Tensor:
    """(tiles_n, tiles_k, tile_n, tile_k) bool: which elements are stored."""
    shifts = torch.arange(32, device=w.bitmap.device, dtype=torch.int64)
    bits = (w.bitmap.to(torch.int64)[..., None] >> shifts) & 1
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
def _bitmap_matmul_kernel(
    x_ptr, bitmap_ptr, offsets_ptr, values_ptr, bias_ptr, out_ptr, ws_ptr, count_ptr,
    M, N, K, stride_xm, stride_xk, stride_om, stride_on,
    tiles_k, tiles_per_split, splits,
    TILE_N: tl.constexpr, TILE_K: tl.constexpr, BLOCK_M: tl.constexpr,
    USE_DOT: tl.constexpr, UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    WORDS: tl.constexpr = TILE_K // 32

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = tl.arange(0, TILE_N)
    rk = tl.arange(0, TILE_K)
    # Element (r, c) of a tile reads word c // 32 of row r (32 lanes share a word; the loads hit the same line).
    word_idx = rn[:, None] * WORDS + rk[None, :] // 32
    bit_idx = rk[None, :] % 32

    acc = tl.zeros((BLOCK_M, TILE_N), dtype=tl.float32)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, tiles_k)
    for t in range(t_start, t_end):
        tile = pid_n * tiles_k + t
        words = tl.load(bitmap_ptr + tile * (TILE_N * WORDS) + word_idx)
        bits = (words >> bit_idx) & 1
        # Rank of each stored element among its tile's values: row-major exclusive prefix count.
        row_counts = tl.sum(bits, axis=1)
        row_start = tl.cumsum(row_counts, axis=0) - row_counts
        rank = row_start[:, None] + tl.cumsum(bits, axis=1) - bits
        base = tl.load(offsets_ptr + tile)
        w = tl.load(values_ptr + (base + rank), mask=bits != 0, other=0.0)

        xk = t * TILE_K + rk
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + xk[None, :] * stride_xk,
            mask=(rm[:, None] < M) & (xk[None, :] < K),
            other=0.0,
        )
        if USE_DOT:
            if UPCAST:  # the interpreter's tl.dot mishandles bf16: it multiplies fp32 copies
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)

    on = pid_n * TILE_N + rn
    if HAS_BIAS:  # added once, by the first K split
        b = tl.load(bias_ptr + on, mask=(on < N) & (pid_k == 0), other=0.0)
        acc += b.to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (on[None, :] < N)
    out = out_ptr + rm[:, None] * stride_om + on[None, :] * stride_on
    if SPLIT:
        # Split-K reduced in this launch (kernels/splitk.py): partials to the workspace, the last split to arrive
        # on this output tile adds them in split order, casts, stores, and resets the tile's count.
        part = rm[:, None] * N + on[None, :]
        tl.store(ws_ptr + pid_k * M * N + part, acc, mask=mask)
        tl.debug_barrier()  # the whole program's partials are written before the (release) count below
        counter = count_ptr + pid_m * tl.num_programs(1) + pid_n
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == splits - 1:
            total = tl.zeros((BLOCK_M, TILE_N), dtype=tl.float32)
            for s in range(0, splits):
                total += tl.load(ws_ptr + s * M * N + part, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counter, 0)
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _block_m(m: int) -> int:
    """Decode (M <= 4): broadcast multiply-reduce on a tiny block. Larger: tl.dot, whose dims must be >= 16."""
    if m <= 4:
        return triton.next_power_of_2(max(m, 1))
    return min(64, max(16, triton.next_power_of_2(m)))


def _default_split_k(programs: int, tiles_k: int, sms: int | None) -> int:
    """Split K until the grid has about two programs per SM (`sms` None: the interpreter), keeping at least two
    tiles per split."""
    if sms is None:
        return 1  # the interpreter runs programs one after another: splitting only adds work
    target = 2 * sms
    if programs >= target:
        return 1
    return max(1, min(-(-target // programs), tiles_k // 2))


NUM_WARPS = 4


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
        return self.block_m >= 16


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


def _fp32_out(dtype: torch.dtype) -> bool:
    # bf16 in the interpreter: its fp32 → bf16 cast truncates where the GPU (and torch) round to nearest even, so
    # the kernel stores fp32 and torch casts.
    return INTERPRETED and dtype == torch.bfloat16


@dataclass
class Buffers:
    out: torch.Tensor  # (m, n) in x's dtype (fp32 for bf16 in the interpreter)
    workspace: torch.Tensor  # (split, m, n) fp32 partial sums; a placeholder when not split
    counts: torch.Tensor  # int32 arrivals per output tile; a placeholder when not split


def buffers(plan: Launch, m: int, n: int, dtype: torch.dtype, device: torch.device | str) -> Buffers:
    """What one launch writes: the output and, for split-K, the fp32 partials and the tiles' arrival counts."""
    out = torch.empty((m, n), dtype=torch.float32 if _fp32_out(dtype) else dtype, device=device)
    if plan.split == 1:
        return Buffers(out, out, out)
    workspace = torch.empty((plan.split, m, n), dtype=torch.float32, device=device)
    return Buffers(out, workspace, arrival_counts(plan.grid[0] * plan.grid[1], device))


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
    constexprs = dict(TILE_N=tn, TILE_K=tk, BLOCK_M=plan.block_m, USE_DOT=plan.use_dot, UPCAST=INTERPRETED,
                      HAS_BIAS=bias is not None,
                      DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",  # fp32: fp32, not TF32
                      SPLIT=plan.split > 1)
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
    _bitmap_matmul_kernel[plan.grid](*args, **constexprs, num_warps=plan.num_warps)
    out = bufs.out.to(x.dtype) if _fp32_out(x.dtype) else bufs.out
    return out.reshape(*lead, n)
