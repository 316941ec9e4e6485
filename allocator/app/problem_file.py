"""`problem.json`: the allocation problem a search run solved, written beside plan.json by the search job.

Its fields are defined here only: `problem_json` writes them and `problem_from_json` reads them back into the same
AllocationProblem (floats round-trip exactly through JSON), so a run's choice can be re-solved or checked
(`python -m allocator.benchmarks.check_optimum <run_dir>`).

    cost_unit       what `cost` and `budget` count: "ms" (latency on top of fixed_ms, in the budget's regime),
                    "params" (kept decoder linear weights) or "bytes" (weights plus KV cache, memory alone)
    fixed_ms        the latency table's fixed part (embeddings, norms, lm_head, overheads) in the budget's regime;
                    null when the run had no latency table (a parameter or memory budget reads none)
    budget          the cap on the summed unit costs
    units[]         name, kind, options (kept counts or sparse labels), and per option: cost, error (the proxy the
                    searcher minimises), kept_fraction (share of the unit's weights), second_cost (only with a
                    second limit); outlier_ratio (only when the searcher used them: owl)
    second_unit, second_budget
                    only with a second limit beside the budget: "bytes" and its cap

Files written before kept_fraction / second_cost / outlier_ratio / second_unit existed load the same (they had no
second limit; without kept_fraction, fractions are each kept count over the largest)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from allocator.core.atomic_io import write_json_atomic
from allocator.core.errors import UserInputError
from search import AllocationProblem

PROBLEM_FILE = "problem.json"
COST_UNITS = ("ms", "params", "bytes")
SECOND_UNIT = "bytes"  # the only second limit: memory beside a latency or sparsity target


@dataclass(frozen=True)
class ProblemFile:
    problem: AllocationProblem
    cost_unit: str
    fixed_ms: float | None  # None: no latency table (the budget read none)
    second_unit: str | None = None


def problem_json(problem: AllocationProblem, cost_unit: str, fixed_ms: float | None) -> dict:
    if cost_unit not in COST_UNITS:
        raise ValueError(f"problem.json: cost_unit {cost_unit!r} is not one of {', '.join(COST_UNITS)}")
    units = []
    for u, (name, kind, options) in enumerate(zip(problem.unit_names, problem.unit_kinds, problem.options)):
        unit: dict[str, Any] = {
            "name": name, "kind": kind, "options": list(options),
            "cost": problem.costs[u].tolist(), "error": problem.errors[u].tolist(),
            "kept_fraction": problem.fractions(u).tolist(),
        }
        if problem.second_costs is not None:
            unit["second_cost"] = problem.second_costs[u].tolist()
        if problem.outlier_ratios is not None:
            unit["outlier_ratio"] = problem.outlier_ratios[u]
        units.append(unit)
    data: dict[str, Any] = {"cost_unit": cost_unit, "fixed_ms": None if fixed_ms is None else float(fixed_ms), "budget": problem.budget}
    if problem.second_costs is not None:
        data.update(second_unit=SECOND_UNIT, second_budget=problem.second_budget)
    data["units"] = units
    return data


def problem_from_json(data: Any, source: str = PROBLEM_FILE) -> ProblemFile:
    """The problem a problem.json describes; a missing or malformed field raises UserInputError naming it."""
    def need(obj: Any, key: str, where: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise UserInputError(f"{source}: {where} has no {key!r} field")
        return obj[key]

    cost_unit = need(data, "cost_unit", "the file")
    if cost_unit not in COST_UNITS:
        raise UserInputError(f"{source}: cost_unit={cost_unit!r}; valid: {', '.join(COST_UNITS)}")
    units = need(data, "units", "the file")
    if not isinstance(units, list) or not units:
        raise UserInputError(f"{source}: units must be a non-empty list, got {units!r:.80}")
    second = "second_budget" in data
    where = [f"units[{i}]" for i in range(len(units))]
    has_ratios = all(isinstance(u, dict) and "outlier_ratio" in u for u in units)
    has_fractions = all(isinstance(u, dict) and "kept_fraction" in u for u in units)  # older files: none
    try:
        problem = AllocationProblem(
            unit_names=tuple(need(u, "name", w) for u, w in zip(units, where)),
            unit_kinds=tuple(need(u, "kind", w) for u, w in zip(units, where)),
            options=tuple(tuple(need(u, "options", w)) for u, w in zip(units, where)),
            costs=tuple(np.array(need(u, "cost", w), dtype=np.float64) for u, w in zip(units, where)),
            errors=tuple(np.array(need(u, "error", w), dtype=np.float64) for u, w in zip(units, where)),
            budget=float(need(data, "budget", "the file")),
            kept_fractions=tuple(np.array(u["kept_fraction"], dtype=np.float64) for u in units) if has_fractions else None,
            second_costs=tuple(np.array(need(u, "second_cost", w), dtype=np.float64) for u, w in zip(units, where))
            if second else None,
            second_budget=float(data["second_budget"]) if second else None,
            outlier_ratios=tuple(float(u["outlier_ratio"]) for u in units) if has_ratios else None,
        )
    except (TypeError, ValueError) as e:
        if isinstance(e, UserInputError):
            raise
        raise UserInputError(f"{source}: {e}") from e
    fixed_ms = need(data, "fixed_ms", "the file")
    if fixed_ms is None and cost_unit == "ms":
        raise UserInputError(f"{source}: fixed_ms is null, but costs in ms are priced by a latency table")
    fixed_ms = None if fixed_ms is None else float(fixed_ms)
    return ProblemFile(problem, cost_unit, fixed_ms, data.get("second_unit", SECOND_UNIT) if second else None)


def write_problem(run_dir: str | Path, problem: AllocationProblem, cost_unit: str, fixed_ms: float | None) -> Path:
    path = Path(run_dir) / PROBLEM_FILE
    write_json_atomic(path, problem_json(problem, cost_unit, fixed_ms))
    return path


def load_problem(run_dir: str | Path) -> ProblemFile:
    """The problem.json of a search run directory (or the file itself)."""
    path = Path(run_dir)
    path = path / PROBLEM_FILE if path.is_dir() else path
    if not path.is_file():
        raise UserInputError(f"{path} does not exist: a search run directory (runs/search/<timestamp>) holds one")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserInputError(f"{path} is not valid JSON: {e}") from e
    return problem_from_json(data, str(path))
