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


def _uniform_allocation(units: list[Unit], attn: int | None, mlp: int | None) -> dict[str, int]:
    """Every attention unit at `attn` kept, every MLP unit at `mlp` (None = dense)."""
    choice = {ATTN: attn, MLP: mlp}
    return {u.name: u.full if choice[u.kind] is None else choice[u.kind] for u in units}


def _variants(units: list[Unit]) -> dict[str, dict[str, int]]:
    """The models timed: the skeleton (every block dropped), dense, and each option applied to every layer of its
    kind with the other kind dropped. An option's per-layer cost is (T(option everywhere) - T(skeleton)) / layers:
    all layers of a Llama-family model share one shape, so the cost is measured in the model's real context
    (caches, overheads) with totals large enough to time reliably."""
    attn_options = next(u.options for u in units if u.kind == ATTN)
    mlp_options = next(u.options for u in units if u.kind == MLP)
    variants = {"skeleton": _uniform_allocation(units, 0, 0), "dense": _uniform_allocation(units, None, None)}
    variants.update({f"attn={k}": _uniform_allocation(units, k, 0) for k in attn_options if k})
    variants.update({f"mlp={n}": _uniform_allocation(units, 0, n) for n in mlp_options if n})
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
    # This machine's speed drifts by tens of percent over seconds; costs are taken as fractions of the dense time
    # of the same round (multiplicative drift cancels), then scaled back to ms by the dense median.
    dense_ms = stats["dense"].median_ms
    fixed_fraction = paired_ratio(stats["skeleton"], stats["dense"])
    unit_ms: dict[str, dict[int, float]] = {ATTN: {0: 0.0}, MLP: {0: 0.0}}
    for name, s in stats.items():
        if "=" in name:
            kind, kept = name.split("=")
            fraction = paired_ratio(s, stats["dense"]) - fixed_fraction
            unit_ms[kind][int(kept)] = max(0.0, fraction * dense_ms / shape.num_layers)
    unit_ms = {kind: clean_curve(costs) for kind, costs in unit_ms.items()}
    return RegimeCosts(
        regime=asdict(regime),
        fixed_ms=fixed_fraction * dense_ms,
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
