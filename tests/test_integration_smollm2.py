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
