"""Calibration Hessians H = Σ x xᵀ of the inputs of the Linears in the decoder layers, from the dense model.

The seven projections of a Llama layer have four distinct inputs: q/k/v share the input_layernorm output and
gate/up share the post_attention_layernorm output, so one Hessian (and one hook) serves each group. Structured OBS
needs the o_proj and down_proj inputs ("o", "down"); per-linear pruners (SparseGPT, Wanda) need all four.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from allocator.levels.compress.calibration_pass import Collector

__all__ = ["INPUT_GROUPS", "InputHessians"]

# Hessian key → (the module whose input is hooked, the projections that read that same input).
INPUT_GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "qkv": ("self_attn.q_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "o": ("self_attn.o_proj", ("self_attn.o_proj",)),
    "gate_up": ("mlp.gate_proj", ("mlp.gate_proj", "mlp.up_proj")),
    "down": ("mlp.down_proj", ("mlp.down_proj",)),
}


class InputHessians(Collector):
    """The float64 Σ x xᵀ over every calibration token (batch, seq) of the inputs `wanted`: (layer, INPUT_GROUPS key).

    Every layer sees the dense model's activations, so each layer's pruning options are independent of the other
    layers' choices (EvoPress' key observation): any allocation can be stitched from the database."""

    def __init__(self, wanted: set[tuple[int, str]]) -> None:
        super().__init__()
        unknown = {key for _layer, key in wanted} - set(INPUT_GROUPS)
        if unknown:
            raise ValueError(f"unknown Hessian inputs {sorted(unknown)}; known: {', '.join(INPUT_GROUPS)}")
        self.wanted = set(wanted)
        self.sums: dict[tuple[int, str], torch.Tensor] = {}
        # Tokens summed into every Hessian (Wanda's activation norms are sqrt(H_jj / tokens)): counted at one input.
        self.tokens = 0
        self._first = min(self.wanted, default=None)

    def attach(self, index: int, layer: nn.Module) -> list[RemovableHandle]:
        return [
            layer.get_submodule(INPUT_GROUPS[key][0]).register_forward_pre_hook(self._accumulate((index, key)))
            for key in INPUT_GROUPS if (index, key) in self.wanted
        ]

    def _accumulate(self, at: tuple[int, str]):
        def hook(_module: nn.Module, args: tuple) -> None:
            if not self.rows:
                return
            with torch.no_grad():  # a batch that runs with gradients for the Fisher: nothing here joins its graph
                x = args[0][: self.rows].detach()
                x = x.reshape(-1, x.shape[-1])
                # float32 product at least (fast; half precision would lose the sum), float64 accumulation so
                # many batches do not drift.
                x = x.to(torch.promote_types(x.dtype, torch.float32))
                h = (x.T @ x).to(torch.float64)
            current = self.sums.get(at)
            self.sums[at] = h if current is None else current.add_(h)
            if at == self._first:
                self.tokens += x.shape[0]

        return hook

    def hessian(self, layer: int, key: str) -> torch.Tensor:
        """Σ x xᵀ of layer `layer`'s `key` input (float64, (in, in))."""
        if (layer, key) not in self.sums:
            raise RuntimeError(f"no Hessian of layer {layer}'s {key!r} input: not wanted, released, or its projection "
                               "never ran during the calibration pass")
        return self.sums[(layer, key)]

    def release(self, layer: int, keys: set[str]) -> None:
        """Free those Hessians (once their unit's levels are built)."""
        for key in keys:
            self.sums.pop((layer, key), None)
