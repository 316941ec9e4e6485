import json

import numpy as np
import pytest

from allocator.core.config import ProfileConfig
from profilers.cpu import _fit_widths, profile_cpu
from profilers.table import load_table
from profilers.timing import TimingStats, paired_ratio, time_interleaved


def test_width_fit_pools_samples_and_ignores_a_burst():
    rng = np.random.default_rng(0)
    widths = (0, 32, 64, 96, 128)
    rounds = 7
    truth = {k: 0.3 + 0.7 * k / 128 for k in widths[1:]}
    fractions = {"dense": np.ones(rounds), "mlp=0": np.full(rounds, 0.25)}
    for k in widths[1:-1]:
        fractions[f"mlp={k}"] = truth[k] * (1 + 0.01 * rng.standard_normal(rounds))
    fractions["mlp=64"][3] *= 1.8  # a burst of contention in one round
    curve = _fit_widths("mlp", widths, fractions)
    assert curve[0] == pytest.approx(0.25)
    for k in widths[1:]:
        assert curve[k] == pytest.approx(truth[k], abs=0.02)


def test_paired_ratio_cancels_drift_shared_by_a_round():
    slow = [1.0, 3.0, 1.0, 5.0]  # the machine slows down in rounds 2 and 4, for both variants alike
    a = TimingStats.of([2 * s for s in slow])
    b = TimingStats.of(slow)
    assert paired_ratio(a, b) == pytest.approx(2.0)


def test_time_interleaved_calls_every_variant_each_round():
    calls = []
    stats = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeats=3)
    assert calls.count("a") == calls.count("b") == 4
    assert len(stats["a"].samples_ms) == 3
    with pytest.raises(ValueError, match="repeats=0"):
        time_interleaved({"a": lambda: None}, warmup=0, repeats=0)


def test_table_is_saved_reused_and_corruption_is_named(tiny, tmp_path):
    loaded, space = tiny
    # These tests check caching, not the figures (tests/test_table_stability.py checks those): allow_unstable, and
    # one thread, whose timings stay consistent on a loaded machine (two wait on each other at every op).
    cfg = ProfileConfig(repeats=2, warmup=0, decode_batches=[1], decode_context=16, prefill_length=16,
                        allow_unstable=True, threads=1)
    table, path = profile_cpu(loaded.model, space, cfg, "float32", tmp_path)
    assert set(table.regimes) == {"prefill", "decode_b1"}
    for costs in table.regimes.values():
        for kind, curve in costs.unit_ms.items():
            values = [curve[k] for k in sorted(curve)]
            assert values == sorted(values) and values[0] == 0.0  # non-decreasing in width, cheapest is 0
    again, same_path = profile_cpu(loaded.model, space, cfg, "float32", tmp_path)
    assert same_path == path and again.regimes["prefill"].raw == table.regimes["prefill"].raw
    path.write_text(json.dumps({"version": 1, "regimes": {}}))
    with pytest.raises(ValueError, match=f"latency table {path} is corrupt"):
        load_table(path)


def test_interrupted_profile_resumes_from_its_partial_table(tiny, tmp_path):
    loaded, space = tiny
    cfg = ProfileConfig(repeats=2, warmup=0, decode_batches=[1], decode_context=16, prefill_length=16,
                        allow_unstable=True, threads=1)
    seen = []

    def interrupt(regime, costs):
        seen.append(regime)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        profile_cpu(loaded.model, space, cfg, "float32", tmp_path, "prefill", interrupt)
    (partial,) = (tmp_path / "profiles").glob("*.partial.json")
    kept = load_table(partial).regimes["prefill"].raw
    table, path = profile_cpu(loaded.model, space, cfg, "float32", tmp_path, "prefill", lambda r, _: seen.append(r))
    assert table.regimes["prefill"].raw == kept  # not measured again
    assert set(table.regimes) == {"prefill", "decode_b1"} and seen == ["prefill", "prefill"]
    assert path.is_file() and not partial.exists()
