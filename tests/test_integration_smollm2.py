"""The real thing, small: SmolLM2-135M from its GGUF, Python-docs calibration, measured CPU table, DP, export."""

import json

import pytest
import torch

from allocator.model.runtime import load_pruned

from .conftest import run_cli

pytestmark = pytest.mark.integration


def test_smollm2_search_exports_a_smaller_faster_model(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "search",
        "budget.speedup=1.25",
        "data.seq_len=128", "data.calib_sequences=8", "data.eval_sequences=4",
        "space.mlp_step=256", "space.fisher_sequences=4",
        "score.kl_sequences=4",
        "profile.repeats=3", "profile.warmup=1", "profile.verify_repeats=6", "profile.allow_unstable=true",
        "profile.decode_batches=[1]", "profile.decode_context=128", "profile.prefill_length=128",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out ppl" in result.stdout and "speedup" in result.stdout
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["profile"]["source"] == "measured"
    assert plan["predicted"]["latency_ms"] <= plan["budget"]["target_ms"] + 1e-9
    assert plan["predicted"]["speedup"] >= 1.25
    assert plan["predicted"]["weight_bytes"] < plan["predicted"]["dense_weight_bytes"]
    assert 5 < plan["quality"]["ppl_dense"] < 60  # a real language model on Python docs, not random weights
    assert plan["quality"]["ppl_pruned"] >= plan["quality"]["ppl_dense"] * 0.98
    assert plan["quality"]["kl"] > 0 and plan["uniform"]["kl"] > 0
    measured = plan["measured"]
    assert measured["speedup"] > 1.0  # the exported model is really faster
    assert abs(measured["speedup_prediction_error"]) < 0.25  # loose: CI machines are noisy
    model, tokenizer, _ = load_pruned(run_dir)
    ids = torch.tensor([tokenizer.encode("def add(a, b):\n    return a + b\n")])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    widths = model.config.sparsity_allocator_widths
    assert sum(widths["mlp_neurons"]) < 30 * 1536 or sum(widths["attn_kv_groups"]) < 30 * 3


def test_smollm2_streamed_database_equals_the_one_pass_build(tmp_path):
    """Layer streaming leaves SmolLM2's levels as the one-pass build made them (levels allclose, errors to 1e-6
    relative), structured and SparseGPT units alike. The full default-space comparison against a database the
    pre-streaming code wrote is the database_build benchmark's --compare (README, Scale)."""
    from allocator.core.config import DataConfig, ModelConfig, SpaceConfig
    from allocator.core.space import ModelShape, Space, build_space
    from allocator.levels.database import open_or_build_database
    from allocator.model.calibration_data import build_calibration_data
    from allocator.model.loader import load_model

    from .test_layer_stream import assert_same_database, present_build

    loaded = load_model(ModelConfig(), tmp_path / "cache")
    data = build_calibration_data(DataConfig(seq_len=128, calib_sequences=8), loaded.tokenizer)
    shape = ModelShape.from_config(loaded.model.config)
    for kind in ("structured", "unstructured"):
        cfg = SpaceConfig(kind=kind, fisher_sequences=4, sparsities=[0.5])
        space = build_space(shape, cfg)
        space = Space(shape, [u for u in space.units if u.layer in (0, shape.num_layers - 1)])
        db = open_or_build_database(loaded.model, space, data.calibration, loaded.fingerprint, data.fingerprint,
                                    cfg, tmp_path / kind, batch_size=4)
        present_build(loaded.model, space, data.calibration, cfg, tmp_path / f"{kind}-present", batch_size=4)
        assert_same_database(db.root, tmp_path / f"{kind}-present", space.units)
