"""Layer-streamed calibration: the calibration activations pass through one decoder layer at a time, so the memory a
build holds is one layer's weights on the device, one layer's statistics and the activations of the calibration
sequences (SparseGPT's and EvoPress' sequential scheme), never every layer's statistics at once.

Two streams:

- `stream_layers`: for each decoder layer in turn, every batch of activations goes through it once (no gradients)
  with the collectors' hooks attached to that layer only; then `after_layer(index)` runs while the layer is still
  resident (the database builds and writes that layer's levels and frees its statistics there), and the outputs
  become the next layer's inputs.
- `stream_fisher`: the output Fisher needs the loss's gradients, which flow from the last layer down. Per batch, the
  forward keeps each layer's input (batch x seq x hidden, on `store`), then the backward walks the layers top down,
  recomputing one layer's forward with autograd from its saved input and pulling the gradient through it
  (activation checkpointing per layer). Only one layer's graph exists at a time, and the collector keeps only
  per-channel squared gradients.

A layer's inputs are caught at layer 0 (the model runs its embedding, position embeddings and mask, then stops), so
each layer is called exactly as the full model calls it, and the statistics equal the one-pass ones
(tests/test_layer_stream.py).

Placement: each layer is moved to `device` for its turn and back afterwards when the model lives elsewhere (a model
larger than the device is built layer by layer); a model already on `device` is left in place; an offloaded model's
layers (meta device, allocator/model/offload.py) are materialised from their source for their turn and emptied
after it, so only one layer's weights are resident at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from tqdm import tqdm

from allocator.levels.compress.calibration_pass import Collector, GradientCollector, rows_read
from allocator.model.offload import LayerWeights, materialise
from allocator.model.surgery import decoder_layers

__all__ = ["LayerInputs", "first_layer_inputs", "resident", "stream_fisher", "stream_layers"]


class _Caught(Exception):
    """Raised by the layer-0 hook to stop the model once that layer's inputs are known."""


class LayerInputs:
    """One batch's inputs of a decoder layer: the hidden states and the keyword arguments the model passes every
    layer (position embeddings, mask, position ids), which are the same for all layers."""

    def __init__(self, hidden: torch.Tensor, kwargs: dict) -> None:
        self.hidden = hidden
        self.kwargs = kwargs


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def _home(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _model_device(model: nn.Module) -> torch.device:
    """Where the model's resident parts are (an offloaded model's layers are on the meta device)."""
    return model.get_input_embeddings().weight.device


@contextmanager
def resident(
    module: nn.Module, device: torch.device, index: int | None = None, weights: LayerWeights | None = None
) -> Iterator[nn.Module]:
    """`module` with its parameters on `device` inside the block, back on their own device after it. An offloaded
    decoder layer (on the meta device) is materialised from `weights` for the block and emptied again after it."""
    home = _home(module)
    if home.type == "meta":
        if weights is None or index is None:
            raise RuntimeError("an offloaded (meta-device) layer needs the source of its weights")
        materialise(module, index, weights, device)
        try:
            yield module
        finally:
            module.to("meta")
        return
    if home == device:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


@torch.no_grad()
def first_layer_inputs(model: nn.Module, batch: torch.Tensor, device: torch.device, store: torch.device) -> LayerInputs:
    """Layer 0's inputs for `batch`: the hidden states on `store`, the shared keyword arguments on `device`."""
    caught: dict = {}

    def hook(_module, args, kwargs):
        caught["hidden"], caught["kwargs"] = args[0], dict(kwargs)
        raise _Caught

    handle = decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        # The embedding runs where the model lives (a few MB even for large vocabularies).
        model(batch.to(_model_device(model)), use_cache=False)
    except _Caught:
        pass
    finally:
        handle.remove()
    if "hidden" not in caught:
        raise RuntimeError("the model never called its first decoder layer")
    kwargs = {k: _to(v, device) for k, v in caught["kwargs"].items() if k != "past_key_values"}
    return LayerInputs(caught["hidden"].to(store), kwargs)


def _batches(tokens: torch.Tensor, batch_size: int, collectors: Sequence[Collector]) -> list[tuple[int, torch.Tensor]]:
    """(start, batch) up to the last batch any collector reads (collectors read leading sequences)."""
    out = []
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size]
        if not any(rows_read(c, start, len(batch)) for c in collectors):
            break
        out.append((start, batch))
    return out


def _check(tokens: torch.Tensor, batch_size: int) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.numel() == 0:
        raise ValueError(f"tokens must be a non-empty 2-D (batch, seq) tensor, got {getattr(tokens, 'shape', tokens)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def stream_layers(
    model: nn.Module,
    tokens: torch.Tensor,
    batch_size: int,
    collectors: Sequence[Collector],
    after_layer: Callable[[int], None] = lambda index: None,
    *,
    device: torch.device | None = None,
    store: torch.device | None = None,
    layers: int | None = None,
    weights: LayerWeights | None = None,
    desc: str = "calibration",
) -> None:
    """Pass `tokens` (batches of `batch_size`, up to the last one any collector reads) through decoder layers
    0..layers-1 one layer at a time, collectors hooked on the current layer; `after_layer(i)` runs once layer i has
    seen every batch, with layer i still on `device`. Activations between layers are kept on `store` (default:
    `device`; "cpu" offloads them). An offloaded model's layers are materialised from `weights` one at a time."""
    _check(tokens, batch_size)
    if any(isinstance(c, GradientCollector) for c in collectors):
        raise ValueError("stream_layers runs without gradients; the output Fisher has its own stream (stream_fisher)")
    device = _model_device(model) if device is None else device
    store = device if store is None else store
    blocks = decoder_layers(model)
    count = len(blocks) if layers is None else layers
    batches = _batches(tokens, batch_size, collectors)
    inputs = [first_layer_inputs(model, batch, device, store) for _start, batch in batches]
    try:
        for index in tqdm(range(count), desc=desc, unit="layer", leave=False):
            with resident(blocks[index], device, index, weights) as layer:
                handles = [h for c in collectors for h in c.attach(index, layer)]
                try:
                    with torch.no_grad():
                        for (start, batch), held in zip(batches, inputs):
                            for c in collectors:
                                c.start, c.rows = start, rows_read(c, start, len(batch))
                            out = layer(held.hidden.to(device), **held.kwargs)
                            held.hidden = (out[0] if isinstance(out, tuple) else out).to(store)
                finally:
                    for handle in handles:
                        handle.remove()
                    for c in collectors:
                        c.rows = 0
                after_layer(index)
    finally:
        for c in collectors:
            c.rows = 0


def stream_fisher(
    model: nn.Module,
    tokens: torch.Tensor,
    batch_size: int,
    fisher: GradientCollector,
    *,
    lowest: int = 0,
    device: torch.device | None = None,
    store: torch.device | None = None,
    weights: LayerWeights | None = None,
) -> None:
    """The gradient collector's statistic over its first `fisher.sequences` sequences of `tokens`, one layer's
    autograd graph at a time; gradients are pulled down to layer `lowest` (nothing below it is wanted)."""
    _check(tokens, batch_size)
    device = _model_device(model) if device is None else device
    store = device if store is None else store
    blocks = decoder_layers(model)
    head = nn.ModuleList([model.model.norm, model.get_output_embeddings()])
    handles = []
    try:
        for index, layer in enumerate(blocks):
            if index >= lowest:
                handles += fisher.attach(index, layer)
        for start, batch in tqdm(_batches(tokens, batch_size, [fisher]), desc="output Fisher", unit="batch",
                                 leave=False):
            fisher.start, fisher.rows = start, rows_read(fisher, start, len(batch))
            batch = batch[: fisher.rows]  # only the sequences the Fisher reads run (the loss covers just those)
            held = first_layer_inputs(model, batch, device, store)
            saved = [held.hidden]
            with torch.no_grad():  # no graph: the collector's hooks act only on outputs that require grad
                for index in range(len(blocks)):
                    with resident(blocks[index], device, index, weights) as layer:
                        out = layer(saved[-1].to(device), **held.kwargs)
                    saved.append((out[0] if isinstance(out, tuple) else out).to(store))
            with resident(head, device), torch.enable_grad():
                top = saved.pop().to(device).requires_grad_(True)
                logits = head[1](head[0](top))
                (grad,) = torch.autograd.grad(fisher.loss(logits, batch.to(device)), top)
                del logits
            for index in range(len(blocks) - 1, lowest - 1, -1):
                x = saved.pop().to(device).requires_grad_(True)
                with resident(blocks[index], device, index, weights) as layer, torch.enable_grad():
                    out = layer(x, **held.kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    # The collector's tensor hooks on this layer's outputs read the gradient on the way to x.
                    (grad,) = torch.autograd.grad(out, x, grad)
    finally:
        for handle in handles:
            handle.remove()
        fisher.rows = 0
