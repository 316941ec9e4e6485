"""EvoPress-style (1 + λ) evolution with staged selection, on DEAP.

Each generation mutates the parent into λ offspring by moving levels between units (one unit steps up, another
steps down, then random units step down until the budget fits again, so the budget holds under any per-unit
costs), then selects in stages: all offspring are scored on few tokens, the best few survive to be scored on
more, ..., and the last survivor replaces the parent if it is at least as good on the largest token count.
Scores on small token counts are noisy but cheap; only promising offspring pay for precise ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Sequence

import numpy as np
from deap import base, creator, tools
from tqdm import tqdm

from allocator.core.config import check_choice
from allocator.core.errors import UserInputError
from search.base import (
    Allocation,
    AllocationProblem,
    ConfiguredSearcher,
    SearcherConfig,
    allocation_from,
    register_searcher,
    repair,
)
from search.dp import DPConfig, DPSearcher
from search.fitness import Fitness
from search.uniform import UniformSearcher

# DEAP's creator registers classes globally: create them once, here.
if not hasattr(creator, "AllocationFitness"):
    creator.create("AllocationFitness", base.Fitness, weights=(-1.0,))
    creator.create("AllocationIndividual", list, fitness=creator.AllocationFitness)



class Init(StrEnum):
    """Evolution's starting point: the DP optimum of the additive proxy, or the uniform baseline (the same kept
    fraction in every unit, search/uniform.py: EvoPress's own start)."""

    dp = "dp"
    uniform = "uniform"



@dataclass
class EvoConfig(SearcherConfig):
    name: str = "evo"
    # Starting point: the DP optimum of the additive proxy, or the uniform baseline (same kept fraction everywhere).
    init: Init = Init.dp
    generations: int = 30
    offspring: int = 8
    # Staged selection: stage i scores its candidates on stage_tokens[i] tokens and keeps stage_survivors[i].
    # Sized for a CPU (about 12k forward tokens a generation); on a GPU, EvoPress's [2048, 16384, 65536] fits.
    # The last stage decides acceptance: on a few sequences, evolution overfits them (measured on SmolLM2:
    # a 1024-token last stage lowered calibration KL while held-out perplexity rose), so it defaults to the
    # whole fitness pool (16 sequences of 256 tokens).
    stage_tokens: list[int] = field(default_factory=lambda: [512, 4096])
    stage_survivors: list[int] = field(default_factory=lambda: [2, 1])
    # Each offspring makes 1..max_moves level moves (one unit up, another down) before repair.
    max_moves: int = 3

    def validate(self) -> None:
        super().validate()
        check_choice("searcher.init", self.init, Init)
        for key in ("generations", "offspring", "max_moves"):
            if getattr(self, key) < 1:
                raise UserInputError(f"searcher.{key}={getattr(self, key)} must be >= 1")
        tokens, survivors = list(self.stage_tokens), list(self.stage_survivors)
        if not tokens or len(tokens) != len(survivors):
            raise UserInputError(
                f"searcher.stage_tokens={tokens} and searcher.stage_survivors={survivors} must be non-empty and "
                "of equal length (one survivor count per stage)"
            )
        if any(t < 1 for t in tokens) or tokens != sorted(tokens):
            raise UserInputError(f"searcher.stage_tokens={tokens} must be >= 1 and non-decreasing")
        if survivors[-1] != 1 or any(s < 1 for s in survivors) or survivors != sorted(survivors, reverse=True):
            raise UserInputError(f"searcher.stage_survivors={survivors} must be non-increasing, >= 1, ending in 1")
        if survivors[0] > self.offspring:
            raise UserInputError(
                f"searcher.stage_survivors[0]={survivors[0]} exceeds searcher.offspring={self.offspring}"
            )


def initial_choice(problem: AllocationProblem, init: str) -> tuple[int, ...]:
    searcher = DPSearcher(DPConfig()) if init == "dp" else UniformSearcher()
    return searcher.search(problem).choice


class LevelMover:
    """Moves a unit `stride` options up or down in cost order (a coarse grid for stride > 1)."""

    def __init__(self, problem: AllocationProblem, stride: int = 1) -> None:
        self.problem = problem
        self.stride = stride
        self.order = [np.argsort(c, kind="stable") for c in problem.costs]  # option indices, cheapest first
        self.rank = [np.argsort(o, kind="stable") for o in self.order]  # option index → position in cost order

    def step(self, unit: int, j: int, up: bool) -> int | None:
        pos = int(self.rank[unit][j])
        last = len(self.order[unit]) - 1
        if (up and pos == last) or (not up and pos == 0):
            return None
        new = min(pos + self.stride, last) if up else max(pos - self.stride, 0)
        return int(self.order[unit][new])

    def mutate(self, choice: Sequence[int], rng: np.random.Generator, max_moves: int) -> tuple[int, ...]:
        """1..max_moves paired moves (a random unit up, another down), then repair into the budget, then up to as
        many random single steps up that still fit, so unequal per-unit costs neither break nor waste the budget."""
        problem = self.problem
        out = list(choice)
        raised: list[int] = []
        n_moves = int(rng.integers(1, max_moves + 1))
        for _ in range(n_moves):
            ups = [u for u in range(len(out)) if self.step(u, out[u], up=True) is not None]
            if not ups:
                break
            u = ups[int(rng.integers(len(ups)))]
            downs = [v for v in range(len(out)) if v != u and self.step(v, out[v], up=False) is not None]
            out[u] = self.step(u, out[u], up=True)
            raised.append(u)
            if downs:
                v = downs[int(rng.integers(len(downs)))]
                out[v] = self.step(v, out[v], up=False)
        out = list(repair(problem, out, rng, protect=raised))
        for u in rng.permutation(len(out))[:n_moves]:
            j = self.step(int(u), out[u], up=True)
            if j is not None:
                previous, out[u] = out[u], j
                if not problem.fits(out):
                    out[u] = previous
        return tuple(out)


def evolve(
    problem: AllocationProblem,
    fitness: Fitness,
    start: Sequence[int],
    cfg: EvoConfig,
    rng: np.random.Generator,
    generations: int,
    stride: int = 1,
    logbook: tools.Logbook | None = None,
    token_limit: int = 0,
) -> tuple[tuple[int, ...], float]:
    """Run up to `generations` generations from `start` (and, if token_limit > 0, until the fitness has spent that
    many tokens in total); returns the final parent and its last-stage fitness."""
    mover = LevelMover(problem, stride)
    toolbox = base.Toolbox()
    toolbox.register("mutate", lambda ind: creator.AllocationIndividual(mover.mutate(ind, rng, cfg.max_moves)))
    toolbox.register("select", tools.selBest)
    final_tokens = cfg.stage_tokens[-1]
    parent = creator.AllocationIndividual(start)
    parent.fitness.values = (fitness.score([parent], final_tokens)[0],)
    if not fitness.trace or fitness.trace[-1]["choice"] != list(parent):
        fitness.note_best(parent, parent.fitness.values[0], final_tokens)
    bar = tqdm(range(generations), desc=f"evolution (stride {stride})", unit="gen", leave=False)
    # Worst-case tokens of one generation (every candidate new): a generation starts only if it fits the bounds, so
    # a search never spends more than it was given and searchers compare at equal token budgets.
    counts = [cfg.offspring, *cfg.stage_survivors[:-1]]
    generation_tokens = sum(n * fitness.sequences_for(t) * fitness.seq_len for n, t in zip(counts, cfg.stage_tokens))

    def out_of_tokens() -> bool:
        within_limit = token_limit <= 0 or fitness.tokens_spent + generation_tokens <= token_limit
        return fitness.exhausted() or not within_limit or not fitness.affords(generation_tokens)

    for gen in bar:
        if out_of_tokens():
            break
        pool = [toolbox.mutate(parent) for _ in range(cfg.offspring)]
        for tokens, survivors in zip(cfg.stage_tokens, cfg.stage_survivors):
            if fitness.exhausted():  # the hard bound; a token_limit only stops new generations
                return tuple(parent), parent.fitness.values[0]
            for ind, value in zip(pool, fitness.score(pool, tokens)):
                ind.fitness.values = (value,)
            pool = toolbox.select(pool, survivors)
        child = pool[0]
        accepted = child.fitness.values[0] <= parent.fitness.values[0]  # ties accepted: neutral drift explores
        if accepted:
            if tuple(child) != tuple(parent) and child.fitness.values[0] < parent.fitness.values[0]:
                fitness.note_best(child, child.fitness.values[0], final_tokens)
            parent = child
        bar.set_postfix(fitness=f"{parent.fitness.values[0]:.4g}", tokens=fitness.tokens_spent)
        if logbook is not None:
            logbook.record(
                stride=stride, gen=gen, parent=parent.fitness.values[0], child=child.fitness.values[0],
                accepted=accepted, tokens=fitness.tokens_spent,
            )
    return tuple(parent), parent.fitness.values[0]


@register_searcher
class EvoSearcher(ConfiguredSearcher):
    stochastic = True
    baseline = False
    uses_fitness = True
    Config = EvoConfig

    def search(self, problem: AllocationProblem, seed: int = 0, fitness: Fitness | None = None) -> Allocation:
        fitness = self.begin_fitness(fitness)
        rng = np.random.default_rng(seed)
        logbook = tools.Logbook()
        choice, value = evolve(
            problem, fitness, initial_choice(problem, self.cfg.init), self.cfg, rng, self.cfg.generations,
            logbook=logbook,
        )
        return allocation_from(problem, choice, self.name, **evolution_info(value, logbook, fitness))


def evolution_info(value: float, logbook: tools.Logbook, fitness: Fitness) -> dict[str, Any]:
    return {
        "fitness": value,
        "generations": len(logbook),
        "accepted": sum(bool(r["accepted"]) for r in logbook),
        **fitness.summary(),
    }
