"""What a latency table predicts for an allocation, and the latency a speedup or latency budget plans for."""

from __future__ import annotations

from typing import Sequence

from allocator.core.budget import validate_budget
from allocator.core.config import BudgetConfig
from allocator.core.errors import UserInputError
from allocator.core.space import Unit
from profilers.table import RegimeCosts


def unit_costs(costs: RegimeCosts, unit: Unit) -> list[float]:
    return [costs.unit_ms[unit.kind][k] for k in unit.options]


def predicted_ms(costs: RegimeCosts, units: Sequence[Unit], allocation: dict[str, int]) -> float:
    kept: dict[str, list[int]] = {}
    for u in units:
        kept.setdefault(u.kind, []).append(allocation[u.name])
    return costs.predict_ms(kept)


def predicted_dense_ms(costs: RegimeCosts, units: Sequence[Unit]) -> float:
    return predicted_ms(costs, units, {u.name: u.full for u in units})


def predicted_min_ms(costs: RegimeCosts, units: Sequence[Unit]) -> float:
    cheapest = {u.name: min(u.options, key=lambda k: costs.unit_ms[u.kind][k]) for u in units}
    return predicted_ms(costs, units, cheapest)


def target_latency_ms(cfg: BudgetConfig, costs: RegimeCosts, units: Sequence[Unit], profile: str) -> float:
    """The latency the pruned model is planned for (the target less the headroom), after checking that the target
    is reachable with this space on this profile (a target reachable only without headroom is planned exactly)."""
    validate_budget(cfg)
    dense = predicted_dense_ms(costs, units)
    fastest = predicted_min_ms(costs, units)
    if not fastest > 0:  # fixed cost clipped to 0: a table measured on a busy machine (profilers/stability.py)
        raise UserInputError(
            f"the latency table of profile {profile} cannot plan regime {cfg.regime}: it predicts {fastest:.1f} ms for "
            f"the fastest allocation and {dense:.1f} ms for dense (fixed cost {costs.fixed_ms:.1f} ms), so it was not "
            "measured on a quiet machine; measure it again with profile.refresh=true"
        )
    asked = dense / cfg.speedup if cfg.speedup is not None else float(cfg.latency_ms)
    target = asked / (1.0 + cfg.headroom)
    if asked < fastest:
        name = f"budget.speedup={cfg.speedup}" if cfg.speedup is not None else f"budget.latency_ms={cfg.latency_ms}"
        raise UserInputError(
            f"{name} is unreachable on profile {profile} (regime {cfg.regime}): achievable speedup 1.00-"
            f"{dense / fastest:.2f}x, latency {fastest:.1f}-{dense:.1f} ms (dense {dense:.1f} ms)"
        )
    return max(target, fastest)
