"""`dense`: the original architecture (a plain transformers `LlamaForCausalLM`, or the base model's own class:
Mistral, Qwen2, Qwen3), every unit at full width: kept KV groups and neurons first, the pruned rows and columns zero, dropped units
all zero, sparse units written dense. `AutoModelForCausalLM.from_pretrained(dir)` loads it with no remote code and
it reproduces the pruned model's outputs (zero heads and neurons add nothing), with no speedup: for evaluation and
tools that only know the original architecture."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM

from allocator.core.plan import Plan
from allocator.core.space import ATTN, MLP, ModelShape
from allocator.model.engines import EXPORT_FORMATS
from allocator.model.engines.layers import (
    LAYERS_PREFIX,
    linear_state,
    outer_state,
    pad_attention,
    pad_mlp,
    save_weights,
    unit_linears,
)
from allocator.model.export import WEIGHTS_FILE
from allocator.model.surgery import (
    BLOCK_ATTRIBUTE,
    SPARSE_KEY,
    UNIT_LINEARS,
    WIDTHS_KEY,
)

HOW_TO_LOAD = """\
Plain transformers, no remote code:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{path}")
tokenizer = AutoTokenizer.from_pretrained("{path}")
```

Same outputs as the pruned model, same speed as the original: the pruned rows and columns are stored as zeros."""


def base_config(model: nn.Module):
    """The model's config without this project's width keys: the original architecture's."""
    config = copy.deepcopy(model.config)
    for key in (WIDTHS_KEY, SPARSE_KEY):
        if hasattr(config, key):
            delattr(config, key)
    return config


def _template_state(config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The original architecture's state dict on the meta device: every name and shape the export must hold."""
    with init_empty_weights(include_buffers=False):
        template = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tied = getattr(config, "tie_word_embeddings", False)
    return {name: t for name, t in template.state_dict().items() if not (tied and name == "lm_head.weight")}


def dense_state(model: nn.Module, shape: ModelShape) -> dict[str, torch.Tensor]:
    """The full-width state dict of the pruned model, in the original architecture's names and shapes. Tensors the
    pruned model has outside the linears (norms, Qwen3's q/k norms) are copied; those a dropped unit lost are ones,
    any weight will do in front of an all-zero unit."""
    dtype = model.model.embed_tokens.weight.dtype
    want = _template_state(base_config(model), dtype)
    have = dict(model.state_dict())
    state = outer_state(model)
    for i in range(shape.num_layers):
        prefix = f"{LAYERS_PREFIX}{i}"
        for kind in (ATTN, MLP):
            block = f"{prefix}.{BLOCK_ATTRIBUTE[kind]}"
            biased = frozenset(name for name in UNIT_LINEARS[kind] if f"{block}.{name}.bias" in want)
            linears = unit_linears(model, i, kind)
            if kind == ATTN:
                padded = pad_attention(linears, shape, shape.num_kv_heads, shape.heads_per_group, dtype, biased)
            else:
                padded = pad_mlp(linears, shape.hidden, shape.intermediate, dtype, biased)
            state |= linear_state(block, padded)
        for name, t in want.items():
            if name.startswith(f"{prefix}.") and name not in state:
                state[name] = have[name] if name in have else torch.ones(t.shape, dtype=dtype)
    wrong = sorted(name for name in want if name not in state or state[name].shape != want[name].shape)
    if wrong or set(state) - set(want):
        raise ValueError(f"dense export does not match the architecture: {wrong or sorted(set(state) - set(want))}")
    return state


@EXPORT_FORMATS.register("dense")
def write(model: nn.Module, tokenizer, out_dir: Path, plan: Plan | None) -> None:
    shape = ModelShape.from_config(model.config)
    save_weights(dense_state(model, shape), out_dir / WEIGHTS_FILE)
    base_config(model).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
