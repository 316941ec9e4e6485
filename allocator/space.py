"""The structured search space: per decoder layer an attention unit (KV groups kept) and an MLP unit (neurons kept)."""

from __future__ import annotations

from dataclasses import dataclass

from allocator.config import SpaceConfig
from allocator.errors import UserInputError

ATTN = "attn"
MLP = "mlp"


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
        )

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class Unit:
    """One prunable place. Options are kept counts (KV groups or neurons), ascending; `full` is the dense one."""

    name: str
    layer: int
    kind: str
    full: int
    options: tuple[int, ...]


def option_params(shape: ModelShape, kind: str, kept: int) -> int:
    """Linear weights a unit keeps: q, k, v, o for `kept` KV groups, or gate, up, down for `kept` neurons."""
    if kind == ATTN:
        q_and_o = 2 * shape.hidden * kept * shape.heads_per_group * shape.head_dim
        return q_and_o + 2 * shape.hidden * kept * shape.head_dim
    return 3 * shape.hidden * kept


def unit_name(layer: int, kind: str) -> str:
    return f"layer{layer:02d}.{kind}"


def mlp_levels(intermediate: int, cfg: SpaceConfig) -> tuple[int, ...]:
    if cfg.width_multiple < 1 or cfg.mlp_step % cfg.width_multiple:
        raise UserInputError(
            f"space.mlp_step={cfg.mlp_step} must be a positive multiple of space.width_multiple={cfg.width_multiple}"
        )
    if not 0 < cfg.mlp_step <= intermediate:
        raise UserInputError(f"space.mlp_step={cfg.mlp_step} must be in 1..{intermediate} (the MLP width)")
    levels = set(range(cfg.mlp_step, intermediate, cfg.mlp_step)) | {intermediate}
    if cfg.allow_drop:
        levels.add(0)
    return tuple(sorted(levels))


def build_space(shape: ModelShape, cfg: SpaceConfig) -> list[Unit]:
    attn_options = tuple(range(0 if cfg.allow_drop else 1, shape.num_kv_heads + 1))
    mlp_options = mlp_levels(shape.intermediate, cfg)
    units = []
    for layer in range(shape.num_layers):
        units.append(Unit(unit_name(layer, ATTN), layer, ATTN, shape.num_kv_heads, attn_options))
        units.append(Unit(unit_name(layer, MLP), layer, MLP, shape.intermediate, mlp_options))
    return units

