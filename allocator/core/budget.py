"""Budgets: validate early, turn a parameter or memory budget into the knapsack's capacity, name the reachable range.
A latency target is turned into a capacity by the profile's table (profilers/prediction.py)."""

from __future__ import annotations

from allocator.core.config import BudgetConfig
from allocator.core.errors import UserInputError
from allocator.core.memory import option_bytes
from allocator.core.space import Option, Space, option_params


def validate_budget(cfg: BudgetConfig) -> None:
    targets = sum(v is not None for v in (cfg.speedup, cfg.latency_ms, cfg.sparsity))
    if targets > 1 or (targets == 0 and cfg.memory_gb is None):
        raise UserInputError(
            f"set one of budget.speedup ({cfg.speedup}), budget.latency_ms ({cfg.latency_ms}) and budget.sparsity "
            f"({cfg.sparsity}), and/or budget.memory_gb ({cfg.memory_gb}); for a latency target use: budget=latency "
            "budget.latency_ms=<ms>, for a parameter budget: budget=sparsity budget.sparsity=<0..1>, for memory only: "
            "budget=memory budget.memory_gb=<GB>"
        )
    if cfg.memory_gb is not None and cfg.memory_gb <= 0:
        raise UserInputError(f"budget.memory_gb={cfg.memory_gb} must be > 0")
    if cfg.memory_batch < 1 or cfg.memory_context < 1:
        raise UserInputError(
            f"budget.memory_batch={cfg.memory_batch} and budget.memory_context={cfg.memory_context} must be >= 1"
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


def is_latency_budget(cfg: BudgetConfig) -> bool:
    return cfg.speedup is not None or cfg.latency_ms is not None


def memory_costs(cfg: BudgetConfig, space: Space, dtype_bytes: int) -> list[list[float]]:
    """Per unit, bytes of each option as the space's engine holds it: weights (unstructured ones in the space's
    format), plus the KV cache for attention."""
    fmt = space.unstructured_format
    return [
        [float(option_bytes(space.shape, u.kind, k, cfg.memory_batch, cfg.memory_context, dtype_bytes, space.rules, fmt))
         for k in u.options]
        for u in space.units
    ]


def memory_capacity(cfg: BudgetConfig, units_bytes: list[list[float]], fixed: int) -> float:
    """Bytes the prunable units may use under budget.memory_gb, after checking the space can get that low."""
    asked = cfg.memory_gb * 1e9
    least = fixed + sum(min(b) for b in units_bytes)
    dense = fixed + sum(max(b) for b in units_bytes)
    if asked < least:
        raise UserInputError(
            f"budget.memory_gb={cfg.memory_gb} is unreachable: with batch {cfg.memory_batch} x context "
            f"{cfg.memory_context} the model needs {least / 1e9:.4f}-{dense / 1e9:.4f} GB (dense {dense / 1e9:.4f} GB)"
        )
    return asked - fixed


def target_params(cfg: BudgetConfig, space: Space) -> float:
    """Weights the pruned decoder may keep under budget.sparsity, after checking the space can get that low."""
    dense = param_count(space, space.dense_allocation())
    least = sum(min(option_params(space.shape, u.kind, k) for k in u.options) for u in space.units)
    target = (1.0 - cfg.sparsity) * dense
    if target < least:
        raise UserInputError(
            f"budget.sparsity={cfg.sparsity} is unreachable with this space: at most {1 - least / dense:.3f} of the "
            "weights can be removed (set space.allow_drop=true or a smaller space.mlp_step to go further)"
        )
    return target


def param_count(space: Space, allocation: dict[str, Option]) -> int:
    """Decoder linear weights an allocation keeps."""
    return sum(option_params(space.shape, u.kind, allocation[u.name]) for u in space.units)


def param_sparsity(space: Space, allocation: dict[str, Option]) -> float:
    return 1.0 - param_count(space, allocation) / param_count(space, space.dense_allocation())


def budget_label(cfg: BudgetConfig) -> str:
    """The budget as asked, in the words every report uses: its target (sparsity, speedup or latency, the latter two
    in their regime) and, alone or beside it, its memory limit with the KV cache that limit counts."""
    parts = []
    if cfg.sparsity is not None:
        parts.append(f"sparsity {cfg.sparsity:.0%}")
    elif cfg.speedup is not None:
        parts.append(f"speedup {cfg.speedup:.2f}x ({cfg.regime})")
    elif cfg.latency_ms is not None:
        parts.append(f"{cfg.latency_ms:.1f} ms ({cfg.regime})")
    if cfg.memory_gb is not None:
        parts.append(f"memory {cfg.memory_gb} GB (KV cache: batch {cfg.memory_batch} x {cfg.memory_context} tokens)")
    return " + ".join(parts)
