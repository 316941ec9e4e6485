"""OWL's layer outlier ratio (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity"), from calibration activations.

A weight's outlier score is Wanda's A_ij = |W_ij| * ||X_j||_2 (X_j: input feature j of its linear over all calibration
tokens). A layer's ratio is the share of all its linears' scores above `threshold` x the mean over all of them (one
pool per layer, as OWL's reference code does); OWL keeps more weights in layers with more such outliers."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from allocator.levels.compress.calibration_pass import Collector, calibration_pass


class OutlierNorms(Collector):
    """Per nn.Linear of every decoder layer, Σ x_j² of its input over the pass's first `sequences` sequences.

    Summed in float32 over each run of `chunk` sequences (the runs start at multiples of `chunk`; one that would
    cross a pass batch is cut there), then in float64 (a sum over many runs must not drift)."""

    def __init__(self, sequences: int | None, chunk: int) -> None:
        super().__init__(sequences)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive int, got {chunk!r}")
        self.chunk = chunk
        self.linears: dict[int, list[nn.Linear]] = {}
        self.sq_norms: dict[nn.Linear, torch.Tensor] = {}

    def attach(self, index: int, layer: nn.Module) -> list[RemovableHandle]:
        self.linears[index] = [m for m in layer.modules() if isinstance(m, nn.Linear)]
        return [m.register_forward_pre_hook(self._accumulate) for m in self.linears[index]]

    def _accumulate(self, module: nn.Module, args: tuple) -> None:
        if not self.rows:
            return
        with torch.no_grad():
            first = self.start
            end = self.start + self.rows
            while first < end:
                last = min(end, (first // self.chunk + 1) * self.chunk)
                x = args[0][first - self.start : last - self.start].detach()
                s = x.reshape(-1, x.shape[-1]).float().square().sum(0).double()
                self.sq_norms[module] = s if module not in self.sq_norms else self.sq_norms[module].add_(s)
                first = last

    def ratios(self, threshold: float = 5.0) -> list[float]:
        """Per decoder layer, the fraction in [0, 1] of its nn.Linear weights whose score exceeds threshold x mean."""
        if threshold <= 0:
            raise ValueError(f"outlier threshold must be > 0, got {threshold}")
        ratios = []
        for index in sorted(self.linears):
            # A linear never called (e.g. a dropped block) scores 0: its weights cannot be outliers.
            scores = [
                (m.weight.detach().abs().double() * self.sq_norms[m].to(m.weight.device).sqrt()[None, :]).flatten()
                if m in self.sq_norms else torch.zeros(m.weight.numel(), dtype=torch.float64)
                for m in self.linears[index]
            ]
            pooled = torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)
            ratios.append(float((pooled > threshold * pooled.mean()).double().mean()) if pooled.numel() else 0.0)
        return ratios


def layer_outlier_ratios(
    model: nn.Module, tokens: torch.Tensor, threshold: float = 5.0, batch_size: int = 4
) -> list[float]:
    """OWL's ratios from a calibration pass of their own (when no level database is built: see
    database.open_or_build_database's `also`), over all of `tokens`."""
    if threshold <= 0:
        raise ValueError(f"outlier threshold must be > 0, got {threshold}")
    norms = OutlierNorms(None, batch_size)
    calibration_pass(model, tokens, batch_size, [norms], desc="outlier ratios")
    return norms.ratios(threshold)
