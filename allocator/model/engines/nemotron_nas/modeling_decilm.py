"""Nemotron-NAS (DeciLM) for transformers: a Llama whose decoder layers each have their own KV-head count and MLP
width, or no attention / no MLP at all (`no_op`: the block and the norm in front of it are absent). Written by
sparsity-allocator into its `decilm` exports; built on transformers' Llama modules, so it computes what Llama
computes."""

from __future__ import annotations

from torch import nn
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .configuration_decilm import DeciLMConfig


class DeciLMMLP(nn.Module):
    """Llama's gated MLP at a width of its own."""

    def __init__(self, config: DeciLMConfig, width: int) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=bias)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def decilm_attention(config: DeciLMConfig, n_heads_in_group: int, cache_slot: int) -> LlamaAttention:
    """Llama attention with all num_attention_heads query heads and num_attention_heads // n_heads_in_group KV
    heads. `cache_slot`: the layer's place in the KV cache (attending layers only, numbered in order, as vLLM does),
    so the cache's first slot always belongs to a layer that fills it (its length is read there)."""
    attention = LlamaAttention(config, cache_slot)
    kv_width = config.num_attention_heads // n_heads_in_group * attention.head_dim
    attention.num_key_value_groups = n_heads_in_group
    attention.k_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
    attention.v_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
    return attention


class DeciLMDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: DeciLMConfig, layer_idx: int, cache_slot: int) -> None:
        super(LlamaDecoderLayer, self).__init__()  # not Llama's: its blocks are built here, each with its own shape
        block = config.block_configs[layer_idx]
        self.hidden_size = config.hidden_size
        self.self_attn = self.input_layernorm = self.mlp = self.post_attention_layernorm = None
        if not block.attention.no_op:
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.self_attn = decilm_attention(config, block.attention.n_heads_in_group, cache_slot)
        if not block.ffn.no_op:
            self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = DeciLMMLP(config, block.ffn.intermediate_size)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        if self.self_attn is not None:
            attended, _ = self.self_attn(
                hidden_states=self.input_layernorm(hidden_states),
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            hidden_states = hidden_states + attended
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class DeciLMModel(LlamaModel):
    """LlamaModel's forward over DeciLM layers."""

    config_class = DeciLMConfig
    config: DeciLMConfig
    _no_split_modules = ["DeciLMDecoderLayer"]  # noqa: RUF012 (transformers' own attribute, a list)

    def __init__(self, config: DeciLMConfig) -> None:
        LlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        slots, layers = 0, []
        for i, block in enumerate(config.block_configs):
            layers.append(DeciLMDecoderLayer(config, i, slots))
            slots += 0 if block.attention.no_op else 1
        self.layers = nn.ModuleList(layers)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class DeciLMForCausalLM(LlamaForCausalLM):
    config_class = DeciLMConfig
    config: DeciLMConfig
    _no_split_modules = ["DeciLMDecoderLayer"]  # noqa: RUF012 (transformers' own attribute, a list)

    def __init__(self, config: DeciLMConfig) -> None:
        LlamaPreTrainedModel.__init__(self, config)
        self.model = DeciLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
