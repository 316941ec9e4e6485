"""Is a search run's allocation the exact optimum of the problem it solved?

python -m allocator.benchmarks.check_optimum <run_dir>  →  <run_dir>/optimum_check.json

Rebuilds the AllocationProblem from the run's problem.json, solves it exactly with the `milp` searcher
(scipy.optimize.milp, HiGHS, mip_rel_gap 0) and with the DP (10,000 buckets, costs rounded up), and compares both
with the allocation in the run's plan.json: proxy error, cost, unused budget, whether it fits. The run's
allocation is the optimum when its error is within 1e-9 (relative) of the MILP's."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

from allocator.app.problem_file import PROBLEM_FILE, load_problem
from allocator.core.atomic_io import write_json_atomic
from allocator.core.errors import UserInputError
from allocator.core.plan import PLAN_FILE, Plan
from allocator.core.space import Option
from search import Allocation, AllocationProblem
from search.dp import DPSearcher
from search.milp import MILPSearcher

RESULT_FILE = "optimum_check.json"
REL_TOL = 1e-9  # an allocation this close to the MILP optimum (relative, in proxy error) is the optimum


def choice_of(problem: AllocationProblem, labels: dict[str, Option], source: str = PLAN_FILE) -> tuple[int, ...]:
    """Option indices of an allocation given as unit name -> label (as plan.json stores it)."""
    missing = [n for n in problem.unit_names if n not in labels]
    extra = [n for n in labels if n not in problem.unit_names]
    if missing or extra:
        raise UserInputError(f"{source}: the allocation's units do not match {PROBLEM_FILE}'s "
                             f"(missing {missing[:3]}, unknown {extra[:3]})")
    choice = []
    for name, options in zip(problem.unit_names, problem.options):
        if labels[name] not in options:
            raise UserInputError(f"{source}: unit {name!r} has option {labels[name]!r}, not one of {list(options)}")
        choice.append(options.index(labels[name]))
    return tuple(choice)


def _summary(problem: AllocationProblem, choice: Sequence[int], **extra: object) -> dict:
    cost = problem.cost_of(choice)
    out = {"proxy_error": problem.error_of(choice), "cost": cost, "unused_budget": problem.budget - cost,
           "fits": problem.fits(choice)}
    if problem.second_costs is not None:
        out["second_cost"] = problem.second_cost_of(choice)
    return {**out, **extra}


def _solved(searcher: object, problem: AllocationProblem) -> tuple[Allocation, float]:
    t0 = time.perf_counter()
    alloc = searcher.search(problem)
    return alloc, time.perf_counter() - t0


def check_optimum(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    loaded = load_problem(run_dir)
    problem = loaded.problem
    plan = Plan.load(run_dir / PLAN_FILE)
    choice = choice_of(problem, plan.allocation, str(run_dir / PLAN_FILE))
    exact, exact_s = _solved(MILPSearcher(), problem)
    dp, dp_s = _solved(DPSearcher(), problem)
    run = _summary(problem, choice, searcher=plan.searcher.name, plan_proxy_error=plan.searcher.proxy_error)
    optimum = exact.error
    excess = run["proxy_error"] - optimum
    return {
        "run": str(run_dir),
        "cost_unit": loaded.cost_unit,
        "budget": problem.budget,
        **({"second_budget": problem.second_budget, "second_unit": loaded.second_unit}
           if problem.second_costs is not None else {}),
        "units": problem.n_units,
        "options": sum(len(o) for o in problem.options),
        "run_allocation": run,
        "milp": _summary(problem, exact.choice, seconds=exact_s, **{k: exact.info[k] for k in ("exact", "cuts", "mip_gap")}),
        "dp": _summary(problem, dp.choice, seconds=dp_s, n_buckets=dp.info["n_buckets"]),
        "run_is_optimum": bool(run["fits"] and excess <= REL_TOL * max(abs(optimum), 1e-300)),
        "run_same_allocation_as_milp": tuple(choice) == exact.choice,
        "run_excess_over_optimum": excess / optimum if optimum > 0 else excess,
        "dp_excess_over_optimum": (dp.error - optimum) / optimum if optimum > 0 else dp.error - optimum,
    }


def report_lines(result: dict) -> list[str]:
    run, milp, dp = result["run_allocation"], result["milp"], result["dp"]
    unit = result["cost_unit"]
    lines = [
        f"{result['run']}: {result['units']} units, {result['options']} options, budget {result['budget']:.6g} {unit}",
        f"  run ({run['searcher']}): proxy error {run['proxy_error']:.6g}, cost {run['cost']:.6g} "
        f"(unused {run['unused_budget']:.3g}), fits: {run['fits']}",
        f"  milp optimum: proxy error {milp['proxy_error']:.6g}, cost {milp['cost']:.6g} "
        f"(unused {milp['unused_budget']:.3g}), {milp['seconds']:.3f} s, proven: {milp['exact']}",
        f"  dp ({dp['n_buckets']} buckets): proxy error {dp['proxy_error']:.6g} "
        f"({100 * result['dp_excess_over_optimum']:+.3f}% vs optimum), {dp['seconds']:.3f} s",
    ]
    verdict = "the run's allocation IS the exact optimum" if result["run_is_optimum"] else (
        f"the run's allocation is {100 * result['run_excess_over_optimum']:+.3f}% above the exact optimum")
    return lines + [f"  {verdict}" + (" (the same allocation)" if result["run_same_allocation_as_milp"] else "")]


def main(argv: list[str] | None = None) -> dict:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m allocator.benchmarks.check_optimum <run_dir>  (a runs/search/<timestamp> "
                         "directory with problem.json and plan.json)")
    try:
        result = check_optimum(args[0])
    except UserInputError as e:
        raise SystemExit(f"error: {e}") from None
    path = Path(args[0]) / RESULT_FILE
    write_json_atomic(path, result)
    print("\n".join(report_lines(result)))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
