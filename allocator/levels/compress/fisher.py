"""Diagonal Fisher of every block's output: how much the next-token loss cares about each residual channel.

OBS errors ||ΔW X||² are not comparable across layers (LLMs carry a few massive residual channels that later
norms absorb), so a sum of raw or relative errors allocates badly. Weighting each output channel's error by
the mean squared loss gradient there gives the second-order (empirical Fisher) estimate of the loss increase,
ΔL ≈ ½ Σ_c F_c ||ΔW_c X||² / tokens, which is additive across units and comparable between layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from allocator.model.surgery import decoder_layers


def collect_output_fisher(
    model: nn.Module, tokens: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer (o_proj output, down_proj output) mean over tokens of the squared loss gradient, float64."""
    layers = decoder_layers(model)
    outputs: dict[tuple[int, str], torch.Tensor] = {}

    def keep(key: tuple[int, str]):
        def hook(_module, _args, output):
            output.retain_grad()
            outputs[key] = output

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_hook(keep((i, "attn"))))
        handles.append(layer.mlp.down_proj.register_forward_hook(keep((i, "mlp"))))
    hidden = model.config.hidden_size
    sums = {key: torch.zeros(hidden, dtype=torch.float64) for i in range(len(layers)) for key in ((i, "attn"), (i, "mlp"))}
    count = 0
    try:
        for start in tqdm(range(0, len(tokens), batch_size), desc="output fisher", unit="batch", leave=False):
            batch = tokens[start : start + batch_size]
            # Gradients flow from the embeddings on, so the (frozen) weights need no grad.
            embeds = model.get_input_embeddings()(batch).detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(inputs_embeds=embeds, use_cache=False).logits[:, :-1]
                loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
                loss.backward()
            for key, output in outputs.items():
                sums[key] += output.grad.double().pow(2).sum(dim=(0, 1))
            count += batch[:, 1:].numel()
            outputs.clear()
    finally:
        for handle in handles:
            handle.remove()
    attn = [sums[(i, "attn")] / count for i in range(len(layers))]
    mlp = [sums[(i, "mlp")] / count for i in range(len(layers))]
    return attn, mlp
