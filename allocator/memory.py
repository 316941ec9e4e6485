"""Memory of a pruned model: weight bytes per option plus KV-cache bytes for a batch and context (GQA included).

GB here is 10^9 bytes. What is not a decoder linear (embeddings, lm_head if untied, norms) is fixed."""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from allocator.pruned_model import decoder_layers
from allocator.space import ATTN, ModelShape, Option, Unit, is_sparse, kept_width, option_params, sparse_pattern


def kv_bytes(shape: ModelShape, kept: Option, batch: int, context: int, dtype_bytes: int) -> int:
    """K and V of one attention unit keeping `kept` KV groups (all of them for a sparse option); a dropped one still
    stores one scalar per token (DroppedAttention's position marker)."""
    kept = kept_width(shape, ATTN, kept)
    per_token = kept * shape.head_dim if kept else 1
    return 2 * batch * context * per_token * dtype_bytes


def unit_weight_bytes(shape: ModelShape, kind: str, kept: Option, dtype_bytes: int) -> int:
    """The unit's linears (a sparse option: in its export format) plus the norm in front of it, which a dropped
    block loses too."""
    if is_sparse(kept):
        from allocator.sparse_export import sparse_unit_bytes  # kernels load only for sparse spaces

        return sparse_unit_bytes(shape, kind, sparse_pattern(kept), dtype_bytes) + shape.hidden * dtype_bytes
    return (option_params(shape, kind, kept) + (shape.hidden if kept else 0)) * dtype_bytes


def option_bytes(shape: ModelShape, kind: str, kept: Option, batch: int, context: int, dtype_bytes: int) -> int:
    kv = kv_bytes(shape, kept, batch, context, dtype_bytes) if kind == ATTN else 0
    return unit_weight_bytes(shape, kind, kept, dtype_bytes) + kv


def weight_bytes(model: nn.Module) -> int:
    """Parameters (tied ones once) plus the compressed weights that SparseLinear modules hold as buffers."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return params + sum(getattr(m, "weight_nbytes", 0) for m in model.modules() if not list(m.parameters(recurse=False)))


def fixed_bytes(dense: nn.Module, shape: ModelShape, units: list[Unit]) -> int:
    """Every parameter byte outside the prunable units."""
    dtype_bytes = next(dense.parameters()).element_size()
    return weight_bytes(dense) - sum(unit_weight_bytes(shape, u.kind, u.full, dtype_bytes) for u in units)


@torch.inference_mode()
def measured_kv_bytes_per_token(model: nn.Module, probe_tokens: int = 8) -> float:
    """KV-cache bytes per token per sequence, read off the cache tensors after a short forward."""
    ids = torch.zeros(1, probe_tokens, dtype=torch.long)
    cache = DynamicCache(config=model.config)
    model(ids, past_key_values=cache, use_cache=True)
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None:
                total += t.numel() * t.element_size()
    return total / probe_tokens


def decoder_weight_count(model: nn.Module) -> int:
    """Weights of the linears inside the decoder layers, what budget.sparsity counts: every element of a dense
    linear, the stored non-zeros of a sparse one (SparseLinear)."""
    count = 0
    for m in decoder_layers(model).modules():
        if isinstance(m, nn.Linear):
            count += m.weight.numel()
        elif hasattr(m, "to_dense") and hasattr(m, "weight_nbytes"):
            count += int(m.to_dense().count_nonzero())
    return count
