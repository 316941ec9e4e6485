"""Memory of a pruned model: weight bytes per option plus KV-cache bytes for a batch and context (GQA included).

GB here is 10^9 bytes. What is not a decoder linear (embeddings, lm_head if untied, norms) is fixed."""

from __future__ import annotations

from allocator.core.formats import sparse_unit_bytes
from allocator.core.space import ATTN, ModelShape, Option, is_sparse, kept_width, option_params, sparse_pattern


def kv_bytes(shape: ModelShape, kept: Option, batch: int, context: int, dtype_bytes: int) -> int:
    """K and V of one attention unit keeping `kept` KV groups (all of them for a sparse option); a dropped one still
    stores one scalar per token (DroppedAttention's position marker)."""
    kept = kept_width(shape, ATTN, kept)
    per_token = kept * shape.head_dim if kept else 1
    return 2 * batch * context * per_token * dtype_bytes


def unit_weight_bytes(
    shape: ModelShape, kind: str, kept: Option, dtype_bytes: int, unstructured_format: str = "bitmap"
) -> int:
    """The unit's linears (a sparse option: in its export format, an unstructured one in `unstructured_format`,
    the Space's) plus the norm in front of it, which a dropped block loses too."""
    if is_sparse(kept):
        linears = sparse_unit_bytes(shape, kind, sparse_pattern(kept), dtype_bytes, unstructured_format)
        return linears + shape.hidden * dtype_bytes
    return (option_params(shape, kind, kept) + (shape.hidden if kept else 0)) * dtype_bytes


def option_bytes(
    shape: ModelShape, kind: str, kept: Option, batch: int, context: int, dtype_bytes: int,
    unstructured_format: str = "bitmap",
) -> int:
    kv = kv_bytes(shape, kept, batch, context, dtype_bytes) if kind == ATTN else 0
    return unit_weight_bytes(shape, kind, kept, dtype_bytes, unstructured_format) + kv
