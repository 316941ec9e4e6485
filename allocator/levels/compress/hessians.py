"""Calibration Hessians H = Σ x xᵀ of the inputs to every o_proj and down_proj, from the dense model."""

from __future__ import annotations

import torch
from torch import nn

from allocator.levels.compress.hooked_forward import forward_with_hooks
from allocator.model.surgery import decoder_layers


@torch.inference_mode()
def collect_hessians(
    model: nn.Module, tokens: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer (o_proj input Hessian, down_proj input Hessian), float64, summed over all calibration tokens.

    Inputs come from the dense model for every layer: options of one unit are then independent of the other
    units' choices, so any allocation can be stitched from the database (EvoPress' key observation)."""
    layers = decoder_layers(model)
    attn_h: list[torch.Tensor | None] = [None] * len(layers)
    mlp_h: list[torch.Tensor | None] = [None] * len(layers)

    def accumulate(store: list, idx: int):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            h = (x.T @ x).double()  # float32 product (fast), float64 sum (no drift over many batches)
            store[idx] = h if store[idx] is None else store[idx].add_(h)

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(accumulate(attn_h, i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(accumulate(mlp_h, i)))
    forward_with_hooks(model, tokens, batch_size, handles, "calibration hessians")
    return attn_h, mlp_h  # type: ignore[return-value]
