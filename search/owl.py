"""Baseline: OWL (Yin et al. 2023) layerwise levels — keep more where a layer has more activation outliers.

Each unit's desired kept fraction is base + lam * r, with r its layer's outlier ratio min-max normalised to [-1, 1];
a unit takes the option whose kept fraction is closest, and base is the largest value whose allocation fits."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from allocator.core.errors import UserInputError
from search.base import (
    Allocation,
    AllocationProblem,
    ConfiguredSearcher,
    SearcherConfig,
    allocation_from,
    register_searcher,
    repair,
)


@dataclass
class OwlConfig(SearcherConfig):
    name: str = "owl"
    # OWL's lambda: the most a unit's kept fraction may deviate from the common base.
    lam: float = 0.08

    def validate(self) -> None:
        super().validate()
        lam = self.lam
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or not 0 <= lam <= 1:
            raise UserInputError(f"searcher.lam={lam!r} must be a number in [0, 1]")


def normalised_ratios(ratios: tuple[float, ...]) -> np.ndarray:
    """Min-max to [-1, 1]; all zeros when the ratios are all equal (no layer stands out)."""
    r = np.asarray(ratios, dtype=np.float64)
    span = float(r.max() - r.min())
    return np.zeros_like(r) if span == 0 else 2 * (r - r.min()) / span - 1


@register_searcher
class OwlSearcher(ConfiguredSearcher):
    stochastic = False
    baseline = True
    uses_fitness = False
    Config = OwlConfig

    def search(self, problem: AllocationProblem, seed: int = 0, fitness: object = None) -> Allocation:
        del seed, fitness  # deterministic, from the outlier ratios and the budget only
        if problem.outlier_ratios is None:
            raise ValueError(
                "searcher owl needs the problem's outlier_ratios, which come from a calibration run of the model "
                "(allocator.levels.compress.outliers.layer_outlier_ratios)"
            )
        problem.check_feasible()
        lam = float(self.cfg.lam)
        shift = lam * normalised_ratios(problem.outlier_ratios)
        # Unit u takes option j once base >= its j-th breakpoint: the midpoint between the kept fractions of options
        # j-1 and j, less its shift (ties go to the larger option). Between breakpoints the allocation is constant,
        # so sweeping them in order visits every allocation OWL can produce, each one option step from the last.
        events: list[tuple[float, int]] = []
        for u, opts in enumerate(problem.options):
            frac = problem.fractions(u)
            events += [(float((frac[j - 1] + frac[j]) / 2 - shift[u]), u) for j in range(1, len(opts))]
        events.sort()
        choice = [0] * problem.n_units
        cost = problem.cost_of(choice)
        # (base, allocation) of every fitting step; None: below all breakpoints (every unit at its lowest option).
        fits: list[tuple[float | None, tuple[int, ...]]] = [(None, tuple(choice))] if cost <= problem.budget else []
        for i, (base, u) in enumerate(events):
            cost += float(problem.costs[u][choice[u] + 1] - problem.costs[u][choice[u]])
            choice[u] += 1
            last_of_tie = i + 1 == len(events) or events[i + 1][0] != base  # equal breakpoints apply together
            if last_of_tie and cost <= problem.budget + 1e-9 * max(1.0, abs(problem.budget)):
                fits.append((base, tuple(choice)))
        # The running sum may drift; the exact re-sum decides, largest base first.
        for base, fit in reversed(fits):
            if problem.fits(fit):
                return allocation_from(problem, fit, self.name, base=base, lam=lam, repaired=False)
        # Even the lowest kept fractions do not fit (costs not increasing with kept count): step down at random,
        # with a fixed generator so the result stays deterministic.
        fit = repair(problem, [0] * problem.n_units, np.random.default_rng(0))
        return allocation_from(problem, fit, self.name, base=None, lam=lam, repaired=True)
