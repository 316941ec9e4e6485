"""The uniform baseline: the same kept fraction in every unit, or the nearest allocation to it that fits; and
uniform_best, the older rule: one option label per unit kind, the best by proxy error that fits the budget."""

from __future__ import annotations

import itertools
from dataclasses import replace

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
def test_uniform_best_matches_brute_force(seed: int) -> None:
    problem = make_problem(np.random.default_rng(seed), n_layers=int(np.random.default_rng(seed).integers(1, 6)))
    kinds = problem.unit_kinds
    fits = []
    for ia, im in itertools.product(range(3), range(5)):
        choice = tuple(ia if k == "attn" else im for k in kinds)
        if problem.cost_of(choice) <= problem.budget:
            fits.append((problem.error_of(choice), problem.cost_of(choice), choice))
    searcher = SEARCHERS.get("uniform_best")()
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


def test_uniform_best_generous_budget_takes_least_error() -> None:
    problem = make_problem(np.random.default_rng(0), 3, budget=1e9)
    alloc = SEARCHERS.get("uniform_best")().search(problem, seed=0)
    assert alloc.error == pytest.approx(sum(float(e.min()) for e in problem.errors))
    assert alloc.searcher == "uniform_best"


def test_uniform_best_infeasible_names_budget_and_minimum() -> None:
    problem = make_problem(np.random.default_rng(1), 2, budget=0.0)
    cheapest = problem.cost_of((0,) * problem.n_units)
    with pytest.raises(InfeasibleBudget, match=rf"budget 0\b.*{cheapest:.6g}"):
        SEARCHERS.get("uniform_best")().search(problem, seed=0)


def test_uniform_best_rejects_mixed_labels_within_kind() -> None:
    problem = AllocationProblem(("a", "b"), ("mlp", "mlp"), ((1, 2), (1, 3)),
                                (np.ones(2), np.ones(2)), (np.ones(2), np.ones(2)), budget=5.0)
    with pytest.raises(ValueError, match="'mlp'.*different option labels"):
        SEARCHERS.get("uniform_best")().search(problem, seed=0)


def test_uniform_best_never_beats_dp() -> None:
    # Uniform searches a subset of the DP's space: whenever its pick also fits the DP's rounded-up
    # costs, the DP must do at least as well.
    from search.dp import discretise

    rng = np.random.default_rng(3)
    compared = 0
    for _ in range(20):
        problem = make_problem(rng, 4)
        try:
            u = SEARCHERS.get("uniform_best")().search(problem, seed=0)
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
    assert {"dp", "uniform", "uniform_best"} <= set(SEARCHERS.names())
    with pytest.raises(ValueError, match="dp.*uniform"):
        SEARCHERS.get("nope")


# --- uniform: the same kept fraction in every unit ---------------------------------------------------------------

ATTN_SIZE, MLP_SIZE = 100, 300  # weights per unit: costs are kept weights, so integers and exact sums


def sparse_problem(n_layers: int, sparsity: float, dense: bool = True, **extra) -> AllocationProblem:
    """An unstructured-like space: every unit prunable to 10..90% (kept tenths 1..9) or dense, costs in kept weights,
    budget = (1 - sparsity) of the weights: every unit at `sparsity` uses it exactly."""
    tenths = list(range(1, 10)) + ([10] if dense else [])
    names, kinds, options, costs, errors, fractions = [], [], [], [], [], []
    for layer in range(n_layers):
        for kind, size in (("attn", ATTN_SIZE), ("mlp", MLP_SIZE)):
            names.append(f"layer{layer:02d}.{kind}")
            kinds.append(kind)
            options.append(tuple(f"unstructured{100 - 10 * t}" if t < 10 else "dense" for t in tenths))
            costs.append(np.array([size * t // 10 for t in tenths], dtype=float))
            # The proxy prefers pruning attention: what misled the best-per-kind rule on SmolLM2.
            errors.append(np.array([(10 - t) ** 2 * (0.1 if kind == "attn" else 1.0) for t in tenths], dtype=float))
            fractions.append(np.array(tenths, dtype=float) / 10)
    total = n_layers * (ATTN_SIZE + MLP_SIZE)
    return AllocationProblem(tuple(names), tuple(kinds), tuple(options), tuple(costs), tuple(errors),
                             budget=round((1 - sparsity) * total), kept_fractions=tuple(fractions), **extra)


def uniform(problem: AllocationProblem):
    return SEARCHERS.get("uniform")().search(problem, seed=0)


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_uniform_gives_every_unit_the_same_sparsity_when_the_options_allow(sparsity: float) -> None:
    problem = sparse_problem(6, sparsity)
    alloc = uniform(problem)
    want = f"unstructured{round(100 * sparsity)}"
    assert set(alloc.labels(problem).values()) == {want}
    assert alloc.cost == problem.budget and alloc.info["raised"] == alloc.info["below"] == 0


def test_uniform_best_trusts_the_proxy_across_kinds() -> None:
    # The proxy here says attention is cheap to prune; the older rule prunes it harder, uniform does not.
    problem = sparse_problem(6, 0.5)
    best = SEARCHERS.get("uniform_best")().search(problem, seed=0).labels(problem)
    sparsity = {kind: int(best[f"layer00.{kind}"].removeprefix("unstructured")) for kind in ("attn", "mlp")}
    assert sparsity["attn"] > 50 > sparsity["mlp"]  # attention 80%, MLP 40%
    assert set(uniform(problem).labels(problem).values()) == {"unstructured50"}


def test_uniform_is_deterministic_and_fits() -> None:
    rng = np.random.default_rng(0)
    for _ in range(30):
        problem = make_problem(rng, int(rng.integers(1, 6)))
        try:
            first = uniform(problem)
        except InfeasibleBudget:
            continue
        assert problem.fits(first.choice) and first.cost <= problem.budget
        assert uniform(problem).choice == first.choice
        # Units of a kind (same options and costs here) hold at most two adjacent levels.
        for kind in ("attn", "mlp"):
            picked = sorted({j for j, k in zip(first.choice, problem.unit_kinds) if k == kind})
            assert len(picked) <= 2 and picked[-1] - picked[0] <= 1, (kind, first.choice)


def test_uniform_dense_when_the_budget_allows() -> None:
    problem = sparse_problem(3, 0.0)
    assert set(uniform(problem).labels(problem).values()) == {"dense"}


def test_uniform_rounding_leaves_the_fewest_units_one_level_lower() -> None:
    """SmolLM2's shapes: 70% of a 576-column row prunes 403 weights, so every unit at 70% keeps 0.1% more than
    budget.sparsity=0.7 allows; the nearest allocation that fits keeps 70% in all but one (MLP) unit."""
    from allocator.core.budget import param_sparsity
    from allocator.core.config import SpaceConfig
    from allocator.core.space import ModelShape, build_space, option_params

    shape = ModelShape(num_layers=30, hidden=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate=1536, vocab=49152)
    space = build_space(shape, SpaceConfig(kind="unstructured", allow_drop=False))
    kept = [np.array([float(option_params(shape, u.kind, o)) for o in u.options]) for u in space.units]
    dense = sum(k[-1] for k in kept)
    for sparsity, want in ((0.5, "unstructured50"), (0.7, "unstructured70")):
        problem = AllocationProblem(
            tuple(u.name for u in space.units), tuple(u.kind for u in space.units), tuple(u.options for u in space.units),
            tuple(kept), tuple(np.ones(len(k)) for k in kept), budget=(1 - sparsity) * dense,
            kept_fractions=tuple(k / k[-1] for k in kept),
        )
        labels = uniform(problem).labels(problem)
        off = {n: o for n, o in labels.items() if o != want}
        assert param_sparsity(space, labels) >= sparsity
        if sparsity == 0.5:
            assert not off  # exact: 288 of 576 and 768 of 1536
        else:
            assert off == {"layer29.mlp": "unstructured80"}, off  # cheapest raises first, then unit order


def structured_problem(n_layers: int, kept_share: float) -> AllocationProblem:
    """SmolLM2's structured options (KV groups 0..3 of 3, MLP neurons in steps of 128 of 1536), costs in weights."""
    attn_size, mlp_size = 884736, 2654208  # per layer, both divisible by 3 and by 12
    names, kinds, options, costs = [], [], [], []
    for layer in range(n_layers):
        for kind, opts, size in (("attn", (0, 1, 2, 3), attn_size), ("mlp", tuple(range(0, 1537, 128)), mlp_size)):
            names.append(f"layer{layer:02d}.{kind}")
            kinds.append(kind)
            options.append(opts)
            costs.append(np.array([size * o // opts[-1] for o in opts], dtype=float))
    budget = kept_share * n_layers * (attn_size + mlp_size)
    return AllocationProblem(tuple(names), tuple(kinds), tuple(options), tuple(costs),
                             tuple(np.zeros(len(o)) for o in options), budget=budget)


def test_uniform_nearest_structured_option() -> None:
    # Kept 75%: MLP 1152/1536 exactly; attention has no 3/4 and takes its nearest, 2 of 3 KV groups. That leaves
    # 73728 weights a layer; the next allocation on the chain (MLP 1280) needs 221184 a unit, so 10 of 30 MLP
    # units (the first in unit order) are raised and the rest stay at 1152.
    problem = structured_problem(30, 0.75)
    alloc = uniform(problem)
    labels = alloc.labels(problem)
    assert {labels[n] for n in problem.unit_names if n.endswith("attn")} == {2}
    mlp = [labels[n] for n in problem.unit_names if n.endswith("mlp")]
    assert mlp == [1280] * 10 + [1152] * 20
    assert alloc.info["raised"] == 10 and alloc.info["below"] == 20 and alloc.cost == problem.budget


def test_uniform_midpoint_takes_the_smaller_fraction() -> None:
    # Kept 50%: attention's 1/3 and 2/3 are equally near; every unit takes 1/3 (never more than asked unless strictly
    # nearer), and then only the units the budget still pays for are raised to 2/3.
    problem = structured_problem(4, 0.5)
    labels = uniform(problem).labels(problem)
    assert {labels[n] for n in problem.unit_names if n.endswith("mlp")} == {768}
    attn = [labels[n] for n in problem.unit_names if n.endswith("attn")]
    # slack per layer: 0.5 * 3538944 - (294912 + 1327104) = 147456; a raise costs 294912: 2 of 4.
    assert attn == [2, 2, 1, 1]
    tight = replace(problem, budget=problem.cost_of(uniform(problem).choice) - 1.0)
    assert [uniform(tight).labels(tight)[n] for n in problem.unit_names if n.endswith("attn")] == [2, 1, 1, 1]


def test_uniform_equal_fractions_go_to_the_cheapest_then_least_error() -> None:
    # A mixed-space MLP at 50%: a width, an unstructured and an N:M option keep the same fraction.
    options = (("0", "768", "unstructured50", "2:4", "1536"),) * 2
    fractions = (np.array([0.0, 0.5, 0.5, 0.5, 1.0]),) * 2
    errors = (np.array([9.0, 3.0, 1.0, 2.0, 0.0]),) * 2
    for costs, want in (((np.array([0.0, 5.0, 6.0, 4.0, 10.0]),) * 2, "2:4"),
                        ((np.array([0.0, 5.0, 5.0, 5.0, 10.0]),) * 2, "unstructured50")):
        problem = AllocationProblem(("a", "b"), ("mlp", "mlp"), options, costs, errors, budget=12.0,
                                    kept_fractions=fractions)
        assert set(uniform(problem).labels(problem).values()) == {want}


def test_uniform_respects_a_second_limit() -> None:
    # The budget allows dense; a memory-like second limit (kept weights plus a per-unit constant) allows 50%.
    problem = sparse_problem(4, 0.0)
    second = tuple(c + 7.0 for c in problem.costs)
    cap = sum(float(c[4]) for c in second)  # every unit at 50%
    limited = replace(problem, second_costs=second, second_budget=cap)
    alloc = uniform(limited)
    assert set(alloc.labels(limited).values()) == {"unstructured50"} and limited.fits(alloc.choice)
    below = replace(limited, second_budget=cap - 1.0)
    alloc = uniform(below)
    assert limited.second_cost_of(alloc.choice) <= cap - 1.0
    assert set(alloc.labels(below).values()) == {"unstructured50", "unstructured60"}  # the nearest that fits


def test_uniform_infeasible_when_no_same_fraction_allocation_fits() -> None:
    # CPU-like costs where a sparse option is slower than dense: only mixed fractions fit, which uniform never takes.
    problem = AllocationProblem(
        ("a", "b"), ("mlp", "mlp"), (("unstructured50", "dense"),) * 2,
        (np.array([10.0, 1.0]), np.array([1.0, 10.0])), (np.zeros(2), np.zeros(2)), budget=2.0,
        kept_fractions=(np.array([0.5, 1.0]),) * 2,
    )
    with pytest.raises(InfeasibleBudget, match="no same-kept-fraction allocation fits budget 2; the cheapest of them costs 11"):
        uniform(problem)


def test_evo_and_tyr_start_from_it_on_sparse_labels() -> None:
    from search import ProxyFitness, make_searcher
    from search.evo import EvoConfig
    from search.tyr import coarse_grid, coarse_start

    problem = sparse_problem(3, 0.7)
    start = uniform(problem).choice
    alloc = make_searcher(EvoConfig(init="uniform", generations=1)).search(problem, seed=0, fitness=ProxyFitness(problem))
    assert alloc.info["trace"][0]["choice"] == list(start)
    # Tyr's first stage: uniform on the coarse grid, by the full problem's kept fractions (sparse labels have none).
    assert coarse_start(problem, 1, "uniform") == start
    coarse = coarse_start(problem, 4, "uniform")
    grids = coarse_grid(problem, 4)
    assert all(j in grid for j, grid in zip(coarse, grids)) and problem.fits(coarse)
