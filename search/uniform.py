"""Baseline: one option label per unit kind (e.g. every MLP keeps the same width), best that fits the budget."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from search.base import (
    Allocation,
    AllocationProblem,
    ConfiguredSearcher,
    InfeasibleBudget,
    SearcherConfig,
    allocation_from,
    register_searcher,
)


@dataclass
class UniformConfig(SearcherConfig):
    name: str = "uniform"  # no options of its own


@register_searcher
class UniformSearcher(ConfiguredSearcher):
    stochastic = False
    baseline = True
    uses_fitness = False
    Config = UniformConfig

    def search(self, problem: AllocationProblem, seed: int = 0, fitness: object = None) -> Allocation:
        del seed, fitness  # exhaustive and deterministic, on the additive proxy
        problem.check_feasible()
        kinds: dict[str, list[int]] = {}  # kind -> unit indices, in order of first appearance
        for u, kind in enumerate(problem.unit_kinds):
            kinds.setdefault(kind, []).append(u)
        labels: list[tuple[int, ...]] = []
        for kind, units in kinds.items():
            first = problem.options[units[0]]
            for u in units[1:]:
                if problem.options[u] != first:
                    raise ValueError(
                        f"searcher uniform: units of kind {kind!r} have different option labels: "
                        f"{problem.unit_names[units[0]]!r} {first} vs {problem.unit_names[u]!r} {problem.options[u]}"
                    )
            labels.append(first)
        n_combos = math.prod(len(lab) for lab in labels)
        if n_combos > 10**6:  # kinds are meant to be few ("attn", "mlp"); refuse rather than hang
            raise ValueError(f"searcher uniform: {n_combos} label combinations over {len(labels)} kinds is too many")
        index = {kind: i for i, kind in enumerate(kinds)}
        best: tuple[float, float, tuple[int, ...]] | None = None
        cheapest, n_fit = math.inf, 0
        for combo in itertools.product(*(range(len(lab)) for lab in labels)):
            choice = tuple(combo[index[kind]] for kind in problem.unit_kinds)
            # Same summation as Allocation.cost, so the budget check is the one the result reports.
            cost = problem.cost_of(choice)
            cheapest = min(cheapest, cost)
            if not problem.fits(choice):
                continue
            n_fit += 1
            key = (problem.error_of(choice), cost, choice)
            if best is None or key[:2] < best[:2]:  # strict: the first in product order wins full ties
                best = key
        if best is None:
            raise InfeasibleBudget(
                f"no uniform allocation fits budget {problem.budget:.6g}"
                + (" and the second limit" if problem.second_costs is not None else "")
                + f"; the minimum achievable cost with one option label per unit kind is {cheapest:.6g}"
            )
        choice = best[2]
        return allocation_from(
            problem, choice, self.name,
            labels_per_kind={k: labels[i][choice[kinds[k][0]]] for k, i in index.items()}, n_feasible=n_fit,
        )
