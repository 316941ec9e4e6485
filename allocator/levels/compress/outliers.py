"""OWL's layer outlier ratio (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity"), from calibration activations.

A weight's outlier score is Wanda's A_ij = |W_ij| * ||X_j||_2 (X_j: input feature j of its linear over all calibration
tokens). A layer's ratio is the share of all its linears' scores above `threshold` x the mean over all of them (one
pool per layer, as OWL's reference code does); OWL keeps more weights in layers with more such outliers."""

from __future__ import annotations

import torch
from torch import nn

from allocator.levels.compress.hooked_forward import forward_with_hooks
from allocator.model.surgery import decoder_layers


@torch.inference_mode()
def layer_outlier_ratios(
    model: nn.Module, tokens: torch.Tensor, threshold: float = 5.0, batch_size: int = 4
) -> list[float]:
    """Per decoder layer, the fraction in [0, 1] of its nn.Linear weights whose score exceeds threshold x mean."""
    if threshold <= 0:
        raise ValueError(f"outlier threshold must be > 0, got {threshold}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    layers = decoder_layers(model)
    linears = [[m for m in layer.modules() if isinstance(m, nn.Linear)] for layer in layers]
    # Per linear, Σ x_j² over tokens in float64 (a sum over many batches must not drift).
    sq_norms: dict[nn.Linear, torch.Tensor] = {}

    def accumulate(module: nn.Linear, args: tuple) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        s = x.square().sum(0).double()
        sq_norms[module] = s if module not in sq_norms else sq_norms[module].add_(s)

    handles = [m.register_forward_pre_hook(accumulate) for group in linears for m in group]
    forward_with_hooks(model, tokens, batch_size, handles, "outlier ratios")

    ratios = []
    for group in linears:
        # A linear never called (e.g. a dropped block) scores 0: its weights cannot be outliers.
        scores = [
            (m.weight.detach().abs().double() * sq_norms[m].sqrt()[None, :]).flatten()
            if m in sq_norms else torch.zeros(m.weight.numel(), dtype=torch.float64)
            for m in group
        ]
        pooled = torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)
        ratios.append(float((pooled > threshold * pooled.mean()).double().mean()) if pooled.numel() else 0.0)
    return ratios
