"""Memory read off a real model: parameter and compressed-weight bytes, KV-cache bytes, decoder weight counts."""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from allocator.core.memory import unit_weight_bytes
from allocator.core.space import Space
from allocator.model.surgery import decoder_layers


def weight_bytes(model: nn.Module) -> int:
    """Parameters (tied ones once) plus the compressed weights that SparseLinear modules hold as buffers."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return params + sum(getattr(m, "weight_nbytes", 0) for m in model.modules() if not list(m.parameters(recurse=False)))


def fixed_bytes(dense: nn.Module, space: Space) -> int:
    """Every parameter byte outside the prunable units."""
    dtype_bytes = next(dense.parameters()).element_size()
    return weight_bytes(dense) - sum(unit_weight_bytes(space.shape, u.kind, u.full, dtype_bytes) for u in space.units)


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
