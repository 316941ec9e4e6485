"""Multiple-choice knapsack by dynamic programming over discretised cost (as in SPDY / ZipLM).

The exact solver is `milp` (search/milp.py). The DP rounds every cost up to budget/n_buckets, so it never exceeds
the budget but may leave part of it unused and land above the optimum (0.96% on the default run's problem at
10,000 buckets). It stays for what it does differently: it needs numpy only, its run time is fixed by
units × options × buckets whatever the numbers, it is exact when costs are integers and n_buckets equals the
budget, and it is the inner solver of SPDY (`bayes` with `param=spdy`, hundreds of solves) and the warm start of
`evo` and `bayes`, whose benchmark figures were measured with it."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from search.base import (
    Allocation,
    AllocationProblem,
    ConfiguredSearcher,
    SearcherConfig,
    allocation_from,
    check_int_option,
    register_searcher,
)


def discretise(costs: np.ndarray, budget: float, n_buckets: int) -> np.ndarray:
    """Integer cost per option in budget/n_buckets units, rounded UP so that an allocation whose
    integer costs sum to <= n_buckets also has real costs summing to <= budget.
    Options that can never fit get n_buckets + 1."""
    unusable = n_buckets + 1
    if budget <= 0:  # nothing to divide by: only free options fit
        return np.where(costs == 0, 0, unusable).astype(np.int64)
    # Multiply before dividing so that integer costs with budget == n_buckets stay exact.
    scaled = np.minimum(costs * n_buckets / budget, unusable)
    ints = np.ceil(scaled)
    # Float rounding in `scaled` may have landed just below the true value; bump those up.
    ints += (ints < unusable) & (ints * budget / n_buckets < costs)
    return np.minimum(ints, unusable).astype(np.int64)


@dataclass
class DPConfig(SearcherConfig):
    name: str = "dp"
    # Cost resolution: the budget is cut into this many buckets; costs round up, so the plan never exceeds it.
    n_buckets: int = 10000

    def validate(self) -> None:
        super().validate()
        check_int_option(self, "n_buckets", 1)


@register_searcher
class DPSearcher(ConfiguredSearcher):
    stochastic = False  # the seed changes nothing
    baseline = False
    uses_fitness = False
    Config = DPConfig

    def search(self, problem: AllocationProblem, seed: int = 0, fitness: object = None) -> Allocation:
        del seed, fitness  # deterministic, on the additive proxy
        problem.check_feasible()
        if problem.second_costs is None:
            return self._knapsack(problem, problem.errors)
        return self._with_second_limit(problem)

    def _with_second_limit(self, problem: AllocationProblem) -> Allocation:
        """Lagrangian relaxation of the second limit: the DP minimises error + λ·second cost under the budget, with
        λ found by bisection as the smallest weight whose optimum meets the second limit. Exact when that optimum
        is the constrained one; otherwise an upper bound within the duality gap (reported in info)."""
        def solve(lam: float) -> Allocation:
            errors = tuple(e + lam * c for e, c in zip(problem.errors, problem.second_costs))
            return self._knapsack(problem, errors)

        free = solve(0.0)
        if problem.fits(free.choice):
            return free
        spread = max(float(np.ptp(np.concatenate(problem.errors))), 1e-12)
        unit = max(float(np.ptp(np.concatenate(problem.second_costs))), 1e-12)
        hi = spread / unit
        best = None
        for _ in range(60):  # find a weight large enough that the second limit holds
            best = solve(hi)
            if problem.fits(best.choice):
                break
            hi *= 4
        else:
            raise problem.infeasible("no weight on the second limit makes it fit")
        lo = 0.0
        for _ in range(40):
            mid = (lo + hi) / 2
            cand = solve(mid)
            if problem.fits(cand.choice):
                hi = mid
                best = cand if cand.error < best.error else best
            else:
                lo = mid
        return replace(best, info={**best.info, "second_limit_weight": hi})

    def _knapsack(self, problem: AllocationProblem, objective: tuple[np.ndarray, ...]) -> Allocation:
        """Least Σ objective under the budget (rounded-up costs); the result reports the problem's real error."""
        n = int(self.cfg.n_buckets)
        width = n + 1
        # err[b] / cost[b]: best (error, real cost) over the units so far with integer cost exactly b.
        err = np.full(width, np.inf)
        err[0] = 0.0
        cost = np.zeros(width)
        int_costs: list[np.ndarray] = []
        picks: list[np.ndarray] = []  # per unit, the option chosen at each b, for backtracking
        for c_real, e in zip(problem.costs, objective):
            c_int = discretise(c_real, problem.budget, n)
            k = len(c_int)
            cand_err = np.full((k, width), np.inf)
            cand_cost = np.full((k, width), np.inf)
            for j in range(k):
                s = int(c_int[j])
                if s <= n:
                    cand_err[j, s:] = err[: width - s] + e[j]
                    cand_cost[j, s:] = cost[: width - s] + c_real[j]
            # Lexicographic (error, real cost) minimum: still exact, since both are additive.
            best = cand_err.min(axis=0)
            pick = np.where(cand_err == best, cand_cost, np.inf).argmin(axis=0)
            cols = np.arange(width)
            err, cost = best, cand_cost[pick, cols]
            int_costs.append(c_int)
            picks.append(pick.astype(np.int16 if k < 2**15 else np.int64))

        reachable = np.isfinite(err)
        if not reachable.any():
            raise problem.infeasible(
                f"with costs rounded up to multiples of budget/{n} nothing fits; increase n_buckets"
            )
        # Best error, then lower real cost, then fewer buckets (lexsort: last key is primary).
        b = int(np.lexsort((np.arange(width), np.where(reachable, cost, np.inf), err))[0])
        b_star, err_star = b, float(err[b])
        choice = [0] * problem.n_units
        for u in range(problem.n_units - 1, -1, -1):
            j = int(picks[u][b])
            choice[u] = j
            b -= int(int_costs[u][j])
        assert b == 0, "DP backtrack did not return to zero buckets"
        return allocation_from(problem, choice, self.name, n_buckets=n, discrete_cost=b_star, discrete_error=err_star)
