"""Offloaded models: the decoder layers stay on the meta device (no memory) and one layer at a time is materialised
from its source (a safetensors checkpoint, or seeded random weights for the scale benchmark) while a layer-streamed
pass works on it; the embedding, final norm and lm_head are loaded once. A model much larger than RAM or the GPU can
then be calibrated with one layer's weights resident."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from allocator.core.errors import UserInputError

__all__ = ["LayerWeights", "RandomLayers", "SafetensorsLayers", "load_offloaded", "materialise"]

LAYER_PREFIX = "model.layers."


class LayerWeights(ABC):
    """Where an offloaded model's decoder-layer weights come from, one layer at a time."""

    @abstractmethod
    def tensors(self, index: int, layer: nn.Module) -> dict[str, torch.Tensor]:
        """Decoder layer `index`'s state dict (names relative to the layer), on the CPU."""


def materialise(layer: nn.Module, index: int, weights: LayerWeights, device: torch.device) -> None:
    """Fill a meta-device layer with its weights, on `device`, in the dtype its meta parameters have."""
    dtypes = {name: p.dtype for name, p in layer.named_parameters()}
    state = {name: t.to(device=device, dtype=dtypes.get(name, t.dtype)) for name, t in weights.tensors(index, layer).items()}
    layer.load_state_dict(state, strict=True, assign=True)


class SafetensorsLayers(LayerWeights):
    """A Hugging Face checkpoint directory (model.safetensors, or shards with model.safetensors.index.json)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            self.files = {name: self.path / f for name, f in json.loads(index.read_text())["weight_map"].items()}
        elif (self.path / "model.safetensors").is_file():
            with safe_open(self.path / "model.safetensors", "pt", device="cpu") as f:
                self.files = {name: self.path / "model.safetensors" for name in f.keys()}  # noqa: SIM118 (not a dict)
        else:
            raise UserInputError(f"{self.path}: no model.safetensors or model.safetensors.index.json to offload from")

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, keys in by_file.items():
            with safe_open(file, "pt", device="cpu") as f:
                out.update({key: f.get_tensor(key) for key in keys})
        return out

    def tensors(self, index: int, layer: nn.Module) -> dict[str, torch.Tensor]:
        prefix = f"{LAYER_PREFIX}{index}."
        found = self.read([n for n in self.files if n.startswith(prefix)])
        return {name[len(prefix):]: t for name, t in found.items()}


class RandomLayers(LayerWeights):
    """N(0, std) weights (norm weights 1), seeded per layer: the same layer gets the same weights every time."""

    def __init__(self, seed: int = 0, std: float = 0.02) -> None:
        self.seed, self.std = seed, std

    def tensors(self, index: int, layer: nn.Module) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        out = {}
        for name, p in layer.named_parameters():
            t = torch.empty(p.shape, dtype=p.dtype)
            out[name] = t.fill_(1.0) if name.endswith("norm.weight") else t.normal_(0.0, self.std, generator=gen)
        return out


def load_offloaded(path: str | Path, dtype: torch.dtype) -> tuple[nn.Module, SafetensorsLayers]:
    """The checkpoint at `path` as a model whose decoder layers are on the meta device (everything else on the CPU),
    with the source that materialises them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    source = SafetensorsLayers(path)
    outer = {k: v.to(dtype) for k, v in source.read([n for n in source.files if not n.startswith(LAYER_PREFIX)]).items()}
    model.load_state_dict(outer, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffers (the rotary inverse frequencies) are computed at construction: redo it on the CPU.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    missing = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(LAYER_PREFIX)]
    if missing:
        raise UserInputError(f"{path}: the checkpoint lacks {', '.join(missing[:3])}")
    return model.eval(), source
