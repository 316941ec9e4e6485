"""evo and tyr specifics: budget-keeping mutations, staged selection's token spend, coarse grids, config errors."""

from __future__ import annotations

import numpy as np
import pytest

from allocator.core.errors import UserInputError
from search import AllocationProblem, ProxyFitness, make_searcher
from search.evo import EvoConfig, LevelMover
from search.tyr import TyrConfig, coarse_grid, coarse_start
from search.uniform import UniformSearcher


def heterogeneous(seed: int = 0, n: int = 10, k: int = 8, budget_frac: float = 0.5) -> AllocationProblem:
    """Per-unit cost and error scales differ a lot, so the optimum is far from uniform."""
    rng = np.random.default_rng(seed)
    costs = tuple(np.sort(rng.uniform(0, 10, k)) * rng.uniform(0.5, 2) for _ in range(n))
    errors = tuple(np.sort(rng.uniform(0, 5, k))[::-1] * rng.uniform(0.2, 3) for _ in range(n))
    return AllocationProblem(
        tuple(f"u{i}" for i in range(n)), ("mlp",) * n, (tuple(range(k)),) * n, costs, errors,
        budget=budget_frac * sum(c.max() for c in costs),
    )


def test_mutations_keep_the_budget_and_change_something():
    problem = heterogeneous()
    start = UniformSearcher().search(problem).choice
    mover = LevelMover(problem)
    rng = np.random.default_rng(0)
    children = [mover.mutate(start, rng, max_moves=3) for _ in range(200)]
    assert all(problem.cost_of(c) <= problem.budget for c in children)
    assert sum(c != start for c in children) > 150


def test_stride_moves_on_a_coarse_grid():
    problem = heterogeneous(k=9)
    mover = LevelMover(problem, stride=4)
    assert mover.step(0, 0, up=True) == 4 and mover.step(0, 4, up=True) == 8 and mover.step(0, 8, up=True) is None
    assert mover.step(0, 2, up=False) == 0  # clipped at the cheapest option
    assert coarse_grid(problem, 4)[0] == [0, 4, 8]
    start = coarse_start(problem, 4, "dp")
    assert all(j in (0, 4, 8) for j in start) and problem.cost_of(start) <= problem.budget


def test_staged_selection_spends_the_configured_tokens_per_generation():
    problem = heterogeneous()
    cfg = EvoConfig(init="uniform", generations=3, offspring=6, stage_tokens=[64, 256], stage_survivors=[2, 1])
    fitness = ProxyFitness(problem, seq_len=64, pool_sequences=8)
    alloc = make_searcher(cfg).search(problem, seed=0, fitness=fitness)
    # Parent once on 4 sequences, then per generation at most 6 children x 1 sequence + 2 survivors x 4 sequences.
    assert alloc.info["tokens_spent"] <= 64 * (4 + 3 * (6 * 1 + 2 * 4))
    assert alloc.info["generations"] == 3


@pytest.mark.parametrize("name", ["evo", "tyr"])
def test_improves_on_a_noisy_fitness_from_uniform(name):
    problem = heterogeneous(seed=2)
    start = UniformSearcher().search(problem)
    cls = EvoConfig if name == "evo" else TyrConfig
    cfg = cls(name=name, init="uniform", generations=150)
    alloc = make_searcher(cfg).search(problem, seed=1, fitness=ProxyFitness(problem, noise=0.05))
    assert alloc.cost <= problem.budget
    assert alloc.error < 0.9 * start.error
    trace = alloc.info["trace"]
    assert [t["tokens_spent"] for t in trace] == sorted(t["tokens_spent"] for t in trace)


def test_tyr_splits_a_token_bound_across_stages():
    problem = heterogeneous()
    cfg = TyrConfig(init="uniform", max_tokens=64 * 16 * 60, stage_generations=[10**6] * 3)
    alloc = make_searcher(cfg).search(problem, seed=0, fitness=ProxyFitness(problem))
    stages = alloc.info["stages"]
    assert [s["stride"] for s in stages] == [4, 2, 1] and all(s["generations"] > 0 for s in stages)
    spent = [b["tokens_spent"] - a for a, b in zip([0] + [s["tokens_spent"] for s in stages], stages)]
    assert max(spent) < 2.5 * min(spent)  # roughly equal shares, not all in the coarse stage
    assert 0.8 * cfg.max_tokens <= alloc.info["tokens_spent"] <= cfg.max_tokens  # never over the bound


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"init": "best"}, "searcher.init='best' is unknown; valid: dp, uniform"),
        ({"offspring": 0}, "searcher.offspring=0 must be >= 1"),
        ({"stage_tokens": [256], "stage_survivors": [2, 1]}, "must be non-empty and of equal length"),
        ({"stage_tokens": [1024, 256]}, "non-decreasing"),
        ({"stage_survivors": [1, 2]}, "ending in 1"),
        ({"offspring": 1, "stage_survivors": [2, 1]}, "exceeds searcher.offspring=1"),
    ],
)
def test_bad_evo_config(changes, message):
    with pytest.raises(UserInputError, match=message.replace("[", r"\[").replace("(", r"\(")):
        make_searcher(EvoConfig(**changes))


def test_bad_tyr_strides():
    with pytest.raises(UserInputError, match="end in 1"):
        make_searcher(TyrConfig(strides=[4, 2], stage_generations=[1, 1]))


def test_needs_a_fitness():
    with pytest.raises(ValueError, match="needs a Fitness"):
        make_searcher(EvoConfig()).search(heterogeneous())


def test_evo_never_spends_more_than_its_token_bound():
    """A generation starts only if its worst case fits: searchers compare at equal token budgets."""
    problem = heterogeneous()
    for bound in (64 * 16 * 7, 64 * 16 * 20 + 100):
        cfg = EvoConfig(init="uniform", max_tokens=bound, generations=10**6)
        alloc = make_searcher(cfg).search(problem, seed=0, fitness=ProxyFitness(problem))
        assert 0 < alloc.info["generations"] and alloc.info["tokens_spent"] <= bound
