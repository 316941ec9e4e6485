"""Latency tables that notice a busy machine: spread recorded, busy or unstable regimes measured again then refused
(or kept marked unstable on request), degenerate tables never kept, and a plan from a stale table flagged by verify."""

import os
import subprocess
import sys
import time
from dataclasses import asdict, replace

import pytest

from allocator.core.config import BudgetConfig, ProfileConfig
from allocator.core.errors import UserInputError
from allocator.core.plan import Plan
from profilers.cpu import profile_cpu
from profilers.prediction import target_latency_ms
from profilers.stability import (
    Checks,
    CpuSample,
    degenerate_reasons,
    judge,
    measure_checked,
    others_cores,
    spread_of,
    wait_for_quiet,
)
from profilers.table import RegimeCosts, load_table

SMALL = dict(repeats=3, warmup=1, decode_batches=[1], decode_context=16, prefill_length=16, quiet_wait_s=2.0)


def _costs(dense: list[float], variant: list[float], fixed_ms: float = 1.0, unit: float = 0.5) -> RegimeCosts:
    raw = {"dense": {"samples_ms": dense}, "mlp=0": {"samples_ms": variant}}
    return RegimeCosts({"name": "prefill"}, fixed_ms, sorted(dense)[len(dense) // 2],
                       {"mlp": {0: 0.0, 32: unit}, "attn": {0: 0.0, 2: unit}}, raw)


def _sampler(others_per_call: float):
    """A CPU sampler whose every call is one second later, with `others_per_call` cores used by other processes."""
    state = {"t": 0.0}

    def sample() -> CpuSample:
        state["t"] += 1.0
        return CpuSample(state["t"], state["t"] * others_per_call, 0.0)

    return sample


def test_spread_is_relative_to_the_median_and_per_round():
    steady = spread_of({"dense": {"samples_ms": [10.0, 20.0, 10.0, 20.0, 15.0]},
                        "mlp=0": {"samples_ms": [5.0, 10.0, 5.0, 10.0, 7.5]}})
    assert steady["rounds"] == 5 and steady["dense_p90"] > 1.2  # the dense time moved ...
    assert steady["variants_p10"] == pytest.approx(1.0) and steady["variants_p90"] == pytest.approx(1.0)  # ... in step
    assert others_cores(CpuSample(0.0, 10.0, 1.0), CpuSample(2.0, 13.0, 2.0)) == pytest.approx(1.0)
    assert others_cores(CpuSample(0.0, None, 1.0), CpuSample(2.0, None, 2.0)) is None


def test_degenerate_tables_are_named():
    assert degenerate_reasons(_costs([10.0] * 3, [5.0] * 3)) == []
    clipped = degenerate_reasons(_costs([10.0] * 3, [5.0] * 3, fixed_ms=0.0))
    assert clipped == ["fixed cost clipped to 0 ms (the cheapest variants measured faster than possible)"]
    assert degenerate_reasons(_costs([10.0] * 3, [5.0] * 3, unit=0.0)) == []  # flat, not 0 ms: judged, not degenerate
    flat = judge(Checks(spread_of(_costs([10.0] * 3, [5.0] * 3).raw), 10.0, 10.0, 0.0, 2, 2), _costs([10.0] * 3, [5.0] * 3, unit=0.0))
    assert flat == ["every unit costs 0 ms (no option measured faster than the cheapest)"]


def test_busy_regime_is_measured_again_then_refused_or_kept_marked(monkeypatch):
    monkeypatch.setattr("profilers.stability._dense_ms", lambda call, n: 10.0)  # the re-checks agree
    quiet, noisy = _costs([10.0, 10.2, 9.9], [5.0, 5.1, 5.0]), _costs([10.0, 30.0, 9.0], [5.0, 5.1, 14.0])
    runs = iter([noisy, quiet])
    costs = measure_checked("prefill", lambda: next(runs), lambda: None, 2, 1, False, sample=_sampler(0.0), warmup_s=0.0)
    assert costs.raw == quiet.raw
    assert costs.stability["stable"] and costs.stability["attempts"] == 2 and costs.stability["reasons"] == []

    busy = _sampler(1.5)  # other processes keep 1.5 of this machine's cores busy
    with pytest.raises(UserInputError, match=r"^latency table not saved: regime prefill was measured on a busy or "
                                             r"unstable machine after 2 attempt\(s\): other processes used 1\.50 of"):
        measure_checked("prefill", lambda: quiet, lambda: None, os.cpu_count(), 1, False, sample=busy, warmup_s=0.0)
    kept = measure_checked("prefill", lambda: quiet, lambda: None, os.cpu_count(), 0, True, sample=_sampler(1.5 * 64), warmup_s=0.0)
    assert not kept.stability["stable"] and "other processes used" in kept.stability["reasons"][0]

    degenerate = _costs([10.0, 10.1, 10.0], [5.0, 5.0, 5.0], fixed_ms=0.0)
    with pytest.raises(UserInputError, match="fixed cost clipped to 0 ms"):
        measure_checked("prefill", lambda: degenerate, lambda: None, 2, 0, False, sample=_sampler(0.0), warmup_s=0.0)
    marked = measure_checked("prefill", lambda: degenerate, lambda: None, 2, 0, True, sample=_sampler(0.0), warmup_s=0.0)
    assert not marked.stability["stable"]  # kept only on request, never as clean (budgets on it are refused)


def _scheduled_sampler(others: list[float]):
    """A CPU sampler over one-second windows: window i has `others[i]` cores used by other processes (the last value
    repeats). Two samples per window, as wait_for_quiet takes them."""
    state = {"t": 0.0, "busy": 0.0, "calls": 0}

    def sample() -> CpuSample:
        window = state["calls"] // 2
        if state["calls"] % 2:  # the end of a window: one second later
            state["t"] += 1.0
            state["busy"] += others[min(window, len(others) - 1)]
        state["calls"] += 1
        return CpuSample(state["t"], state["busy"], 0.0)

    return sample


def test_wait_for_quiet_waits_out_a_burst_then_needs_two_quiet_windows():
    """Runs started together: three windows of startup load, then quiet. Waiting ends after two quiet windows in a
    row (a quiet window between bursts does not count), and on a machine that stays busy it ends at its limit."""
    sample = _scheduled_sampler([1.6, 0.1, 1.2, 0.05, 0.02, 1.9])
    assert wait_for_quiet(threads=2, cores=2, max_wait_s=60, sample=sample, sleep=lambda s: None) == pytest.approx(0.02)
    always_busy = _scheduled_sampler([1.5])
    assert wait_for_quiet(threads=2, cores=2, max_wait_s=0, sample=always_busy, sleep=lambda s: None) == pytest.approx(1.5)
    # With a core left free by torch's threads, one other process is within the limit.
    assert wait_for_quiet(threads=1, cores=2, max_wait_s=0, sample=_scheduled_sampler([1.0]), sleep=lambda s: None) == pytest.approx(1.0)


def test_degenerate_table_refuses_budgets_instead_of_accepting_any(tiny):
    """The cause of `budget.speedup=50` accepted and of ZeroDivisionError: fixed cost clipped to 0, so the
    all-cheapest model was predicted to run in 0 ms."""
    _, space = tiny
    curve = {kind: {k: (0.0 if i == 0 else 1.0) for i, k in enumerate(opts)} for kind, opts in space.options.items()}
    costs = RegimeCosts({"name": "prefill"}, 0.0, 10.0, curve)
    with pytest.raises(UserInputError, match="cannot plan regime prefill: it predicts 0.0 ms for the fastest"):
        target_latency_ms(BudgetConfig(speedup=50), costs, space.units, "cpu")
    healthy = replace(costs, fixed_ms=1.0)
    with pytest.raises(UserInputError, match="budget.speedup=50 is unreachable"):
        target_latency_ms(BudgetConfig(speedup=50), healthy, space.units, "cpu")


def _busy_loops(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def test_table_profiled_beside_a_busy_loop_is_not_saved_as_clean(tiny, tmp_path):
    """One busy loop per core this process may use, beside a real profile of the tiny model: refused (nothing saved
    as the table), or kept only on request and then marked unstable, and not reused silently afterwards."""
    loaded, space = tiny
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    loops = _busy_loops(cores)
    try:
        with pytest.raises(UserInputError, match=r"^latency table not saved: regime \w+ was measured on a busy"):
            profile_cpu(loaded.model, space, ProfileConfig(**SMALL, retries=1), "float32", tmp_path)
        saved = [p for p in (tmp_path / "profiles").glob("*.json") if not p.name.endswith(".partial.json")]
        assert saved == []
        table, path = profile_cpu(loaded.model, space, ProfileConfig(**SMALL, retries=0, allow_unstable=True),
                                  "float32", tmp_path)
        assert any(not c.stability["stable"] for c in load_table(path).regimes.values())
        for costs in table.regimes.values():
            assert {"dense_p10", "dense_p90", "variants_p10", "variants_p90"} <= set(costs.stability["spread"])
            assert costs.stability["recheck_start_ms"] > 0 and costs.stability["recheck_end_ms"] > 0
        with pytest.raises(UserInputError, match="latency table not saved"):  # measured again, not reused
            profile_cpu(loaded.model, space, ProfileConfig(**SMALL, retries=0), "float32", tmp_path)
    finally:
        for p in loops:
            p.kill()
            p.wait()


def test_verify_of_a_plan_from_a_stale_table_prints_the_mismatch_and_the_refresh_command(tiny, tmp_path, monkeypatch):
    """A search on a table that no longer describes the machine, then `verify`. The table is written with the key a
    real profile of these settings has, but with times 1000x shorter than any run of the tiny model (a loaded
    machine only slows the measurement, so load cannot hide the mismatch; a real profile here could be refused)."""
    import profilers.cpu as cpu

    from .conftest import run_cli

    loaded, _ = tiny
    cache = tmp_path / "cache"
    common = ["model=tiny-llama", "model.tiny_layers=3", "data.seq_len=64", "data.calib_sequences=8",
              "data.eval_sequences=4", "space.mlp_step=32", "space.fisher_sequences=4", "profile.repeats=2",
              "profile.warmup=1", "profile.decode_batches=[1]", "profile.decode_context=64",
              "profile.prefill_length=64", f"cache_dir={cache}"]
    from allocator.core.config import SpaceConfig
    from allocator.core.space import ModelShape, build_space

    space = build_space(ModelShape.from_config(loaded.model.config), SpaceConfig(mlp_step=32, fisher_sequences=4))
    dense_ms, layers = 0.001, space.shape.num_layers

    def stale(dense, space, regime, cfg):
        unit_ms = {kind: {k: 0.35 * dense_ms / layers * i / (len(opts) - 1) for i, k in enumerate(opts)}
                   for kind, opts in space.options.items()}
        return RegimeCosts(asdict(regime), 0.3 * dense_ms, dense_ms, unit_ms, {})

    monkeypatch.setattr(cpu, "measure_regime", stale)
    monkeypatch.setattr(cpu, "measure_checked", lambda name, measure, *_: replace(measure(), stability={"stable": True}))
    cfg = ProfileConfig(repeats=2, warmup=1, decode_batches=[1], decode_context=64, prefill_length=64)
    profile_cpu(loaded.model, space, cfg, "float32", cache)
    run = tmp_path / "run"
    searched = run_cli("search", *common, "budget.speedup=1.2", "verify=false", f"hydra.run.dir={run}", cwd=tmp_path)
    assert searched.returncode == 0, searched.stderr[-2000:]
    done = run_cli("verify", f"run={run}", "profile.warmup=1", "profile.verify_repeats=3", "profile.decode_batches=[1]",
                   "profile.decode_context=64", "profile.prefill_length=64", f"cache_dir={cache}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "absolute latency: predicted" in done.stdout
    assert "WARNING: the latency table no longer describes this machine: it predicts" in done.stdout
    command = ("python -m allocator profile model=tiny-llama model.tiny_layers=3 space=structured space.mlp_step=32 "
               "space.fisher_sequences=4 profile.repeats=2 profile.warmup=1 'profile.decode_batches=[1]' "
               "profile.decode_context=64 profile.prefill_length=64")
    assert command in done.stdout and f"cache_dir={cache} profile.refresh=true" in done.stdout
    measured = Plan.load(run / "plan.json").measured
    assert measured.table_stale and measured.dense_prediction_error < -0.25 and command in measured.table_note
    assert measured.predicted_dense_latency_ms == pytest.approx(Plan.load(run / "plan.json").predicted.dense_latency_ms)


def test_start_recheck_warm_up_lasts_its_calls_and_its_seconds():
    """The re-check's warm-up: at least RECHECK_WARMUP calls, and for `warmup_s` at least (a quiet run's first fast
    decode calls stayed slow for longer than two of them)."""
    from profilers.stability import RECHECK_WARMUP, _warm_up

    calls = []
    _warm_up(lambda: calls.append(1), 0.0)
    assert len(calls) == RECHECK_WARMUP
    calls.clear()
    start = time.perf_counter()
    _warm_up(lambda: (calls.append(1), time.sleep(0.02)), 0.3)
    assert time.perf_counter() - start >= 0.3 and len(calls) >= 0.3 / 0.02 * 0.5
