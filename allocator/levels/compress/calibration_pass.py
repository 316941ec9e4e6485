"""One pass of the dense model over the calibration tokens, in batches, during which collectors gather statistics.

A collector hooks modules of each decoder layer (`attach` is called once per layer, so a layer-streamed pass can
attach one layer at a time) and reads the pass's first `sequences` sequences. Every batch calls the model once:

- without gradients (inference mode, logits of the last position only: the hooks want activations, and full logits
  would cost a vocab-sized matrix per token) when no gradient collector reads any of its sequences;
- with gradients otherwise: from the input embeddings on (the frozen weights need none), full logits, the gradient
  collector's loss over its sequences of the batch, and one backward, during which its tensor hooks read the
  gradients. The other collectors' hooks run on the same forward, outside autograd.

The statistics do not depend on which of the two forwards a batch took, nor on the batch holding sequences that a
collector does not read: a sequence's activations (and its loss's gradients) are the same either way on CPU, which
tests/test_calibration_pass.py checks against separate passes over each statistic's own sequences."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm import tqdm

from allocator.model.surgery import decoder_layers


class Collector(ABC):
    """A statistic gathered by hooks during the calibration pass over its first `sequences` sequences (None: all).

    Before each batch the pass sets `start` (the batch's first sequence) and `rows` (how many of the batch's leading
    sequences this collector reads; 0: none, and its hooks must do nothing). Hooks slice their inputs to `rows`."""

    def __init__(self, sequences: int | None = None) -> None:
        if sequences is not None and (isinstance(sequences, bool) or not isinstance(sequences, int) or sequences < 1):
            raise ValueError(f"sequences must be None or a positive int, got {sequences!r}")
        self.sequences = sequences
        self.start = 0
        self.rows = 0

    @abstractmethod
    def attach(self, index: int, layer: nn.Module) -> list[RemovableHandle]:
        """Register this collector's hooks on decoder layer `index`; the pass removes them when it ends."""


class GradientCollector(Collector):
    """A collector that needs the gradients of a loss: batches it reads run forward with autograd and backward."""

    @abstractmethod
    def loss(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The scalar loss over this collector's `rows` leading sequences of the batch (`logits`: all positions)."""


def rows_read(collector: Collector, start: int, batch: int) -> int:
    end = batch if collector.sequences is None else collector.sequences - start
    return max(0, min(batch, end))


def calibration_pass(
    model: nn.Module, tokens: torch.Tensor, batch_size: int, collectors: Sequence[Collector], desc: str = "calibration"
) -> None:
    """Run `model` once per batch of `tokens` (batch_size sequences; batches after the last one any collector reads
    are skipped) with every collector's hooks attached, and remove the hooks afterwards, on failure too."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.numel() == 0:
        raise ValueError(f"tokens must be a non-empty 2-D (batch, seq) tensor, got {getattr(tokens, 'shape', tokens)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    gradient = [c for c in collectors if isinstance(c, GradientCollector)]
    if len(gradient) > 1:
        raise ValueError("a calibration pass takes at most one gradient collector (their losses' gradients would mix)")
    handles: list[RemovableHandle] = []
    try:
        for index, layer in enumerate(decoder_layers(model)):
            for collector in collectors:
                handles += collector.attach(index, layer)
        for start in tqdm(range(0, len(tokens), batch_size), desc=desc, unit="batch", leave=False):
            batch = tokens[start : start + batch_size]
            for collector in collectors:
                collector.start, collector.rows = start, rows_read(collector, start, len(batch))
            if not any(c.rows for c in collectors):
                break  # collectors read leading sequences: none reads a later batch either
            if gradient and gradient[0].rows:
                # Gradients flow from the embeddings on, so the (frozen) weights need no grad.
                with torch.enable_grad():
                    embeds = model.get_input_embeddings()(batch).detach().requires_grad_(True)
                    # The full logits are freed before the backward (the loss keeps what it needs).
                    gradient[0].loss(model(inputs_embeds=embeds, use_cache=False).logits, batch).backward()
            else:
                with torch.inference_mode():
                    model(batch, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
        for collector in collectors:
            collector.rows = 0
