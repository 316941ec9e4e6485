"""Run a model over calibration tokens so that forward hooks can collect statistics, then remove the hooks."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm import tqdm


def forward_with_hooks(
    model: nn.Module, tokens: torch.Tensor, batch_size: int, handles: Iterable[RemovableHandle], desc: str
) -> None:
    """Forward every batch of `tokens` (logits of the last position only: the hooks want activations, and full
    logits would cost a vocab-sized matrix per token), and remove `handles` afterwards, on failure too."""
    try:
        for start in tqdm(range(0, len(tokens), batch_size), desc=desc, unit="batch", leave=False):
            model(tokens[start : start + batch_size], use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
