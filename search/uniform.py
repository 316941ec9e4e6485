"""Baseline: the same kept fraction in every unit, or the nearest allocation to it that fits.

This is the published uniform baseline (EvoPress, OWL, SparseGPT and Wanda prune every layer to one sparsity).
Each option keeps a share of its unit's weights, its kept fraction (`AllocationProblem.fractions`). For a common
target f, a unit takes the option whose kept fraction is nearest to f: the option that keeps exactly f when the unit
has one (in an unstructured space at f = 0.3 every unit takes its 70% option), else the nearer of the two fractions
around f (structured widths are discrete: attention keeps 0, 1/3, 2/3 or 3/3 of its KV groups, an MLP k/12 of its
neurons in steps of 128 of 1536); exactly at the midpoint, the smaller fraction (a unit never keeps more than f
unless that option is strictly nearer). Options that keep the same fraction (a width, an unstructured, an N:M and a
block option at 50% in a mixed space) are told apart by cost, then the second limit's cost, then proxy error, then
option order; that is the only use of the proxy.

As f rises these allocations form a chain A_0 < A_1 < ... (a unit's option changes only at the midpoints of its
fractions); `uniform` takes A_k, the one at the largest f that fits the budget and the second limit. A_k can leave
budget unused that A_{k+1} needs only part of: nominal patterns round per row (70% of 576 columns prunes 403, so
every unit at 70% keeps 0.1% more weights than budget.sparsity=0.7 allows), and widths are coarse. So the units
are then raised from their A_k option to their A_{k+1} option one at a time, in order of cost increase, then unit
order, each raise kept if the allocation still fits. The result holds at most two adjacent levels per unit kind
and is deterministic.

`uniform_best` (search/uniform_best.py) keeps the older rule: the best same option per unit kind by proxy error."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from search.base import (
    Allocation,
    AllocationProblem,
    ConfiguredSearcher,
    InfeasibleBudget,
    SearcherConfig,
    allocation_from,
    register_searcher,
)


def unit_levels(problem: AllocationProblem, u: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Unit u's distinct kept fractions, ascending; the option taken at each (ties between options that keep the same
    fraction: least cost, then second cost, then proxy error, then index); the midpoints between the fractions."""
    frac = problem.fractions(u)
    second = problem.second_costs[u] if problem.second_costs is not None else np.zeros(len(frac))
    pick: dict[float, tuple] = {}
    for j in range(len(frac)):
        key = (float(problem.costs[u][j]), float(second[j]), float(problem.errors[u][j]), j)
        pick[float(frac[j])] = min(pick.get(float(frac[j]), key), key)
    fractions = np.array(sorted(pick))
    return [pick[f][-1] for f in fractions], fractions, (fractions[:-1] + fractions[1:]) / 2


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
        del seed, fitness  # deterministic, from the kept fractions and costs
        problem.check_feasible()
        levels = [unit_levels(problem, u) for u in range(problem.n_units)]
        # A unit's option changes only at its midpoints; at a midpoint it keeps the smaller fraction. So A(f) is
        # constant on (m_i, m_{i+1}] and these candidates (and f above every midpoint) visit each A_k once, at the
        # largest f that gives it.
        targets = [*np.unique(np.concatenate([mids for _, _, mids in levels])), math.inf]
        # index[t, u]: how many of unit u's midpoints lie strictly below targets[t], i.e. its level at that target.
        index = np.stack([np.searchsorted(mids, targets, side="left") for _, _, mids in levels], axis=1)
        chain = [tuple(levels[u][0][int(i)] for u, i in enumerate(row)) for row in index]
        k = next((i for i in range(len(chain) - 1, -1, -1) if problem.fits(chain[i])), None)
        if k is None:
            raise InfeasibleBudget(
                f"no same-kept-fraction allocation fits budget {problem.budget:.6g}"
                + (" and the second limit" if problem.second_costs is not None else "")
                + f"; the cheapest of them costs {min(problem.cost_of(c) for c in chain):.6g}"
                + f" (the minimum achievable cost is {problem.min_cost():.6g}; searcher uniform_best or milp may fit)"
            )
        choice = list(chain[k])
        raised = below = 0
        if k + 1 < len(chain):
            upper = chain[k + 1]
            costs = problem.costs
            order = sorted((float(costs[u][upper[u]] - costs[u][choice[u]]), u)
                           for u in range(problem.n_units) if upper[u] != choice[u])
            for _, u in order:
                trial = choice.copy()
                trial[u] = upper[u]
                if problem.fits(trial):
                    choice, raised = trial, raised + 1
            below = len(order) - raised if raised else 0
        kept: dict[str, list[float]] = {}
        for u, kind in enumerate(problem.unit_kinds):
            kept.setdefault(kind, []).append(float(problem.fractions(u)[choice[u]]))
        # raised: units moved up to their A_{k+1} option; below: units left under it beside them (both 0: every unit
        # holds its A_k option, the same fraction everywhere when the options allow).
        return allocation_from(
            problem, choice, self.name, raised=raised, below=below,
            kept_fraction_range={kind: [min(v), max(v)] for kind, v in kept.items()},
        )
