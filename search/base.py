"""The allocation problem every searcher solves: one option per unit, summed cost <= budget, least summed error."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

import numpy as np

from allocator.core.errors import UserInputError
from allocator.core.registry import Registry

if TYPE_CHECKING:
    from search.fitness import Fitness


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
    # Per unit, option labels: kept counts (strictly ascending) or, in sparse spaces, any distinct labels.
    options: tuple[tuple[int | str, ...], ...]
    # Per unit, cost (e.g. ms) and proxy error of each option, aligned with `options`.
    costs: tuple[np.ndarray, ...]
    errors: tuple[np.ndarray, ...]
    budget: float
    # Per unit, OWL's outlier ratio of the unit's layer (from a model run); only the owl searcher needs it.
    outlier_ratios: tuple[float, ...] | None = None
    # An optional second limit beside `budget` (memory bytes beside latency): each option's cost under it, and its cap.
    second_costs: tuple[np.ndarray, ...] | None = None
    second_budget: float | None = None
    # Per unit, the share of the unit's weights each option keeps, for fraction-based baselines (owl); default:
    # each kept count over the largest.
    kept_fractions: tuple[np.ndarray, ...] | None = None

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
            opts = tuple(o if isinstance(o, str) else int(o) for o in opts)
            if not opts:
                raise ValueError(f"allocation problem: unit {name!r} has no options")
            numeric = not any(isinstance(o, str) for o in opts)
            if numeric and any(a >= b for a, b in zip(opts, opts[1:])):
                raise ValueError(f"allocation problem: unit {name!r} option labels are not strictly ascending: {opts}")
            if len(set(opts)) != len(opts):
                raise ValueError(f"allocation problem: unit {name!r} has repeated option labels: {opts}")
            options.append(opts)
            costs.append(_as_vector(c, "costs", name, len(opts)))
            errors.append(_as_vector(e, "errors", name, len(opts)))
        object.__setattr__(self, "unit_names", tuple(self.unit_names))
        object.__setattr__(self, "unit_kinds", tuple(self.unit_kinds))
        object.__setattr__(self, "options", tuple(options))
        object.__setattr__(self, "costs", tuple(costs))
        object.__setattr__(self, "errors", tuple(errors))
        object.__setattr__(self, "budget", float(self.budget))
        if (self.second_costs is None) != (self.second_budget is None):
            raise ValueError("allocation problem: second_costs and second_budget come together")
        if self.second_costs is not None:
            if len(self.second_costs) != n or not math.isfinite(self.second_budget):
                raise ValueError(f"allocation problem: second_costs needs {n} entries and a finite second_budget")
            second = tuple(_as_vector(c, "second costs", u, len(o)) for u, o, c in zip(self.unit_names, options, self.second_costs))
            object.__setattr__(self, "second_costs", second)
            object.__setattr__(self, "second_budget", float(self.second_budget))
        if self.kept_fractions is not None:
            if len(self.kept_fractions) != n:
                raise ValueError(f"allocation problem: kept_fractions needs {n} entries (one per unit)")
            fractions = tuple(_as_vector(f, "kept fractions", u, len(o)) for u, o, f in zip(self.unit_names, options, self.kept_fractions))
            object.__setattr__(self, "kept_fractions", fractions)
        if self.outlier_ratios is not None:
            ratios = np.array(self.outlier_ratios, dtype=np.float64)
            if ratios.shape != (n,) or not np.all(np.isfinite(ratios)) or np.any(ratios < 0):
                raise ValueError(
                    f"allocation problem: outlier_ratios must be {n} finite values >= 0 (one per unit), "
                    f"got {self.outlier_ratios!r}"
                )
            object.__setattr__(self, "outlier_ratios", tuple(float(r) for r in ratios))

    @property
    def n_units(self) -> int:
        return len(self.unit_names)

    def fractions(self, unit: int) -> np.ndarray:
        """The share of the unit's weights each option keeps (kept_fractions, or each count over the largest)."""
        if self.kept_fractions is not None:
            return self.kept_fractions[unit]
        opts = self.options[unit]
        if any(isinstance(o, str) for o in opts):
            raise ValueError(f"unit {self.unit_names[unit]!r} has label options {opts}: the problem needs kept_fractions")
        return np.asarray(opts, dtype=np.float64) / opts[-1] if opts[-1] > 0 else np.ones(len(opts))

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

    def second_cost_of(self, choice: Sequence[int]) -> float:
        self._check_choice(choice)
        if self.second_costs is None:
            return 0.0
        return math.fsum(float(c[j]) for c, j in zip(self.second_costs, choice))

    def fits(self, choice: Sequence[int]) -> bool:
        """Within the budget, and within the second limit if there is one."""
        if self.cost_of(choice) > self.budget:
            return False
        return self.second_costs is None or self.second_cost_of(choice) <= self.second_budget

    def check_feasible(self) -> None:
        """Raise InfeasibleBudget when even each limit's cheapest allocation exceeds it."""
        if self.min_cost() > self.budget:
            raise self.infeasible()
        if self.second_costs is not None and math.fsum(float(c.min()) for c in self.second_costs) > self.second_budget:
            raise self.infeasible("the second limit cannot be met")

    def infeasible(self, detail: str = "") -> InfeasibleBudget:
        """The error to raise when nothing fits; names the budget(s) and the cheapest achievable cost(s)."""
        msg = f"no allocation fits budget {self.budget:.6g}; the minimum achievable cost is {self.min_cost():.6g}"
        if self.second_costs is not None:
            least = math.fsum(float(c.min()) for c in self.second_costs)
            msg += f"; second limit {self.second_budget:.6g}, its minimum {least:.6g}"
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


def check_int_option(cfg: object, field: str, low: int) -> None:
    """Raise UserInputError unless searcher.<field> is an integer (not a bool) >= low."""
    value = getattr(cfg, field)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise UserInputError(f"searcher.{field}={value!r} must be an integer >= {low}")


@dataclass
class SearcherConfig:
    """Options every searcher accepts; each searcher extends it with its own (its `Config` class attribute)."""

    # The searcher to run. This default is the default searcher (conf/search.yaml picks the same one; a test checks
    # they agree); each searcher's Config overrides it with its own name, the one place that name is written.
    name: str = "milp"
    # Bounds on what a fitness-driven searcher (evo, bayes, tyr, random) may spend; 0 = unbounded.
    # It stops at the first check after a bound is reached and returns its best so far.
    max_tokens: int = 0
    max_seconds: float = 0.0

    def validate(self) -> None:
        """Raise UserInputError naming the bad value; subclasses extend (call super)."""
        if self.max_tokens < 0:
            raise UserInputError(f"searcher.max_tokens={self.max_tokens} must be >= 0 (0 = unbounded)")
        if self.max_seconds < 0:
            raise UserInputError(f"searcher.max_seconds={self.max_seconds} must be >= 0 (0 = unbounded)")


@runtime_checkable
class Searcher(Protocol):
    """Built from its config (`cls(cfg)`); `fitness` scores real candidates for the searchers that use one
    (evo, bayes, tyr, random) and is ignored by those that optimise the additive proxy (dp, uniform, owl)."""

    name: str
    Config: type[SearcherConfig]
    stochastic: bool  # whether the seed can change the result
    baseline: bool  # a reference point (uniform, owl, random), not expected to beat random
    uses_fitness: bool  # scores real candidates with the Fitness it is given (else: the additive proxy)

    def search(self, problem: AllocationProblem, seed: int = 0, fitness: Fitness | None = None) -> Allocation: ...


class ConfiguredSearcher:
    """Base of searchers: holds the validated config. Subclasses set traits and Config; `register_searcher` gives
    them their name (the Config's)."""

    name: str  # set by register_searcher from Config.name
    Config: type[SearcherConfig] = SearcherConfig

    def __init__(self, cfg: SearcherConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else self.Config()
        self.cfg.validate()

    def require_fitness(self, fitness: Fitness | None) -> Fitness:
        if fitness is None:
            raise ValueError(f"searcher {self.name} scores real candidates and needs a Fitness (e.g. KL to dense)")
        return fitness

    def begin_fitness(self, fitness: Fitness | None) -> Fitness:
        """The fitness, required, with its counters reset and this search's token and time bounds set."""
        fitness = self.require_fitness(fitness)
        fitness.begin(max_tokens=self.cfg.max_tokens, max_seconds=self.cfg.max_seconds)
        return fitness


# Searcher classes, each with a `Config` (a SearcherConfig subclass) and built as cls(cfg).
SEARCHERS: Registry[type] = Registry("searcher")


def register_searcher(cls: type) -> type:
    """Class decorator: register a searcher under its Config's `name` default, which becomes the class's `name` too,
    so a searcher's name is written once in Python (conf/searcher/<name>.yaml names it for Hydra)."""
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and issubclass(config, SearcherConfig)) or config is SearcherConfig \
            or "name" not in vars(config):
        raise TypeError(f"searcher {cls.__name__} needs a Config: a SearcherConfig subclass that sets its own name")
    cls.name = config.name
    return SEARCHERS.register(config.name)(cls)


def make_searcher(cfg: SearcherConfig) -> Searcher:
    cls = SEARCHERS.get(cfg.name)
    if type(cfg) is SearcherConfig:  # only the shared options were given: the searcher's defaults for the rest
        cfg = cls.Config(**{f.name: getattr(cfg, f.name) for f in fields(SearcherConfig)})
    if not isinstance(cfg, cls.Config):
        raise TypeError(f"searcher {cfg.name!r} needs a {cls.Config.__name__}, got {type(cfg).__name__}")
    cfg.validate()
    return cls(cfg)



def cheaper_option(problem: AllocationProblem, unit: int, j: int, costs: Sequence[np.ndarray] | None = None) -> int | None:
    """The costliest option of `unit` strictly cheaper than option j (the smallest step down), or None.
    `costs` picks the limit to step under (default: the budget's costs)."""
    c = (costs or problem.costs)[unit]
    below = [i for i in range(len(c)) if c[i] < c[j]]
    return max(below, key=lambda i: (c[i], i)) if below else None


def repair(
    problem: AllocationProblem, choice: Sequence[int], rng: np.random.Generator, protect: Sequence[int] = ()
) -> tuple[int, ...]:
    """Step random units down one option at a time until the choice fits the budget (and the second limit). Units
    in `protect` (say, the ones a mutation just raised) are stepped down only once no other unit can be."""
    problem.check_feasible()
    out = list(choice)
    protected = set(protect)
    while not problem.fits(out):  # exact re-sums each step: no drift at a budget of exactly min_cost
        over_first = problem.cost_of(out) > problem.budget
        costs = problem.costs if over_first else problem.second_costs
        movable = [
            u for u in range(problem.n_units) if u not in protected and cheaper_option(problem, u, out[u], costs) is not None
        ]
        if not movable:
            if not protected:
                raise problem.infeasible("repair ran out of cheaper options")
            protected = set()
            continue
        u = movable[int(rng.integers(len(movable)))]
        out[u] = cheaper_option(problem, u, out[u], costs)
    return tuple(out)


def allocation_from(problem: AllocationProblem, choice: Sequence[int], searcher: str, **info: Any) -> Allocation:
    """An Allocation with cost and proxy error computed the one way every searcher reports them."""
    choice_t = tuple(int(j) for j in choice)
    return Allocation(choice_t, problem.cost_of(choice_t), problem.error_of(choice_t), searcher, dict(info))
