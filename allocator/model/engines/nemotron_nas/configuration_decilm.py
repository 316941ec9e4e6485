"""Nemotron-NAS (DeciLM) configuration: a Llama configuration whose decoder layers each have their own attention and
MLP shape, listed in `block_configs`. Written by sparsity-allocator into its `decilm` exports; read by transformers
(trust_remote_code=True, with modeling_decilm.py) and by vLLM (vllm/model_executor/models/nemotron_nas.py)."""

from __future__ import annotations

import dataclasses

from transformers import LlamaConfig


@dataclasses.dataclass
class AttentionConfig:
    no_op: bool = False  # no attention in this layer, and no norm in front of it
    # Query heads per KV head: the layer has num_attention_heads // n_heads_in_group KV heads.
    n_heads_in_group: int | None = None
    replace_with_linear: bool = False  # never set by this exporter


@dataclasses.dataclass
class FFNConfig:
    no_op: bool = False  # no MLP in this layer, and no norm in front of it
    # The width, exactly. There is deliberately no `ffn_mult`: vLLM rounds a multiplier's width up to a multiple of
    # 256 and uses `intermediate_size` as it is only when the ffn config has no `ffn_mult` attribute.
    intermediate_size: int | None = None
    replace_with_linear: bool = False  # never set by this exporter


@dataclasses.dataclass
class BlockConfig:
    attention: AttentionConfig
    ffn: FFNConfig

    @classmethod
    def from_dict(cls, data: dict) -> BlockConfig:
        return cls(attention=AttentionConfig(**data["attention"]), ffn=FFNConfig(**data["ffn"]))


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        super().__init__(**kwargs)
        # Attributes, not dicts: vLLM reads block_config.attention.no_op and friends.
        self.block_configs = [b if isinstance(b, BlockConfig) else BlockConfig.from_dict(b) for b in block_configs or []]

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [dataclasses.asdict(b) for b in self.block_configs]
        return out
