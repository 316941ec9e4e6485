"""N:M structured sparsity: every group of m consecutive input elements of a row holds at most n non-zeros.

Storage (per row of the (out_features, in_features) weight, G = in_features / m groups):
- values:  (out_features, G * n), the weight's dtype: each group's n kept elements in ascending in-group position.
  A group with fewer than n non-zeros is filled up with zero-valued positions, so the n in-group indices of a group
  are always distinct: the kernel can expand a group by selecting, never by adding colliding entries.
- indices: (out_features, ceil(G * n / per_byte)) uint8: the in-group position (0..m-1) of each value, packed
  `bits` = 1/2/4 bits each (the fewest that hold m - 1), low bits first: 2:4 costs 2 bits per value, 4:8 four.

The Triton kernel loads a tile of values and packed indices, expands it in registers into a dense
(BLOCK_K x BLOCK_N) tile of W^T and multiplies with tl.dot (fp32 accumulation). For power-of-two n and m (2:4,
4:8, ...) x, values and index bytes are contiguous tiles that the pipeliner streams several stages ahead (cp.async
on Hopper); other n:m load per kept slot and lay the tile's K axis out as groups x m_pow2 slots, slots >= m masked
off in x and never selected in W. Decode-sized M splits K across programs, whose fp32 partials the last of them to
finish adds in the same launch (kernels/splitk.py).

Decode (at most DECODE_MAX_M rows of x, n a power of two) runs `_nm_decode_kernel` instead, which expands nothing:
one warp per 16 rows of W works per stored value, unpacking its index, gathering x at its column and multiplying
into an fp32 accumulator reduced once at the end; split K to about 8 programs per SM, reduced in the launch.

2:4 with 16-bit values at DECODE_MAX_M < M <= PAIR_MAX_M (batched decode) runs `_nm_pair_kernel`: one warp per 16
rows of W selects each dense column from one 32-bit load per group (its two values) and the group's index nibble,
then multiplies the (16, 32) tile with tl.dot.

Zeros are compared numerically: a -0.0 that is not kept decompresses as +0.0 (equal, not the same bits)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.compressed import CompressedWeight
from kernels.errors import FLOAT_DTYPES, UnsupportedShape, check_kernel_device, check_layout_args, check_linear_call
from kernels.splitk import arrival_counts, store_split
from kernels.triton_compat import FLAT_GATHER as _FLAT_GATHER

MAX_M = 16  # indices pack at least two per byte; 1:4, 2:4, 4:8, 8:16, 2:8 are all the patterns in practice
# Triton built this module's kernels for its interpreter (TRITON_INTERPRET=1 when it was imported): they run on
# CPU tensors there and nowhere else; compiled kernels run on CUDA tensors only.
INTERPRETED = bool(triton.knobs.runtime.interpret)
FLAT_GATHER = tl.constexpr(_FLAT_GATHER)  # the decode kernel's gathers under Triton < 3.7 (kernels.triton_compat)
INT32_LIMIT = 2**31  # the kernels index with 32-bit offsets
SPLIT_M_MAX = 64  # M (rounded up to a power of two) up to which autotuning may split K


def index_bits(m: int) -> int:
    """Bits per packed in-group index: the fewest of 1, 2, 4 (a divisor of 8, so no index straddles bytes)."""
    for bits in (1, 2, 4, 8):
        if (1 << bits) >= m:
            return bits
    raise UnsupportedShape(f"nm: m={m} needs more than 8 index bits; at most m={MAX_M} is supported")


def _check_nm(where: str, n: int, m: int) -> None:
    if not isinstance(n, int) or not isinstance(m, int) or isinstance(n, bool) or isinstance(m, bool):
        raise UnsupportedShape(f"{where}: n={n!r}, m={m!r} must be integers")
    if not 2 <= m <= MAX_M:
        raise UnsupportedShape(f"{where}: m={m} must be in [2, {MAX_M}]")
    if not 1 <= n < m:
        raise UnsupportedShape(f"{where}: n={n} must satisfy 1 <= n < m={m}")


@dataclass
class NMWeight(CompressedWeight):
    DATA = ("values", "indices")
    VALUES = "values"

    shape: tuple[int, int]  # (out_features, in_features) of the dense weight
    n: int
    m: int
    values: torch.Tensor  # (out_features, in_features // m * n), the dense weight's dtype
    indices: torch.Tensor  # (out_features, packed_cols(...)) uint8

    @property
    def bits(self) -> int:
        return index_bits(self.m)


    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "values": self.values,
            "indices": self.indices,
            "shape": torch.tensor(self.shape, dtype=torch.int64),
            "nm": torch.tensor([self.n, self.m], dtype=torch.int64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "NMWeight":
        missing = {"values", "indices", "shape", "nm"} - set(tensors)
        if missing:
            raise UnsupportedShape(f"NMWeight.from_tensors: missing {sorted(missing)}; got {sorted(tensors)}")
        shape = tuple(int(v) for v in tensors["shape"].tolist())
        nm = [int(v) for v in tensors["nm"].tolist()]
        if len(shape) != 2 or len(nm) != 2:
            raise UnsupportedShape(f"NMWeight.from_tensors: shape={list(shape)} and nm={nm} must have 2 entries each")
        weight = cls((shape[0], shape[1]), nm[0], nm[1], tensors["values"], tensors["indices"])
        weight.validate()
        return weight

    def validate(self) -> None:
        """Consistency of the fields (not of the stored indices' values, which would cost a device sync)."""
        where = "NMWeight"
        _check_nm(where, self.n, self.m)
        out_features, in_features = self.shape
        if out_features < 0 or in_features < 0 or in_features % self.m:
            raise UnsupportedShape(f"{where}: shape={self.shape} needs in_features a multiple of m={self.m}")
        if self.values.dtype not in FLOAT_DTYPES:
            raise UnsupportedShape(f"{where}: values dtype {self.values.dtype} is not one of fp16/bf16/fp32")
        expect_v = (out_features, in_features // self.m * self.n)
        if tuple(self.values.shape) != expect_v:
            raise UnsupportedShape(f"{where}: values shape {tuple(self.values.shape)} != {expect_v} for "
                                   f"shape={self.shape}, {self.n}:{self.m}")
        expect_i = (out_features, packed_cols(expect_v[1], self.bits))
        if self.indices.dtype != torch.uint8 or tuple(self.indices.shape) != expect_i:
            raise UnsupportedShape(f"{where}: indices must be uint8 of shape {expect_i}, got {self.indices.dtype} "
                                   f"{tuple(self.indices.shape)}")
        if self.indices.device != self.values.device:
            raise UnsupportedShape(f"{where}: values on {self.values.device} but indices on {self.indices.device}")


def packed_cols(entries: int, bits: int) -> int:
    per_byte = 8 // bits
    return -(-entries // per_byte)


def _pack(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, entries) small ints -> (rows, packed_cols) uint8: entry e goes to byte e // per_byte, at bit
    (e % per_byte) * bits."""
    per_byte = 8 // bits
    rows, entries = idx.shape
    padded = torch.zeros(rows, packed_cols(entries, bits) * per_byte, dtype=torch.int32, device=idx.device)
    padded[:, :entries] = idx
    shifts = torch.arange(per_byte, device=idx.device, dtype=torch.int32) * bits
    return (padded.view(rows, -1, per_byte) << shifts).sum(-1).to(torch.uint8)


def _unpack(packed: torch.Tensor, bits: int, entries: int) -> torch.Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)[:, :entries]


def compress(dense: torch.Tensor, n: int = 2, m: int = 4) -> NMWeight:
    """Exact: decompress(compress(w)) == w for every w whose groups of m hold at most n non-zeros; raises
    UnsupportedShape naming the first row and group that hold more."""
    where = "nm.compress"
    _check_nm(where, n, m)
    if dense.dim() != 2:
        raise UnsupportedShape(f"{where}: weight must be 2-D (out_features, in_features), got shape "
                               f"{tuple(dense.shape)}")
    if dense.dtype not in FLOAT_DTYPES:
        raise UnsupportedShape(f"{where}: dtype {dense.dtype} is not supported; fp16, bf16 or fp32 only")
    out_features, in_features = dense.shape
    if in_features % m:
        raise UnsupportedShape(f"{where}: in_features={in_features} is not a multiple of m={m}")
    groups = dense.reshape(out_features, in_features // m, m)
    nonzero = groups != 0  # NaN counts as a non-zero (and is stored), -0.0 as a zero
    counts = nonzero.sum(-1)
    if bool((counts > n).any()):
        row, group = (int(v) for v in (counts > n).nonzero()[0])
        raise UnsupportedShape(f"{where}: row {row} group {group} has {int(counts[row, group])} non-zeros, "
                               f"{n}:{m} allows at most {n}")
    # Keep the non-zero positions, then the first zero positions to fill up to n: distinct indices per group.
    position = torch.arange(m, device=dense.device)
    key = (~nonzero).to(torch.int64) * m + position
    keep = key.argsort(dim=-1)[..., :n].sort(dim=-1).values
    values = groups.gather(-1, keep).reshape(out_features, -1).contiguous()
    indices = _pack(keep.reshape(out_features, -1).to(torch.int32), index_bits(m))
    return NMWeight((out_features, in_features), n, m, values, indices)


def _layout_args(where: str, shape: tuple[int, int], kept: int, dtype: torch.dtype, n: int, m: int) -> tuple[int, ...]:
    _check_nm(where, n, m)
    rows, cols, value_bytes = check_layout_args(where, shape, kept, dtype)
    if cols % m:
        raise UnsupportedShape(f"{where}: in_features={cols} is not a multiple of m={m}")
    if kept > rows * cols // m * n:
        raise UnsupportedShape(f"{where}: kept={kept} exceeds {n} per group of {m} ({rows * cols // m * n})")
    return rows, cols, value_bytes


def stored_nbytes(shape: tuple[int, int], kept: int, dtype: torch.dtype, n: int = 2, m: int = 4) -> int:
    """Bytes `compress` stores (NMWeight.nbytes) for an (out, in) weight, from the layout alone: n values and n
    packed `index_bits(m)`-bit indices per group of m, per row, whatever `kept` (at most n per group) is."""
    rows, cols, value_bytes = _layout_args("nm.stored_nbytes", shape, kept, dtype, n, m)
    entries = cols // m * n
    return rows * (entries * value_bytes + packed_cols(entries, index_bits(m)))


def dot_elements(shape: tuple[int, int], kept: int, n: int = 2, m: int = 4) -> int:
    """Weight elements the kernel multiplies with each row of x: each group of m expanded to its next_power_of_2(m)
    slots of a dense tile before tl.dot (every element when m is a power of two)."""
    rows, cols, _ = _layout_args("nm.dot_elements", shape, kept, torch.float32, n, m)
    return rows * (cols // m) * triton.next_power_of_2(m)


def decompress(w: NMWeight) -> torch.Tensor:
    out_features, in_features = w.shape
    groups = in_features // w.m
    idx = _unpack(w.indices, w.bits, groups * w.n).reshape(out_features, groups, w.n).to(torch.int64)
    dense = torch.zeros(out_features, groups, w.m, dtype=w.dtype, device=w.device)
    dense.scatter_(-1, idx, w.values.reshape(out_features, groups, w.n))
    return dense.reshape(out_features, in_features)


def reference_matmul(x: torch.Tensor, w: NMWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x[..., K] @ W^T + bias, expanded from the compressed tensors, accumulated in fp32, returned in x's dtype."""
    check_linear_call("nm.reference_matmul", x, w, bias)
    dense = decompress(w).float()
    out = torch.nn.functional.linear(x.float(), dense, None if bias is None else bias.float())
    return out.to(x.dtype)


@triton.jit
def _nm_matmul_kernel(
    x_ptr, val_ptr, idx_ptr, bias_ptr, out_ptr, ws_ptr, count_ptr,
    M, N, K, M_BUCKET, idx_cols,
    stride_xm, stride_xk, stride_vn, stride_in, stride_om, stride_on,
    NN: tl.constexpr, MM: tl.constexpr, MM_P2: tl.constexpr, BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    # BLOCK_K counts slots: BLOCK_G groups of MM_P2 slots, the first MM of each real input columns.
    BLOCK_G: tl.constexpr = BLOCK_K // MM_P2
    PER_BYTE: tl.constexpr = 8 // BITS
    KC: tl.constexpr = BLOCK_G * NN  # compressed entries per row and step
    # The fast path needs power-of-two n and m (tl.arange, reshape) and whole index bytes per step.
    FAST: tl.constexpr = (MM == MM_P2) and ((NN & (NN - 1)) == 0) and (KC % PER_BYTE == 0)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m  # M tiles fastest: the programs that read the same weight tile run side by side
    pid_n = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    g_loc = tl.arange(0, BLOCK_G)
    slot = tl.arange(0, MM_P2)

    groups = K // MM
    steps = tl.cdiv(groups, BLOCK_G)
    steps_per_split = tl.cdiv(steps, SPLIT_K)
    step_begin = pid_k * steps_per_split
    step_end = tl.minimum(steps, step_begin + steps_per_split)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Offsets are step * (a constant) + arange: the compiler sees their alignment, so the loads vectorise and
    # the pipeliner can issue them stages ahead. Split boundaries fall on steps, so only the matrix end masks.
    for step in range(step_begin, step_end):
        g = step * BLOCK_G + g_loc  # (BLOCK_G,)
        mask_g = g < groups
        if MM == MM_P2:  # slots are columns: one contiguous (BLOCK_M, BLOCK_K) tile
            col = step * BLOCK_K + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + col[None, :] * stride_xk,
                        mask=mask_m[:, None] & (col < K)[None, :], other=0.0)
        else:  # (BLOCK_M, BLOCK_G, MM_P2): column g*MM + slot, the padding slots read as 0
            col3 = g[:, None] * MM + slot[None, :]
            mask_x = mask_m[:, None, None] & (mask_g[:, None] & (slot[None, :] < MM))[None, :, :]
            x3 = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + col3[None, :, :] * stride_xk, mask=mask_x,
                         other=0.0)
            a = tl.reshape(x3, (BLOCK_M, BLOCK_K))
        # Expand the compressed entries p = g*NN + s of each row into a (BLOCK_N, BLOCK_G, MM_P2) tile. A group's
        # indices are distinct, so each slot is selected at most once. Masked-off rows and groups read code 0 and
        # value 0: they can only touch slots that no output uses.
        if FAST:  # contiguous (vectorised, pipelinable) loads of values and packed bytes, unpacked in registers
            pc = step * KC + tl.arange(0, KC)
            v = tl.load(val_ptr + offs_n[:, None] * stride_vn + pc[None, :],
                        mask=mask_n[:, None] & (pc < groups * NN)[None, :], other=0.0)
            pb = step * (KC // PER_BYTE) + tl.arange(0, KC // PER_BYTE)
            byte = tl.load(idx_ptr + offs_n[:, None] * stride_in + pb[None, :],
                           mask=mask_n[:, None] & (pb < idx_cols)[None, :], other=0)
            shift = tl.arange(0, PER_BYTE) * BITS
            code = (byte.to(tl.int32)[:, :, None] >> shift[None, None, :]) & ((1 << BITS) - 1)
            code = tl.reshape(code, (BLOCK_N, BLOCK_G, NN))
            v3 = tl.reshape(v, (BLOCK_N, BLOCK_G, NN))
            hit = code[:, :, :, None] == slot[None, None, None, :]  # (BLOCK_N, BLOCK_G, NN, MM_P2)
            w = tl.sum(tl.where(hit, v3[:, :, :, None], 0.0), axis=2).to(val_ptr.dtype.element_ty)
        else:  # any n:m: one strided load of values and codes per kept slot s
            mask_w = mask_n[:, None] & mask_g[None, :]
            w = tl.zeros((BLOCK_N, BLOCK_G, MM_P2), dtype=val_ptr.dtype.element_ty)
            for s in tl.static_range(NN):
                p = g * NN + s
                v = tl.load(val_ptr + offs_n[:, None] * stride_vn + p[None, :], mask=mask_w, other=0.0)
                byte = tl.load(idx_ptr + offs_n[:, None] * stride_in + (p // PER_BYTE)[None, :], mask=mask_w,
                               other=0)
                code = (byte.to(tl.int32) >> ((p % PER_BYTE) * BITS)[None, :]) & ((1 << BITS) - 1)
                w = tl.where(code[:, :, None] == slot[None, None, :], v[:, :, None], w)
        b = tl.trans(tl.reshape(w, (BLOCK_N, BLOCK_K)))
        if UPCAST:  # the interpreter's tl.dot mishandles bf16: it multiplies fp32 copies
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    mask_o = mask_m[:, None] & mask_n[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_o)
    else:
        # Split-K reduced in this launch (kernels/splitk.py): partials to the (SPLIT_K, M, N) workspace, the last
        # split to arrive on this output tile adds them in split order and the bias, casts, stores, and resets the
        # tile's count.
        part = offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + pid_k * M * N + part, acc, mask=mask_o)
        tl.debug_barrier()  # the whole program's partials are written before the (release) count below
        counter = count_ptr + pid
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(0, SPLIT_K):
                total += tl.load(ws_ptr + s * M * N + part, mask=mask_o, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(out, total.to(out_ptr.dtype.element_ty), mask=mask_o)
            tl.atomic_xchg(counter, 0)


def _cuda_configs() -> list[triton.Config]:
    """Decode-sized M gets narrow tiles and split K (a 4096-row weight in 64-row tiles leaves most of an H100's
    132 SMs idle); prefill-sized M gets the usual square-ish tensor-core tiles. Hopper: 3-4 pipeline stages."""
    configs = []
    for block_m, block_n, block_k, split_k, warps, stages in (
        (16, 32, 128, 1, 4, 4), (16, 64, 128, 1, 4, 4), (16, 32, 128, 2, 4, 4), (16, 64, 128, 4, 4, 3),
        (16, 64, 64, 2, 4, 4), (16, 128, 64, 4, 4, 3), (32, 64, 64, 1, 4, 4), (32, 64, 128, 2, 4, 3),
        (64, 64, 64, 1, 4, 4), (64, 128, 64, 1, 4, 3), (128, 128, 64, 1, 8, 3), (128, 64, 64, 1, 4, 4),
        (64, 128, 32, 1, 4, 4),
    ):
        configs.append(triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                                      "SPLIT_K": split_k}, num_warps=warps, num_stages=stages))
    return configs


def _prune(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Tiles no wider in M than the M bucket (wasted MMA rows), split K only for decode-sized M, and K tiles
    that hold at least one whole group of slots."""
    m_bucket = int(named_args["M_BUCKET"])
    mm_p2 = int(kwargs["MM_P2"])  # type: ignore[call-overload]
    kept = [c for c in configs
            if c.kwargs["BLOCK_K"] >= mm_p2
            and (c.kwargs["BLOCK_M"] <= max(16, m_bucket))
            and (c.kwargs["SPLIT_K"] == 1 or m_bucket <= SPLIT_M_MAX)
            and (m_bucket <= SPLIT_M_MAX or c.kwargs["BLOCK_M"] >= 64)]
    return kept or [c for c in configs if c.kwargs["BLOCK_K"] >= mm_p2 and c.kwargs["SPLIT_K"] == 1][:1]


def candidate_configs(m: int, group: int) -> list[triton.Config]:
    """The configs the CUDA autotuner times for m rows of x and groups of `group` (the format's m): the kernel
    runs the fastest of these (the static benchmark, allocator.benchmarks.kernel_static, compiles each)."""
    return _prune(_cuda_configs(), {"M_BUCKET": triton.next_power_of_2(m)}, MM_P2=triton.next_power_of_2(group))


_tuned_kernel = triton.autotune(configs=_cuda_configs(), key=["M_BUCKET", "N", "K"],
                                prune_configs_by={"early_config_prune": _prune})(_nm_matmul_kernel)
# The interpreter runs one fixed config (autotuning there would only multiply the runtime).
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 1}


def buffers(M: int, N: int, dtype: torch.dtype, device: torch.device | str,
            config: dict[str, int] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The output, the split-K workspace and the output tiles' arrival counts one launch uses (`config` None:
    autotuned, so sized for the largest split and the smallest tiles any candidate has)."""
    # The interpreter casts fp32 to bf16 by truncation where GPUs (and torch) round to nearest even: there the
    # kernel stores fp32 and torch casts.
    fp32_out = INTERPRETED and dtype == torch.bfloat16
    out = torch.empty(M, N, dtype=torch.float32 if fp32_out else dtype, device=device)
    # The split-K workspace, only where a split can be chosen (autotuning splits decode-sized M only).
    if config is not None:
        splits = config["SPLIT_K"]
    else:
        splits = max(c.kwargs["SPLIT_K"] for c in _cuda_configs()) if triton.next_power_of_2(M) <= SPLIT_M_MAX else 1
    if splits == 1:
        return out, out, out
    ws = torch.empty((splits, M, N), dtype=torch.float32, device=device)
    return out, ws, arrival_counts(triton.cdiv(M, 16) * triton.cdiv(N, 16), device)  # tiles are >= 16 x 16


def kernel_arguments(x2d: torch.Tensor, w: NMWeight, bias: torch.Tensor | None, out: torch.Tensor,
                     ws: torch.Tensor, counts: torch.Tensor) -> tuple[tuple, dict]:
    """The kernel's runtime arguments and constexprs (all but the config's) for one launch on a 2-D x."""
    M, K = x2d.shape
    args = (x2d, w.values, w.indices, bias if bias is not None else out, out, ws, counts,
            M, w.shape[0], K, triton.next_power_of_2(M), w.indices.shape[1],  # idx_cols: a host int (alignment)
            x2d.stride(0), x2d.stride(1), w.values.stride(0), w.indices.stride(0), out.stride(0), out.stride(1))
    # fp32 weights get fp32 products ("ieee"), not TF32's 10-bit mantissas; 16-bit operands are exact either way.
    meta = dict(NN=w.n, MM=w.m, MM_P2=triton.next_power_of_2(w.m), BITS=w.bits, HAS_BIAS=bias is not None,
                UPCAST=INTERPRETED, DOT_PRECISION="ieee" if x2d.dtype == torch.float32 else "tf32")
    return args, meta


def _launch(x2d: torch.Tensor, w: NMWeight, bias: torch.Tensor | None, config: dict[str, int] | None) -> torch.Tensor:
    """One kernel launch on a 2-D x; `config` fixes the tile sizes (the interpreter, tests), None autotunes."""
    M, K = x2d.shape
    N = w.shape[0]
    out, ws, counts = buffers(M, N, x2d.dtype, x2d.device, config)
    mm_p2 = triton.next_power_of_2(w.m)
    args, meta = kernel_arguments(x2d, w, bias, out, ws, counts)

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"]

    if config is None:
        _tuned_kernel[grid](*args, **meta)
    else:
        if config["BLOCK_K"] < mm_p2 or config["BLOCK_K"] < 16 or config["BLOCK_M"] < 16 or config["BLOCK_N"] < 16:
            raise UnsupportedShape(f"nm: config {config} needs BLOCK_M, BLOCK_N >= 16 and BLOCK_K >= "
                                   f"max(16, {mm_p2}) (m={w.m} rounded to a power of two)")
        _nm_matmul_kernel[grid](*args, **meta, **config)
    return out.to(x2d.dtype)


# Decode: up to DECODE_MAX_M rows of x, all in one program, for n a power of two (so a step's entries are an arange).
DECODE_MAX_M = 4
DECODE_BLOCK_N = 16  # rows of W per program
# Groups per step, by rows of x: 32 * n entries of each row of W (contiguous vector loads), fewer when the
# (rows of x, BLOCK_N, entries) accumulator would otherwise spill.
DECODE_BLOCK_G = {1: 32, 2: 32, 4: 16}
# One-warp programs per SM that the decode kernel's split-K aims for. Measured on an H200 (2:4, M=1, 4096x14336 /
# 14336x4096; runs/bench/gpu/NVIDIA_H200-occupancy.json): 8 → 0.85x / 0.90x cuBLAS, 32 → 0.95x / 1.00x, 64 → 0.92x /
# 0.96x. The pair kernel (5-16 rows) measured no better above 8 (0.14x at 8, 0.11-0.14x above).
PROGRAMS_PER_SM = 32
PAIR_PROGRAMS_PER_SM = 8


@triton.jit
def _nm_decode_kernel(
    x_ptr, val_ptr, idx_ptr, bias_ptr, out_ptr, ws_ptr, count_ptr,
    M, N, K, stride_xm, stride_xk, stride_vn, stride_in, stride_om, stride_on,
    steps_per_split, splits,
    NN: tl.constexpr, MM: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """BLOCK_M rows of x (program axis 0) against BLOCK_N rows of W (axis 1) over a range of K steps (axis 2), by
    one warp, working per stored value: each value's column is its group's first column plus its unpacked in-group
    index, and each row of x is gathered there (L1 hits: x is small and shared by every program). Nothing is
    expanded to dense; the (BLOCK_M, BLOCK_N, entries) fp32 accumulator is reduced across lanes once, at the end."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    PER_BYTE: tl.constexpr = 8 // BITS
    KC: tl.constexpr = BLOCK_G * NN  # entries per row and step
    groups = K // MM
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[:, None]
    e = tl.arange(0, KC)[None, :]
    if BLOCK_M == 1:
        rm = pid_m
        acc = tl.zeros((BLOCK_N, KC), dtype=tl.float32)
    else:
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M))[:, None, None]  # (BLOCK_M, 1, 1)
        acc = tl.zeros((BLOCK_M, BLOCK_N, KC), dtype=tl.float32)
    x_rows = x_ptr + rm.to(tl.int64) * stride_xm

    steps = tl.cdiv(groups, BLOCK_G)
    step_begin = pid_k * steps_per_split
    step_end = tl.minimum(steps, step_begin + steps_per_split)
    for step in range(step_begin, step_end):
        p = step * KC + e  # entry of each row: group p // NN, slot p % NN
        ok = (p < groups * NN) & (rn < N)
        v = tl.load(val_ptr + rn * stride_vn + p, mask=ok, other=0.0)
        if FLAT_GATHER and BLOCK_M == 1:  # Triton < 3.7 (kernels.triton_compat)
            byte = tl.reshape(tl.load(tl.reshape(idx_ptr + rn * stride_in + p // PER_BYTE, (BLOCK_N * KC,)),
                                      mask=tl.reshape(ok, (BLOCK_N * KC,)), other=0), (BLOCK_N, KC))
        else:
            byte = tl.load(idx_ptr + rn * stride_in + p // PER_BYTE, mask=ok, other=0)
        code = (byte.to(tl.int32) >> ((p % PER_BYTE) * BITS)) & ((1 << BITS) - 1)
        col = (p // NN) * MM + code
        if BLOCK_M == 1:  # 2-D, so the compiler keeps one layout for the whole loop (no conversion, no barrier)
            if FLAT_GATHER:
                x = tl.reshape(tl.load(tl.reshape(x_rows + col * stride_xk, (BLOCK_N * KC,)),
                                       mask=tl.reshape(ok, (BLOCK_N * KC,)), other=0.0), (BLOCK_N, KC))
            else:
                x = tl.load(x_rows + col * stride_xk, mask=ok, other=0.0)
            acc += v.to(tl.float32) * x.to(tl.float32)
        else:
            x = tl.load(x_rows + col[None] * stride_xk, mask=ok[None] & (rm < M), other=0.0)
            acc += v.to(tl.float32)[None] * x.to(tl.float32)

    on = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    om = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    if BLOCK_M == 1:
        total = tl.sum(acc, axis=1)[None, :]  # (1, BLOCK_N)
    else:
        total = tl.sum(acc, axis=2)  # (BLOCK_M, BLOCK_N)
    if HAS_BIAS:  # added once, by the first K split
        total += tl.load(bias_ptr + on, mask=(on < N) & (pid_k == 0), other=0.0).to(tl.float32)
    mask = (om < M) & (on < N)
    out = out_ptr + om * stride_om + on * stride_on
    if SPLIT:  # reduced in this launch (kernels/splitk.py)
        store_split(total, out, mask, om * N + on, ws_ptr, count_ptr + pid_m * tl.num_programs(1) + pid_n, pid_k,
                    splits, M, N)
    else:
        tl.store(out, total.to(out_ptr.dtype.element_ty), mask=mask)


def decodes(m: int, n: int, bits: int) -> bool:
    """Whether m rows of x against an n:m weight (with `bits`-bit indices) run on the decode kernel."""
    return 1 <= m <= DECODE_MAX_M and n & (n - 1) == 0 and (min(DECODE_BLOCK_G.values()) * n) % (8 // bits) == 0


@dataclass(frozen=True)
class DecodePlan:
    """The decode kernel's launch: grid (1, row blocks of W, K splits), rows of x and groups per step, steps per
    split, warps."""

    grid: tuple[int, int, int]
    block_m: int
    block_g: int
    split: int
    steps_per_split: int
    num_warps: int = 1


def decode_plan(m: int, out_features: int, in_features: int, group: int, sms: int | None,
                split_k: int | None = None) -> DecodePlan:
    """Split K until about PROGRAMS_PER_SM programs per SM (`sms` None, the interpreter: no split), at least two
    steps per split; `split_k` forces it."""
    block_m = triton.next_power_of_2(m)
    block_g = DECODE_BLOCK_G[block_m]
    blocks = triton.cdiv(out_features, DECODE_BLOCK_N)
    steps = triton.cdiv(in_features // group, block_g)
    if split_k is None:
        target = PROGRAMS_PER_SM * sms if sms is not None else 0
        split_k = 1 if blocks >= target else max(1, min(-(-target // blocks), steps // 2))
    if split_k < 1:
        raise UnsupportedShape(f"nm.triton_matmul: split_k={split_k} must be >= 1")
    per_split = triton.cdiv(max(steps, 1), split_k)
    split = max(1, triton.cdiv(steps, per_split))  # no empty splits
    return DecodePlan((1, blocks, split), block_m, block_g, split, per_split)


def decode_arguments(x2d: torch.Tensor, w: NMWeight, bias: torch.Tensor | None, out: torch.Tensor, ws: torch.Tensor,
                     counts: torch.Tensor, plan: DecodePlan) -> tuple[tuple, dict]:
    """The decode kernel's runtime arguments and constexprs for one launch on a 2-D x."""
    M, K = x2d.shape
    args = (x2d, w.values, w.indices, bias if bias is not None else out, out, ws, counts,
            M, w.shape[0], K, x2d.stride(0), x2d.stride(1), w.values.stride(0), w.indices.stride(0),
            out.stride(0), out.stride(1), plan.steps_per_split, plan.split)
    meta = {"NN": w.n, "MM": w.m, "BITS": w.bits, "HAS_BIAS": bias is not None, "SPLIT": plan.split > 1,
            "BLOCK_M": plan.block_m, "BLOCK_N": DECODE_BLOCK_N, "BLOCK_G": plan.block_g}
    return args, meta


def decode_buffers(plan: DecodePlan, M: int, N: int, dtype: torch.dtype,
                   device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output, split-K workspace and arrival counts of one decode launch."""
    out = torch.empty(M, N, dtype=torch.float32 if INTERPRETED and dtype == torch.bfloat16 else dtype,
                      device=device)  # fp32 for bf16 in the interpreter, as in `buffers`
    if plan.split == 1:
        return out, out, out
    ws = torch.empty((plan.split, M, N), dtype=torch.float32, device=device)
    return out, ws, arrival_counts(plan.grid[0] * plan.grid[1], device)


def _sm_count(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device.index or torch.cuda.current_device()).multi_processor_count


def _decode(x2d: torch.Tensor, w: NMWeight, bias: torch.Tensor | None, split_k: int | None = None) -> torch.Tensor:
    """One decode launch on a 2-D x of at most DECODE_MAX_M rows."""
    M, K = x2d.shape
    plan = decode_plan(M, w.shape[0], K, w.m, _sm_count(x2d.device), split_k)
    out, ws, counts = decode_buffers(plan, M, w.shape[0], x2d.dtype, x2d.device)
    args, meta = decode_arguments(x2d, w, bias, out, ws, counts, plan)
    _nm_decode_kernel[plan.grid](*args, **meta, num_warps=plan.num_warps)
    return out.to(x2d.dtype)


# 2:4 at 5-16 rows of x (batched decode): `_nm_pair_kernel`, one warp per 16 rows of W, builds each dense
# (16, PAIR_BLOCK_K) tile of W by selecting from one 32-bit load per group (its two 16-bit values) and the group's
# index nibble, then multiplies with tl.dot. Static SASS (python -m allocator.benchmarks.kernel_static, H200 rates,
# 4096x14336 bf16, a prediction): 0.39 warp-instructions per element, 1.13x cuBLAS at M = 16 and 1.11x at M = 8,
# where the autotuned one-hot tl.dot kernel is 0.68 (0.64x); 16x64 and 16x128 tiles and two warps were slower.
PAIR_MAX_M = 16
PAIR_BLOCK_M = 16  # tl.dot's smallest M tile
PAIR_BLOCK_N = 16
PAIR_BLOCK_K = 32
# No software pipelining: the gathers depend on nothing prefetchable, and the default stages add cp.async
# bookkeeping (0.46 warp-instructions per element instead of 0.39 in the static count).
PAIR_NUM_STAGES = 1


@triton.jit
def _nm_pair_kernel(
    x_ptr, val_ptr, idx_ptr, bias_ptr, out_ptr, ws_ptr, count_ptr,
    M, N, K, stride_xm, stride_xk, stride_vn, stride_in, stride_om, stride_on,
    steps_per_split, splits,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """2:4, 16-bit values: BLOCK_M rows of x (axis 0) against BLOCK_N rows of W (axis 1) over a range of K steps
    (axis 2). Column c of the dense tile is slot c % 4 of group c // 4: the group's two values are one int32 (low
    half first, ascending slot) and its two 2-bit codes one nibble of the index bytes; the slot takes the value
    whose code names it, else 0 (codes within a group are distinct)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_K)
    slot = (c % 4)[None, :]
    mask_n = (offs_n < N)[:, None]
    pairs = val_ptr.to(tl.pointer_type(tl.int32)) + offs_n[:, None] * (stride_vn // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    steps = tl.cdiv(K, BLOCK_K)
    step_begin = pid_k * steps_per_split
    step_end = tl.minimum(steps, step_begin + steps_per_split)
    for step in range(step_begin, step_end):
        col = step * BLOCK_K + c
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + col[None, :] * stride_xk,
                    mask=(offs_m < M)[:, None] & (col < K)[None, :], other=0.0)
        ok = mask_n & (col < K)[None, :]
        g = (col // 4)[None, :]
        pair = tl.load(pairs + g, mask=ok, other=0)
        nib = tl.load(idx_ptr + offs_n[:, None] * stride_in + g // 2, mask=ok, other=0).to(tl.int32) >> ((g % 2) * 4)
        half = tl.where((nib & 3) == slot, pair, tl.where(((nib >> 2) & 3) == slot, pair >> 16, 0))
        w = (half & 0xFFFF).to(tl.int16).to(val_ptr.dtype.element_ty, bitcast=True)
        b = tl.trans(w)
        if UPCAST:  # the interpreter's tl.dot mishandles bf16: it multiplies fp32 copies
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)

    om = offs_m[:, None]
    on = offs_n[None, :]
    if HAS_BIAS:  # added once, by the first K split
        acc += tl.load(bias_ptr + on, mask=(on < N) & (pid_k == 0), other=0.0).to(tl.float32)
    mask = (om < M) & (on < N)
    out = out_ptr + om * stride_om + on * stride_on
    if SPLIT:  # reduced in this launch (kernels/splitk.py)
        store_split(acc, out, mask, om * N + on, ws_ptr, count_ptr + pid_m * tl.num_programs(1) + pid_n, pid_k,
                    splits, M, N)
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


def pair_kernel_runs(m: int, n: int, group: int, element_size: int) -> bool:
    """Whether m rows of x against an n:`group` weight of `element_size`-byte values run on the 2:4 pair kernel
    (its rows stored 4-byte aligned, as `compress` stores them: `pairs`): 2:4, 16-bit, and more rows than the
    decode kernel takes, up to PAIR_MAX_M."""
    return DECODE_MAX_M < m <= PAIR_MAX_M and (n, group) == (2, 4) and element_size == 2


def pairs(m: int, w: NMWeight) -> bool:
    """pair_kernel_runs for this weight, whose value rows must start on 4-byte boundaries (one int32 per group)."""
    return (pair_kernel_runs(m, w.n, w.m, w.values.element_size()) and w.values.stride(1) == 1
            and w.values.stride(0) % 2 == 0 and w.values.data_ptr() % 4 == 0)


def pair_plan(m: int, out_features: int, in_features: int, sms: int | None, split_k: int | None = None) -> DecodePlan:
    """The pair kernel's launch: (row blocks of x, row blocks of W, K splits), split K as `decode_plan` does."""
    blocks = triton.cdiv(out_features, PAIR_BLOCK_N)
    steps = triton.cdiv(in_features, PAIR_BLOCK_K)
    if split_k is None:
        target = PAIR_PROGRAMS_PER_SM * sms if sms is not None else 0
        split_k = 1 if blocks >= target else max(1, min(-(-target // blocks), steps // 2))
    if split_k < 1:
        raise UnsupportedShape(f"nm.triton_matmul: split_k={split_k} must be >= 1")
    per_split = triton.cdiv(max(steps, 1), split_k)
    split = max(1, triton.cdiv(steps, per_split))
    return DecodePlan((triton.cdiv(m, PAIR_BLOCK_M), blocks, split), PAIR_BLOCK_M, 0, split, per_split)


def pair_arguments(x2d: torch.Tensor, w: NMWeight, bias: torch.Tensor | None, out: torch.Tensor, ws: torch.Tensor,
                   counts: torch.Tensor, plan: DecodePlan) -> tuple[tuple, dict]:
    """The pair kernel's runtime arguments and constexprs for one launch on a 2-D x."""
    M, K = x2d.shape
    args = (x2d, w.values, w.indices, bias if bias is not None else out, out, ws, counts,
            M, w.shape[0], K, x2d.stride(0), x2d.stride(1), w.values.stride(0), w.indices.stride(0),
            out.stride(0), out.stride(1), plan.steps_per_split, plan.split)
    meta = {"HAS_BIAS": bias is not None, "SPLIT": plan.split > 1, "UPCAST": INTERPRETED,
            "BLOCK_M": PAIR_BLOCK_M, "BLOCK_N": PAIR_BLOCK_N, "BLOCK_K": PAIR_BLOCK_K}
    return args, meta


def _pair(x2d: torch.Tensor, w: NMWeight, bias: torch.Tensor | None, split_k: int | None = None) -> torch.Tensor:
    """One pair-kernel launch on a 2-D x of DECODE_MAX_M < M <= PAIR_MAX_M rows."""
    M, K = x2d.shape
    plan = pair_plan(M, w.shape[0], K, _sm_count(x2d.device), split_k)
    out, ws, counts = decode_buffers(plan, M, w.shape[0], x2d.dtype, x2d.device)
    args, meta = pair_arguments(x2d, w, bias, out, ws, counts, plan)
    _nm_pair_kernel[plan.grid](*args, **meta, num_warps=plan.num_warps, num_stages=PAIR_NUM_STAGES)
    return out.to(x2d.dtype)


def triton_matmul(x: torch.Tensor, w: NMWeight, bias: torch.Tensor | None = None,
                  config: dict[str, int] | None = None) -> torch.Tensor:
    """x[..., K] @ W^T + bias on the Triton kernel, fp32 accumulation, output in x's dtype. Up to DECODE_MAX_M rows
    of x (and n a power of two) run the per-stored-value decode kernel; up to PAIR_MAX_M of a 16-bit 2:4 weight, the
    pair kernel; more, the tl.dot kernel. `config` (BLOCK_M,
    BLOCK_N, BLOCK_K, SPLIT_K) forces the tl.dot kernel with those tiles instead of the autotuned (CUDA) or fixed
    (interpreter) choice."""
    where = "nm.triton_matmul"
    check_linear_call(where, x, w, bias)
    check_kernel_device(where, "nm", INTERPRETED, x, w.values, w.indices, bias)
    for name, t in (("x", x), ("values", w.values), ("indices", w.indices)):
        if t.numel() >= INT32_LIMIT:
            raise UnsupportedShape(f"{where}: {name} has {t.numel()} elements; the kernel's 32-bit offsets "
                                   f"allow fewer than {INT32_LIMIT}")
    x2d = x.reshape(-1, w.shape[1])
    if x2d.shape[0] == 0 or w.shape[0] == 0:
        return x.new_zeros(*x.shape[:-1], w.shape[0])
    if x2d.shape[0] * w.shape[0] >= INT32_LIMIT:
        raise UnsupportedShape(f"{where}: output {x2d.shape[0]}x{w.shape[0]} needs 64-bit offsets")
    bias = bias.contiguous() if bias is not None else None
    if config is None and decodes(x2d.shape[0], w.n, w.bits):
        return _decode(x2d, w, bias).reshape(*x.shape[:-1], w.shape[0])
    if config is None and pairs(x2d.shape[0], w):
        return _pair(x2d, w, bias).reshape(*x.shape[:-1], w.shape[0])
    if config is None and INTERPRETED:
        config = INTERPRETER_CONFIG
    out = _launch(x2d, w, bias, config)
    return out.reshape(*x.shape[:-1], w.shape[0])
