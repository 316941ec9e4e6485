"""Registry of the sparse weight formats: name → module with compress / decompress / reference_matmul /
triton_matmul, stored_nbytes / dot_elements (what its layout stores and its kernel multiplies, computed without
building a weight) and a weight class with tensors() / from_tensors() / nbytes.

Each format's `tensors()` holds device data (values, indices, bitmaps) and small integer headers (shape, N:M,
block). The headers travel as plain ints (`split_tensors`), so the custom ops rebuild a weight without reading
device memory: a host read would sync the GPU and break CUDA-graph capture."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import torch

from kernels import bitmap, bsr, csr8, nm
from kernels.compressed import CompressedWeight

FORMATS: dict[str, ModuleType] = {"bitmap": bitmap, "nm": nm, "bsr": bsr, "csr8": csr8}


@dataclass(frozen=True)
class FormatSpec:
    code: int  # stable id written into checkpoints (SparseLinear's `layout` buffer): never renumber, only append
    weight: type[CompressedWeight]  # its from_tensors is the full check, done on load
    header_keys: tuple[str, ...]  # integer headers, passed to the op as ints
    # Rebuilds the weight on every op call: structural checks only, no reads of device memory.
    build: Callable[[dict[str, torch.Tensor]], Any]

    @property
    def data_keys(self) -> tuple[str, ...]:
        """Device tensors, in the order the custom op takes them."""
        return self.weight.DATA


def _build_bsr(t: dict[str, torch.Tensor]) -> bsr.BSRWeight:
    # BSRWeight.from_tensors also checks the index values, a device sync per call; the structure check suffices here.
    n, k = (int(v) for v in t["shape"].tolist())
    bn, bk = (int(v) for v in t["block"].tolist())
    w = bsr.BSRWeight((n, k), (bn, bk), t["row_ptr"], t["col_idx"], t["blocks"])
    w.validate()
    return w


SPECS: dict[str, FormatSpec] = {
    "bitmap": FormatSpec(1, bitmap.BitmapWeight, ("shape",), bitmap.BitmapWeight.from_tensors),
    "nm": FormatSpec(2, nm.NMWeight, ("shape", "nm"), nm.NMWeight.from_tensors),
    "bsr": FormatSpec(3, bsr.BSRWeight, ("shape", "block"), _build_bsr),
    "csr8": FormatSpec(4, csr8.CSR8Weight, ("shape",), csr8.CSR8Weight.from_tensors),
}


def get(fmt: str) -> ModuleType:
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown sparse format {fmt!r}; known: {', '.join(sorted(FORMATS))}") from None


def spec(fmt: str) -> FormatSpec:
    get(fmt)  # the unknown-format error
    return SPECS[fmt]


def format_of(code: int) -> str:
    for name, s in SPECS.items():
        if s.code == code:
            return name
    raise ValueError(f"unknown sparse format code {code}; known: {({n: s.code for n, s in SPECS.items()})}")


def compress(fmt: str, dense: torch.Tensor, **params: Any) -> Any:
    """Compress a 2-D weight; `params` go to the format (nm: n, m; bsr: block; bitmap: tile)."""
    return get(fmt).compress(dense, **params)


def stored_nbytes(fmt: str, shape: tuple[int, int], kept: int, dtype: torch.dtype, **params: Any) -> int:
    """Bytes `compress(fmt, w, **params)` stores (the weight's nbytes) for a (out, in) weight `w` with `kept`
    non-zeros in `dtype`, computed from the format's layout without building it."""
    return get(fmt).stored_nbytes(shape, kept, dtype, **params)


def dot_elements(fmt: str, shape: tuple[int, int], kept: int, **params: Any) -> int:
    """Weight elements the format's kernel multiplies with each row of x (its FLOPs are twice that per row)."""
    return get(fmt).dot_elements(shape, kept, **params)


def decompress(fmt: str, w: Any) -> torch.Tensor:
    return get(fmt).decompress(w)


def from_tensors(fmt: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Rebuild a weight with the format's full checks (load time)."""
    return spec(fmt).weight.from_tensors(tensors)


def build(fmt: str, data: list[torch.Tensor], headers: list[int]) -> Any:
    """Rebuild a weight from `split_tensors` output, cheaply (every op call)."""
    return spec(fmt).build(join_tensors(fmt, data, headers))


def split_tensors(fmt: str, tensors: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """tensors() → (device data in `data_keys` order, headers flattened to ints).

    Each header is encoded as [ndim, *sizes, *values] in `header_keys` order, so `decode_headers` restores it."""
    s = spec(fmt)
    expected = set(s.data_keys) | set(s.header_keys)
    if set(tensors) != expected:
        raise ValueError(f"sparse format {fmt!r}: tensors have keys {sorted(tensors)}, expected {sorted(expected)}")
    headers: list[int] = []
    for key in s.header_keys:
        t = tensors[key]
        if t.dtype.is_floating_point or t.dtype.is_complex:
            raise ValueError(f"sparse format {fmt!r}: header {key!r} must be an integer tensor, got {t.dtype}")
        headers += [t.dim(), *t.shape, *(int(v) for v in t.flatten().tolist())]
    return [tensors[k] for k in s.data_keys], headers


def _decode(fmt: str, headers: list[int]) -> dict[str, tuple[list[int], list[int]]]:
    """Encoded headers → {key: (sizes, values)} as plain ints: the fake op calls this under FakeTensorMode."""
    out: dict[str, tuple[list[int], list[int]]] = {}
    pos = 0
    for key in spec(fmt).header_keys:
        ndim = headers[pos]
        sizes = list(headers[pos + 1 : pos + 1 + ndim])
        numel = 1
        for size in sizes:
            numel *= size
        start = pos + 1 + ndim
        out[key] = sizes, list(headers[start : start + numel])
        pos = start + numel
    if pos != len(headers):
        raise ValueError(f"sparse format {fmt!r}: {len(headers) - pos} trailing header ints in {headers}")
    return out


def decode_headers(fmt: str, headers: list[int]) -> dict[str, torch.Tensor]:
    """The header half of `split_tensors` back to CPU int64 tensors."""
    return {
        key: torch.tensor(values, dtype=torch.int64).reshape(sizes)
        for key, (sizes, values) in _decode(fmt, headers).items()
    }


def join_tensors(fmt: str, data: list[torch.Tensor], headers: list[int]) -> dict[str, torch.Tensor]:
    """(data, headers) → a tensors() dict."""
    keys = spec(fmt).data_keys
    if len(keys) != len(data):
        raise ValueError(f"sparse format {fmt!r}: {len(data)} data tensors for keys {keys}")
    return {**dict(zip(keys, data)), **decode_headers(fmt, headers)}


def shape_of(fmt: str, headers: list[int]) -> tuple[int, int]:
    """(out_features, in_features) from the encoded headers."""
    n, k = _decode(fmt, headers)["shape"][1]
    return n, k
