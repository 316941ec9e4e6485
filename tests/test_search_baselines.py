"""The owl and random baselines, and the OWL outlier ratios they start from."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from allocator.core.errors import UserInputError
from allocator.levels.compress.outliers import layer_outlier_ratios
from allocator.model.surgery import decoder_layers
from search.base import AllocationProblem, InfeasibleBudget, make_searcher
from search.fitness import ProxyFitness
from search.owl import OwlConfig, normalised_ratios
from search.random_search import RandomConfig

MLP = (0, 16, 32, 48, 64, 80, 96, 112, 128)


def problem(ratios: list[float], budget_frac: float, costs: list[np.ndarray] | None = None) -> AllocationProblem:
    """One MLP unit per ratio with cost = kept fraction: the budget is the mean kept fraction times the units."""
    n = len(ratios)
    frac = np.asarray(MLP, dtype=float) / MLP[-1]
    costs = costs or [frac] * n
    return AllocationProblem(
        tuple(f"layer{i:02d}.mlp" for i in range(n)), ("mlp",) * n, (MLP,) * n, tuple(costs),
        tuple(1 - frac for _ in range(n)), budget_frac * n, outlier_ratios=tuple(ratios),
    )


def owl(p: AllocationProblem, lam: float = 0.08):
    return make_searcher(OwlConfig(lam=lam)).search(p)


def kept(p: AllocationProblem, choice: tuple[int, ...]) -> np.ndarray:
    return np.array([p.options[u][j] / p.options[u][-1] for u, j in enumerate(choice)])


def test_problem_validates_outlier_ratios() -> None:
    p = problem([0.1, 0.2], 0.5)
    assert p.outlier_ratios == (0.1, 0.2) and all(type(r) is float for r in p.outlier_ratios)
    for bad in ((0.1,), (0.1, -0.1), (0.1, math.nan)):
        with pytest.raises(ValueError, match="outlier_ratios"):
            AllocationProblem(p.unit_names, p.unit_kinds, p.options, p.costs, p.errors, p.budget, outlier_ratios=bad)


def test_owl_keeps_more_where_outliers_are() -> None:
    ratios = [0.01, 0.05, 0.02, 0.09, 0.03, 0.07]
    p = problem(ratios, 0.5)
    alloc = owl(p, lam=0.2)
    fractions = kept(p, alloc.choice)
    order = np.argsort(ratios)
    assert np.all(np.diff(fractions[order]) >= 0), fractions
    assert fractions[order[-1]] > fractions[order[0]]
    assert alloc.cost <= p.budget


def test_owl_takes_the_largest_base_that_fits() -> None:
    # Reference: a fine scan of base, nearest option per unit, the last base that fits.
    rng = np.random.default_rng(0)
    ratios = list(rng.uniform(0, 0.1, 6))
    costs = [np.sort(rng.uniform(0, 1, len(MLP))) for _ in ratios]
    p = problem(ratios, 0.0, costs)
    p = AllocationProblem(p.unit_names, p.unit_kinds, p.options, p.costs, p.errors,
                          p.min_cost() + 0.55 * (p.max_cost() - p.min_cost()), outlier_ratios=p.outlier_ratios)
    frac = np.asarray(MLP) / MLP[-1]
    shift = 0.1 * normalised_ratios(p.outlier_ratios)
    expected = None
    for base in np.linspace(-0.5, 1.5, 20001):
        choice = tuple(int(np.abs(frac - (base + s)).argmin()) for s in shift)
        if p.cost_of(choice) <= p.budget:
            expected = choice
    alloc = owl(p, lam=0.1)
    assert alloc.choice == expected
    assert alloc.info["base"] is not None and not alloc.info["repaired"]


def test_owl_respects_lam() -> None:
    ratios = [0.0, 0.02, 0.05, 0.1]
    p = problem(ratios, 0.5)
    assert len(set(owl(p, lam=0.0).choice)) == 1  # no deviation allowed: every unit the same
    step = 1 / (len(MLP) - 1)
    for lam in (0.1, 0.25):
        spread = np.ptp(kept(p, owl(p, lam=lam).choice))
        assert spread <= 2 * lam + step + 1e-9  # rounding to the nearest option adds at most one step
        assert spread >= 2 * lam - step - 1e-9


def test_owl_equal_ratios_are_uniform() -> None:
    assert len(set(owl(problem([0.03] * 5, 0.6), lam=0.3).choice)) == 1


def test_owl_errors() -> None:
    p = problem([0.1, 0.2], 0.5)
    bare = AllocationProblem(p.unit_names, p.unit_kinds, p.options, p.costs, p.errors, p.budget)
    with pytest.raises(ValueError, match="outlier_ratios.*model"):
        owl(bare)
    with pytest.raises(InfeasibleBudget):
        owl(problem([0.1, 0.2], -0.1))
    for lam in (-0.1, 1.5, math.nan, True):
        with pytest.raises(UserInputError, match="lam"):
            make_searcher(OwlConfig(lam=lam))


def test_owl_repairs_when_costs_do_not_rise_with_kept_count() -> None:
    # Half width is the cheap option of both units, but with lam = 0.5 OWL never has both at half at once (one
    # unit's fraction sits 1.0 above the other's), so no base fits and the lowest-base allocation is repaired.
    costs = (np.array([5.0, 1.0, 5.0]),) * 2
    p = AllocationProblem(("a", "b"), ("mlp",) * 2, ((0, 64, 128),) * 2, costs, (np.array([1.0, 0.5, 0.0]),) * 2,
                          2.0, outlier_ratios=(0.0, 1.0))
    alloc = owl(p, lam=0.5)
    assert alloc.info["repaired"] and alloc.choice == (1, 1) and alloc.cost <= p.budget


def random_search(p: AllocationProblem, seed: int = 0, **options):
    fitness = ProxyFitness(p, seq_len=64, pool_sequences=16)
    return make_searcher(RandomConfig(**options)).search(p, seed=seed, fitness=fitness), fitness


def test_random_samples_bound_and_trace() -> None:
    p = problem([0.0] * 6, 0.5)
    alloc, fitness = random_search(p, samples=5, sample_tokens=128)
    assert alloc.info["samples"] == 5 and fitness.evaluations <= 5
    assert alloc.info["tokens_spent"] == fitness.evaluations * 128  # 2 sequences of 64 per evaluation
    values = [t["fitness"] for t in alloc.info["trace"]]
    assert values == sorted(values, reverse=True) and values[-1] == alloc.error
    assert alloc.cost <= p.budget


def test_random_stops_at_max_tokens() -> None:
    alloc, fitness = random_search(problem([0.0] * 8, 0.5), samples=10**4, sample_tokens=64, max_tokens=640)
    assert alloc.info["samples"] == 10 and fitness.tokens_spent == 640


def test_random_errors() -> None:
    p = problem([0.0, 0.0], 0.5)
    with pytest.raises(ValueError, match="needs a Fitness"):
        make_searcher(RandomConfig()).search(p, fitness=None)
    with pytest.raises(InfeasibleBudget):
        random_search(problem([0.0, 0.0], -0.1))
    for field, value in (("samples", 0), ("sample_tokens", 0), ("samples", 2.5)):
        with pytest.raises(UserInputError, match=field):
            make_searcher(RandomConfig(**{field: value}))


def test_layer_outlier_ratios_tiny(tiny) -> None:
    loaded, space = tiny
    shape = space.shape
    model = copy.deepcopy(loaded.model)  # the fixture is shared: inject the outlier into a copy
    tokens = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    before = layer_outlier_ratios(model, tokens, batch_size=2)
    assert len(before) == shape.num_layers and all(0 <= r <= 1 for r in before)
    with torch.no_grad():
        # One massive input channel to layer 1's MLP: its gate/up columns become outliers (the residual carries
        # part of it on to later layers, so only layer 1's rise is asserted).
        decoder_layers(model)[1].post_attention_layernorm.weight[3] *= 50
    after = layer_outlier_ratios(model, tokens, batch_size=2)
    assert after[1] > 1.2 * before[1] and after[0] == before[0]
    assert after[0] == before[0]  # layer 0's weights and inputs are unchanged
    with pytest.raises(ValueError, match="threshold"):
        layer_outlier_ratios(model, tokens, threshold=0)
