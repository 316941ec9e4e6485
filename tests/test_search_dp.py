"""The DP searcher: exact optimum of its discretised knapsack, never over the real budget."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
from scipy.optimize import Bounds, LinearConstraint, milp

from search import SEARCHERS, AllocationProblem, InfeasibleBudget
from search.dp import DPConfig, DPSearcher, discretise


def make_problem(rng: np.random.Generator, n_units: int, n_opts: int, budget: float,
                 integer_costs: bool = False) -> AllocationProblem:
    costs, errors, options = [], [], []
    for _ in range(n_units):
        k = int(rng.integers(1, n_opts + 1))
        c = rng.integers(0, 20, size=k).astype(float) if integer_costs else rng.uniform(0, 10, size=k)
        costs.append(np.sort(c))
        errors.append(rng.uniform(0, 5, size=k))
        options.append(tuple(range(1, k + 1)))
    return AllocationProblem(
        unit_names=tuple(f"u{i}" for i in range(n_units)),
        unit_kinds=tuple("attn" if i % 2 else "mlp" for i in range(n_units)),
        options=tuple(options),
        costs=tuple(costs),
        errors=tuple(errors),
        budget=budget,
    )


def milp_optimum(int_costs: list[np.ndarray], errors: list[np.ndarray], cap: int) -> float | None:
    """Optimum of the multiple-choice knapsack as a 0/1 ILP, or None if infeasible."""
    sizes = [len(c) for c in int_costs]
    n = sum(sizes)
    one_per_unit = np.zeros((len(sizes), n))
    start = 0
    for u, k in enumerate(sizes):
        one_per_unit[u, start:start + k] = 1
        start += k
    res = milp(
        c=np.concatenate(errors),
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        constraints=[
            LinearConstraint(one_per_unit, 1, 1),
            LinearConstraint(np.concatenate(int_costs)[None, :].astype(float), -np.inf, cap),
        ],
        options={"mip_rel_gap": 0},
    )
    return float(res.fun) if res.status == 0 else None


@pytest.mark.parametrize("seed", range(30))
def test_dp_matches_milp_on_integer_costs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_units = int(rng.integers(2, 9))
    probe = make_problem(np.random.default_rng(seed), n_units, 6, 1.0, integer_costs=True)
    # budget == n_buckets makes the integer cost equal the real cost: no rounding at all.
    cap = int(rng.integers(int(probe.min_cost()), int(probe.max_cost()) + 2))
    problem = make_problem(np.random.default_rng(seed), n_units, 6, float(cap), integer_costs=True)
    # (options dearer than the whole budget are marked unusable as cap + 1)
    assert all(np.array_equal(discretise(c, problem.budget, cap), np.minimum(c, cap + 1)) for c in problem.costs)
    expected = milp_optimum(list(problem.costs), list(problem.errors), cap)
    if expected is None:
        with pytest.raises(InfeasibleBudget):
            DPSearcher(DPConfig(n_buckets=cap)).search(problem, seed=0)
        return
    alloc = DPSearcher(DPConfig(n_buckets=cap)).search(problem, seed=0)
    assert alloc.error == pytest.approx(expected, abs=1e-7)
    assert alloc.info["discrete_error"] == pytest.approx(expected, abs=1e-7)
    assert alloc.cost <= problem.budget
    assert alloc.info["n_buckets"] == cap


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("n_buckets", [7, 50, 1000])
def test_dp_matches_brute_force_on_real_costs(seed: int, n_buckets: int) -> None:
    rng = np.random.default_rng(seed)
    n_units = int(rng.integers(1, 5))
    probe = make_problem(np.random.default_rng(seed), n_units, 4, 1.0)
    budget = float(rng.uniform(probe.min_cost(), probe.max_cost() * 1.1))
    problem = make_problem(np.random.default_rng(seed), n_units, 4, budget)
    ints = [discretise(c, budget, n_buckets) for c in problem.costs]
    best = min(
        (problem.error_of(ch) for ch in itertools.product(*(range(len(o)) for o in problem.options))
         if sum(int(i[j]) for i, j in zip(ints, ch)) <= n_buckets),
        default=None,
    )
    if best is None:  # rounding up made every choice overflow: the DP must say so
        with pytest.raises(InfeasibleBudget, match="n_buckets"):
            DPSearcher(DPConfig(n_buckets=n_buckets)).search(problem, seed=0)
        return
    alloc = DPSearcher(DPConfig(n_buckets=n_buckets)).search(problem, seed=0)
    assert alloc.error == pytest.approx(best, abs=1e-9)
    assert alloc.cost <= budget
    assert sum(int(i[j]) for i, j in zip(ints, alloc.choice)) == alloc.info["discrete_cost"] <= n_buckets


@pytest.mark.parametrize("n_buckets", [1, 7, 13, 100, 10000])
def test_dp_never_exceeds_budget(n_buckets: int) -> None:
    rng = np.random.default_rng(n_buckets)
    for _ in range(40):
        problem = make_problem(rng, int(rng.integers(1, 20)), 8, 1.0)
        budget = float(rng.uniform(problem.min_cost(), problem.max_cost()))
        problem = AllocationProblem(problem.unit_names, problem.unit_kinds, problem.options,
                                    problem.costs, problem.errors, budget)
        try:
            alloc = DPSearcher(DPConfig(n_buckets=n_buckets)).search(problem, seed=0)
        except InfeasibleBudget:
            continue
        assert alloc.cost <= budget
        assert alloc.cost == problem.cost_of(alloc.choice)
        assert alloc.error == problem.error_of(alloc.choice)


def test_discretise_rounds_up() -> None:
    costs = np.array([0.0, 0.1, 0.3, 1 / 3, 0.7, 1.0, 2.0])
    ints = discretise(costs, 1.0, 10)
    assert ints.tolist() == [0, 1, 3, 4, 7, 10, 11]
    fits = ints <= 10
    assert np.all(ints[fits] * 1.0 / 10 >= costs[fits])


def test_dp_infeasible_names_budget_and_minimum() -> None:
    problem = AllocationProblem(("a", "b"), ("mlp", "mlp"), ((1, 2), (1, 2)),
                                (np.array([1.0, 2.0]), np.array([1.5, 3.0])),
                                (np.array([1.0, 0.0]), np.array([1.0, 0.0])), budget=2.0)
    with pytest.raises(InfeasibleBudget, match=r"budget 2\b.*2\.5"):
        DPSearcher().search(problem, seed=0)


def test_dp_zero_budget_with_free_options() -> None:
    problem = AllocationProblem(("a", "b"), ("attn", "mlp"), ((0, 4, 8), (0, 8)),
                                (np.array([0.0, 1.0, 2.0]), np.array([0.0, 3.0])),
                                (np.array([5.0, 1.0, 0.0]), np.array([2.0, 0.0])), budget=0.0)
    alloc = DPSearcher(DPConfig(n_buckets=100)).search(problem, seed=0)
    assert alloc.choice == (0, 0) and alloc.cost == 0.0 and alloc.error == 7.0
    assert alloc.labels(problem) == {"a": 0, "b": 0}
    with pytest.raises(InfeasibleBudget):
        DPSearcher().search(AllocationProblem(problem.unit_names, problem.unit_kinds, problem.options,
                                              problem.costs, problem.errors, budget=-1.0), seed=0)


def test_dp_ties_prefer_lower_cost() -> None:
    # Equal error at every option: the cheapest allocation must win, whatever the order.
    problem = AllocationProblem(("a", "b"), ("mlp", "mlp"), ((1, 2, 3), (1, 2)),
                                (np.array([3.0, 1.0, 2.0]), np.array([2.0, 1.0])),
                                (np.zeros(3), np.zeros(2)), budget=10.0)
    alloc = DPSearcher().search(problem, seed=0)
    assert alloc.choice == (1, 1) and alloc.cost == 2.0
    assert DPSearcher().search(problem, seed=1) == alloc


def test_dp_is_fast_at_model_scale() -> None:
    rng = np.random.default_rng(0)
    problem = make_problem(rng, 60, 15, 1.0)
    problem = AllocationProblem(problem.unit_names, problem.unit_kinds, problem.options, problem.costs,
                                problem.errors, 0.6 * problem.max_cost())
    searcher = DPSearcher(DPConfig(n_buckets=10000))
    t0 = time.perf_counter()
    alloc = searcher.search(problem, seed=0)
    assert time.perf_counter() - t0 < 1.0
    assert alloc.cost <= problem.budget and alloc.searcher == "dp"
    assert math.isfinite(alloc.error)


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_dp_rejects_bad_n_buckets(bad: object) -> None:
    with pytest.raises(ValueError, match="n_buckets"):
        DPSearcher(DPConfig(n_buckets=bad))  # type: ignore[arg-type]


def test_problem_validation_names_unit() -> None:
    with pytest.raises(ValueError, match="'b'.*costs"):
        AllocationProblem(("a", "b"), ("mlp", "mlp"), ((1, 2), (1, 2)),
                          (np.array([1.0, 2.0]), np.array([1.0])),
                          (np.zeros(2), np.zeros(2)), budget=1.0)
    with pytest.raises(ValueError, match="'a'.*errors"):
        AllocationProblem(("a",), ("mlp",), ((1, 2),), (np.ones(2),), (np.array([-1.0, 0.0]),), budget=1.0)
    with pytest.raises(ValueError, match="'a'.*ascending"):
        AllocationProblem(("a",), ("mlp",), ((2, 1),), (np.ones(2),), (np.ones(2),), budget=1.0)
    with pytest.raises(ValueError, match="unit_kinds"):
        AllocationProblem(("a",), (), ((1,),), (np.ones(1),), (np.ones(1),), budget=1.0)


def test_registry_miss_lists_searchers() -> None:
    with pytest.raises(ValueError, match="dp.*uniform"):
        SEARCHERS.get("nope")
