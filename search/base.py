"""The allocation problem every searcher solves: one option per unit, summed cost <= budget, least summed error."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from allocator.errors import UserInputError
from allocator.registry import Registry


class InfeasibleBudget(UserInputError):
    """Even the cheapest allocation costs more than the budget."""


def _as_vector(values: Any, what: str, unit: str, n: int) -> np.ndarray:
    arr = np.array(values, dtype=np.float64)  # a copy, so the frozen problem cannot change under us
    if arr.shape != (n,):
        raise ValueError(f"allocation problem: unit {unit!r} has {what} of shape {arr.shape}, expected ({n},)")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"allocation problem: unit {unit!r} has {what} that are not all finite and >= 0: {arr}")
    arr.flags.writeable = False
    return arr


# eq=False: the fields hold numpy arrays, whose == is elementwise and unhashable.
@dataclass(frozen=True, eq=False)
class AllocationProblem:
    unit_names: tuple[str, ...]
    unit_kinds: tuple[str, ...]
    # Per unit, option labels (kept counts), strictly ascending.
    options: tuple[tuple[int, ...], ...]
    # Per unit, cost (e.g. ms) and proxy error of each option, aligned with `options`.
    costs: tuple[np.ndarray, ...]
    errors: tuple[np.ndarray, ...]
    budget: float

    def __post_init__(self) -> None:
        n = len(self.unit_names)
        if n == 0:
            raise ValueError("allocation problem has no units")
        for what in ("unit_kinds", "options", "costs", "errors"):
            if len(getattr(self, what)) != n:
                raise ValueError(
                    f"allocation problem: {what} has {len(getattr(self, what))} entries for {n} units"
                )
        if len(set(self.unit_names)) != n:
            raise ValueError(f"allocation problem: unit names are not unique: {self.unit_names}")
        if not math.isfinite(self.budget):
            raise ValueError(f"allocation problem: budget must be finite, got {self.budget}")
        options, costs, errors = [], [], []
        for name, opts, c, e in zip(self.unit_names, self.options, self.costs, self.errors):
            opts = tuple(int(o) for o in opts)
            if not opts:
                raise ValueError(f"allocation problem: unit {name!r} has no options")
            if any(a >= b for a, b in zip(opts, opts[1:])):
                raise ValueError(f"allocation problem: unit {name!r} option labels are not strictly ascending: {opts}")
            options.append(opts)
            costs.append(_as_vector(c, "costs", name, len(opts)))
            errors.append(_as_vector(e, "errors", name, len(opts)))
        object.__setattr__(self, "unit_names", tuple(self.unit_names))
        object.__setattr__(self, "unit_kinds", tuple(self.unit_kinds))
        object.__setattr__(self, "options", tuple(options))
        object.__setattr__(self, "costs", tuple(costs))
        object.__setattr__(self, "errors", tuple(errors))
        object.__setattr__(self, "budget", float(self.budget))

    @property
    def n_units(self) -> int:
        return len(self.unit_names)

    def min_cost(self) -> float:
        return math.fsum(float(c.min()) for c in self.costs)

    def max_cost(self) -> float:
        return math.fsum(float(c.max()) for c in self.costs)

    def _check_choice(self, choice: Sequence[int]) -> None:
        if len(choice) != self.n_units:
            raise ValueError(f"choice has {len(choice)} entries for {self.n_units} units")
        for name, opts, j in zip(self.unit_names, self.options, choice):
            if not 0 <= j < len(opts):
                raise ValueError(f"choice index {j} out of range for unit {name!r} ({len(opts)} options)")

    def cost_of(self, choice: Sequence[int]) -> float:
        self._check_choice(choice)
        return math.fsum(float(c[j]) for c, j in zip(self.costs, choice))

    def error_of(self, choice: Sequence[int]) -> float:
        self._check_choice(choice)
        return math.fsum(float(e[j]) for e, j in zip(self.errors, choice))

    def infeasible(self, detail: str = "") -> InfeasibleBudget:
        """The error to raise when nothing fits; names the budget and the cheapest achievable cost."""
        msg = f"no allocation fits budget {self.budget:.6g}; the minimum achievable cost is {self.min_cost():.6g}"
        return InfeasibleBudget(msg + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class Allocation:
    choice: tuple[int, ...]  # option index per unit
    cost: float
    error: float
    searcher: str
    info: dict[str, Any] = field(default_factory=dict)

    def labels(self, problem: AllocationProblem) -> dict[str, int]:
        problem._check_choice(self.choice)
        return {name: opts[j] for name, opts, j in zip(problem.unit_names, problem.options, self.choice)}


@runtime_checkable
class Searcher(Protocol):
    name: str

    def search(self, problem: AllocationProblem, seed: int) -> Allocation: ...


# Searcher classes, built with keyword options from the config: SEARCHERS.get("dp")(n_buckets=10000).
SEARCHERS: Registry[type] = Registry("searcher")
