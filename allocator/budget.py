"""Budgets: validate early, turn a speedup or latency target into the knapsack's capacity, name the reachable range."""

from __future__ import annotations

from allocator.config import BudgetConfig
from allocator.errors import UserInputError
from allocator.space import ModelShape, Unit, option_params
from profilers.table import RegimeCosts


def validate_budget(cfg: BudgetConfig) -> None:
    if sum(v is not None for v in (cfg.speedup, cfg.latency_ms, cfg.sparsity)) != 1:
        raise UserInputError(
            f"set exactly one of budget.speedup ({cfg.speedup}), budget.latency_ms ({cfg.latency_ms}) and "
            f"budget.sparsity ({cfg.sparsity}); for a latency target use: budget=latency budget.latency_ms=<ms>, "
            "for a parameter budget: budget=sparsity budget.sparsity=<0..1>"
        )
    if cfg.sparsity is not None and not 0.0 < cfg.sparsity < 1.0:
        raise UserInputError(f"budget.sparsity={cfg.sparsity} must be in (0, 1): the share of weights removed")
    if cfg.speedup is not None and cfg.speedup < 1.0:
        raise UserInputError(f"budget.speedup={cfg.speedup} must be >= 1.0 (relative to the dense model)")
    if cfg.latency_ms is not None and cfg.latency_ms <= 0:
        raise UserInputError(f"budget.latency_ms={cfg.latency_ms} must be > 0")
    if not 0.0 <= cfg.headroom < 0.5:
        raise UserInputError(f"budget.headroom={cfg.headroom} must be in [0, 0.5)")


def is_param_budget(cfg: BudgetConfig) -> bool:
    return cfg.sparsity is not None


def target_params(cfg: BudgetConfig, shape: ModelShape, units: list[Unit]) -> float:
    """Weights the pruned decoder may keep under budget.sparsity, after checking the space can get that low."""
    dense = sum(option_params(shape, u.kind, u.full) for u in units)
    least = sum(min(option_params(shape, u.kind, k) for k in u.options) for u in units)
    target = (1.0 - cfg.sparsity) * dense
    if target < least:
        raise UserInputError(
            f"budget.sparsity={cfg.sparsity} is unreachable with this space: at most {1 - least / dense:.3f} of the "
            "weights can be removed (set space.allow_drop=true or a smaller space.mlp_step to go further)"
        )
    return target


def param_sparsity(shape: ModelShape, units: list[Unit], allocation: dict[str, int]) -> float:
    dense = sum(option_params(shape, u.kind, u.full) for u in units)
    return 1.0 - sum(option_params(shape, u.kind, allocation[u.name]) for u in units) / dense


def unit_costs(costs: RegimeCosts, unit: Unit) -> list[float]:
    return [costs.unit_ms[unit.kind][k] for k in unit.options]


def predicted_ms(costs: RegimeCosts, units: list[Unit], allocation: dict[str, int]) -> float:
    kept: dict[str, list[int]] = {}
    for u in units:
        kept.setdefault(u.kind, []).append(allocation[u.name])
    return costs.predict_ms(kept)


def predicted_dense_ms(costs: RegimeCosts, units: list[Unit]) -> float:
    return predicted_ms(costs, units, {u.name: u.full for u in units})


def predicted_min_ms(costs: RegimeCosts, units: list[Unit]) -> float:
    cheapest = {u.name: min(u.options, key=lambda k: costs.unit_ms[u.kind][k]) for u in units}
    return predicted_ms(costs, units, cheapest)


def target_latency_ms(cfg: BudgetConfig, costs: RegimeCosts, units: list[Unit], profile: str) -> float:
    """The latency the pruned model is planned for (the target less the headroom), after checking that the target
    is reachable with this space on this profile (a target reachable only without headroom is planned exactly)."""
    validate_budget(cfg)
    dense = predicted_dense_ms(costs, units)
    fastest = predicted_min_ms(costs, units)
    asked = dense / cfg.speedup if cfg.speedup is not None else float(cfg.latency_ms)
    target = asked / (1.0 + cfg.headroom)
    if asked < fastest:
        name = f"budget.speedup={cfg.speedup}" if cfg.speedup is not None else f"budget.latency_ms={cfg.latency_ms}"
        raise UserInputError(
            f"{name} is unreachable on profile {profile} (regime {cfg.regime}): achievable speedup 1.00-"
            f"{dense / fastest:.2f}x, latency {fastest:.1f}-{dense:.1f} ms (dense {dense:.1f} ms)"
        )
    return max(target, fastest)
