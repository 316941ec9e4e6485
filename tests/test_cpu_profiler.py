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


@pytest.fixture
def no_kernel(monkeypatch):
    """CPU tensors as a CPU runs them outside the tests (conftest's TRITON_INTERPRET=1 gives them the interpreted
    kernel): no kernel, so SparseLinear decompresses once and runs the dense GEMM."""
    from kernels import ops

    monkeypatch.setattr(ops, "backend", lambda device: "torch-reference")


def test_cpu_prices_sparse_options_as_the_dense_unit_they_run_as(tiny, tmp_path, no_kernel):
    """A mixed space on a CPU: sparse variants are not timed (they run as the full-width dense unit), every sparse
    option costs exactly the full width's cost, and the table's method says so."""
    import torch

    from allocator.core.config import SpaceConfig
    from allocator.core.space import build_space, is_sparse, parse_option_key
    from allocator.model.sparse_export import build_deployable
    from allocator.model.surgery import build_pruned_model, leading_levels
    from kernels.sparse_linear import SparseLinear
    from profilers.cpu import measure_regime, sparse_runs_dense
    from profilers.regimes import regimes_of

    loaded, structured = tiny
    space = build_space(structured.shape, SpaceConfig(kind="mixed", mlp_step=32))
    assert space.has_sparse and sparse_runs_dense()
    cfg = ProfileConfig(repeats=2, warmup=0, decode_batches=[1], decode_context=16, prefill_length=16)
    # measure_regime itself (profile_cpu adds the busy-machine checks, which a loaded test machine can fail)
    for regime in regimes_of(cfg):
        costs = measure_regime(loaded.model, space, regime, cfg)
        timed = set(costs.raw)
        assert not any(is_sparse(parse_option_key(name.split("=", 1)[1])) for name in timed if "=" in name), timed
        assert any("=" in name for name in timed)  # the widths are still timed
        for kind, curve in costs.unit_ms.items():
            full = max(k for k in curve if not is_sparse(k))
            sparse = [k for k in curve if is_sparse(k)]
            assert sparse and all(curve[k] == curve[full] for k in sparse)
    # What was priced is what runs: the deployable model's SparseLinear modules run the dense GEMM of the very
    # weights the masked model multiplies.
    alloc = {u.name: next(o for o in u.options if is_sparse(o)) for u in space.units}
    source = leading_levels(loaded.model, space.shape)
    deployed = build_deployable(loaded.model, space.shape, alloc, source)
    masked = build_pruned_model(loaded.model, space.shape, alloc, source)
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        assert torch.equal(deployed(ids).logits, masked(ids).logits)
    modules = [m for m in deployed.modules() if isinstance(m, SparseLinear)]
    assert modules and all(m.decompressed for m in modules)
