"""Inference regimes and the forward call that each one times: what generation really runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import DynamicCache

from allocator.core.config import ProfileConfig
from allocator.core.errors import UserInputError
from allocator.core.space import ModelShape
from allocator.model.surgery import DroppedAttention, decoder_layers


@dataclass(frozen=True)
class Regime:
    name: str
    kind: str  # "prefill": batch × length new tokens; "decode": batch × 1 new token over a KV cache of `length`
    batch: int
    length: int


def regimes_of(cfg: ProfileConfig) -> list[Regime]:
    out = [Regime("prefill", "prefill", cfg.prefill_batch, cfg.prefill_length)]
    out += [Regime(f"decode_b{b}", "decode", b, cfg.decode_context) for b in cfg.decode_batches]
    return out


def find_regime(cfg: ProfileConfig, name: str) -> Regime:
    by_name = {r.name: r for r in regimes_of(cfg)}
    if name not in by_name:
        raise UserInputError(f"regime {name!r} is not profiled; known: {', '.join(by_name)} (see profile.decode_batches)")
    return by_name[name]


def _random_cache(model: nn.Module, batch: int, length: int, generator: torch.Generator) -> DynamicCache:
    """A KV cache of `length` positions with each layer's own (pruned) KV head count, without running a prefill."""
    head_dim = ModelShape.from_config(model.config).head_dim
    dtype = next(model.parameters()).dtype
    cache = DynamicCache()
    for idx, layer in enumerate(decoder_layers(model)):
        attn = layer.self_attn
        if isinstance(attn, DroppedAttention):
            keys = torch.zeros(batch, 1, length, 1, dtype=dtype)
            values = keys
        else:
            heads = attn.k_proj.out_features // head_dim
            keys = torch.randn(batch, heads, length, head_dim, generator=generator).to(dtype)
            values = torch.randn(batch, heads, length, head_dim, generator=generator).to(dtype)
        cache.update(keys, values, idx)
    return cache


def forward_call(model: nn.Module, regime: Regime, seed: int = 0) -> Callable[[], object]:
    """A zero-argument call running one step of `regime` on `model` (inference mode, last-token logits only)."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    if regime.kind == "prefill":
        ids = torch.randint(0, vocab, (regime.batch, regime.length), generator=generator)

        def prefill() -> object:
            with torch.inference_mode():
                return model(ids, use_cache=True, logits_to_keep=1)

        return prefill
    if regime.kind != "decode":
        raise ValueError(f"unknown regime kind {regime.kind!r}; valid: prefill, decode")
    ids = torch.randint(0, vocab, (regime.batch, 1), generator=generator)
    positions = torch.full((regime.batch, 1), regime.length)
    with torch.inference_mode():
        cache = _random_cache(model, regime.batch, regime.length, generator)

    def decode() -> object:
        with torch.inference_mode():
            out = model(ids, past_key_values=cache, position_ids=positions, use_cache=True, logits_to_keep=1)
            for layer in cache.layers:  # back to the same context length for the next call
                layer.keys = layer.keys[..., : regime.length, :]
                layer.values = layer.values[..., : regime.length, :]
        return out

    return decode
