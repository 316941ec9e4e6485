"""Physically shrink a Llama-family model to an allocation: smaller Linear layers, dropped blocks skipped.

The same code builds the stitched model that the search scores, the models that the profiler times and the
structure that the runtime loader fills from an exported checkpoint, so what is scored is what is timed and run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import nn

from allocator.core.config import Runtime
from allocator.core.patterns import magnitude_prune
from allocator.core.space import (
    ATTN,
    MLP,
    NATIVE,
    EngineRules,
    ModelShape,
    Option,
    full_width,
    is_sparse,
    kept_width,
    sparse_pattern,
    unit_name,
)

WIDTHS_KEY = "sparsity_allocator_widths"
SPARSE_KEY = "sparsity_allocator_sparse"  # per kind, per layer: the sparse option's label, or null


@dataclass(frozen=True)
class UnitWeights:
    """A pruned level of one unit: the kept groups/neurons and the (OBS-updated) output projection over them."""

    kept: torch.Tensor  # int64, ascending: KV-group indices (attention) or neuron indices (MLP)
    out_weight: torch.Tensor  # o_proj (hidden, kept*group) or down_proj (hidden, kept)


@dataclass(frozen=True)
class SparseUnitWeights:
    """A sparse level of one unit: every linear's weight (q/k/v/o_proj or gate/up/down_proj), zeros where pruned."""

    weights: dict[str, torch.Tensor]


UNIT_LINEARS = {ATTN: ("q_proj", "k_proj", "v_proj", "o_proj"), MLP: ("gate_proj", "up_proj", "down_proj")}
BLOCK_ATTRIBUTE = {ATTN: "self_attn", MLP: "mlp"}

# (layer index, unit kind, option) → that level's weights
LevelSource = Callable[[int, str, Option], Union[UnitWeights, SparseUnitWeights]]


class DroppedAttention(nn.Module):
    """k = 0: no attention at all. Still appends one scalar per token to the KV cache, because transformers reads
    the cache's position from its tensors' length and an empty tensor reads as length 0 (4 bytes/token, unread)."""

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        if past_key_values is not None:
            marker = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            past_key_values.update(marker, marker, self.layer_idx)
        return hidden_states.new_zeros(()), None


class DroppedMLP(nn.Module):
    def forward(self, hidden_states):
        return hidden_states.new_zeros(())


def widths_of(allocation: dict[str, Option], shape: ModelShape) -> dict[str, list[int]]:
    """Structured widths per layer (a sparse unit keeps its full width)."""
    return {
        "attn_kv_groups": [kept_width(shape, ATTN, allocation[unit_name(i, ATTN)]) for i in range(shape.num_layers)],
        "mlp_neurons": [kept_width(shape, MLP, allocation[unit_name(i, MLP)]) for i in range(shape.num_layers)],
    }


def sparse_of(allocation: dict[str, Option], num_layers: int) -> dict[str, list[str | None]] | None:
    """Per kind, per layer, the sparse option's label (None where the unit is structured or dense); None when the
    allocation has no sparse unit, so structured exports keep their plain config."""
    out = {kind: [allocation[unit_name(i, kind)] for i in range(num_layers)] for kind in (ATTN, MLP)}
    out = {kind: [o if is_sparse(o) else None for o in opts] for kind, opts in out.items()}
    return out if any(o is not None for opts in out.values() for o in opts) else None


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def _rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    bias = None if linear.bias is None else linear.bias[rows]
    return _linear(linear.weight[rows], bias)


def group_rows(groups: torch.Tensor, rows_per_group: int) -> torch.Tensor:
    """Row indices of whole groups (heads of a KV group, or one KV head) in a projection's output."""
    return (groups[:, None] * rows_per_group + torch.arange(rows_per_group)).reshape(-1)


def _prune_attention(layer: nn.Module, shape: ModelShape, level: UnitWeights) -> None:
    attn = layer.self_attn
    q_rows = group_rows(level.kept, shape.heads_per_group * shape.head_dim)
    kv_rows = group_rows(level.kept, shape.head_dim)
    attn.q_proj = _rows(attn.q_proj, q_rows)
    attn.k_proj = _rows(attn.k_proj, kv_rows)
    attn.v_proj = _rows(attn.v_proj, kv_rows)
    attn.o_proj = _linear(level.out_weight, attn.o_proj.bias)


def _prune_mlp(layer: nn.Module, level: UnitWeights) -> None:
    mlp = layer.mlp
    mlp.gate_proj = _rows(mlp.gate_proj, level.kept)
    mlp.up_proj = _rows(mlp.up_proj, level.kept)
    mlp.down_proj = _linear(level.out_weight, mlp.down_proj.bias)


def _sparsify(layer: nn.Module, kind: str, level: SparseUnitWeights) -> None:
    block = getattr(layer, BLOCK_ATTRIBUTE[kind])
    for name in UNIT_LINEARS[kind]:
        setattr(block, name, _linear(level.weights[name], getattr(block, name).bias))


def _on_layer_device(layer: nn.Module, level: UnitWeights | SparseUnitWeights) -> UnitWeights | SparseUnitWeights:
    """The level's weights on the device of the layer they go into (levels are read from disk onto the CPU; a
    model placed on a GPU builds its units there). The kept indices stay where they are: they index, on any device.
    On the CPU nothing is copied."""
    device = next((p.device for p in layer.parameters()), None)
    if device is None:
        return level
    if isinstance(level, SparseUnitWeights):
        return SparseUnitWeights({name: w.to(device) for name, w in level.weights.items()})
    return UnitWeights(level.kept, level.out_weight.to(device))


def _apply_unit(layer: nn.Module, shape: ModelShape, kind: str, layer_idx: int, option: Option, source: LevelSource) -> None:
    """Put `option` into one unit of `layer` (a dense option leaves it untouched)."""
    if option == full_width(shape, kind):
        return
    if option == 0:
        _drop(layer, kind, layer_idx)
        return
    level = _on_layer_device(layer, source(layer_idx, kind, option))
    if is_sparse(option):
        _sparsify(layer, kind, level)
    elif kind == ATTN:
        _prune_attention(layer, shape, level)
    else:
        _prune_mlp(layer, level)


def _drop(layer: nn.Module, kind: str, layer_idx: int) -> None:
    if kind == ATTN:
        layer.self_attn = DroppedAttention(layer_idx)
        layer.input_layernorm = nn.Identity()
    else:
        layer.mlp = DroppedMLP()
        layer.post_attention_layernorm = nn.Identity()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def apply_allocation(model: nn.Module, shape: ModelShape, allocation: dict[str, Option], source: LevelSource) -> None:
    """Replace, in place, every unit of `model` that the allocation does not keep dense."""
    layers = decoder_layers(model)
    for i in range(shape.num_layers):
        for kind in (ATTN, MLP):
            _apply_unit(layers[i], shape, kind, i, allocation[unit_name(i, kind)], source)
    setattr(model.config, WIDTHS_KEY, widths_of(allocation, shape))
    setattr(model.config, SPARSE_KEY, sparse_of(allocation, shape.num_layers))


# The layer attributes one unit owns: its block and the norm in front of it (dropped together).
UNIT_ATTRIBUTES = {ATTN: ("input_layernorm", "self_attn"), MLP: ("post_attention_layernorm", "mlp")}


def unit_modules(
    dense: nn.Module, shape: ModelShape, layer: int, kind: str, kept: Option, source: LevelSource
) -> dict[str, nn.Module]:
    """The modules one unit at option `kept` puts into decoder layer `layer` (attribute name → module), built like
    apply_allocation builds them and sharing every untouched tensor with `dense`."""
    original = decoder_layers(dense)[layer]
    if kept == full_width(shape, kind):
        return {name: getattr(original, name) for name in UNIT_ATTRIBUTES[kind]}
    shared = {id(t): t for t in [*original.parameters(), *original.buffers()]}
    holder = copy.deepcopy(original, memo=shared)
    _apply_unit(holder, shape, kind, layer, kept, source)
    return {name: getattr(holder, name) for name in UNIT_ATTRIBUTES[kind]}


def build_pruned_model(dense: nn.Module, shape: ModelShape, allocation: dict[str, Option], source: LevelSource) -> nn.Module:
    """A new model sharing every untouched tensor with `dense` (no copy), with pruned units replaced."""
    shared = {id(t): t for t in [*dense.parameters(), *dense.buffers()]}
    model = copy.deepcopy(dense, memo=shared)
    apply_allocation(model, shape, allocation, source)
    return model


def pad_query_heads(layer: nn.Module, shape: ModelShape) -> None:
    """Give a pruned attention vLLM's layout: all num_heads query heads over its k KV heads, n_heads_in_group =
    num_heads / k per KV head. Each kept group's query heads take the first slots of its KV head, the other slots
    are zero heads whose o_proj columns are zero, so the output is unchanged (the zero heads add nothing)."""
    attn = layer.self_attn
    kv = attn.k_proj.out_features // shape.head_dim
    per_kv = shape.num_heads // kv
    if per_kv == shape.heads_per_group:  # every group kept: nothing to pad
        return
    slots = (torch.arange(kv)[:, None] * per_kv + torch.arange(shape.heads_per_group)).reshape(-1)
    rows = group_rows(slots, shape.head_dim)
    width = shape.num_heads * shape.head_dim
    q, o = attn.q_proj, attn.o_proj
    q_weight = q.weight.new_zeros(width, q.in_features)
    q_weight[rows] = q.weight
    q_bias = None
    if q.bias is not None:
        q_bias = q.bias.new_zeros(width)
        q_bias[rows] = q.bias
    o_weight = o.weight.new_zeros(o.out_features, width)
    o_weight[:, rows] = o.weight
    attn.q_proj, attn.o_proj = _linear(q_weight, q_bias), _linear(o_weight, o.bias)
    attn.num_key_value_groups = per_kv  # transformers repeats each KV head this many times


def to_engine_shape(model: nn.Module, dense: nn.Module, shape: ModelShape, rules: EngineRules = NATIVE) -> nn.Module:
    """In place: a pruned model (built, or loaded from an export) at the shapes `rules.runtime` runs
    (allocator.core.space.run_shape), its outputs unchanged: under vLLM every kept attention with all query heads
    (pad_query_heads); under llama.cpp every dropped MLP as an MLP of rules.zero_mlp neurons (the dense model's norm
    and first neurons) whose down_proj is zero. What the profilers and verify time for that engine; natively the
    model is left as it is. Returns the model."""
    for i, layer in enumerate(decoder_layers(model)):
        if rules.runtime == Runtime.vllm and not isinstance(layer.self_attn, DroppedAttention):
            pad_query_heads(layer, shape)
        if rules.zero_mlp and isinstance(layer.mlp, DroppedMLP):
            modules = unit_modules(dense, shape, i, MLP, rules.zero_mlp, leading_levels(dense, shape))
            mlp = modules["mlp"]
            mlp = copy.deepcopy(mlp, memo={id(t): t for t in mlp.parameters()})  # dense's own at full width
            mlp.down_proj = _linear(torch.zeros_like(mlp.down_proj.weight), mlp.down_proj.bias)
            layer.post_attention_layernorm, layer.mlp = modules["post_attention_layernorm"], mlp
    return model


def build_engine_model(
    dense: nn.Module, shape: ModelShape, allocation: dict[str, Option], source: LevelSource, rules: EngineRules = NATIVE
) -> nn.Module:
    """build_pruned_model's model at the shapes `rules.runtime` runs (to_engine_shape)."""
    return to_engine_shape(build_pruned_model(dense, shape, allocation, source), dense, shape, rules)


def leading_levels(dense: nn.Module, shape: ModelShape) -> LevelSource:
    """Keep the first groups/neurons (sparse options: the largest weights) without any weight update: right shapes
    and patterns for timing, not for quality."""
    layers = decoder_layers(dense)

    def source(layer: int, kind: str, kept: Option) -> UnitWeights | SparseUnitWeights:
        if is_sparse(kept):
            pattern = sparse_pattern(kept)
            block = getattr(layers[layer], BLOCK_ATTRIBUTE[kind])
            weights = {}
            for name in UNIT_LINEARS[kind]:
                weights[name] = magnitude_prune(getattr(block, name).weight.detach(), pattern)
            return SparseUnitWeights(weights)
        idx = torch.arange(kept)
        if kind == ATTN:
            cols = group_rows(idx, shape.heads_per_group * shape.head_dim)
            return UnitWeights(idx, layers[layer].self_attn.o_proj.weight[:, cols])
        return UnitWeights(idx, layers[layer].mlp.down_proj.weight[:, :kept].contiguous())

    return source


def allocation_from_widths(widths: dict[str, list[int]], sparse: dict[str, list[str | None]] | None = None) -> dict[str, Option]:
    """The allocation a model's config records: widths, with the sparse units' labels over them."""
    allocation: dict[str, Option] = {
        **{unit_name(i, ATTN): k for i, k in enumerate(widths["attn_kv_groups"])},
        **{unit_name(i, MLP): n for i, n in enumerate(widths["mlp_neurons"])},
    }
    for kind, labels in (sparse or {}).items():
        allocation.update({unit_name(i, kind): label for i, label in enumerate(labels) if label is not None})
    return allocation


def shrink_to_widths(
    model: nn.Module, shape: ModelShape, widths: dict[str, list[int]], sparse: dict[str, list[str | None]] | None = None
) -> None:
    """Give an empty (meta-device) dense model the pruned module shapes so a checkpoint can be loaded into it; sparse
    units keep their full-width linears (allocator.model.sparse_export.load_sparse_units puts the compressed ones in)."""
    dtype = next(model.parameters()).dtype
    layers = decoder_layers(model)

    def empty_level(layer: int, kind: str, kept: Option) -> UnitWeights | SparseUnitWeights:
        if is_sparse(kept):
            block = getattr(layers[layer], BLOCK_ATTRIBUTE[kind])
            return SparseUnitWeights({name: getattr(block, name).weight for name in UNIT_LINEARS[kind]})
        columns = kept * shape.heads_per_group * shape.head_dim if kind == ATTN else kept
        return UnitWeights(torch.arange(kept), torch.empty(shape.hidden, columns, device="meta", dtype=dtype))

    apply_allocation(model, shape, allocation_from_widths(widths, sparse), empty_level)
