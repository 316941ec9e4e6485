"""Sparse units as they run: masked linears turned into SparseLinear modules in the format of their pattern.

The export, the reloaded checkpoint and both profilers go through `compress_sparse_units`, so what is profiled
is what is exported and run. Unstructured patterns are stored as bitmaps or CSR8 (the Space's unstructured_format),
N:M patterns in the N:M format (values and in-group indices), block sparsity as BSR. On a GPU the modules run their formats' Triton kernels; on a CPU
(no kernel) each decompresses once and runs the dense GEMM, so there a sparse unit costs its dense unit's time
(kernels/sparse_linear.py; profilers/cpu.py prices it so)."""

from __future__ import annotations

import torch
from torch import nn

from allocator.core.formats import export_format, format_choice
from allocator.core.patterns import SparsityPattern
from allocator.core.space import ATTN, MLP, NATIVE, EngineRules, ModelShape, Option
from allocator.model.surgery import (
    BLOCK_ATTRIBUTE,
    SPARSE_KEY,
    UNIT_LINEARS,
    LevelSource,
    build_engine_model,
    decoder_layers,
)
from kernels.sparse_linear import SparseLinear


def sparse_units(model: nn.Module) -> list[tuple[int, str, SparsityPattern]]:
    """(layer, kind, pattern) of every sparse unit recorded in the model's config."""
    recorded = getattr(model.config, SPARSE_KEY, None) or {}
    return [
        (layer, kind, SparsityPattern.parse(label))
        for kind in (ATTN, MLP)
        for layer, label in enumerate(recorded.get(kind, []))
        if label is not None
    ]


def compress_sparse_units(model: nn.Module, unstructured_format: str = "bitmap") -> nn.Module:
    """Replace, in place, the masked linears of every sparse unit by SparseLinear modules (unstructured ones in
    `unstructured_format`, the plan's Space's); returns the model."""
    layers = decoder_layers(model)
    for layer, kind, pattern in sparse_units(model):
        fmt, params = export_format(pattern, format_choice(pattern, unstructured_format))
        block = getattr(layers[layer], BLOCK_ATTRIBUTE[kind])
        for name in UNIT_LINEARS[kind]:
            linear = getattr(block, name)
            weight = linear.weight.detach() + 0.0  # -0.0 → +0.0: the bitmap stores any non-zero bit pattern
            setattr(block, name, SparseLinear.from_dense(weight, linear.bias, fmt, **params))
    return model


def build_deployable(
    dense: nn.Module, shape: ModelShape, allocation: dict[str, Option], source: LevelSource, rules: EngineRules = NATIVE,
    unstructured_format: str = "bitmap",
) -> nn.Module:
    """The model as exported and run: structured units shrunk, sparse units in their compressed formats (unstructured
    ones in `unstructured_format`, the Space's; the loader reads each unit's format from its tensors); with `rules`
    of another engine, at the shapes that engine runs (surgery.build_engine_model), for timing."""
    model = build_engine_model(dense, shape, allocation, source, rules)
    return compress_sparse_units(model, unstructured_format)


def load_sparse_units(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """For a reloaded checkpoint: build the sparse units' SparseLinear modules from their stored tensors and put
    the modules' own tensors back into `state`, whose load then assigns them (the same tensors, or a format's
    older layout converted on load: bitmap version 1)."""
    layers = decoder_layers(model)
    for layer, kind, _pattern in sparse_units(model):
        block = getattr(layers[layer], BLOCK_ATTRIBUTE[kind])
        for name in UNIT_LINEARS[kind]:
            prefix = f"model.layers.{layer}.{BLOCK_ATTRIBUTE[kind]}.{name}."
            tensors = {key[len(prefix):]: t for key, t in state.items() if key.startswith(prefix)}
            if not tensors:
                raise ValueError(f"checkpoint has no tensors for sparse linear {prefix[:-1]}")
            module = SparseLinear.from_state_dict(tensors)
            setattr(block, name, module)
            state.update({prefix + key: t for key, t in module.state_dict().items()})
