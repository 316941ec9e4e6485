"""Baseline: the best same option per unit kind (every attention unit one label, every MLP unit one label), the
combination with the least summed proxy error that fits the budget. This was `uniform` before that name went to the
canonical baseline (the same kept fraction in every unit, search/uniform.py); it is kept because it is the proxy's
own best uniform-per-kind point. It trusts the proxy across kinds, which can mislead badly: on SmolLM2 at
`space=unstructured budget=sparsity budget.sparsity=0.7` it prunes attention to 90% and is far worse on held-out
text than the same sparsity in every unit (README, "Measured")."""

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
class UniformBestConfig(SearcherConfig):
    name: str = "uniform_best"  # no options of its own


@register_searcher
class UniformBestSearcher(ConfiguredSearcher):
    stochastic = False
    baseline = True
    uses_fitness = False
    Config = UniformBestConfig

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
                        f"searcher {self.name}: units of kind {kind!r} have different option labels: "
                        f"{problem.unit_names[units[0]]!r} {first} vs {problem.unit_names[u]!r} {problem.options[u]}"
                    )
            labels.append(first)
        n_combos = math.prod(len(lab) for lab in labels)
        if n_combos > 10**6:  # kinds are meant to be few ("attn", "mlp"); refuse rather than hang
            raise ValueError(f"searcher {self.name}: {n_combos} label combinations over {len(labels)} kinds is too many")
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
                f"no same-option-per-kind allocation fits budget {problem.budget:.6g}"
                + (" and the second limit" if problem.second_costs is not None else "")
                + f"; the minimum achievable cost with one option label per unit kind is {cheapest:.6g}"
            )
        choice = best[2]
        return allocation_from(
            problem, choice, self.name,
            labels_per_kind={k: labels[i][choice[kinds[k][0]]] for k, i in index.items()}, n_feasible=n_fit,
        )
