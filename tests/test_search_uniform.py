"""The uniform searcher: one option label per unit kind, best that fits the budget."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from search import SEARCHERS, AllocationProblem, InfeasibleBudget
from search.dp import DPConfig, DPSearcher


def make_problem(rng: np.random.Generator, n_layers: int, budget: float | None = None) -> AllocationProblem:
    attn_labels, mlp_labels = (0, 2, 4), (0, 128, 256, 384, 512)
    names, kinds, options, costs, errors = [], [], [], [], []
    for layer in range(n_layers):
        for kind, labels in (("attn", attn_labels), ("mlp", mlp_labels)):
            names.append(f"layers.{layer}.{kind}")
            kinds.append(kind)
            options.append(labels)
            costs.append(np.sort(rng.uniform(0, 3, size=len(labels))))
            errors.append(np.sort(rng.uniform(0, 2, size=len(labels)))[::-1])
    problem = AllocationProblem(tuple(names), tuple(kinds), tuple(options), tuple(costs), tuple(errors), 0.0)
    if budget is None:
        budget = float(rng.uniform(problem.min_cost(), problem.max_cost()))
    return AllocationProblem(problem.unit_names, problem.unit_kinds, problem.options, problem.costs,
                             problem.errors, budget)


@pytest.mark.parametrize("seed", range(25))
def test_uniform_matches_brute_force(seed: int) -> None:
    problem = make_problem(np.random.default_rng(seed), n_layers=int(np.random.default_rng(seed).integers(1, 6)))
    kinds = problem.unit_kinds
    fits = []
    for ia, im in itertools.product(range(3), range(5)):
        choice = tuple(ia if k == "attn" else im for k in kinds)
        if problem.cost_of(choice) <= problem.budget:
            fits.append((problem.error_of(choice), problem.cost_of(choice), choice))
    searcher = SEARCHERS.get("uniform")()
    if not fits:
        with pytest.raises(InfeasibleBudget):
            searcher.search(problem, seed=0)
        return
    alloc = searcher.search(problem, seed=0)
    best_error, best_cost, _ = min(fits, key=lambda t: t[:2])
    assert alloc.error == best_error and alloc.cost == best_cost
    assert alloc.cost <= problem.budget
    labels = alloc.labels(problem)
    assert len({labels[n] for n, k in zip(problem.unit_names, kinds) if k == "attn"}) == 1
    assert len({labels[n] for n, k in zip(problem.unit_names, kinds) if k == "mlp"}) == 1
    assert alloc.info["labels_per_kind"] == {"attn": labels[problem.unit_names[0]],
                                             "mlp": labels[problem.unit_names[1]]}


def test_uniform_generous_budget_takes_least_error() -> None:
    problem = make_problem(np.random.default_rng(0), 3, budget=1e9)
    alloc = SEARCHERS.get("uniform")().search(problem, seed=0)
    assert alloc.error == pytest.approx(sum(float(e.min()) for e in problem.errors))
    assert alloc.searcher == "uniform"


def test_uniform_infeasible_names_budget_and_minimum() -> None:
    problem = make_problem(np.random.default_rng(1), 2, budget=0.0)
    cheapest = problem.cost_of((0,) * problem.n_units)
    with pytest.raises(InfeasibleBudget, match=rf"budget 0\b.*{cheapest:.6g}"):
        SEARCHERS.get("uniform")().search(problem, seed=0)


def test_uniform_rejects_mixed_labels_within_kind() -> None:
    problem = AllocationProblem(("a", "b"), ("mlp", "mlp"), ((1, 2), (1, 3)),
                                (np.ones(2), np.ones(2)), (np.ones(2), np.ones(2)), budget=5.0)
    with pytest.raises(ValueError, match="'mlp'.*different option labels"):
        SEARCHERS.get("uniform")().search(problem, seed=0)


def test_uniform_never_beats_dp() -> None:
    # Uniform searches a subset of the DP's space: whenever its pick also fits the DP's rounded-up
    # costs, the DP must do at least as well.
    from search.dp import discretise

    rng = np.random.default_rng(3)
    compared = 0
    for _ in range(20):
        problem = make_problem(rng, 4)
        try:
            u = SEARCHERS.get("uniform")().search(problem, seed=0)
        except InfeasibleBudget:
            continue
        n = 100000
        d = DPSearcher(DPConfig(n_buckets=n)).search(problem, seed=0)
        assert d.cost <= problem.budget
        if sum(int(discretise(c, problem.budget, n)[j]) for c, j in zip(problem.costs, u.choice)) <= n:
            assert d.error <= u.error + 1e-9
            compared += 1
    assert compared >= 5


def test_registry_names() -> None:
    assert {"dp", "uniform"} <= set(SEARCHERS.names())
    with pytest.raises(ValueError, match="dp.*uniform"):
        SEARCHERS.get("nope")
