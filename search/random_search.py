"""Baseline: random feasible allocations scored on the fitness, best kept — what any real searcher must beat."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from search.base import (
    Allocation,
    AllocationProblem,
    ConfiguredSearcher,
    SearcherConfig,
    allocation_from,
    check_int_option,
    register_searcher,
    repair,
)
from search.fitness import Fitness


@dataclass
class RandomConfig(SearcherConfig):
    name: str = "random"
    # Allocations drawn at most (max_tokens / max_seconds may stop it earlier).
    samples: int = 64
    # Tokens per evaluation (rounded up to whole sequences by the fitness).
    sample_tokens: int = 1024

    def validate(self) -> None:
        super().validate()
        for field in ("samples", "sample_tokens"):
            check_int_option(self, field, 1)


@register_searcher
class RandomSearcher(ConfiguredSearcher):
    stochastic = True
    baseline = True
    uses_fitness = True
    Config = RandomConfig

    def search(self, problem: AllocationProblem, seed: int = 0, fitness: Fitness | None = None) -> Allocation:
        fitness = self.begin_fitness(fitness)
        problem.check_feasible()
        cfg = self.cfg
        rng = np.random.default_rng(seed)
        best: tuple[float, tuple[int, ...]] | None = None
        drawn = 0
        ahead: list[tuple[int, ...]] = []
        while drawn < cfg.samples:
            if not ahead:
                ahead = self._draw_ahead(problem, rng, fitness, cfg.samples - drawn)
            choice = ahead.pop(0)
            value = fitness.score([choice], cfg.sample_tokens)[0]
            drawn += 1
            if best is None or value < best[0]:
                best = (value, choice)
                fitness.note_best(choice, value, cfg.sample_tokens)
            if fitness.exhausted():  # checked after scoring, so at least one allocation is always returned
                break
        assert best is not None
        return allocation_from(
            problem, best[1], self.name, fitness=best[0], samples=drawn, sample_tokens=cfg.sample_tokens,
            **fitness.summary(),
        )

    def _draw_ahead(
        self, problem: AllocationProblem, rng: np.random.Generator, fitness: Fitness, left: int
    ) -> list[tuple[int, ...]]:
        """The next allocations, as many as the fitness scores at once (one when serial), prefetched. No more are
        drawn than the token bound could still pay for, so the search never scores one it would have stopped
        before: drawing a batch uses the generator as drawing them one by one does, so the result is the serial one."""
        n = min(fitness.parallelism, left)
        if self.cfg.max_tokens:
            one = fitness.sequences_for(self.cfg.sample_tokens) * fitness.seq_len
            n = min(n, max(1, -(-(self.cfg.max_tokens - fitness.tokens_spent) // one)))
        # Uniform over each unit's options, then stepped down at random until it fits: covers the feasible set
        # with a bias toward the budget boundary, where the good allocations are.
        batch = [repair(problem, [int(rng.integers(len(o))) for o in problem.options], rng) for _ in range(n)]
        if n > 1:
            fitness.prefetch(batch, self.cfg.sample_tokens)
        return batch
