"""Check (a): the `dense` and `decilm` exports load with plain transformers (decilm with trust_remote_code) and their
logits equal the native loader's, on tiny-llama plans that exercise every case: dropped attention (layer 0 too),
dropped MLP, a KV-group count that needs KV heads padded, one that needs query heads padded, reduced widths, sparse
units. Plus the export layout, the model card, the decilm rule and the errors."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from allocator.core.config import ModelConfig
from allocator.core.errors import UserInputError
from allocator.core.space import ModelShape
from allocator.model.engines import (
    EXPORT_DIR,
    check_model_support,
    export_formats,
    export_writer,
)
from allocator.model.engines.decilm import decilm_kv_heads, decilm_kv_layout
from allocator.model.loader import load_model
from allocator.model.runtime import load_plan, load_pruned
from allocator.model.sparse_export import build_deployable
from allocator.model.surgery import leading_levels

from .plans import sample_plan

# 8 query heads in 4 KV groups of 2: keeping 3 groups needs 4 KV heads (one all zero), keeping 1 needs 1 KV head of
# 8 query heads (2 real, 6 zero); 4 and 2 divide 8 as they are.
SHAPE = {"tiny_layers": 5, "tiny_hidden": 64, "tiny_heads": 8, "tiny_kv_heads": 4, "tiny_intermediate": 128}
PLANS = {
    "every case": {
        "layer00.attn": 3, "layer00.mlp": 64,  # KV heads padded 3 → 4; MLP reduced
        "layer01.attn": 0, "layer01.mlp": "2:4",  # attention dropped; a sparse MLP
        "layer02.attn": 1, "layer02.mlp": 0,  # 6 zero query heads; MLP dropped
        "layer03.attn": "unstructured50", "layer03.mlp": 128,  # a sparse attention; a full MLP
        "layer04.attn": 2, "layer04.mlp": 32,
    },
    "layer 0 attention dropped": {
        "layer00.attn": 0, "layer00.mlp": 96, "layer01.attn": 4, "layer01.mlp": 0, "layer02.attn": 0,
        "layer02.mlp": 0, "layer03.attn": 3, "layer03.mlp": "4:8", "layer04.attn": 1, "layer04.mlp": 128,
    },
}
TOL = 1e-5  # float32; the dense copy sums zero rows too, in another order


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory):
    return load_model(ModelConfig(name="tiny-llama", **SHAPE), tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module", params=list(PLANS))
def exported(request, tiny8, tmp_path_factory):
    dense = tiny8.model
    shape = ModelShape.from_config(dense.config)
    allocation = PLANS[request.param]
    model = build_deployable(dense, shape, allocation, leading_levels(dense, shape))
    run = tmp_path_factory.mktemp("run")
    written = export_formats(model, tiny8.tokenizer, run, sample_plan(allocation), ["native", "dense", "decilm"])
    return run, written, allocation


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_dense_and_decilm_logits_equal_the_native_loaders(exported):
    run, written, _ = exported
    native, _, _ = load_pruned(run)  # the run directory: its export/native
    dense, dense_info = AutoModelForCausalLM.from_pretrained(written["dense"], output_loading_info=True)
    decilm, decilm_info = AutoModelForCausalLM.from_pretrained(written["decilm"], trust_remote_code=True,
                                                               output_loading_info=True)
    for info in (dense_info, decilm_info):  # every tensor the architecture has came from the file, and no other
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(dense).__name__ == "LlamaForCausalLM" and type(decilm).__name__ == "DeciLMForCausalLM"
    ids = torch.randint(0, 256, (2, 24))
    want = _logits(native, ids)
    assert (_logits(dense, ids) - want).abs().max() <= TOL
    assert (_logits(decilm, ids) - want).abs().max() <= TOL


def test_decilm_generates_with_its_kv_cache_as_native(exported):
    """Attending layers take KV-cache slots in order, so a no-op first layer leaves the cache's length readable."""
    _run, written, _ = exported
    native, _, _ = load_pruned(written["native"])
    decilm = AutoModelForCausalLM.from_pretrained(written["decilm"], trust_remote_code=True)
    prompt = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        want = native.generate(prompt, max_new_tokens=12, do_sample=False)
        got = decilm.generate(prompt, max_new_tokens=12, do_sample=False)
    assert got.tolist() == want.tolist()


def test_decilm_config_follows_the_export_rule(exported):
    _run, written, allocation = exported
    config = json.loads((written["decilm"] / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_decilm.DeciLMForCausalLM"
    assert all((written["decilm"] / name).is_file() for name in ("configuration_decilm.py", "modeling_decilm.py"))
    state = load_file(written["decilm"] / "model.safetensors")
    first_mlp_before_attention = None
    for i, block in enumerate(config["block_configs"]):
        attn, mlp = allocation[f"layer{i:02d}.attn"], allocation[f"layer{i:02d}.mlp"]
        groups = 4 if isinstance(attn, str) else attn
        width = 128 if isinstance(mlp, str) else mlp
        if first_mlp_before_attention is None and (groups or width):
            first_mlp_before_attention = groups == 0  # vLLM needs an attention there: one zero KV head
            groups = 1 if first_mlp_before_attention else groups
        assert "ffn_mult" not in block["ffn"]  # vLLM would round a multiplier up to 256 neurons
        assert block["attention"]["no_op"] == (groups == 0) and block["ffn"]["no_op"] == (width == 0)
        has_attn = f"model.layers.{i}.self_attn.k_proj.weight" in state
        assert has_attn == (groups != 0) and (f"model.layers.{i}.input_layernorm.weight" in state) == has_attn
        if groups:
            kv_heads = 8 // block["attention"]["n_heads_in_group"]
            assert kv_heads == decilm_kv_heads(groups, 8)
            assert state[f"model.layers.{i}.self_attn.k_proj.weight"].shape[0] == kv_heads * 8
            assert state[f"model.layers.{i}.self_attn.q_proj.weight"].shape[0] == 8 * 8  # all query heads
        if width:
            assert block["ffn"]["intermediate_size"] == width
            assert state[f"model.layers.{i}.mlp.gate_proj.weight"].shape[0] == width
    remote = AutoConfig.from_pretrained(written["decilm"], trust_remote_code=True)
    assert not hasattr(remote.block_configs[0].ffn, "ffn_mult")  # attributes, as vLLM reads them
    assert remote.block_configs[0].attention.no_op == config["block_configs"][0]["attention"]["no_op"]


def test_decilm_kv_heads_is_the_smallest_divisor_at_least_k():
    assert [decilm_kv_heads(k, 9) for k in range(4)] == [0, 1, 3, 3]  # SmolLM2: 9 query heads, 3 KV groups
    assert [decilm_kv_heads(k, 32) for k in range(9)] == [0, 1, 2, 4, 4, 8, 8, 8, 8]  # 32 heads, 8 KV groups
    assert [decilm_kv_heads(k, 8) for k in range(5)] == [0, 1, 2, 4, 4]
    # An MLP before any attention gets a zero attention of one KV head (vLLM's residual starts at an attention);
    # dropped layers before it, and dropped attentions after one has run, stay no_op.
    assert decilm_kv_layout([0, 0, 0, 2, 0], [0, 0, 64, 64, 64], 8) == [0, 0, 1, 2, 0]
    assert decilm_kv_layout([3, 0, 1], [0, 64, 64], 9) == [3, 0, 1]


def test_every_export_directory_is_self_contained_with_a_card(exported, tiny8, tmp_path):
    run, written, allocation = exported
    tiny8.tokenizer.save_pretrained(tmp_path)
    tokenizer_files = [p.name for p in tmp_path.iterdir()]
    assert sorted(p.name for p in (run / EXPORT_DIR).iterdir()) == ["decilm", "dense", "native"]
    for name, out in written.items():
        assert out == run / EXPORT_DIR / name
        for file in ("config.json", "model.safetensors", "plan.json", "README.md", *tokenizer_files):
            assert (out / file).is_file(), (name, file)
        assert load_plan(out) == sample_plan(allocation)
        card = (out / "README.md").read_text()
        assert "speedup 1.60x" in card and "held-out perplexity 12.00 (dense 10.00)" in card  # sample_plan's figures
        assert "| 0 | " in card and "## How to load it" in card and str(out) in card
    assert "trust_remote_code=True" in (written["decilm"] / "README.md").read_text()
    assert "zero query heads" in (written["decilm"] / "README.md").read_text()


def test_unknown_format_and_unsupported_models_are_one_line_errors(tiny8, tmp_path):
    with pytest.raises(UserInputError, match="export.formats: unknown format 'onnx'; valid: native, dense, decilm, gguf"):
        export_writer("onnx")
    with pytest.raises(UserInputError, match="listed twice"):
        export_formats(tiny8.model, tiny8.tokenizer, tmp_path, None, ["dense", "dense"])
    qwen = AutoConfig.for_model("qwen2")
    with pytest.raises(UserInputError, match="export format 'decilm' supports model_type llama; this model is 'qwen2'"):
        check_model_support(["native", "decilm"], qwen)
    check_model_support(["native", "dense"], qwen)


def test_a_run_without_a_native_export_says_so(exported, tmp_path):
    _run, written, _ = exported
    only_dense = tmp_path / "run"
    (only_dense / EXPORT_DIR).mkdir(parents=True)
    (only_dense / EXPORT_DIR / "dense").symlink_to(written["dense"])
    with pytest.raises(FileNotFoundError, match=r"has no native export .* holds dense\): load_pruned and verify read the "
                                                r"native format; export it with export.formats=\[native,...\]"):
        load_pruned(only_dense)
