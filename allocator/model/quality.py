"""Quality of a pruned model: KL divergence of its logits to the dense logits, and perplexity on held-out text.
The passes run where the models are (allocator/model/placement.py): the tokens are moved to them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from allocator.model.placement import input_device


@torch.inference_mode()
def kl_to_dense(dense: nn.Module, models: dict[str, nn.Module], tokens: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Mean per-token KL(dense ‖ model). Dense logits are computed once per batch and shared by all models."""
    totals = {name: 0.0 for name in models}
    count = 0
    tokens = tokens.to(input_device(dense))  # the models are built on the dense model's device
    for start in tqdm(range(0, len(tokens), batch_size), desc="KL to dense", unit="batch", leave=False):
        batch = tokens[start : start + batch_size]
        reference = F.log_softmax(dense(batch).logits.float(), dim=-1).flatten(0, 1)
        for name, model in models.items():
            logp = F.log_softmax(model(batch).logits.float(), dim=-1).flatten(0, 1).to(reference.device)
            totals[name] += F.kl_div(logp, reference, log_target=True, reduction="sum").item()
        count += reference.shape[0]
    return {name: total / count for name, total in totals.items()}


@torch.inference_mode()
def perplexity(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> float:
    """exp(mean next-token negative log-likelihood) over every position of the blocks."""
    nll, count = 0.0, 0
    tokens = tokens.to(input_device(model))
    for start in tqdm(range(0, len(tokens), batch_size), desc="perplexity", unit="batch", leave=False):
        batch = tokens[start : start + batch_size]
        logits = model(batch).logits[:, :-1].float()
        nll += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)
