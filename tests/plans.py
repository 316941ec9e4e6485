"""Complete plans with made-up figures, for tests that need a plan.json without running a search."""

from __future__ import annotations

from dataclasses import is_dataclass, replace

from allocator.core.config import ErrorMetric, ModelConfig
from allocator.core.plan import (
    Measured,
    MeasuredMemory,
    Plan,
    PlanBudget,
    PlanProfile,
    Predicted,
    Quality,
    SearcherInfo,
    Timing,
    Uniform,
)


def sample_measured(**changes) -> Measured:
    measured = Measured(
        regime="prefill", latency_ms=8.0, dense_latency_ms=12.0, speedup=1.5, predicted_speedup=1.52,
        speedup_prediction_error=1.52 / 1.5 - 1.0, latency_prediction_error=0.01,
        pruned_stats=Timing(median_ms=8.0, p10_ms=7.5, p90_ms=8.5, samples_ms=[8.0, 7.5, 8.5]),
        dense_stats=Timing(median_ms=12.0, p10_ms=11.0, p90_ms=13.0, samples_ms=[12.0, 11.0, 13.0]),
        memory=MeasuredMemory(weight_bytes=1000, kv_cache_bytes=24.0, total_bytes=1024.0),
        target_met=True, verdict="target met: measured speedup 1.500x vs target 1.500x",
    )
    return replace(measured, **changes)


def sample_plan(allocation: dict | None = None, **changes) -> Plan:
    """Every field set. `changes` replace fields; a dict given for a section (budget={"regime": "decode_b1"})
    updates that section's fields."""
    allocation = allocation if allocation is not None else {"layer00.attn": 2, "layer00.mlp": "2:4"}
    plan = Plan(
        allocation=allocation,
        budget=PlanBudget(speedup=1.5, regime="prefill", target_ms=7.6),
        profile=PlanProfile(name="cpu", source="measured", fingerprint={"device": "test CPU", "threads": 2},
                            table="runs/cache/profiles/cpu-test.json"),
        model="tiny-llama",
        model_spec=ModelConfig(name="tiny-llama", tiny_layers=3),
        searcher=SearcherInfo(name="dp", proxy_error=12.5, error_metric=ErrorMetric.fisher),
        predicted=Predicted(latency_ms=7.5, dense_latency_ms=12.0, speedup=1.6, param_sparsity=0.3, weight_bytes=1000,
                            dense_weight_bytes=1500, kv_cache_bytes=24, memory_bytes=1024),
        uniform=Uniform(allocation=dict(allocation), proxy_error=20.0, predicted_latency_ms=7.4, predicted_speedup=1.62,
                        param_sparsity=0.32, kl=0.4, ppl_dense=10.0, ppl_pruned=15.0),
        quality=Quality(kl=0.2, ppl_dense=10.0, ppl_pruned=12.0),
    )
    updates = {}
    for name, value in changes.items():
        current = getattr(plan, name)
        updates[name] = replace(current, **value) if isinstance(value, dict) and is_dataclass(current) else value
    return replace(plan, **updates)
