"""The milp searcher: the exact optimum over the allocations that fit, checked against brute force."""

from __future__ import annotations

import itertools
import time
from dataclasses import replace

import numpy as np
import pytest

from search import SEARCHERS, AllocationProblem, InfeasibleBudget
from search.dp import DPConfig, DPSearcher
from search.milp import MILPSearcher, candidate_options, solve_exact

LABELS = ("dense", "nm2:4", "nm4:8", "unstructured50", "bsr50", "unstructured70")


def random_problem(seed: int, second: bool = False, labels: bool = False, integer: bool = False) -> AllocationProblem:
    """2-5 units of 1-5 options; costs and errors drawn independently (so options dominate each other at times),
    with repeats and zeros; the budget somewhere between the cheapest and dearest allocation, or exactly on the
    cost of one allocation (the edge a tolerance would get wrong)."""
    rng = np.random.default_rng(seed)
    n_units = int(rng.integers(2, 6))
    names, options, costs, errors, second_costs = [], [], [], [], []
    for u in range(n_units):
        k = int(rng.integers(1, 6))
        names.append(f"layers.{u}.{'attn' if u % 2 else 'mlp'}")
        options.append(tuple(rng.permutation(LABELS)[:k]) if labels else tuple(sorted(rng.choice(64, k, replace=False))))
        draw = (lambda n: rng.integers(0, 6, n).astype(float)) if integer else (lambda n: rng.uniform(0, 3, n))
        costs.append(draw(k))
        errors.append(draw(k) if rng.random() < 0.3 else rng.uniform(0, 2, k))
        second_costs.append(rng.integers(1, 1000, k).astype(float) * 1e6)  # bytes-like magnitudes
    problem = AllocationProblem(tuple(names), tuple(n.rsplit(".", 1)[1] for n in names), tuple(options),
                                tuple(costs), tuple(errors), budget=0.0)
    low, high = problem.min_cost(), problem.max_cost()
    if rng.random() < 0.3:  # exactly the cost of some allocation
        budget = problem.cost_of(tuple(int(rng.integers(len(o))) for o in options))
    else:
        budget = float(rng.uniform(low, high))
    problem = replace(problem, budget=budget)
    if second:
        least = sum(float(c.min()) for c in second_costs)
        most = sum(float(c.max()) for c in second_costs)
        problem = replace(problem, second_costs=tuple(second_costs),
                          second_budget=float(rng.uniform(least, most)))
    return problem


def brute_force(problem: AllocationProblem) -> float | None:
    """Least summed error over every allocation that fits by the problem's own exact check, or None."""
    fitting = [ch for ch in itertools.product(*(range(len(o)) for o in problem.options)) if problem.fits(ch)]
    return min((problem.error_of(ch) for ch in fitting), default=None)


def milp_search(problem: AllocationProblem):
    return SEARCHERS.get("milp")().search(problem)


@pytest.mark.parametrize("second", [False, True], ids=["one-limit", "second-limit"])
@pytest.mark.parametrize("labels", [False, True], ids=["int-options", "label-options"])
@pytest.mark.parametrize("integer", [False, True], ids=["real-costs", "integer-costs"])
def test_matches_brute_force(second: bool, labels: bool, integer: bool) -> None:
    solved = 0
    for seed in range(40):
        problem = random_problem(seed, second=second, labels=labels, integer=integer)
        best = brute_force(problem)
        if best is None:
            with pytest.raises(InfeasibleBudget):
                milp_search(problem)
            continue
        alloc = milp_search(problem)
        assert problem.fits(alloc.choice), (seed, alloc)
        assert alloc.error == pytest.approx(best, rel=1e-9, abs=1e-12), (seed, alloc.error, best)
        assert alloc.info["exact"] is True and alloc.searcher == "milp"
        solved += 1
    assert solved >= 25  # the draws are mostly feasible: the comparison is not vacuous


@pytest.mark.parametrize("cost_scale, error_scale", [(1.0, 1e-8), (1.0, 1e8), (1e9, 1.0), (1e-6, 1.0)])
def test_exact_whatever_the_units(cost_scale: float, error_scale: float) -> None:
    """Rows and objective are normalised, so HiGHS's absolute tolerances do not decide the answer."""
    for seed in range(15):
        base = random_problem(100 + seed)
        problem = replace(base, costs=tuple(c * cost_scale for c in base.costs),
                          errors=tuple(e * error_scale for e in base.errors), budget=base.budget * cost_scale)
        best = brute_force(problem)
        if best is None:
            continue
        alloc = milp_search(problem)
        assert problem.fits(alloc.choice)
        assert alloc.error == pytest.approx(best, rel=1e-9, abs=1e-300), (seed, alloc.error, best)


def hair_over_problem() -> AllocationProblem:
    """The best two allocations cost the budget plus 1e-9 (within HiGHS's feasibility tolerance): only (1, 0) and
    (0, 1) truly fit, and the better of them, (0, 1), has error 1."""
    return AllocationProblem(("a", "b"), ("mlp", "mlp"), ((0, 1), (0, 1)),
                             (np.array([0.0, 0.5 + 1e-9]), np.array([0.0, 0.5])),
                             (np.array([1.0, 0.0]), np.array([1.5, 0.0])), budget=1.0)


def test_allocation_over_by_tolerance_is_cut_off() -> None:
    problem = hair_over_problem()
    assert not problem.fits((1, 1)) and brute_force(problem) == 1.0
    alloc = milp_search(problem)
    assert alloc.choice == (0, 1) and alloc.error == 1.0 and problem.fits(alloc.choice)
    assert alloc.info["exact"] is True and alloc.info["cuts"] >= 1  # HiGHS did accept (1, 1) first


def test_tightening_fallback_fits_and_says_it_is_not_proven() -> None:
    problem = hair_over_problem()
    choice, info = solve_exact(problem, max_cuts=0)
    assert problem.fits(choice)
    assert info["exact"] is False and info["tightened"] >= 1


def test_infeasible_budget_raises() -> None:
    problem = random_problem(3)
    with pytest.raises(InfeasibleBudget, match="minimum achievable cost"):
        milp_search(replace(problem, budget=problem.min_cost() - 1e-6))


def test_limits_feasible_alone_but_not_together_raise() -> None:
    # Option 0 is cheap in latency and dear in memory, option 1 the reverse; each limit alone can be met.
    problem = AllocationProblem(("a", "b"), ("mlp", "mlp"), ((0, 1), (0, 1)),
                                (np.array([0.0, 1.0]), np.array([0.0, 1.0])), (np.zeros(2), np.zeros(2)),
                                budget=0.5, second_costs=(np.array([1.0, 0.0]), np.array([1.0, 0.0])),
                                second_budget=0.5)
    problem.check_feasible()
    with pytest.raises(InfeasibleBudget, match="together"):
        milp_search(problem)


def test_budget_exactly_the_minimum_and_single_options() -> None:
    problem = AllocationProblem(("a", "b", "c"), ("attn", "mlp", "mlp"), ((4,), (0, 8), (0, 4, 8)),
                                (np.array([0.3]), np.array([0.1, 0.7]), np.array([0.2, 0.2, 0.9])),
                                (np.array([0.0]), np.array([2.0, 0.0]), np.array([3.0, 1.0, 0.0])), budget=0.0)
    problem = replace(problem, budget=problem.min_cost())
    alloc = milp_search(problem)
    # b must take its cheapest option; c's two cheapest cost the same, so the one with less error.
    assert alloc.choice == (0, 0, 1) and alloc.cost == problem.budget and alloc.error == 3.0
    free = AllocationProblem(("a",), ("mlp",), ((0, 8),), (np.zeros(2),), (np.array([1.0, 0.0]),), budget=0.0)
    assert milp_search(free).choice == (1,)


def test_candidate_options_drop_only_what_no_optimum_needs() -> None:
    problem = AllocationProblem(("a", "b"), ("mlp", "mlp"), ((1, 2, 3, 4, 5), (1, 2)),
                                # 1: the identical twin of 0 (the first is kept); 2: dearer and worse than 0;
                                # 3: best error, but costs more than the budget leaves; 4: cheaper, worse.
                                (np.array([1.0, 1.0, 2.0, 9.0, 0.5]), np.array([0.0, 1.0])),
                                (np.array([1.0, 1.0, 1.5, 0.0, 2.0]), np.array([1.0, 0.0])), budget=3.0)
    keep = candidate_options(problem)
    assert keep[0].tolist() == [0, 4] and keep[1].tolist() == [0, 1]


@pytest.mark.parametrize("second", [False, True], ids=["one-limit", "second-limit"])
def test_never_worse_than_dp(second: bool) -> None:
    rng = np.random.default_rng(7)
    strictly = 0
    for _ in range(15):
        n, k = int(rng.integers(5, 25)), int(rng.integers(2, 10))
        costs = tuple(np.sort(rng.uniform(0, 10, k)) for _ in range(n))
        errors = tuple(np.sort(rng.uniform(0, 5, k))[::-1] for _ in range(n))
        problem = AllocationProblem(tuple(f"u{i}" for i in range(n)), ("mlp",) * n, (tuple(range(k)),) * n,
                                    costs, errors, budget=0.0)
        problem = replace(problem, budget=problem.min_cost() + rng.uniform(0.1, 0.9) * (problem.max_cost() - problem.min_cost()))
        if second:
            mem = tuple(np.sort(rng.uniform(1, 5, k)) * 1e6 for _ in range(n))
            least, most = sum(m[0] for m in mem), sum(m[-1] for m in mem)
            problem = replace(problem, second_costs=mem, second_budget=least + rng.uniform(0.2, 0.8) * (most - least))
        exact = milp_search(problem)
        dp = DPSearcher(DPConfig(n_buckets=1000)).search(problem)
        assert problem.fits(exact.choice) and problem.fits(dp.choice)
        assert exact.error <= dp.error * (1 + 1e-12), (exact.error, dp.error)
        strictly += exact.error < dp.error * (1 - 1e-9)
    assert strictly >= 1  # rounding costs up does cost the DP something on these problems


def test_fast_at_model_scale() -> None:
    """60 units of 15 options (a mixed space on a 30-layer model) with a second limit."""
    rng = np.random.default_rng(0)
    n, k = 60, 15
    costs = tuple(np.sort(rng.uniform(0, 10, k)) for _ in range(n))
    errors = tuple(np.sort(rng.uniform(0, 5, k))[::-1] for _ in range(n))
    mem = tuple(np.sort(rng.uniform(1, 5, k)) * 1e6 for _ in range(n))
    problem = AllocationProblem(tuple(f"u{i}" for i in range(n)), ("mlp",) * n, (tuple(range(k)),) * n, costs, errors,
                                budget=0.5 * sum(c[-1] for c in costs), second_costs=mem,
                                second_budget=0.6 * sum(m[-1] for m in mem))
    t0 = time.perf_counter()
    alloc = MILPSearcher().search(problem)
    assert time.perf_counter() - t0 < 10.0  # well under a second on an idle core; generous for a shared machine
    assert problem.fits(alloc.choice) and alloc.info["exact"]
