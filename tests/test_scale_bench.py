"""The scale benchmark on the tiny shape: it builds the database (in memory and offloaded), measures the fitness
engine, and states the pre-streaming statistics from the shape."""

from __future__ import annotations

import json

import pytest
import torch

from allocator.benchmarks import scale
from allocator.core.config import SpaceConfig
from allocator.core.space import ModelShape, build_space


@pytest.mark.parametrize("offload", [False, True])
def test_tiny_shape_runs_and_writes_json(tmp_path, monkeypatch, offload):
    monkeypatch.chdir(tmp_path)
    argv = ["--shape", "tiny", "--mlp-step", "32", "--calib-sequences", "4", "--seq-len", "16",
            "--fisher-sequences", "2", "--out", "t"] + (["--offload"] if offload else [])
    result = scale.main(argv)
    written = json.loads((tmp_path / "runs/bench/scale/t.json").read_text())
    assert written["database_build"]["units"] == 2 * scale.SHAPES["tiny"]["num_hidden_layers"]
    assert written["database_build"]["seconds"] > 0 and written["database_build"]["peak_rss_gb"] > 0
    assert written["offloaded"] is offload and written["streamed"] is True
    if offload:
        assert result["fitness"] is None
    else:
        assert result["fitness"]["tokens_per_second"] > 0 and len(result["fitness"]["kl"]) == 2


def test_random_model_is_materialised_in_its_dtype():
    model = scale.random_model("tiny", torch.bfloat16, torch.device("cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    offloaded = scale.random_model("tiny", torch.bfloat16, torch.device("cpu"), offload=True)
    assert all(p.is_meta for p in offloaded.model.layers.parameters())
    assert not offloaded.lm_head.weight.is_meta


def test_present_design_arithmetic():
    """TinyLlama's structured database before streaming: o_proj and down_proj input Hessians of all 22 layers."""
    config = dict(scale.SHAPES["tinyllama-1.1b"])
    from transformers import LlamaConfig

    shape = ModelShape.from_config(LlamaConfig(**config))
    units = build_space(shape, SpaceConfig(mlp_step=2816, allow_drop=False)).units
    held = scale.present_design_bytes(shape, units, 1024, 512, 2)
    assert held["hessians_bytes"] == 22 * (2048**2 + 5632**2) * 8
    assert held["largest_layer_hessians_bytes"] == (2048**2 + 5632**2) * 8
    assert held["block_calls_bytes"] == 0
