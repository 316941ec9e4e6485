"""SparseLinear: an inference-only nn.Linear whose weight is held in a sparse format and applied by its custom op.

The exported model and the GPU profiler both use this module, so what is profiled is what runs.

Everything lives in buffers, so `state_dict()` saves it, `.to(device)` moves it and `.to(dtype)` casts the values
and bias (integer tensors keep their dtype):
  - `weight_<key>` for every tensor of the format's `tensors()` (e.g. weight_bitmap, weight_offsets, weight_values,
    weight_shape for bitmap),
  - `layout`: int64 [format code (formats.SPECS), out_features, in_features],
  - `bias` (absent when None).
`SparseLinear.from_state_dict(module.state_dict())` rebuilds the module from those tensors alone.

The format's integer headers are also kept as Python ints, so forward never reads them back from the device.

Where the ops have no kernel (`ops.backend(device)` is "torch-reference": a CPU), the module decompresses its
weight once, on its first call, keeps that dense weight beside the buffers (not in the state dict; dropped when the
buffers are moved, cast, replaced or changed in place) and runs torch's dense GEMM: on a CPU a sparse unit costs
exactly what the dense unit of its shape costs. The alternatives, measured on SmollM2's linears
(`python -m allocator.benchmarks.cpu_sparse`), are slower: the reference, which decompresses on every call
(2-700x the dense call), and torch.sparse CSR (slower than dense at 50-70%, N:M and blocks; faster only at 90%
unstructured, with a wide spread). The compressed format then shrinks the stored checkpoint, not the time, and
the running model holds the dense weight too."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kernels import formats, ops
from kernels.errors import check_linear_call

_PREFIX = "weight_"


class SparseLinear(nn.Module):
    def __init__(self, fmt: str, weight: Any, bias: torch.Tensor | None = None) -> None:
        """`weight`: a compressed weight of format `fmt` (e.g. from formats.compress). Prefer `from_dense`."""
        super().__init__()
        tensors = weight.tensors()
        data, headers = formats.split_tensors(fmt, tensors)  # validates format and keys
        out_features, in_features = formats.shape_of(fmt, headers)
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"SparseLinear: bias shape {tuple(bias.shape)} must be (out_features={out_features},)")
        self.fmt = fmt
        self._headers = headers
        for key, t in tensors.items():
            self.register_buffer(_PREFIX + key, t)
        code = formats.spec(fmt).code
        self.register_buffer("layout", torch.tensor([code, out_features, in_features], dtype=torch.int64))
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous())
        self._density: float | None = None
        self._dense: tuple[tuple, torch.Tensor] | None = None  # (key of the buffers it was built from, weight)
        self.register_load_state_dict_post_hook(_refresh_headers)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, **params: Any) -> SparseLinear:
        """Compress `weight` (zeros are dropped) into `fmt`; `params` go to the format's compress. The bias is kept
        in the weight's dtype, as nn.Linear has it."""
        compressed = formats.compress(fmt, weight.detach(), **params)
        return cls(fmt, compressed, None if bias is None else bias.to(weight.dtype))

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor]) -> SparseLinear:
        """Rebuild from `module.state_dict()` (keys relative to the module), e.g. after safetensors' load_file."""
        if "layout" not in tensors:
            raise ValueError(f"SparseLinear.from_state_dict: no 'layout' entry among {sorted(tensors)}")
        fmt = formats.format_of(int(tensors["layout"][0]))
        unknown = [k for k in tensors if k not in ("layout", "bias") and not k.startswith(_PREFIX)]
        if unknown:
            raise ValueError(f"SparseLinear.from_state_dict: unexpected keys {unknown}")
        weight = formats.from_tensors(fmt, {k[len(_PREFIX) :]: t for k, t in tensors.items() if k.startswith(_PREFIX)})
        module = cls(fmt, weight, tensors.get("bias"))
        if not torch.equal(module.layout, tensors["layout"].to(torch.int64).cpu()):
            raise ValueError(
                f"SparseLinear.from_state_dict: layout {tensors['layout'].tolist()} disagrees with the weight's "
                f"{module.layout.tolist()}"
            )
        return module

    def _data(self) -> list[torch.Tensor]:
        return [getattr(self, _PREFIX + key) for key in formats.spec(self.fmt).data_keys]

    def weight_tensors(self) -> dict[str, torch.Tensor]:
        """The format's tensors() of the current buffers."""
        spec = formats.spec(self.fmt)
        return {key: getattr(self, _PREFIX + key) for key in (*spec.data_keys, *spec.header_keys)}

    def compressed(self) -> Any:
        """The compressed weight object over the current buffers."""
        return formats.build(self.fmt, self._data(), self._headers)

    def value_buffer_names(self) -> tuple[str, ...]:
        """The buffers that hold float values (the compressed weight's values, the bias): what a change of the
        model's dtype casts. The others (bitmaps, indices, offsets, block pointers, shapes, layout) are metadata and
        keep their dtype."""
        values = _PREFIX + type(self.compressed()).VALUES
        return (values,) if self.bias is None else (values, "bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ops.backend(x.device) == "torch-reference":  # no kernel here: the weight decompressed once, dense GEMM
            weight = self.dense_weight()
            check_linear_call(f"SparseLinear({self.fmt})", x, weight, self.bias)  # the reference's own checks
            return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))
        return ops.sparse_linear(self.fmt, x, self._data(), self._headers, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The decompressed weight, built once and kept until a buffer is moved, cast, replaced or changed."""
        data = self._data()
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in data)
        if self._dense is None or self._dense[0] != key:
            self._dense = (key, self.to_dense())
        return self._dense[1]

    @property
    def decompressed(self) -> bool:
        """Whether a dense copy of the weight is currently held (the torch-reference path built one)."""
        return self._dense is not None

    def to_dense(self) -> torch.Tensor:
        return formats.decompress(self.fmt, self.compressed())

    @property
    def out_features(self) -> int:
        return formats.shape_of(self.fmt, self._headers)[0]

    @property
    def in_features(self) -> int:
        return formats.shape_of(self.fmt, self._headers)[1]

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the compressed weight as the format counts them (bias excluded)."""
        return int(self.compressed().nbytes)

    @property
    def density(self) -> float:
        """Fraction of non-zero weights (decompresses once, then cached)."""
        if self._density is None:
            dense = self.to_dense()
            self._density = float((dense != 0).sum()) / max(dense.numel(), 1)
        return self._density

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={self.fmt}, density={self.density:.3f}"
        )


def _refresh_headers(module: nn.Module, _incompatible: Any) -> None:
    """load_state_dict replaced the buffers: re-read the host-side headers (a one-off read at load time)."""
    assert isinstance(module, SparseLinear)
    module._headers = formats.split_tensors(module.fmt, module.weight_tensors())[1]
    module._density = None
    module._dense = None
