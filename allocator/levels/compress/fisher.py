"""Diagonal Fisher of every block's output: how much the next-token loss cares about each residual channel.

OBS errors ||ΔW X||² are not comparable across layers (LLMs carry a few massive residual channels that later
norms absorb), so a sum of raw or relative errors allocates badly. Weighting each output channel's error by
the mean squared loss gradient there gives the second-order (empirical Fisher) estimate of the loss increase,
ΔL ≈ ½ Σ_c F_c ||ΔW_c X||² / tokens, which is additive across units and comparable between layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from allocator.core.space import ATTN, MLP
from allocator.levels.compress.calibration_pass import GradientCollector

OUTPUT_OF = {ATTN: "self_attn.o_proj", MLP: "mlp.down_proj"}  # the projection whose output is a unit's output


class OutputFisher(GradientCollector):
    """Per (layer, unit kind) in `wanted`: the mean over tokens of the squared next-token loss gradient at the
    o_proj / down_proj output, float64 (hidden,), over the pass's first `sequences` sequences.

    Per-channel squared gradients are summed by tensor hooks during the backward, so no gradient is retained."""

    def __init__(self, wanted: set[tuple[int, str]], sequences: int | None) -> None:
        super().__init__(sequences)
        self.wanted = set(wanted)
        self.sums: dict[tuple[int, str], torch.Tensor] = {}
        self.count = 0  # tokens with a next-token target

    def attach(self, index: int, layer: nn.Module) -> list[RemovableHandle]:
        return [
            layer.get_submodule(OUTPUT_OF[kind]).register_forward_hook(self._watch((index, kind)))
            for kind in OUTPUT_OF if (index, kind) in self.wanted
        ]

    def _watch(self, key: tuple[int, str]):
        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            if self.rows and output.requires_grad:
                rows = self.rows
                output.register_hook(lambda grad: self._add(key, grad[:rows]))

        return hook

    def _add(self, key: tuple[int, str], grad: torch.Tensor) -> None:
        square = grad.double().pow(2).sum(dim=(0, 1))
        self.sums[key] = square if key not in self.sums else self.sums[key].add_(square)

    def loss(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross-entropy of the batch's first `rows` sequences."""
        targets = tokens[: self.rows, 1:]
        self.count += targets.numel()
        return F.cross_entropy(logits[: self.rows, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum")

    def fisher(self, layer: int, kind: str) -> torch.Tensor:
        if (layer, kind) not in self.sums:
            raise RuntimeError(f"no output Fisher of layer {layer}'s {kind}: not wanted, or no gradient reached it")
        return self.sums[(layer, kind)] / self.count
