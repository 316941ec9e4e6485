"""Memory of a pruned model: weight bytes per option plus KV-cache bytes for a batch and context (GQA included),
for the shape the space's engine runs (allocator.core.space.run_shape: zero-padded heads and neurons included).

GB here is 10^9 bytes. What is not a decoder linear (embeddings, lm_head if untied, norms) is fixed."""

from __future__ import annotations

from allocator.core.config import Runtime
from allocator.core.formats import sparse_unit_bytes
from allocator.core.space import (
    ATTN,
    NATIVE,
    EngineRules,
    ModelShape,
    Option,
    is_sparse,
    kept_width,
    run_shape,
    runs,
    sparse_pattern,
    unit_linear_shapes,
)


def kv_bytes(
    shape: ModelShape, kept: Option, batch: int, context: int, dtype_bytes: int, rules: EngineRules = NATIVE
) -> int:
    """K and V of one attention unit keeping `kept` KV groups (all of them for a sparse option). A dropped one
    stores nothing in vLLM and llama.cpp (the layer gets no cache), natively one scalar per token
    (DroppedAttention's position marker)."""
    kept = kept_width(shape, ATTN, kept)
    if not kept and rules.runtime != Runtime.native:
        return 0
    per_token = kept * shape.head_dim if kept else 1
    return 2 * batch * context * per_token * dtype_bytes


def unit_weight_bytes(
    shape: ModelShape, kind: str, kept: Option, dtype_bytes: int, rules: EngineRules = NATIVE,
    unstructured_format: str = "bitmap",
) -> int:
    """The unit's linears as the engine holds them (a sparse option: in its export format, an unstructured one in
    `unstructured_format`, the Space's; a dense one at its run shape, zero-padded rows included) plus the norm in
    front of it, which a dropped block loses too."""
    if is_sparse(kept):
        linears = sparse_unit_bytes(shape, kind, sparse_pattern(kept), dtype_bytes, unstructured_format)
        return linears + shape.hidden * dtype_bytes
    run = run_shape(shape, kind, kept, rules)
    if not runs(run, kind):
        return 0
    return (sum(rows * cols for rows, cols in unit_linear_shapes(run, kind)) + shape.hidden) * dtype_bytes


def option_bytes(
    shape: ModelShape, kind: str, kept: Option, batch: int, context: int, dtype_bytes: int, rules: EngineRules = NATIVE,
    unstructured_format: str = "bitmap",
) -> int:
    kv = kv_bytes(shape, kept, batch, context, dtype_bytes, rules) if kind == ATTN else 0
    return unit_weight_bytes(shape, kind, kept, dtype_bytes, rules, unstructured_format) + kv
