"""Sparse levels of the database: every linear of a unit pruned to a pattern, and the unit's measured output error.

Each linear is pruned from the dense model's input Hessian (SparseGPT factors it once for all patterns). A unit's
error is measured where it is comparable with the structured levels: at the attention / MLP block output, on the
dense model's block inputs, weighted per channel by the output Fisher (½ Σ_c F_c Σ_t Δy²_tc), so structured and
sparse options of a mixed space compete on one scale."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from allocator.levels.compress.hooked_forward import forward_with_hooks
from allocator.levels.compress.linear_hessians import LinearHessians
from allocator.core.patterns import SparsityPattern
from allocator.levels.compress.sparse_prune import PRUNERS, sparsegpt_levels
from allocator.model.surgery import BLOCK_ATTRIBUTE, UNIT_LINEARS, decoder_layers

# Which collected Hessian is the input of each linear.
HESSIAN_OF = {
    "q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o",
    "gate_proj": "gate_up", "up_proj": "gate_up", "down_proj": "down",
}


def prune_unit(
    block: nn.Module, kind: str, layer: int, hessians: LinearHessians, patterns: list[SparsityPattern], pruner: str,
    damp: float,
) -> dict[str, dict[str, torch.Tensor]]:
    """{pattern label: {linear name: pruned weight}} for one unit."""
    levels: dict[str, dict[str, torch.Tensor]] = {p.label: {} for p in patterns}
    for name in UNIT_LINEARS[kind]:
        weight = getattr(block, name).weight.detach()
        hessian = hessians[HESSIAN_OF[name]][layer]
        if pruner == "sparsegpt":
            pruned = sparsegpt_levels(weight, hessian, patterns, damp)
        else:
            prune = PRUNERS[pruner]
            pruned = {p.label: prune(weight, hessian, p, tokens=hessians.tokens, damp=damp) for p in patterns}
        for label, result in pruned.items():
            levels[label][name] = result.weight.contiguous()
    return levels


@dataclass
class BlockCall:
    """One recorded call of an attention or MLP block: its inputs and its dense output."""

    args: tuple
    kwargs: dict
    output: torch.Tensor


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    return value


@torch.inference_mode()
def record_block_calls(
    model: nn.Module, tokens: torch.Tensor, batch_size: int, kinds: set[tuple[int, str]]
) -> dict[tuple[int, str], list[BlockCall]]:
    """Inputs and outputs of the (layer, kind) blocks of the dense model over `tokens`, one entry per batch."""
    layers = decoder_layers(model)
    calls: dict[tuple[int, str], list[BlockCall]] = {key: [] for key in kinds}

    def record(key: tuple[int, str]):
        def hook(_module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            kept = {k: _detached(v) for k, v in kwargs.items() if k != "past_key_values"}
            calls[key].append(BlockCall(_detached(args), kept, out.detach()))

        return hook

    handles = [
        getattr(layers[layer], BLOCK_ATTRIBUTE[kind]).register_forward_hook(record((layer, kind)), with_kwargs=True)
        for layer, kind in kinds
    ]
    forward_with_hooks(model, tokens, batch_size, handles, "block inputs")
    return calls


@torch.inference_mode()
def block_output_errors(
    block: nn.Module, calls: list[BlockCall], weights: dict[str, torch.Tensor], fisher: torch.Tensor,
    scale: float,
) -> dict[str, float]:
    """The block's output error with `weights` swapped in: absolute Σ Δy², relative Σ Δy² / Σ y², and
    fisher ½ Σ_c F_c Σ_t Δy²_tc; absolute and fisher are scaled by `scale` (tokens the Hessians summed over, per
    token measured here) so they add up like the structured levels' errors."""
    params = {f"{name}.weight": w for name, w in weights.items()}
    per_channel = torch.zeros(fisher.shape[0], dtype=torch.float64)
    reference = 0.0
    for call in calls:
        out = functional_call(block, params, call.args, call.kwargs)
        out = out[0] if isinstance(out, tuple) else out
        delta = (out - call.output).double().reshape(-1, per_channel.shape[0])
        per_channel += delta.pow(2).sum(dim=0)
        reference += float(call.output.double().pow(2).sum())
    absolute = float(per_channel.sum())
    return {
        "absolute": absolute * scale,
        "relative": absolute / max(reference, 1e-30),
        "fisher": 0.5 * float(fisher.double() @ per_channel) * scale,
    }


def unit_block(model: nn.Module, layer: int, kind: str) -> nn.Module:
    return getattr(decoder_layers(model)[layer], BLOCK_ATTRIBUTE[kind])
