import torch

from allocator.model.export import export_checkpoint
from allocator.model.runtime import load_pruned
from allocator.model.surgery import DroppedAttention, DroppedMLP, build_pruned_model, leading_levels

from .conftest import mixed_allocation
from .plans import sample_plan


def test_dense_allocation_reproduces_dense_logits(tiny):
    loaded, space = tiny
    shape, units = space.shape, space.units
    dense_alloc = {u.name: u.full for u in units}
    model = build_pruned_model(loaded.model, shape, dense_alloc, leading_levels(loaded.model, shape))
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, loaded.model(ids).logits, rtol=0, atol=0)


def test_pruned_model_is_physically_smaller_and_drops_blocks(tiny):
    loaded, space = tiny
    shape, units = space.shape, space.units
    alloc = mixed_allocation(units)
    model = build_pruned_model(loaded.model, shape, alloc, leading_levels(loaded.model, shape))
    layers = model.model.layers
    assert isinstance(layers[0].self_attn, DroppedAttention)
    assert layers[1].mlp.gate_proj.out_features == alloc["layer01.mlp"]
    kept_groups = alloc["layer02.attn"]
    assert layers[2].self_attn.k_proj.out_features == kept_groups * shape.head_dim
    assert layers[2].self_attn.q_proj.out_features == kept_groups * shape.heads_per_group * shape.head_dim
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in loaded.model.parameters())
    # the dense model is untouched
    assert loaded.model.model.layers[1].mlp.gate_proj.out_features == shape.intermediate


def test_kv_cache_decode_matches_full_forward_with_dropped_blocks(tiny):
    loaded, space = tiny
    shape, units = space.shape, space.units
    alloc = {u.name: (0 if u.layer == 0 else u.options[1]) for u in units}  # layer 0 fully dropped
    model = build_pruned_model(loaded.model, shape, alloc, leading_levels(loaded.model, shape))
    assert isinstance(model.model.layers[0].mlp, DroppedMLP)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        prefix = model(ids[:, :9], use_cache=True)
        assert prefix.past_key_values.get_seq_length() == 9
        step = model(ids[:, 9:], past_key_values=prefix.past_key_values)
        torch.testing.assert_close(step.logits[:, -1], model(ids).logits[:, -1], rtol=1e-5, atol=1e-5)


def test_export_reload_logits_equal_stitched(tiny, tmp_path):
    loaded, space = tiny
    shape, units = space.shape, space.units
    model = build_pruned_model(loaded.model, shape, mixed_allocation(units), leading_levels(loaded.model, shape))
    export_checkpoint(model, loaded.tokenizer, tmp_path, sample_plan(mixed_allocation(units)))
    reloaded, tokenizer, plan = load_pruned(tmp_path)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert plan == sample_plan(mixed_allocation(units))
    assert tokenizer.encode("ab") == loaded.tokenizer.encode("ab")
    bare = tmp_path / "bare"  # weights without a plan (as the benchmarks export): loads, plan None
    export_checkpoint(model, loaded.tokenizer, bare, None)
    again, _, none = load_pruned(bare)
    assert none is None and not (bare / "plan.json").exists()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_load_pruned_names_missing_files(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pruned(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_pruned(tmp_path)


def test_model_option_takes_a_local_llama_directory(tiny, tmp_path):
    from allocator.core.config import ModelConfig
    from allocator.model.loader import load_model

    loaded, space = tiny
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    again = load_model(ModelConfig(name=str(tmp_path)), tmp_path / "cache")
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, loaded.model(ids).logits)
    assert again.tokenizer.encode("x") == loaded.tokenizer.encode("x")
