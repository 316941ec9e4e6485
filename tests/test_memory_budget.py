"""Memory budgets: the byte model matches the real KV cache and weights, and exported models meet the budget."""

from __future__ import annotations

import json

import pytest

from allocator.core.budget import memory_capacity, memory_costs, validate_budget
from allocator.core.config import BudgetConfig
from allocator.core.errors import UserInputError
from allocator.core.memory import kv_bytes, unit_weight_bytes
from allocator.core.space import ATTN, option_params
from allocator.model.measure import decoder_weight_count, fixed_bytes, measured_kv_bytes_per_token
from allocator.model.surgery import build_pruned_model, leading_levels

from .conftest import mixed_allocation, run_cli

TINY = [
    "model=tiny-llama", "data.seq_len=64", "data.calib_sequences=8", "data.eval_sequences=4", "space.mlp_step=32",
    "space.fisher_sequences=4", "profile.repeats=2", "profile.warmup=1", "profile.decode_batches=[1]",
    "profile.decode_context=64", "profile.prefill_length=64", "profile.allow_unstable=true",
]


def test_byte_model_matches_the_model(tiny):
    loaded, space = tiny
    shape, units = space.shape, space.units
    dense = loaded.model
    alloc = mixed_allocation(units)
    pruned = build_pruned_model(dense, shape, alloc, leading_levels(dense, shape))
    for model, widths in ((dense, {u.name: u.full for u in units}), (pruned, alloc)):
        predicted_kv = sum(kv_bytes(shape, widths[u.name], 1, 1, 4) for u in units if u.kind == ATTN)
        assert measured_kv_bytes_per_token(model) == predicted_kv
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        assert weights == fixed_bytes(dense, space) + sum(
            unit_weight_bytes(shape, u.kind, widths[u.name], 4) for u in units
        )
    assert decoder_weight_count(pruned) == sum(option_params(shape, u.kind, alloc[u.name]) for u in units)


def test_capacity_and_unreachable_memory_names_the_range(tiny):
    loaded, space = tiny
    cfg = BudgetConfig(speedup=None, memory_gb=1e-6, memory_batch=2, memory_context=128)
    per_unit = memory_costs(cfg, space, 4)
    with pytest.raises(UserInputError, match=r"budget.memory_gb=1e-06 is unreachable: with batch 2 x context 128"):
        memory_capacity(cfg, per_unit, fixed_bytes(loaded.model, space))


@pytest.mark.parametrize(
    "budget, message",
    [
        (BudgetConfig(speedup=None), "set one of budget.speedup"),
        (BudgetConfig(speedup=1.5, sparsity=0.5), "set one of budget.speedup"),
        (BudgetConfig(speedup=None, memory_gb=0.0), "budget.memory_gb=0.0 must be > 0"),
        (BudgetConfig(memory_gb=1.0, memory_context=0), "budget.memory_context=0 must be >= 1"),
    ],
)
def test_bad_memory_budgets(budget, message):
    with pytest.raises(UserInputError, match=message):
        validate_budget(budget)


@pytest.mark.parametrize("extra", [["budget=memory", "budget.memory_gb=0.0006"],
                                   ["budget.speedup=1.2", "budget.memory_gb=0.0005"]])
def test_exported_model_meets_the_memory_budget(tmp_path, extra):
    run = tmp_path / "run"
    out = run_cli("search", *TINY, *extra, f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    plan = json.loads((run / "plan.json").read_text())
    memory = plan["measured"]["memory"]
    assert memory["total_bytes"] <= plan["budget"]["memory_gb"] * 1e9
    assert memory["weight_bytes"] == plan["predicted"]["weight_bytes"]
    assert memory["kv_cache_bytes"] == plan["predicted"]["kv_cache_bytes"]
    assert "memory" in plan["measured"]["verdict"]
