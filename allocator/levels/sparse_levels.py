"""Sparse levels of the database: every linear of a unit pruned to a pattern, and the unit's measured output error.

Each linear is pruned from the dense model's input Hessian (SparseGPT factors it once for all patterns). A unit's
error is measured where it is comparable with the structured levels: at the attention / MLP block output, on the
dense model's block inputs, weighted per channel by the output Fisher (½ Σ_c F_c Σ_t Δy²_tc), so structured and
sparse options of a mixed space compete on one scale."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.hooks import RemovableHandle

from allocator.core.patterns import SparsityPattern
from allocator.levels.compress.calibration_pass import Collector
from allocator.levels.compress.sparse_prune import PRUNERS, sparsegpt_levels
from allocator.model.surgery import BLOCK_ATTRIBUTE, UNIT_LINEARS, decoder_layers

# Which collected Hessian is the input of each linear.
HESSIAN_OF = {
    "q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o",
    "gate_proj": "gate_up", "up_proj": "gate_up", "down_proj": "down",
}


def prune_unit(
    block: nn.Module, kind: str, hessians: Mapping[str, torch.Tensor], tokens: int, patterns: list[SparsityPattern],
    pruner: str, damp: float,
) -> dict[str, dict[str, torch.Tensor]]:
    """{pattern label: {linear name: pruned weight}} for one unit, from its linears' input Hessians (by HESSIAN_OF
    key) summed over `tokens` calibration tokens."""
    levels: dict[str, dict[str, torch.Tensor]] = {p.label: {} for p in patterns}
    for name in UNIT_LINEARS[kind]:
        weight = getattr(block, name).weight.detach()
        hessian = hessians[HESSIAN_OF[name]]
        if pruner == "sparsegpt":
            pruned = sparsegpt_levels(weight, hessian, patterns, damp)
        else:
            prune = PRUNERS[pruner]
            pruned = {p.label: prune(weight, hessian, p, tokens=tokens, damp=damp) for p in patterns}
        for label, result in pruned.items():
            levels[label][name] = result.weight.contiguous()
    return levels


@dataclass
class BlockCall:
    """One recorded call of an attention or MLP block: its inputs and its dense output."""

    args: tuple
    kwargs: dict
    output: torch.Tensor


def _leading(value, rows: int, batch: int):
    """`value` detached; a tensor of the whole batch (first dimension `batch`, not a broadcast 1) is cut to its first
    `rows` sequences, copied so that the rest of the batch is freed."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return value[:rows].clone() if rows < batch and value.ndim >= 2 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(_leading(v, rows, batch) for v in value)
    return value


class BlockCalls(Collector):
    """Inputs and outputs of the dense (layer, kind) blocks in `wanted` over the pass's first `sequences`
    sequences: {(layer, kind): one BlockCall per batch}."""

    def __init__(self, wanted: set[tuple[int, str]], sequences: int | None) -> None:
        super().__init__(sequences)
        self.calls: dict[tuple[int, str], list[BlockCall]] = {key: [] for key in wanted}

    def attach(self, index: int, layer: nn.Module) -> list[RemovableHandle]:
        return [
            getattr(layer, BLOCK_ATTRIBUTE[kind]).register_forward_hook(self._record((index, kind)), with_kwargs=True)
            for kind in BLOCK_ATTRIBUTE if (index, kind) in self.calls
        ]

    def _record(self, key: tuple[int, str]):
        def hook(_module, args, kwargs, output):
            if not self.rows:
                return
            out = output[0] if isinstance(output, tuple) else output
            rows, batch = self.rows, out.shape[0]
            kept = {k: _leading(v, rows, batch) for k, v in kwargs.items() if k != "past_key_values"}
            self.calls[key].append(BlockCall(_leading(args, rows, batch), kept, _leading(out, rows, batch)))

        return hook


@torch.inference_mode()
def block_output_errors(
    block: nn.Module, calls: list[BlockCall], weights: dict[str, torch.Tensor], fisher: torch.Tensor,
    scale: float,
) -> dict[str, float]:
    """The block's output error with `weights` swapped in: absolute Σ Δy², relative Σ Δy² / Σ y², and
    fisher ½ Σ_c F_c Σ_t Δy²_tc; absolute and fisher are scaled by `scale` (tokens the Hessians summed over, per
    token measured here) so they add up like the structured levels' errors."""
    params = {f"{name}.weight": w for name, w in weights.items()}
    per_channel = torch.zeros(fisher.shape[0], dtype=torch.float64, device=fisher.device)
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
