"""Calibration Hessians H = Σ x xᵀ of the inputs of every Linear in every decoder layer, from the dense model.

The seven projections of a Llama layer have four distinct inputs: q/k/v share the input_layernorm output and
gate/up share the post_attention_layernorm output, so one Hessian (and one hook) serves each group. This is what
per-linear pruners (SparseGPT, Wanda) need, as opposed to hessians.py's o_proj/down_proj pair for structured OBS.
"""

from __future__ import annotations

import torch
from torch import nn

from allocator.levels.compress.hooked_forward import forward_with_hooks
from allocator.model.surgery import decoder_layers

__all__ = ["INPUT_GROUPS", "LinearHessians", "collect_linear_hessians"]

# Hessian key → (the module whose input is hooked, the projections that read that same input).
INPUT_GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "qkv": ("self_attn.q_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "o": ("self_attn.o_proj", ("self_attn.o_proj",)),
    "gate_up": ("mlp.gate_proj", ("mlp.gate_proj", "mlp.up_proj")),
    "down": ("mlp.down_proj", ("mlp.down_proj",)),
}


class LinearHessians(dict[str, list[torch.Tensor]]):
    """{"qkv" | "o" | "gate_up" | "down": per-layer float64 (in, in) Σ x xᵀ}, plus ``tokens``: how many
    calibration tokens were summed into every Hessian (Wanda's activation norms are sqrt(H_jj / tokens))."""

    def __init__(self, hessians: dict[str, list[torch.Tensor]], tokens: int) -> None:
        super().__init__(hessians)
        self.tokens = tokens


@torch.inference_mode()
def collect_linear_hessians(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> LinearHessians:
    """Per layer and per distinct Linear input, float64 Σ x xᵀ over all calibration tokens (batch, seq).

    Every layer sees the dense model's activations (as in hessians.py), so each layer's pruning options are
    independent of the other layers' choices."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.numel() == 0:
        raise ValueError(f"tokens must be a non-empty 2-D (batch, seq) tensor, got {getattr(tokens, 'shape', tokens)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    layers = decoder_layers(model)
    store: dict[str, list[torch.Tensor | None]] = {key: [None] * len(layers) for key in INPUT_GROUPS}
    seen = [0]  # tokens that reached the first hooked input: each counted once, whatever the number of layers

    def accumulate(key: str, idx: int):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            # float32 product at least (fast; half precision would lose the sum), float64 accumulation so
            # many batches do not drift.
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            h = (x.T @ x).to(torch.float64)
            current = store[key][idx]
            store[key][idx] = h if current is None else current.add_(h)
            if key == "qkv" and idx == 0:
                seen[0] += x.shape[0]

        return hook

    handles = [
        layer.get_submodule(hooked).register_forward_pre_hook(accumulate(key, i))
        for i, layer in enumerate(layers)
        for key, (hooked, _readers) in INPUT_GROUPS.items()
    ]
    forward_with_hooks(model, tokens, batch_size, handles, "linear hessians")
    if any(h is None for hs in store.values() for h in hs):
        raise RuntimeError("a hooked projection never ran during the calibration forward passes")
    return LinearHessians(store, seen[0])  # type: ignore[arg-type]
