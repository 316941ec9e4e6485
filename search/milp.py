"""The exact solver: the multiple-choice knapsack as a 0/1 integer program, solved by HiGHS (scipy.optimize.milp).

Binary x[u, j] = 1 when unit u takes option j; Σ_j x[u, j] = 1 per unit; Σ cost·x <= budget, and a second limit is
one more row Σ second_cost·x <= second_budget (no Lagrangian); minimise Σ error·x. mip_rel_gap is 0, so HiGHS
stops only at a proven optimum. Before the solve, options that cannot fit even with every other unit at its
cheapest, and options another option of the same unit matches or beats on error and every cost, are dropped (this
keeps an optimum, and of equal options the cheaper, lower-index one). Each row is shifted by the units' cheapest
options and scaled to a right-hand side of 1, and the errors to a largest per-unit spread of OBJECTIVE_SCALE, so
HiGHS's absolute tolerances mean the same on any units (ms, bytes, parameters).

HiGHS accepts a row that exceeds its bound by up to its feasibility tolerance. The chosen allocation is therefore
re-checked with the problem's exact `fits()`; one that is over by such a hair is cut off (a constraint that forbids
exactly that allocation) and the problem solved again, so the result is the optimum over the allocations that
truly fit. Only if more than `max_cuts` allocations in a row land in that hair-wide band is each over-run row
tightened instead: the result then fits but is not proven optimal, and `info["exact"]` says so."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from search.base import (
    Allocation,
    AllocationProblem,
    ConfiguredSearcher,
    SearcherConfig,
    allocation_from,
    register_searcher,
)

# The errors are scaled so the largest per-unit spread is this; HiGHS's absolute MIP gap (1e-6) then resolves
# differences of 1e-9 of that spread.
OBJECTIVE_SCALE = 1e3
# Allocations over a limit by HiGHS's tolerance that are cut off one by one before rows are tightened instead.
MAX_CUTS = 64
MAX_TIGHTENINGS = 8


@dataclass
class MILPConfig(SearcherConfig):
    name: str = "milp"  # no options of its own: the solve is exact and needs no tuning


@register_searcher
class MILPSearcher(ConfiguredSearcher):
    stochastic = False
    baseline = False
    uses_fitness = False
    Config = MILPConfig

    def search(self, problem: AllocationProblem, seed: int = 0, fitness: object = None) -> Allocation:
        del seed, fitness  # exact and deterministic, on the additive proxy
        choice, info = solve_exact(problem)
        return allocation_from(problem, choice, self.name, **info)


def _rows(problem: AllocationProblem) -> list[tuple[tuple[np.ndarray, ...], float, str]]:
    """(per-unit costs, cap, name) of each limit."""
    rows = [(problem.costs, problem.budget, "budget")]
    if problem.second_costs is not None:
        rows.append((problem.second_costs, problem.second_budget, "second limit"))
    return rows


def candidate_options(problem: AllocationProblem) -> list[np.ndarray]:
    """Per unit, the indices of the options an optimum may need: those that can fit under every limit with the
    other units at their cheapest, less those another option of the unit matches or beats on error and on every
    cost (of identical options the first is kept). Never empty for a problem that passes check_feasible."""
    rows = _rows(problem)
    keep = []
    for u in range(problem.n_units):
        ok = np.ones(len(problem.options[u]), dtype=bool)
        for costs, cap, _ in rows:
            others = math.fsum(float(c.min()) for i, c in enumerate(costs) if i != u)
            # A hair of slack: an option dropped here is gone for good, one kept in error is only a variable more.
            ok &= costs[u] <= cap - others + 1e-9 * max(1.0, abs(cap))
        idx = np.flatnonzero(ok)
        keys = np.stack([problem.errors[u][idx]] + [costs[u][idx] for costs, _, _ in rows])  # (1 + limits, k)
        le = np.all(keys[:, :, None] <= keys[:, None, :], axis=0)  # le[a, b]: option a no worse than b everywhere
        eq = np.all(keys[:, :, None] == keys[:, None, :], axis=0)
        earlier = np.arange(len(idx))[:, None] < np.arange(len(idx))[None, :]
        dominated = np.any(le & (~eq | earlier), axis=0)  # b is dominated by some a (strictly, or equal and earlier)
        keep.append(idx[~dominated])
    return keep


def solve_exact(problem: AllocationProblem, max_cuts: int = MAX_CUTS) -> tuple[tuple[int, ...], dict[str, Any]]:
    """The allocation of least summed error that fits (see the module docstring), and what the solve took:
    cuts (allocations over a limit by HiGHS's tolerance, forbidden and re-solved), whether it is `exact`, the MIP
    gap and branch-and-bound nodes of the last solve, the variables after filtering, and the seconds taken."""
    t0 = time.perf_counter()
    problem.check_feasible()
    keep = candidate_options(problem)
    sizes = [len(k) for k in keep]
    if min(sizes) == 0:  # an option can fit alone in every unit, so only a combined limit rules them all out
        raise problem.infeasible("no allocation meets the budget and the second limit together")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    n_vars = int(starts[-1])
    unit_of = np.repeat(np.arange(problem.n_units), sizes)
    option_of = np.concatenate(keep)

    def gathered(values: tuple[np.ndarray, ...]) -> np.ndarray:
        return np.concatenate([values[u][k] for u, k in enumerate(keep)])

    # Objective: per-unit shifted errors (a constant off the total), scaled.
    err = gathered(problem.errors)
    err = err - np.array([problem.errors[u][k].min() for u, k in enumerate(keep)])[unit_of]
    spread = float(err.max())
    objective = err * (OBJECTIVE_SCALE / spread) if spread > 0 else err
    one_hot = csr_array((np.ones(n_vars), (unit_of, np.arange(n_vars))), shape=(problem.n_units, n_vars))
    # Limit rows, shifted by each unit's cheapest kept option and scaled to a right-hand side of 1.
    limits = []
    for costs, cap, what in _rows(problem):
        c = gathered(costs)
        base = np.array([costs[u][k].min() for u, k in enumerate(keep)])
        c = c - base[unit_of]
        slack = cap - math.fsum(base)  # < 0 only when no allocation of the kept options meets both limits
        scale = slack if slack > 0 else 1.0
        limits.append({"what": what, "coef": c / scale, "rhs": slack / scale, "scale": scale})

    cuts: list[np.ndarray] = []  # rows forbidding one allocation each: Σ its x <= n_units - 1
    tightened = 0
    while True:
        constraints = [LinearConstraint(one_hot, 1, 1)]
        constraints += [LinearConstraint(lim["coef"][None, :], -np.inf, lim["rhs"]) for lim in limits]
        if cuts:
            constraints.append(LinearConstraint(np.stack(cuts), -np.inf, problem.n_units - 1))
        res = milp(objective, integrality=np.ones(n_vars), bounds=Bounds(0, 1), constraints=constraints,
                   options={"mip_rel_gap": 0.0})
        if res.status == 2:
            if cuts or tightened:
                detail = f"after cutting off {len(cuts)} allocations over a limit by HiGHS's tolerance"
            elif len(limits) > 1:
                detail = "no allocation meets the budget and the second limit together"
            else:
                detail = "HiGHS found no allocation within the budget"
            raise problem.infeasible(detail)
        if res.status != 0 or res.x is None:
            raise RuntimeError(f"searcher milp: HiGHS stopped without an optimum (status {res.status}): {res.message}")
        x = res.x
        picked = np.array([starts[u] + int(np.argmax(x[starts[u]:starts[u + 1]])) for u in range(problem.n_units)])
        if not np.all(np.abs(x[picked] - 1) < 1e-3):
            raise RuntimeError(f"searcher milp: HiGHS returned a fractional one-hot (min picked {x[picked].min():.3g})")
        choice = tuple(int(j) for j in option_of[picked])
        if problem.fits(choice):
            break
        # Over a limit by no more than HiGHS's tolerance: forbid this very allocation and solve again.
        if len(cuts) < max_cuts * (tightened + 1):
            row = np.zeros(n_vars)
            row[picked] = 1.0
            cuts.append(row)
            continue
        if tightened == MAX_TIGHTENINGS:
            raise RuntimeError(
                f"searcher milp: after {len(cuts)} cuts and {tightened} tightenings HiGHS still returns allocations "
                f"over a limit (cost {problem.cost_of(choice)!r} vs budget {problem.budget!r})"
            )
        # Too many allocations in the band: pull each over-run row in by twice its excess, and at least past HiGHS's
        # feasibility tolerance (1e-6 of a scaled row), doubling each time (no longer provably optimal).
        tightened += 1
        for lim, (costs, cap, _) in zip(limits, _rows(problem)):
            excess = math.fsum(float(c[j]) for c, j in zip(costs, choice)) - cap
            if excess > 0:
                lim["rhs"] -= max(2 * excess / lim["scale"], 2e-6 * 2 ** (tightened - 1))
    info = {
        "exact": tightened == 0,
        "cuts": len(cuts),
        "mip_gap": float(res.mip_gap) if res.mip_gap is not None else 0.0,
        "mip_nodes": int(res.mip_node_count) if res.mip_node_count is not None else 0,
        "variables": n_vars,
        "seconds": time.perf_counter() - t0,
    }
    if tightened:
        info["tightened"] = tightened
    return choice, info
