"""llama.cpp: the `gguf` export's layout (no build needed), and check (c): llama.cpp (built once into runs/cache by
allocator/model/engines/llamacpp_build.py) loads the export of pruned models and its perplexity on held-out text
matches the native model's on the very tokens llama.cpp scored.

Tolerance: with f32 weights and an f32 KV cache (llama-perplexity -ctk f32 -ctv f32) the two compute the same
function; what differs is summation order (ggml's SIMD dot products, its softmax and RMS norm against torch's), about
1e-6 relative per operation. Measured differences are reported in README "llama.cpp"; F32_RTOL leaves an order of
magnitude of margin over them and stays far below what a real layout error does (a wrong RoPE permutation, a skipped
residual or a swapped head multiplies the perplexity, changes of 10% and more). f16 weights round every weight
(2^-11 relative); F16_RTOL covers that."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from allocator.core.config import DataConfig, ModelConfig, ProfileConfig, SpaceConfig
from allocator.core.errors import UserInputError
from allocator.core.space import ATTN, MLP, ModelShape, build_space, unit_name
from allocator.model.calibration_data import load_documents, split_documents
from allocator.model.engines import export_formats
from allocator.model.engines.gguf import (
    GGUF_FILE,
    PAD_FF_WIDTH,
    layer_specs,
    write_gguf,
)
from allocator.model.loader import load_model
from allocator.model.surgery import build_pruned_model, leading_levels
from profilers.llamacpp import check_space, llamacpp_regimes

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "runs" / "cache"  # the llama.cpp build is kept here between test runs (runs/ is not committed)
F32_RTOL = 1e-3
F16_RTOL = 1e-2


def _allocation(shape: ModelShape, layers: list[tuple[int, int]]) -> dict[str, int]:
    return {**{unit_name(i, ATTN): k for i, (k, _) in enumerate(layers)},
            **{unit_name(i, MLP): n for i, (_, n) in enumerate(layers)}}


def test_layer_specs_pad_what_llama_cpp_would_get_wrong():
    shape = ModelShape(num_layers=5, hidden=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate=128, vocab=257)
    specs = layer_specs(shape, [0, 2, 0, 1, 0], [128, 0, 0, 64, 32])
    assert [s.source for s in specs] == [0, 1, 3, 4]  # layer 2 (both dropped) is the identity: left out
    first, attn_only, reduced, mlp_only = specs
    assert (first.n_head, first.n_head_kv, first.pad_attention) == (1, 1, True)  # llama.cpp reads head size off layer 0
    assert (attn_only.n_head, attn_only.n_head_kv, attn_only.n_ff, attn_only.pad_mlp) == (4, 2, PAD_FF_WIDTH, True)
    assert (reduced.n_head, reduced.n_head_kv, reduced.n_ff) == (2, 1, 64)
    assert (mlp_only.n_head, mlp_only.n_head_kv, mlp_only.n_ff, mlp_only.pad_attention) == (0, 0, 32, False)
    (only,) = layer_specs(shape, [0] * 5, [0] * 5)  # every layer dropped: one layer computing exactly 0
    assert only.pad_attention and only.pad_mlp


def test_gguf_export_writes_per_layer_arrays(tiny, tmp_path):
    loaded, space = tiny
    shape = space.shape
    model = build_pruned_model(loaded.model, shape, _allocation(shape, [(0, 64), (2, 0), (1, 32)]),
                               leading_levels(loaded.model, shape))
    export_formats(model, loaded.tokenizer, tmp_path, None, ["gguf"])  # as export.formats=[gguf] writes it
    out = tmp_path / "export" / "gguf"
    reader = GGUFReader(out / GGUF_FILE)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [1, 4, 2]
    assert fields["deci.attention.head_count_kv"] == [1, 2, 1]
    assert fields["deci.feed_forward_length"] == [64, PAD_FF_WIDTH, 32]
    tensors = {t.name: t for t in reader.tensors}
    assert not np.asarray(tensors["blk.0.attn_output.weight"].data).any()  # the zero attention outputs 0
    assert not np.asarray(tensors["blk.1.ffn_down.weight"].data).any()  # the zero MLP outputs 0
    card = (out / "README.md").read_text()
    assert "zero pad" in card and "llama-perplexity" in card  # the layout and how to load it


def test_llamacpp_profile_refuses_sparse_spaces_and_batched_regimes(tiny):
    loaded, _ = tiny
    shape = ModelShape.from_config(loaded.model.config)
    with pytest.raises(UserInputError, match="llama.cpp runs no sparse weights.*space=structured"):
        check_space(build_space(shape, SpaceConfig(kind="unstructured", mlp_step=32)))
    check_space(build_space(shape, SpaceConfig(mlp_step=32)))
    with pytest.raises(UserInputError, match="decode_batches=\\[1\\]"):
        llamacpp_regimes(ProfileConfig(name="llamacpp", decode_batches=[1, 16]))


# ---- check (c): the real llama.cpp ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llamacpp():
    from allocator.model.engines.llamacpp_build import llamacpp_bin

    return llamacpp_bin(CACHE)  # minutes the first time (README "llama.cpp"), then reused


@pytest.fixture(scope="module")
def heldout_text(tmp_path_factory) -> Path:
    _, heldout = split_documents(load_documents(DataConfig()), DataConfig().heldout_fraction)
    path = tmp_path_factory.mktemp("text") / "heldout.txt"
    path.write_text("\n\n".join(heldout))
    return path


def _compare(model, tokenizer, tmp_path: Path, text: Path, n_ctx: int, chunks: int, outtype: str) -> tuple[float, float]:
    from allocator.model.engines.llamacpp import chunked_perplexity, llama_perplexity

    gguf = write_gguf(model, tokenizer, tmp_path / f"{outtype}.gguf", outtype)
    found = llama_perplexity(gguf, text, n_ctx, CACHE, chunks=chunks)
    expected = tokenizer.encode(text.read_text())[: found.tokens.size]
    assert found.tokens.reshape(-1).tolist() == expected  # llama.cpp tokenizes exactly as the model's tokenizer
    native = chunked_perplexity(model, found.tokens, found.first)
    print(f"{outtype}: llama.cpp ppl {found.ppl:.4f}, native {native:.4f}, rel {found.ppl / native - 1:+.2e}")
    return found.ppl, native


def test_tiny_llama_pruned_perplexity_matches_llama_cpp(llamacpp, tiny, heldout_text, tmp_path):
    loaded, space = tiny
    shape = space.shape
    torch.manual_seed(0)
    model = build_pruned_model(loaded.model, shape, _allocation(shape, [(0, 96), (2, 0), (1, 64)]),
                               leading_levels(loaded.model, shape))
    ppl, native = _compare(model, loaded.tokenizer, tmp_path, heldout_text, 128, 8, "f32")
    assert ppl == pytest.approx(native, rel=F32_RTOL)


@pytest.mark.integration
def test_smollm2_dense_and_pruned_perplexity_match_llama_cpp(llamacpp, heldout_text, tmp_path):
    loaded = load_model(ModelConfig(), CACHE)
    dense, tokenizer = loaded.model, loaded.tokenizer
    shape = ModelShape.from_config(dense.config)
    ppl, native = _compare(dense, tokenizer, tmp_path, heldout_text, 256, 6, "f32")
    assert ppl == pytest.approx(native, rel=F32_RTOL)
    assert 3 < native < 60  # a real language model on Python docs
    # Every shape the export writes differently: layer 0 without attention (padded), attention without MLP
    # (padded), both dropped (left out), reduced KV groups and MLP widths, dense layers.
    layers = [(0, 1536), (3, 0), (0, 0), (2, 1024), (1, 512), (3, 1536)] * 5
    pruned = build_pruned_model(dense, shape, _allocation(shape, layers), leading_levels(dense, shape))
    ppl, native = _compare(pruned, tokenizer, tmp_path, heldout_text, 256, 6, "f32")
    assert ppl == pytest.approx(native, rel=F32_RTOL)
    ppl16, _ = _compare(pruned, tokenizer, tmp_path, heldout_text, 256, 6, "f16")
    assert ppl16 == pytest.approx(native, rel=F16_RTOL)
