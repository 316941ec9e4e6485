"""Týr-the-Pruner-style coarse-to-fine search: evolve on a coarse level grid, then on finer grids from the best.

Stage s moves levels `strides[s]` options at a time, so it explores the grid of every strides[s]-th option around
its start; the first stage starts from the DP optimum of the additive proxy (or, init=uniform, the uniform baseline)
restricted to the coarsest grid, each later stage from the previous stage's result. Defaults follow Týr's schedule of halving the grid.
Under searcher.max_tokens each stage gets an equal share of the tokens still left."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from deap import tools

from allocator.core.errors import UserInputError
from search.base import Allocation, AllocationProblem, ConfiguredSearcher, allocation_from, register_searcher
from search.evo import EvoConfig, evolution_info, evolve, initial_choice
from search.fitness import Fitness


@dataclass
class TyrConfig(EvoConfig):
    name: str = "tyr"
    # Grid steps (in options, cost order), coarse to fine, and the generations spent on each.
    strides: list[int] = field(default_factory=lambda: [4, 2, 1])
    stage_generations: list[int] = field(default_factory=lambda: [10, 10, 20])

    def validate(self) -> None:
        super().validate()
        strides, gens = list(self.strides), list(self.stage_generations)
        if not strides or len(strides) != len(gens):
            raise UserInputError(
                f"searcher.strides={strides} and searcher.stage_generations={gens} must be non-empty and of equal length"
            )
        if any(s < 1 for s in strides) or strides != sorted(strides, reverse=True) or strides[-1] != 1:
            raise UserInputError(f"searcher.strides={strides} must be >= 1, non-increasing and end in 1")
        if any(g < 0 for g in gens):
            raise UserInputError(f"searcher.stage_generations={gens} must be >= 0")


def coarse_grid(problem: AllocationProblem, stride: int) -> list[list[int]]:
    """Per unit, the option indices at every stride-th position in cost order, plus the costliest (dense)."""
    grids = []
    for costs in problem.costs:
        order = [int(j) for j in np.argsort(costs, kind="stable")]
        grids.append(sorted(set(order[::stride]) | {order[-1]}))
    return grids


def coarse_start(problem: AllocationProblem, stride: int, init: str) -> tuple[int, ...]:
    """The proxy optimum (or the uniform baseline) on the coarse grid, as option indices of the full problem."""
    grids = coarse_grid(problem, stride)
    sub = AllocationProblem(
        unit_names=problem.unit_names,
        unit_kinds=problem.unit_kinds,
        options=tuple(tuple(problem.options[u][j] for j in grid) for u, grid in enumerate(grids)),
        costs=tuple(problem.costs[u][grid] for u, grid in enumerate(grids)),
        errors=tuple(problem.errors[u][grid] for u, grid in enumerate(grids)),
        budget=problem.budget,
        second_costs=None if problem.second_costs is None else tuple(c[g] for c, g in zip(problem.second_costs, grids)),
        second_budget=problem.second_budget,
        # init=uniform picks by kept fraction: the full problem's, on the grid (sparse labels have none of their own)
        kept_fractions=tuple(problem.fractions(u)[grid] for u, grid in enumerate(grids)) if init == "uniform" else None,
    )
    return tuple(grids[u][j] for u, j in enumerate(initial_choice(sub, init)))


@register_searcher
class TyrSearcher(ConfiguredSearcher):
    stochastic = True
    baseline = False
    uses_fitness = True
    Config = TyrConfig

    def search(self, problem: AllocationProblem, seed: int = 0, fitness: Fitness | None = None) -> Allocation:
        fitness = self.begin_fitness(fitness)
        rng = np.random.default_rng(seed)
        logbook = tools.Logbook()
        choice = coarse_start(problem, self.cfg.strides[0], self.cfg.init)
        value = float("nan")
        stages = list(zip(self.cfg.strides, self.cfg.stage_generations))
        stage_log: list[dict] = []
        for i, (stride, generations) in enumerate(stages):
            # Under a token bound, each stage may spend an equal share of what is left, so the fine grids run too.
            limit = 0
            if self.cfg.max_tokens:
                limit = fitness.tokens_spent + (self.cfg.max_tokens - fitness.tokens_spent) // (len(stages) - i)
            choice, value = evolve(
                problem, fitness, choice, self.cfg, rng, generations, stride=stride, logbook=logbook, token_limit=limit
            )
            ran = sum(row["stride"] == stride for row in logbook)
            stage_log.append({"stride": stride, "generations": ran, "tokens_spent": fitness.tokens_spent, "fitness": value})
        return allocation_from(problem, choice, self.name, stages=stage_log, **evolution_info(value, logbook, fitness))
