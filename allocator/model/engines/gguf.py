"""`gguf` export: the pruned model as llama.cpp's `deci` architecture (per-layer head counts and MLP widths).

llama.cpp's deci graph (src/models/deci.cpp, build b11434) takes `deci.attention.head_count`, `head_count_kv` and
`feed_forward_length` as per-layer arrays of any integers. A kept attention of k KV groups is written as k KV heads
and k·(heads per group) query heads, exactly; a kept MLP of n neurons as n. Three shapes the graph gets wrong are
written differently, so that llama.cpp computes what the pruned model computes:

- A layer whose attention and MLP are both dropped is the identity: it is left out of the file (costs nothing).
  When every layer is, one layer of both paddings below is written (llama.cpp needs a layer; it computes 0).
- A layer that keeps its attention but drops its MLP: llama.cpp's `n_ff == 0` path `continue`s before the layer's
  residual add and before `inpL = cur`, so the whole layer, attention included, would be skipped. Such a layer is
  written with a zero MLP of PAD_FF_WIDTH neuron (zero gate/up/down, unit norm): its output is exactly 0, so the
  residual add gives attention + input. Cost per token: an RMS norm, three 1-wide GEMVs and an add (~3.5k FLOPs
  against ~2M for one SmolLM2 layer), plus graph nodes.
- The first written layer without attention: llama.cpp reads the head size from the first layer's head count
  (`n_embd / n_head(0)`, key_length only when n_head(0) > 0), so a file whose layer 0 has no attention gets head
  size 0 everywhere. That layer gets a zero attention of one query and one KV head (zero o_proj: output exactly 0),
  costing a 64-wide q/k/v projection, one head's attention over the context and its KV cache.

Sparse units (SparseLinear) are written dense: llama.cpp runs no sparse weights. Weights are f32, f16, bf16 or q8_0
(norms always f32; a matrix whose rows do not fit q8_0's 32-blocks falls back to f16).

Tokenizer: a model whose vocabulary is an embedded model's (SmolLM2) gets that GGUF's `tokenizer.*` fields verbatim
(llama.cpp then tokenizes exactly as the shipped GGUF does); the byte tokenizer of tiny-llama becomes a byte-level
BPE of its 256 bytes plus EOS. Other tokenizers are refused with one line.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from allocator.core.errors import UserInputError
from allocator.core.plan import Plan
from allocator.core.space import (
    ATTN,
    LLAMACPP_ZERO_MLP,
    MLP,
    ModelShape,
    Option,
    kept_width,
    unit_name,
)
from allocator.model.engines import EXPORT_FORMATS, export_dir
from allocator.model.engines.card import write_card
from allocator.model.loader import EMBEDDED_MODELS
from allocator.model.surgery import (
    WIDTHS_KEY,
    DroppedAttention,
    DroppedMLP,
    decoder_layers,
)

log = logging.getLogger(__name__)

ARCH = "deci"
GGUF_FILE = "model.gguf"
PAD_FF_WIDTH = LLAMACPP_ZERO_MLP  # neurons of the zero MLP written for a layer that keeps attention but drops its MLP
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_OUTTYPE = "f16"  # llama.cpp's CPU GEMMs are fastest in f16 among the lossless-enough types here


@dataclass(frozen=True)
class LayerSpec:
    """One layer as written: its index in the model, head counts and MLP width, and which parts are zero padding."""

    source: int
    n_head: int
    n_head_kv: int
    n_ff: int
    pad_attention: bool = False
    pad_mlp: bool = False


def layer_specs(shape: ModelShape, kv_groups: list[int], neurons: list[int]) -> list[LayerSpec]:
    """The layers llama.cpp gets for these per-layer widths (see the module docstring for the padded shapes)."""
    specs = []
    for i, (k, n) in enumerate(zip(kv_groups, neurons)):
        if k == 0 and n == 0:
            continue  # the identity
        pad_mlp = k > 0 and n == 0
        specs.append(LayerSpec(i, k * shape.heads_per_group, k, PAD_FF_WIDTH if pad_mlp else n, pad_mlp=pad_mlp))
    if not specs:  # every layer dropped: llama.cpp needs one layer, so one that computes 0 (+ the residual)
        return [LayerSpec(0, 1, 1, PAD_FF_WIDTH, pad_attention=True, pad_mlp=True)]
    if specs[0].n_head == 0:
        first = specs[0]
        specs[0] = LayerSpec(first.source, 1, 1, first.n_ff, pad_attention=True)
    return specs


def _widths(model: nn.Module, shape: ModelShape) -> tuple[list[int], list[int]]:
    widths = getattr(model.config, WIDTHS_KEY, None)
    if widths is None:  # a dense model
        return [shape.num_kv_heads] * shape.num_layers, [shape.intermediate] * shape.num_layers
    return list(widths["attn_kv_groups"]), list(widths["mlp_neurons"])


def _weight(module: nn.Module) -> torch.Tensor:
    """A linear's dense weight: nn.Linear's, or a SparseLinear decompressed (zeros where pruned)."""
    if hasattr(module, "to_dense"):
        return module.to_dense().detach()
    return module.weight.detach()


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half RoPE layout → llama.cpp's interleaved pairs (convert_hf_to_gguf's DeciModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    rope_type = params.get("rope_type", "default")
    if rope_type not in ("default", None):
        raise UserInputError(f"gguf export: rope_type {rope_type!r} is not written (only the default RoPE)")
    return float(10000.0 if theta is None else theta)


class _Tensors:
    """Adds tensors to a GGUFWriter in the chosen type (1-D tensors in f32, as llama.cpp's converter does)."""

    def __init__(self, writer, outtype: str) -> None:
        import gguf

        self.gguf, self.writer, self.outtype = gguf, writer, outtype

    def add(self, name: str, t: torch.Tensor) -> None:
        gguf, data = self.gguf, t.detach().to(torch.float32).contiguous().numpy()
        qtype = {"f32": None, "f16": None, "bf16": gguf.GGMLQuantizationType.BF16,
                 "q8_0": gguf.GGMLQuantizationType.Q8_0}[self.outtype]
        if data.ndim == 1 or self.outtype == "f32":
            self.writer.add_tensor(name, data)
        elif qtype is None:
            self.writer.add_tensor(name, data.astype(np.float16))
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
            self.writer.add_tensor(name, data.astype(np.float16))  # rows not in 32-blocks (the 1-wide zero MLP)
        else:
            self.writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def _file_type(outtype: str) -> int:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]


def _write_layer(tensors: _Tensors, i: int, layer: nn.Module, spec: LayerSpec, shape: ModelShape) -> None:
    hidden, head_dim, dtype = shape.hidden, shape.head_dim, torch.float32
    if spec.pad_attention:
        tensors.add(f"blk.{i}.attn_norm.weight", torch.ones(hidden))
        for name in ("attn_q", "attn_k", "attn_v"):
            tensors.add(f"blk.{i}.{name}.weight", torch.zeros(head_dim, hidden, dtype=dtype))
        tensors.add(f"blk.{i}.attn_output.weight", torch.zeros(hidden, head_dim, dtype=dtype))
    elif spec.n_head > 0:
        attn = layer.self_attn
        tensors.add(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight)
        q, k = _weight(attn.q_proj), _weight(attn.k_proj)
        tensors.add(f"blk.{i}.attn_q.weight", _permute(q, spec.n_head))
        tensors.add(f"blk.{i}.attn_k.weight", _permute(k, spec.n_head_kv))
        tensors.add(f"blk.{i}.attn_v.weight", _weight(attn.v_proj))
        tensors.add(f"blk.{i}.attn_output.weight", _weight(attn.o_proj))
        for name, proj, heads in (("attn_q", attn.q_proj, spec.n_head), ("attn_k", attn.k_proj, spec.n_head_kv)):
            if getattr(proj, "bias", None) is not None:
                tensors.add(f"blk.{i}.{name}.bias", _permute(proj.bias.detach(), heads))
        for name, proj in (("attn_v", attn.v_proj), ("attn_output", attn.o_proj)):
            if getattr(proj, "bias", None) is not None:
                tensors.add(f"blk.{i}.{name}.bias", proj.bias.detach())
    if spec.pad_mlp:
        tensors.add(f"blk.{i}.ffn_norm.weight", torch.ones(hidden))
        tensors.add(f"blk.{i}.ffn_gate.weight", torch.zeros(spec.n_ff, hidden, dtype=dtype))
        tensors.add(f"blk.{i}.ffn_up.weight", torch.zeros(spec.n_ff, hidden, dtype=dtype))
        tensors.add(f"blk.{i}.ffn_down.weight", torch.zeros(hidden, spec.n_ff, dtype=dtype))
    elif spec.n_ff > 0:
        mlp = layer.mlp
        tensors.add(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight)
        for name, proj in (("ffn_gate", mlp.gate_proj), ("ffn_up", mlp.up_proj), ("ffn_down", mlp.down_proj)):
            tensors.add(f"blk.{i}.{name}.weight", _weight(proj))
            if getattr(proj, "bias", None) is not None:
                tensors.add(f"blk.{i}.{name}.bias", proj.bias.detach())


def _check_layer(layer: nn.Module, spec: LayerSpec, shape: ModelShape) -> None:
    """The module shapes agree with the recorded widths (a mismatch would write a file llama.cpp refuses)."""
    if spec.n_head > 0 and not spec.pad_attention:
        rows = _weight(layer.self_attn.k_proj).shape[0]
        if isinstance(layer.self_attn, DroppedAttention) or rows != spec.n_head_kv * shape.head_dim:
            raise ValueError(f"gguf export: layer {spec.source}'s attention does not have {spec.n_head_kv} KV heads")
    if spec.n_ff > 0 and not spec.pad_mlp and (
        isinstance(layer.mlp, DroppedMLP) or _weight(layer.mlp.up_proj).shape[0] != spec.n_ff
    ):
        raise ValueError(f"gguf export: layer {spec.source}'s MLP does not have {spec.n_ff} neurons")


# ---- tokenizer ----------------------------------------------------------------------------------------------------


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as a printable character (as byte-level BPE vocabularies spell it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _write_byte_tokenizer(writer, n_vocab: int = 257) -> None:
    """tiny-llama's ByteTokenizer (id = byte value, 256 = EOS) as a byte-level BPE with no merge that ever fires
    (llama.cpp requires a merges list: one merge of two NUL bytes, whose result is no token, falls back to bytes).
    Ids past 256 (the timing-only vocabulary of a larger model) are unused placeholder tokens."""
    import gguf

    chars = _byte_to_unicode()
    extra = max(0, n_vocab - 257)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([chars[b] for b in range(256)] + ["<|endoftext|>"] + [f"<unused{i}>" for i in range(extra)])
    writer.add_token_types([gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.CONTROL] + [gguf.TokenType.UNUSED] * extra)
    writer.add_token_merges([f"{chars[0]} {chars[0]}"])
    writer.add_eos_token_id(256)
    writer.add_add_bos_token(False)


@lru_cache(maxsize=4)
def _embedded_tokenizer_fields(name: str) -> tuple[tuple, tuple[str, ...]]:
    """(the `tokenizer.*` fields as (key, value, type, subtype), the token list) of an embedded model's GGUF."""
    from gguf import GGUFReader, GGUFValueType

    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return (), ()
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    reader = GGUFReader(path)
    fields, tokens = [], ()
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
        value = field.contents()
        fields.append((key, value, vtype, sub))
        if key == "tokenizer.ggml.tokens":
            tokens = tuple(value)
    return tuple(fields), tokens


def _vocabulary(tokenizer) -> list[str] | None:
    if not hasattr(tokenizer, "convert_ids_to_tokens"):
        return None
    return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def write_tokenizer(writer, tokenizer, n_vocab: int) -> None:
    """The tokenizer's llama.cpp metadata. `tokenizer=None` writes a timing-only vocabulary of `n_vocab` tokens
    (bytes, then placeholders: llama-bench feeds random ids and never tokenizes text), for profile=llamacpp."""
    from allocator.model.byte_tokenizer import ByteTokenizer

    if tokenizer is None or isinstance(tokenizer, ByteTokenizer):
        _write_byte_tokenizer(writer, n_vocab)
        return
    vocab = _vocabulary(tokenizer)
    for name in EMBEDDED_MODELS:
        fields, tokens = _embedded_tokenizer_fields(name)
        if vocab is not None and tokens and list(tokens) == vocab:
            for key, value, vtype, sub in fields:
                writer.add_key_value(key, value, vtype, sub)
            return
    raise UserInputError(
        f"gguf export: tokenizer {type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '?')}) has no "
        f"llama.cpp tokenizer metadata here; supported: the embedded models' ({', '.join(EMBEDDED_MODELS)}) and "
        "tiny-llama's byte tokenizer"
    )


# ---- the writer ---------------------------------------------------------------------------------------------------


def write_gguf(model: nn.Module, tokenizer, path: Path, outtype: str = DEFAULT_OUTTYPE, name: str = "pruned") -> Path:
    """Write `model` (pruned by allocator.model.surgery, or dense) to the GGUF file `path`, atomically
    (`tokenizer=None`: a timing-only vocabulary, see write_tokenizer)."""
    import gguf

    if outtype not in OUTTYPES:
        raise UserInputError(f"gguf outtype={outtype!r} is unknown; valid: {', '.join(OUTTYPES)}")
    config = model.config
    if getattr(config, "model_type", "llama") not in ("llama", "mistral", "qwen2"):
        raise UserInputError(f"gguf export: model_type {config.model_type!r} has no llama.cpp deci equivalent "
                             "(supported: llama, mistral, qwen2)")
    shape = ModelShape.from_config(config)
    kv_groups, neurons = _widths(model, shape)
    specs = layer_specs(shape, kv_groups, neurons)
    layers = decoder_layers(model)
    for spec in specs:
        _check_layer(layers[spec.source], spec, shape)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".gguf")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_block_count(len(specs))
        writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
        writer.add_embedding_length(shape.hidden)
        writer.add_feed_forward_length([s.n_ff for s in specs])
        writer.add_head_count([s.n_head for s in specs])
        writer.add_head_count_kv([s.n_head_kv for s in specs])
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
        writer.add_rope_dimension_count(shape.head_dim)
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(int(config.vocab_size))
        writer.add_file_type(_file_type(outtype))
        write_tokenizer(writer, tokenizer, int(config.vocab_size))

        tensors = _Tensors(writer, outtype)
        tensors.add("token_embd.weight", model.model.embed_tokens.weight)
        tensors.add("output_norm.weight", model.model.norm.weight)
        if not getattr(config, "tie_word_embeddings", False):
            tensors.add("output.weight", model.lm_head.weight)
        for i, spec in enumerate(specs):
            _write_layer(tensors, i, layers[spec.source], spec, shape)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def gguf_layout(model: nn.Module) -> list[LayerSpec]:
    """The layers `write_gguf` writes for `model` (for the model card and the profile's variants)."""
    shape = ModelShape.from_config(model.config)
    return layer_specs(shape, *_widths(model, shape))


HOW_TO_LOAD = """\
llama.cpp (`python -m allocator.model.engines.llamacpp_build` builds `llama-perplexity` and `llama-bench` into the
cache):

    llama-perplexity -m {path}/model.gguf -f text.txt
    llama-bench -m {path}/model.gguf -p 512 -n 128
"""


def card_notes(shape: ModelShape, allocation: dict[str, Option]) -> list[str]:
    """The layers llama.cpp gets (layer_specs), and which are padded."""
    kv_groups = [kept_width(shape, ATTN, allocation[unit_name(i, ATTN)]) for i in range(shape.num_layers)]
    neurons = [kept_width(shape, MLP, allocation[unit_name(i, MLP)]) for i in range(shape.num_layers)]
    specs = layer_specs(shape, kv_groups, neurons)
    padded_mlp = [s.source for s in specs if s.pad_mlp]
    padded_attn = [s.source for s in specs if s.pad_attention]
    return [
        "## Layout (GGUF, architecture `deci`)",
        "",
        (f"`{GGUF_FILE}`: {len(specs)} of {shape.num_layers} decoder layers written "
         f"({shape.num_layers - len(specs)} fully dropped layers left out), weights {DEFAULT_OUTTYPE}."),
        "",
        "| layer | query heads | KV heads | MLP width |",
        "| --- | --- | --- | --- |",
        *(f"| {s.source} | {s.n_head}{' (zero pad)' if s.pad_attention else ''} | {s.n_head_kv} | "
          f"{s.n_ff}{' (zero pad)' if s.pad_mlp else ''} |" for s in specs),
        "",
        ("Exact in llama.cpp: every kept KV-group count and MLP width. Padded: "
         f"{len(padded_mlp)} layer(s) keeping attention without an MLP get a zero {PAD_FF_WIDTH}-neuron MLP "
         f"(llama.cpp's n_ff = 0 path skips the layer) {padded_mlp or ''}; "
         f"{len(padded_attn)} first layer(s) without attention get a zero one-head attention {padded_attn or ''}. "
         "Sparse units are written dense (llama.cpp runs no sparse weights)."),
    ]


@EXPORT_FORMATS.register("gguf")
def write(model: nn.Module, tokenizer, out_dir: Path, plan: Plan | None) -> None:
    """`<out_dir>/model.gguf` (f16); the model card is the export's (allocator.model.engines.card)."""
    write_gguf(model, tokenizer, Path(out_dir) / GGUF_FILE, DEFAULT_OUTTYPE)


def main(argv: list[str]) -> None:
    """`python -m allocator.model.engines.gguf <exported run dir> [f32|f16|bf16|q8_0]`: `<run>/export/gguf/`."""
    from allocator.model.runtime import load_pruned

    if not argv or len(argv) > 2:
        raise SystemExit(f"usage: python -m allocator.model.engines.gguf <run dir> [{'|'.join(OUTTYPES)}]")
    run, outtype = Path(argv[0]), argv[1] if len(argv) > 1 else DEFAULT_OUTTYPE
    model, tokenizer, plan = load_pruned(run)
    out = export_dir(run, "gguf")
    write_gguf(model, tokenizer, out / GGUF_FILE, outtype)
    write_card(out, "gguf", ModelShape.from_config(model.config), plan, model.config)
    print(out / GGUF_FILE)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
