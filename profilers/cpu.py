"""CPU profiler: measures what each (unit, option) costs inside the real model, in each regime, with torch."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from allocator.config import ProfileConfig
from allocator.pruned_model import build_pruned_model, leading_levels
from allocator.space import ATTN, MLP, ModelShape, Unit
from profilers.regimes import Regime, forward_call, regimes_of
from profilers.table import CostTable, RegimeCosts, clean_curve, cpu_fingerprint, load_table, save_table, table_key
from profilers.timing import paired_ratio, time_interleaved

log = logging.getLogger(__name__)


def _variants(units: list[Unit]) -> dict[str, dict[str, int]]:
    """The models timed: dense, and each option of a kind applied to every layer with the other kind dense.

    All layers of a Llama-family model share one shape, so an option's per-layer cost is measured in the whole
    model's real context (caches, overheads, the neighbouring block present, as in the plans searched for) with
    totals large enough to time reliably: cost(kind, k) = (T(k everywhere) - T(cheapest everywhere)) / layers."""
    dense = {u.name: u.full for u in units}
    variants = {"dense": dense}
    for unit in units[:2]:  # one attention and one MLP unit carry the option lists
        for kept in unit.options[:-1]:
            variants[f"{unit.kind}={kept}"] = {
                name: kept if name.endswith("." + unit.kind) else full for name, full in dense.items()
            }
    return variants


def measure_regime(
    dense: nn.Module, shape: ModelShape, units: list[Unit], regime: Regime, cfg: ProfileConfig
) -> RegimeCosts:
    source = leading_levels(dense, shape)
    variants = _variants(units)
    calls = {
        name: forward_call(build_pruned_model(dense, shape, alloc, source), regime) for name, alloc in variants.items()
    }
    stats = time_interleaved(calls, cfg.warmup, cfg.repeats, desc=f"profile {regime.name}")
    # This machine's speed drifts by tens of percent over seconds: each variant is taken as a fraction of the
    # dense time of the same round (multiplicative drift cancels), then scaled back to ms by the dense median.
    dense_ms = stats["dense"].median_ms
    fraction = {name: paired_ratio(s, stats["dense"]) for name, s in stats.items()}
    unit_ms: dict[str, dict[int, float]] = {}
    fixed = 1.0
    for unit in units[:2]:
        cheapest = fraction[f"{unit.kind}={unit.options[0]}"]
        fixed -= 1.0 - cheapest
        per_layer = {k: (fraction.get(f"{unit.kind}={k}", 1.0) - cheapest) * dense_ms / shape.num_layers for k in unit.options}
        unit_ms[unit.kind] = clean_curve({k: max(0.0, v) for k, v in per_layer.items()})
    return RegimeCosts(
        regime=asdict(regime),
        fixed_ms=max(0.0, fixed) * dense_ms,
        dense_ms=dense_ms,
        unit_ms=unit_ms,
        raw={name: asdict(s) for name, s in stats.items()},
    )


def profile_cpu(
    dense: nn.Module,
    shape: ModelShape,
    units: list[Unit],
    cfg: ProfileConfig,
    dtype: str,
    cache_dir: str | Path,
    first_regime: str | None = None,
    on_regime: Callable[[str, RegimeCosts], None] | None = None,
) -> tuple[CostTable, Path]:
    """Load the table for this device/model/options, or measure it (the `first_regime` first, so a budget can be
    checked by `on_regime` before the remaining regimes are spent on)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    fingerprint = cpu_fingerprint(dtype, torch.get_num_threads())
    options = {ATTN: list(units[0].options), MLP: list(units[1].options)}
    settings = {"warmup": cfg.warmup, "repeats": cfg.repeats, "regimes": [asdict(r) for r in regimes_of(cfg)]}
    model_shape = asdict(shape)
    path = Path(cache_dir) / "profiles" / f"{cfg.name}-{table_key(fingerprint, model_shape, options, settings)}.json"
    if path.is_file() and not cfg.refresh:
        table = load_table(path)
        log.info("latency table: reusing %s (fingerprint matches)", path)
        if on_regime is not None and first_regime is not None:
            on_regime(first_regime, table.regime(first_regime))
        return table, path
    regimes = sorted(regimes_of(cfg), key=lambda r: r.name != first_regime)
    measured: dict[str, RegimeCosts] = {}
    for regime in regimes:
        log.info("measuring regime %s (batch %d, length %d)", regime.name, regime.batch, regime.length)
        measured[regime.name] = measure_regime(dense, shape, units, regime, cfg)
        if on_regime is not None and regime.name == first_regime:
            on_regime(regime.name, measured[regime.name])
    table = CostTable(cfg.name, "measured", fingerprint, model_shape, options, settings, measured)
    save_table(table, path)
    log.info("latency table: measured and saved to %s", path)
    return table, path
