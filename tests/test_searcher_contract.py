"""One contract every registered searcher keeps: within budget, reproducible per seed, seed-sensitive only when
stochastic, non-baselines better than random at equal tokens, InfeasibleBudget when nothing fits, token bounds
honoured. Every module of the `search` package is imported, so a searcher added later is covered with no edit here."""

from __future__ import annotations

import importlib
import itertools
import pkgutil
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

import search
from search.base import (
    SEARCHERS,
    Allocation,
    AllocationProblem,
    ConfiguredSearcher,
    InfeasibleBudget,
    SearcherConfig,
    make_searcher,
    register_searcher,
)
from search.fitness import ProxyFitness

for _module in pkgutil.iter_modules(search.__path__):
    importlib.import_module(f"search.{_module.name}")  # registers whatever searchers it defines

NAMES = SEARCHERS.names()
# Fitness: 64-token sequences, a pool of 16, so one evaluation costs 64..1024 tokens.
SEQ_LEN, POOL = 64, 16
# 256 full-pool evaluations: generous for the 8-unit problems below (a coarse-to-fine schedule can finish), yet fast.
MAX_TOKENS = 256 * SEQ_LEN * POOL
# A small budget: a few dozen evaluations, below what any searcher would want by default.
SMALL_TOKENS = 16 * SEQ_LEN * POOL
REL_TOL = 0.03  # "within a few %" of the brute-force optimum


def synthetic(
    seed: int, n_layers: int, budget_frac: float, per_unit_costs: bool = True, jitter: float = 1.0,
    attn: tuple[int, ...] = (0, 1, 2), mlp: tuple[int, ...] = (0, 32, 64, 96, 128),
) -> AllocationProblem:
    """Costs rise and errors fall (convexly) with the kept fraction; per-unit scales make the optimum non-uniform.
    jitter < 1 shrinks the per-unit differences, giving many near-optimal allocations."""
    rng = np.random.default_rng(seed)
    names, kinds, options, costs, errors, ratios = [], [], [], [], [], []
    for layer in range(n_layers):
        ratio = float(rng.uniform(0, 0.1))
        for kind, labels in (("attn", attn), ("mlp", mlp)):
            frac = np.asarray(labels, dtype=float) / labels[-1]
            c_scale = float(rng.uniform(0.5, 2.0)) if per_unit_costs else 1.0
            e_scale = 1.0 + jitter * float(rng.uniform(-0.8, 2.0))
            names.append(f"layer{layer:02d}.{kind}")
            kinds.append(kind)
            options.append(labels)
            costs.append(c_scale * (frac * (2.0 if kind == "mlp" else 1.0) + 0.1 * (frac > 0)))
            errors.append(e_scale * (1 - frac) ** 2 + jitter * 0.01 * rng.uniform(0, 1, len(labels)) * (1 - frac))
            ratios.append(ratio)
    problem = AllocationProblem(
        tuple(names), tuple(kinds), tuple(options), tuple(costs), tuple(errors), 0.0, outlier_ratios=tuple(ratios)
    )
    low, high = problem.min_cost(), problem.max_cost()
    return with_budget(problem, low + budget_frac * (high - low) if budget_frac else low)


def with_budget(problem: AllocationProblem, budget: float) -> AllocationProblem:
    return AllocationProblem(problem.unit_names, problem.unit_kinds, problem.options, problem.costs, problem.errors,
                             budget, outlier_ratios=problem.outlier_ratios)


def build(name: str, max_tokens: int = MAX_TOKENS, **options):
    return make_searcher(SEARCHERS.get(name).Config(name=name, max_tokens=max_tokens, **options))


def run(name: str, problem: AllocationProblem, seed: int = 0, noise: float = 0.0, max_tokens: int = MAX_TOKENS,
        scored_on: AllocationProblem | None = None, **options) -> Allocation:
    """Search `problem`; the fitness is the additive error of `scored_on` (default: the problem itself)."""
    fitness = ProxyFitness(scored_on or problem, noise=noise, seed=0, seq_len=SEQ_LEN, pool_sequences=POOL)
    alloc = build(name, max_tokens, **options).search(problem, seed=seed, fitness=fitness)
    # Reported cost and error are the problem's own sums for the choice.
    assert alloc.searcher == name
    assert alloc.cost == problem.cost_of(alloc.choice) and alloc.error == problem.error_of(alloc.choice)
    return alloc


def brute_force(problem: AllocationProblem) -> float:
    """Least proxy error over every allocation that fits."""
    grid = np.array(list(itertools.product(*(range(len(o)) for o in problem.options))))
    units = np.arange(problem.n_units)
    cost = np.stack([problem.costs[u][grid[:, u]] for u in units]).sum(0)
    error = np.stack([problem.errors[u][grid[:, u]] for u in units]).sum(0)
    return float(error[cost <= problem.budget - 1e-9].min())


def trace_of(alloc: Allocation) -> list:
    return [t["choice"] for t in alloc.info.get("trace", [])]


# Small enough to brute-force (3^4 * 5^4 allocations), large enough that random sampling rarely hits the optimum.
QUALITY_PROBLEMS = [synthetic(11, 4, 0.45), synthetic(12, 4, 0.6)]


@lru_cache(maxsize=None)
def random_error(index: int) -> float:
    """Random search spending the same tokens as the searcher it is compared with."""
    return run("random", QUALITY_PROBLEMS[index], samples=10**4).error


@pytest.mark.parametrize("name", NAMES)
def test_traits(name: str) -> None:
    cls = SEARCHERS.get(name)
    assert cls.name == name
    assert issubclass(cls.Config, SearcherConfig)
    assert all(isinstance(getattr(cls, t), bool) for t in ("stochastic", "baseline", "uses_fitness"))


@pytest.mark.parametrize("name", NAMES)
def test_hydra_group_file_selects_it(name: str) -> None:
    """conf/searcher/<name>.yaml exists and composes to the searcher's own Config, named by the Config alone."""
    cfg = compose_search([f"searcher={name}"])
    assert cfg.searcher.name == name and OmegaConf.get_type(cfg.searcher) is SEARCHERS.get(name).Config


def test_default_searcher_is_the_same_in_python_and_conf() -> None:
    assert compose_search([]).searcher.name == SearcherConfig().name == "milp"
    assert SearcherConfig().name in SEARCHERS


def test_register_searcher_needs_a_config_that_names_it() -> None:
    class Unnamed(ConfiguredSearcher):
        Config = SearcherConfig  # the shared options only: its name default is the default searcher's

    with pytest.raises(TypeError, match="sets its own name"):
        register_searcher(Unnamed)
    assert SEARCHERS.get("milp") is not Unnamed


@lru_cache(maxsize=None)
def _hydra_ready() -> Path:
    from allocator.app.config import register_configs

    register_configs()
    return Path(__file__).resolve().parent.parent / "conf"


def compose_search(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(_hydra_ready()), version_base=None):
        return compose("search", overrides=overrides)


@pytest.mark.parametrize("name", NAMES)
def test_respects_budget(name: str) -> None:
    problems = [
        synthetic(1, 3, 0.3, per_unit_costs=False),
        synthetic(2, 4, 0.5),
        synthetic(3, 4, 0.85),
        synthetic(4, 2, 0.01),  # barely above the minimum cost: little but the cheapest allocation fits
    ]
    for problem in problems:
        alloc = run(name, problem)
        assert alloc.cost <= problem.budget, (name, problem.budget, alloc)


def with_second_limit(problem: AllocationProblem, frac: float, seed: int = 0) -> AllocationProblem:
    """A memory-like second limit: per-unit costs proportional to the kept label with their own scale."""
    rng = np.random.default_rng(seed)
    second = tuple(np.asarray(o, dtype=np.float64) * rng.uniform(0.5, 2.0) + 1.0 for o in problem.options)
    least, most = sum(c.min() for c in second), sum(c.max() for c in second)
    return replace(problem, second_costs=second, second_budget=least + frac * (most - least))


@pytest.mark.parametrize("name", NAMES)
def test_respects_a_second_limit(name: str) -> None:
    for seed, (budget_frac, second_frac) in enumerate([(0.9, 0.3), (0.4, 0.6), (0.85, 0.05)]):
        problem = with_second_limit(synthetic(10 + seed, 3, budget_frac), second_frac, seed)
        alloc = run(name, problem)
        assert problem.fits(alloc.choice), (name, seed, alloc)
    tight = with_second_limit(synthetic(20, 3, 0.9), 0.3)
    impossible = replace(tight, second_budget=sum(c.min() for c in tight.second_costs) - 1.0)
    with pytest.raises(InfeasibleBudget, match="second limit"):
        run(name, impossible)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_choice(name: str) -> None:
    problem = synthetic(5, 4, 0.5)
    assert run(name, problem, seed=3, noise=0.05).choice == run(name, problem, seed=3, noise=0.05).choice


@pytest.mark.parametrize("name", NAMES)
def test_seed_matters_only_when_stochastic(name: str) -> None:
    # Equal costs under a noisy fitness that disagrees with the proxy and with the same kept fraction everywhere
    # (other per-unit error scales: so neither a proxy-optimal nor a uniform warm start is already the answer):
    # many allocations nearly tie, and on a small token budget a stochastic searcher should end elsewhere, or get
    # there by another path, for some seed.
    problem = synthetic(6, 4, 0.5, per_unit_costs=False)
    other = synthetic(46, 4, 0.5, per_unit_costs=False, jitter=1.0)
    runs = [run(name, problem, seed=s, noise=0.05, max_tokens=SMALL_TOKENS, scored_on=other) for s in range(4)]
    outcomes = {(r.choice, repr(trace_of(r))) for r in runs}
    if SEARCHERS.get(name).stochastic:
        assert len(outcomes) > 1, f"{name} is declared stochastic but gave the same result and trace for 4 seeds"
    else:
        assert len(outcomes) == 1, f"{name} is declared deterministic but the seed changed its result"


@pytest.mark.parametrize("name", [n for n in NAMES if not SEARCHERS.get(n).baseline])
def test_beats_random_and_nears_optimum(name: str) -> None:
    strictly_better = False
    for i, problem in enumerate(QUALITY_PROBLEMS):
        best = brute_force(problem)
        alloc = run(name, problem)
        assert alloc.error <= random_error(i) + 1e-12, (name, i, alloc.error, random_error(i))
        assert alloc.error <= best * (1 + REL_TOL), (name, i, alloc.error, best)
        strictly_better |= alloc.error < random_error(i) - 1e-12
    assert strictly_better, f"{name} never beat random search at {MAX_TOKENS} tokens"


@pytest.mark.parametrize("name", NAMES)
def test_infeasible_budget_raises(name: str) -> None:
    feasible = synthetic(7, 3, 0.5)
    problem = with_budget(feasible, feasible.min_cost() - 0.5)
    with pytest.raises(InfeasibleBudget):
        run(name, problem)


@pytest.mark.parametrize("name", [n for n in NAMES if SEARCHERS.get(n).uses_fitness])
def test_stops_when_tokens_are_spent(name: str) -> None:
    alloc = run(name, synthetic(8, 6, 0.5), max_tokens=SMALL_TOKENS)
    assert 0 < alloc.info["tokens_spent"] <= 1.5 * SMALL_TOKENS, alloc.info["tokens_spent"]
    assert alloc.info["evaluations"] >= 1
