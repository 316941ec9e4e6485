"""Tests for structured OBS pruning (allocator/levels/compress/structured_obs.py)."""

from __future__ import annotations

import pytest
import torch

from allocator.levels.compress.structured_obs import PrunedLevel, structured_obs_sweep


def _data(d_out: int, d_in: int, n_tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random weight and correlated, unevenly scaled calibration inputs X (n_tokens, d_in), float64."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(d_in, dtype=torch.float64) + 0.3 * torch.randn(d_in, d_in, generator=gen, dtype=torch.float64)
    scale = 0.2 + 2 * torch.rand(d_in, generator=gen, dtype=torch.float64)
    x = torch.randn(n_tokens, d_in, generator=gen, dtype=torch.float64) @ mix * scale
    w = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    return w, x


def _scatter(level: PrunedLevel, d_in: int, group_size: int) -> torch.Tensor:
    """Pruned weight back at full width, zeros in removed columns."""
    cols = (level.kept_groups[:, None] * group_size + torch.arange(group_size)).reshape(-1)
    full = torch.zeros(level.weight.shape[0], d_in, dtype=torch.float64)
    full[:, cols] = level.weight.double()
    return full


def _output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ w.T - x @ w_hat.T).square().sum())


@pytest.mark.parametrize("group_size", [1, 4])
def test_error_is_exact_output_error(group_size: int) -> None:
    w, x = _data(10, 24, 200)
    h = x.T @ x
    n_groups = 24 // group_size
    levels = list(range(n_groups + 1))
    out = structured_obs_sweep(w.float(), h.float(), group_size, levels)
    assert sorted(out) == levels
    total = float(((x @ w.T) ** 2).sum())
    for level, res in out.items():
        assert res.weight.dtype == torch.float32
        assert res.weight.shape == (10, level * group_size)
        assert res.kept_groups.dtype == torch.int64 and res.kept_groups.numel() == level
        assert torch.all(res.kept_groups[1:] > res.kept_groups[:-1])  # sorted, unique
        direct = _output_error(w.float().double(), _scatter(res, 24, group_size), x)
        assert res.error == pytest.approx(direct, rel=1e-4, abs=1e-6 * total)
        assert res.relative_error == pytest.approx(res.error / total, rel=1e-4)


@pytest.mark.parametrize("group_size", [1, 3])
def test_single_removal_matches_least_squares_optimum(group_size: int) -> None:
    d_out, d_in = 7, 12
    w, x = _data(d_out, d_in, 500, seed=1)
    h = x.T @ x
    n_groups = d_in // group_size
    target = x @ w.T
    best: tuple[float, int, torch.Tensor] | None = None
    for grp in range(n_groups):  # brute force: least-squares refit of the other columns
        kept_cols = [c for c in range(d_in) if c // group_size != grp]
        sol = torch.linalg.lstsq(x[:, kept_cols], target).solution.T  # (d_out, k)
        err = float((target - x[:, kept_cols] @ sol.T).square().sum())
        if best is None or err < best[0]:
            best = (err, grp, sol)
    assert best is not None
    res = structured_obs_sweep(w, h, group_size, [n_groups - 1], damp=1e-8, sweep_dtype=torch.float64)[n_groups - 1]
    assert set(res.kept_groups.tolist()) == set(range(n_groups)) - {best[1]}
    assert res.error == pytest.approx(best[0], rel=1e-6)
    torch.testing.assert_close(res.weight, best[2], rtol=1e-4, atol=1e-6)  # damp 1e-8 perturbs slightly


def _damped_objective(w: torch.Tensor, h_d: torch.Tensor, cols: list[int]) -> float:
    """min over W' of tr((W - W'_K) H_d (W - W'_K)^T), by a direct solve."""
    wh = w @ h_d[:, cols]
    return float((w @ h_d * w).sum() - (torch.linalg.solve(h_d[cols][:, cols], wh.T).T * wh).sum())


@pytest.mark.parametrize(("group_size", "sweep_dtype"), [(1, torch.float64), (1, torch.float32), (3, torch.float64)])
def test_every_step_is_the_greedy_optimum(group_size: int, sweep_dtype: torch.dtype) -> None:
    # Checks the OBS scores and rank-g downdates (and compaction) over the whole sweep: each step
    # must remove the group whose removal least increases the damped objective.
    d_in, damp = 24, 0.01
    w, x = _data(6, d_in, 80, seed=8)
    h = x.T @ x
    h_d = h + damp * h.diagonal().mean() * torch.eye(d_in, dtype=torch.float64)
    n_groups = d_in // group_size
    out = structured_obs_sweep(w, h, group_size, list(range(n_groups + 1)), damp=damp, sweep_dtype=sweep_dtype)

    def columns(groups: list[int]) -> list[int]:
        return [c for c in range(d_in) if c // group_size in groups]

    kept = list(range(n_groups))
    for level in range(n_groups - 1, 0, -1):
        costs = {grp: _damped_objective(w, h_d, columns([k for k in kept if k != grp])) for grp in kept}
        kept.remove(min(costs, key=costs.__getitem__))
        assert out[level].kept_groups.tolist() == kept
        # ...and the weight is the damped least-squares refit of the kept columns.
        cols = columns(kept)
        expected = torch.linalg.solve(h_d[cols][:, cols], (w @ h_d[:, cols]).T).T
        torch.testing.assert_close(out[level].weight, expected, rtol=1e-9, atol=1e-9)


def test_obs_update_beats_zeroing() -> None:
    w, x = _data(16, 32, 300, seed=2)
    out = structured_obs_sweep(w, x.T @ x, 1, [24, 16, 8])
    for res in out.values():
        zeroed = torch.zeros_like(w)
        zeroed[:, res.kept_groups] = w[:, res.kept_groups]
        assert res.error < _output_error(w, zeroed, x)


def test_monotone_and_endpoints() -> None:
    w, x = _data(12, 40, 300, seed=3)
    h = x.T @ x
    out = structured_obs_sweep(w.float(), h.float(), 1, list(range(41)))
    errors = [out[k].error for k in range(40, -1, -1)]
    assert all(b >= a * (1 - 1e-9) for a, b in zip(errors, errors[1:]))
    dense, empty = out[40], out[0]
    assert torch.equal(dense.weight, w.float()) and dense.error == 0.0 and dense.relative_error == 0.0
    assert torch.equal(dense.kept_groups, torch.arange(40))
    assert empty.weight.shape == (12, 0) and empty.kept_groups.numel() == 0
    assert empty.error == pytest.approx(float((w.float().double() @ h.float().double() * w.float().double()).sum()))
    assert empty.relative_error == pytest.approx(1.0)
    # Kept sets are nested: the sweep removes one group at a time.
    for k in range(40):
        assert set(out[k].kept_groups.tolist()) <= set(out[k + 1].kept_groups.tolist())


def test_group_size_greater_than_one() -> None:
    w, x = _data(5, 12, 100, seed=4)
    out = structured_obs_sweep(w, x.T @ x, 4, [0, 1, 2, 3])
    assert [out[k].weight.shape[1] for k in range(4)] == [0, 4, 8, 12]
    assert out[1].error <= out[0].error and out[2].error <= out[1].error
    # One group (of 3) kept: greedy may not be globally optimal, but must beat plain zeroing.
    zeroed = _scatter(out[1], 12, 4) * 0
    cols = (out[1].kept_groups[:, None] * 4 + torch.arange(4)).reshape(-1)
    zeroed[:, cols] = w[:, cols]
    assert out[1].error < _output_error(w, zeroed, x)


def test_float32_sweep_matches_float64() -> None:
    w, x = _data(48, 128, 1024, seed=5)
    h = x.T @ x
    levels = [120, 96, 64, 32, 8]
    fast = structured_obs_sweep(w.float(), h.float(), 1, levels, sweep_dtype=torch.float32)
    ref = structured_obs_sweep(w.float(), h.float(), 1, levels, sweep_dtype=torch.float64)
    for k in levels:
        assert fast[k].relative_error == pytest.approx(ref[k].relative_error, rel=1e-3)


def test_dead_columns_pruned_first_and_free() -> None:
    w, x = _data(6, 10, 100, seed=6)
    x[:, [2, 7]] = 0  # never activated on calibration data
    out = structured_obs_sweep(w, x.T @ x, 1, [10, 8])
    assert set(out[8].kept_groups.tolist()) == set(range(10)) - {2, 7}
    assert out[8].error == pytest.approx(0.0, abs=1e-9)
    # A kept dead column keeps its weight (H_d decouples it).
    res = structured_obs_sweep(w, x.T @ x, 1, [9])[9]
    assert res.error == pytest.approx(0.0, abs=1e-9)


def test_bfloat16_input_returns_input_dtype() -> None:
    w, x = _data(8, 16, 100, seed=7)
    res = structured_obs_sweep(w.bfloat16(), (x.T @ x).float(), 1, [8])[8]
    assert res.weight.dtype == torch.bfloat16
    # Error is that of the weight as returned (rounded to bf16).
    assert res.error == pytest.approx(_output_error(w.bfloat16().double(), _scatter(res, 16, 1), x), rel=1e-3)


@pytest.mark.parametrize(
    ("weight", "hessian", "group_size", "levels", "damp", "match"),
    [
        (torch.zeros(4), torch.eye(4), 1, [1], 0.01, "2-D"),
        (torch.zeros(3, 4), torch.eye(5), 1, [1], 0.01, "shape"),
        (torch.zeros(3, 4), torch.zeros(4, 5), 1, [1], 0.01, "shape"),
        (torch.zeros(3, 6), torch.eye(6), 4, [1], 0.01, "divisible"),
        (torch.zeros(3, 6), torch.eye(6), 0, [1], 0.01, "group_size"),
        (torch.zeros(3, 6), torch.eye(6), 2, [4], 0.01, r"\[0, 3\]"),
        (torch.zeros(3, 6), torch.eye(6), 2, [-1], 0.01, r"\[0, 3\]"),
        (torch.zeros(3, 6), torch.eye(6), 2, [1.5], 0.01, "int"),
        (torch.zeros(3, 6), torch.eye(6), 2, 2, 0.01, "sequence"),
        (torch.zeros(3, 6), torch.eye(6), 2, [1], -0.1, "damp"),
        (torch.zeros(3, 6, dtype=torch.int64), torch.eye(6), 2, [1], 0.01, "floating"),
        (torch.full((3, 6), float("nan")), torch.eye(6), 2, [1], 0.01, "finite"),
        (torch.zeros(3, 6), -torch.eye(6), 2, [1], 0.01, "negative"),
    ],
)
def test_bad_inputs_raise(weight, hessian, group_size, levels, damp, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        structured_obs_sweep(weight, hessian, group_size, levels, damp=damp)


def test_singular_hessian_without_damping_raises() -> None:
    hessian = torch.ones(4, 4, dtype=torch.float64)  # rank 1 (identical inputs), no dead columns
    with pytest.raises(ValueError, match="damp"):
        structured_obs_sweep(torch.randn(2, 4), hessian, 1, [2], damp=0.0)
