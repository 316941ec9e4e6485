"""The pruned model's units as plain dense tensors, and their padding to the shapes an engine runs.

Engines run no sparse weights (vLLM dropped 2:4 in 2026, llama.cpp never had it), so a sparse unit is written
dense: its SparseLinear modules decompressed, zeros and all. A structured unit keeps its kept KV groups / neurons
first, in the order the native model holds them: attention heads and MLP neurons can be permuted together with the
output projection's columns without changing the output, and zero rows/columns add nothing."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from allocator.core.space import ATTN, MLP, ModelShape
from allocator.model.surgery import (
    BLOCK_ATTRIBUTE,
    UNIT_LINEARS,
    DroppedAttention,
    DroppedMLP,
    decoder_layers,
)
from kernels.sparse_linear import SparseLinear

# A linear as (weight (out, in), bias (out,) or None).
Linear = tuple[torch.Tensor, torch.Tensor | None]
LAYERS_PREFIX = "model.layers."
NORM_OF = {ATTN: "input_layernorm", MLP: "post_attention_layernorm"}


def linear_tensors(module: nn.Module) -> Linear:
    """Weight and bias of an nn.Linear, or of a SparseLinear decompressed (its zeros written out)."""
    if isinstance(module, SparseLinear):
        return module.to_dense(), module.bias
    return module.weight.detach(), None if module.bias is None else module.bias.detach()


def unit_linears(model: nn.Module, layer: int, kind: str) -> dict[str, Linear] | None:
    """name → (weight, bias) of the unit's linears (q/k/v/o_proj or gate/up/down_proj) as the pruned model runs
    them; None when the unit is dropped."""
    block = getattr(decoder_layers(model)[layer], BLOCK_ATTRIBUTE[kind])
    if isinstance(block, (DroppedAttention, DroppedMLP)):
        return None
    return {name: linear_tensors(getattr(block, name)) for name in UNIT_LINEARS[kind]}


def kept_groups(linears: dict[str, Linear] | None, head_dim: int) -> int:
    """KV groups an attention unit keeps (0 when dropped)."""
    return 0 if linears is None else linears["k_proj"][0].shape[0] // head_dim


def kept_neurons(linears: dict[str, Linear] | None) -> int:
    """Neurons an MLP unit keeps (0 when dropped)."""
    return 0 if linears is None else linears["gate_proj"][0].shape[0]


def unit_norm(model: nn.Module, layer: int, kind: str) -> torch.Tensor | None:
    """The RMSNorm weight in front of a unit; None when the unit is dropped (the surgery drops its norm too)."""
    norm = getattr(decoder_layers(model)[layer], NORM_OF[kind])
    return None if isinstance(norm, nn.Identity) else norm.weight.detach()


def _zeros(out_features: int, in_features: int, dtype: torch.dtype, bias: bool) -> Linear:
    return torch.zeros(out_features, in_features, dtype=dtype), torch.zeros(out_features, dtype=dtype) if bias else None


def llama_biased(config, kind: str) -> frozenset[str]:
    """The unit's linears that carry a bias in a Llama-architecture config (attention_bias, mlp_bias)."""
    flag = getattr(config, "attention_bias" if kind == ATTN else "mlp_bias", False)
    return frozenset(UNIT_LINEARS[kind]) if flag else frozenset()


def pad_attention(
    linears: dict[str, Linear] | None, shape: ModelShape, kv_heads: int, q_per_kv: int, dtype: torch.dtype,
    biased: frozenset[str],
) -> dict[str, Linear]:
    """The unit's linears with `kv_heads` KV heads of `q_per_kv` query heads each. Kept group j becomes KV head j,
    its shape.heads_per_group query heads the first of head j's; every other query, key and value row, and the
    o_proj columns of the zero query heads, are zero, so they add nothing to the output. A dropped unit (None) comes
    out all zero, its o_proj bias included. `biased`: the linears that carry a bias in the architecture."""
    g, hd, hidden = shape.heads_per_group, shape.head_dim, shape.hidden
    kept = kept_groups(linears, hd)
    if kv_heads < kept or q_per_kv < g:
        raise ValueError(f"cannot pad {kept} KV groups of {g} query heads into {kv_heads} of {q_per_kv}")
    q_rows, kv_rows = kv_heads * q_per_kv * hd, kv_heads * hd
    out = {
        "q_proj": _zeros(q_rows, hidden, dtype, "q_proj" in biased),
        "k_proj": _zeros(kv_rows, hidden, dtype, "k_proj" in biased),
        "v_proj": _zeros(kv_rows, hidden, dtype, "v_proj" in biased),
        "o_proj": _zeros(hidden, q_rows, dtype, "o_proj" in biased),
    }
    for j in range(kept):
        src_q, dst_q = slice(j * g * hd, (j + 1) * g * hd), slice(j * q_per_kv * hd, j * q_per_kv * hd + g * hd)
        kv = slice(j * hd, (j + 1) * hd)
        for name, src, dst in (("q_proj", src_q, dst_q), ("k_proj", kv, kv), ("v_proj", kv, kv)):
            out[name][0][dst] = linears[name][0][src]
            if name in biased:
                out[name][1][dst] = linears[name][1][src]
        out["o_proj"][0][:, dst_q] = linears["o_proj"][0][:, src_q]
    if kept and "o_proj" in biased:
        out["o_proj"][1].copy_(linears["o_proj"][1])
    return out


def pad_mlp(
    linears: dict[str, Linear] | None, hidden: int, width: int, dtype: torch.dtype, biased: frozenset[str]
) -> dict[str, Linear]:
    """The unit's linears widened to `width` neurons, the kept ones first and the others zero (a dropped unit: all
    zero, down_proj bias included)."""
    kept = kept_neurons(linears)
    if width < kept:
        raise ValueError(f"cannot pad {kept} neurons into {width}")
    out = {
        "gate_proj": _zeros(width, hidden, dtype, "gate_proj" in biased),
        "up_proj": _zeros(width, hidden, dtype, "up_proj" in biased),
        "down_proj": _zeros(hidden, width, dtype, "down_proj" in biased),
    }
    if kept:
        for name in ("gate_proj", "up_proj"):
            out[name][0][:kept] = linears[name][0]
            if name in biased:
                out[name][1][:kept] = linears[name][1]
        out["down_proj"][0][:, :kept] = linears["down_proj"][0]
        if "down_proj" in biased:
            out["down_proj"][1].copy_(linears["down_proj"][1])
    return out


def linear_state(prefix: str, linears: dict[str, Linear]) -> dict[str, torch.Tensor]:
    """State-dict entries `<prefix>.<name>.weight` / `.bias` of a unit's linears."""
    state = {}
    for name, (weight, bias) in linears.items():
        state[f"{prefix}.{name}.weight"] = weight
        if bias is not None:
            state[f"{prefix}.{name}.bias"] = bias
    return state


def outer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Embedding, final norm and (untied) lm_head: everything outside the decoder layers."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    return {
        name: t.detach()
        for name, t in model.state_dict().items()
        if not name.startswith(LAYERS_PREFIX) and not (tied and name == "lm_head.weight")
    }


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """Contiguous copies (tensors may share storage with the dense model) to safetensors, atomically."""
    state = {name: t.detach().contiguous().clone() for name, t in state.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)
