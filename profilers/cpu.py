"""CPU profiler: measures what each (unit, option) costs inside the real model, in each regime, with torch."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy.stats import theilslopes
from torch import nn

from allocator.core.config import ProfileConfig
from allocator.core.space import Option, Space, is_sparse
from allocator.model.sparse_export import build_deployable
from allocator.model.surgery import leading_levels
from kernels import ops
from profilers.regimes import Regime, forward_call, regimes_of
from profilers.stability import measure_checked, unstable_regimes
from profilers.table import (
    CostTable,
    RegimeCosts,
    base_cost,
    clean_curve,
    cpu_fingerprint,
    load_or_measure,
    load_table,
    runtime_settings,
    table_key,
)
from profilers.timing import TimingStats, time_interleaved

log = logging.getLogger(__name__)
# How costs are derived from the timings; part of the table's cache key, so a change re-measures.
METHOD = ("neighbour-dense variants, per-round dense fractions, Theil-Sen width fit, median-residual intercept; "
          "stability checked; fixed part at least the all-narrowest model's measured time")
# Appended for spaces with sparse options only, so structured tables keep their cache key.
SPARSE_METHOD = "; sparse options: per-option medians, costs above the cheapest option"
# ... when SparseLinear runs a dense GEMM on this CPU (no kernel: the weight decompressed once, see
# kernels/sparse_linear.py): a sparse option is the full-width unit in time, so it is priced as that, not timed.
SPARSE_DENSE_METHOD = "; sparse options: decompressed once and run dense on a CPU, priced as the full-width unit"


def sparse_runs_dense() -> bool:
    """Whether exported sparse units run on this CPU as their dense unit (SparseLinear's dense path), rather than
    through a kernel (Triton's interpreter, TRITON_INTERPRET=1: the tests)."""
    return ops.backend("cpu") == "torch-reference"


def _variants(space: Space, time_sparse: bool = True) -> dict[str, dict[str, Option]]:
    """The models timed: dense, and each option of a kind applied to every layer with the other kind dense
    (sparse options only when `time_sparse`).

    All layers of a Llama-family model share one shape, so an option's per-layer cost is measured in the whole
    model's real context (caches, overheads, the neighbouring block present, as in the plans searched for) with
    totals large enough to time reliably: cost(kind, k) = (T(k everywhere) - T(cheapest everywhere)) / layers,
    with T(k) read off the fitted curve of `_fit_widths`."""
    dense = space.dense_allocation()
    variants = {"dense": dense}
    for kind, options in space.options.items():
        for kept in options[:-1]:
            if is_sparse(kept) and not time_sparse:
                continue
            variants[f"{kind}={kept}"] = {
                name: kept if name.endswith("." + kind) else full for name, full in dense.items()
            }
    narrowest = {kind: min(o for o in options if not is_sparse(o)) for kind, options in space.options.items()}
    fixed = {u.name: narrowest[u.kind] for u in space.units}
    if fixed != dense:  # every unit at its narrowest width (dropped, where allowed): the fixed part, timed directly
        variants["fixed"] = fixed
    return variants


def _fit_widths(kind: str, options: tuple[int, ...], fractions: dict[str, np.ndarray]) -> dict[int, float]:
    """Fraction of the dense time with `kind` at each width. The cheapest width is its own median; the kept
    widths above it follow a robust (Theil-Sen) line through every sample. Per-option medians of a few noisy
    samples would do worse: the searcher picks exactly the options whose cost happened to be measured low, so
    independent noise per option turns into systematically optimistic plans; the line pools all samples."""
    if len(options) == 1:  # only the full width (a sparse space without dropping)
        return {options[0]: 1.0}
    cheapest, *kept = options
    curve = {cheapest: float(np.median(fractions[f"{kind}={cheapest}"]))}
    xs = np.concatenate([np.full(len(fractions["dense"]), k) for k in kept])
    ys = np.concatenate([fractions.get(f"{kind}={k}", fractions["dense"]) for k in kept])
    if len(set(kept)) >= 2:
        slope = theilslopes(ys, xs)[0]
        intercept = np.median(ys - slope * xs)  # scipy's median(y) - slope*median(x) jumps between width groups
        curve.update({k: float(intercept + slope * k) for k in kept})
    else:
        curve.update({k: float(np.median(ys)) for k in kept})
    return curve


def measure_regime(
    dense: nn.Module, space: Space, regime: Regime, cfg: ProfileConfig
) -> RegimeCosts:
    source = leading_levels(dense, space.shape)
    as_dense = sparse_runs_dense()
    variants = _variants(space, time_sparse=not as_dense)
    calls = {
        name: forward_call(
            build_deployable(dense, space.shape, alloc, source, space.rules, space.unstructured_format), regime
        )
        for name, alloc in variants.items()
    }
    stats = time_interleaved(calls, cfg.warmup, cfg.repeats, desc=f"profile {regime.name}")
    return regime_costs(space, regime, stats, as_dense)


def regime_costs(space: Space, regime: Regime, stats: dict[str, TimingStats], as_dense: bool) -> RegimeCosts:
    """Per-unit costs from the timings of `_variants` (round-ordered samples; sparse variants absent when
    `as_dense`). Shared with profilers/llamacpp.py, which times the same variants in llama.cpp."""
    # This machine's speed drifts by tens of percent within seconds: each sample is taken as a fraction of the
    # dense time of the same round (multiplicative drift cancels), then scaled back to ms by the dense median.
    dense_samples = np.asarray(stats["dense"].samples_ms)
    fractions = {name: np.asarray(s.samples_ms) / dense_samples for name, s in stats.items()}
    dense_ms = stats["dense"].median_ms
    unit_ms: dict[str, dict[int, float]] = {}
    fixed = 1.0
    for kind, options in space.options.items():
        widths = tuple(o for o in options if not is_sparse(o))
        curve: dict[Option, float] = _fit_widths(kind, widths, fractions)
        if not as_dense:
            curve.update({o: float(np.median(fractions[f"{kind}={o}"])) for o in options if is_sparse(o)})
        # The fixed part is the model with every unit at its cheapest option: the narrowest width, or a sparse
        # format that beats it (a sparse space without dropping has only the full width).
        cheapest = base_cost(curve)
        fixed -= 1.0 - cheapest
        per_layer = {k: (f - cheapest) * dense_ms / space.shape.num_layers for k, f in curve.items()}
        unit_ms[kind] = clean_curve({k: max(0.0, v) for k, v in per_layer.items()})
        if as_dense:  # run as the full-width dense unit: priced as its cleaned cost
            unit_ms[kind].update({o: unit_ms[kind][max(widths)] for o in options if is_sparse(o)})
    # dense less what each kind's cheapest option saves assumes the savings add up; they overlap (dropping every
    # attention and every MLP together saves less than the two apart), and on SmolLM2's prefill the difference
    # went below 0 on a quiet machine. The all-narrowest model, timed, bounds it from below (plans stay pessimistic).
    if "fixed" in fractions:
        fixed = max(fixed, float(np.median(fractions["fixed"])))
    return RegimeCosts(
        regime=asdict(regime),
        fixed_ms=max(0.0, fixed) * dense_ms,
        dense_ms=dense_ms,
        unit_ms=unit_ms,
        raw={name: asdict(s) for name, s in stats.items()},
    )


def _settings(space: Space, cfg: ProfileConfig) -> dict:
    """How the table is measured: part of its cache key."""
    return {
        "warmup": cfg.warmup,
        "repeats": cfg.repeats,
        "regimes": [asdict(r) for r in regimes_of(cfg)],
        "method": METHOD + ((SPARSE_DENSE_METHOD if sparse_runs_dense() else SPARSE_METHOD) if space.has_sparse else ""),
        # Runs dense here whatever the format, but a table is for the model exported: the format joins the key,
        # only when it is not bitmap, so bitmap tables keep their keys; so does the engine, when it is not native.
        **space.format_settings(),
        **runtime_settings(space),
    }


def cached_cpu_table(space: Space, cfg: ProfileConfig, dtype: str, cache_dir: str | Path) -> tuple[CostTable, Path] | None:
    """The table `profile_cpu` would reuse for this device, model, options and settings, if one was saved; None
    instead of measuring one (for a budget that reads no latency, predictions only where they are free). A table
    kept from a busy machine (profile.allow_unstable) is not offered."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    key = table_key(cpu_fingerprint(dtype, torch.get_num_threads()), asdict(space.shape), space.options,
                    _settings(space, cfg))
    path = Path(cache_dir) / "profiles" / f"{cfg.name}-{key}.json"  # load_or_measure's file for that key
    if not path.is_file():
        return None
    table = load_table(path)
    if unstable_regimes(table.regimes):
        log.info("latency table %s was measured on a busy machine: not used for predictions", path)
        return None
    return table, path


def profile_cpu(
    dense: nn.Module,
    space: Space,
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
    settings = _settings(space, cfg)
    by_name = {r.name: r for r in regimes_of(cfg)}

    def measure(name: str) -> RegimeCosts:
        regime = by_name[name]
        log.info("measuring regime %s (batch %d, length %d)", regime.name, regime.batch, regime.length)
        return measure_checked(name, lambda: measure_regime(dense, space, regime, cfg), forward_call(dense, regime),
                               torch.get_num_threads(), cfg.retries, cfg.allow_unstable, cfg.quiet_wait_s)

    args = (cfg.name, cache_dir, fingerprint, asdict(space.shape), space.options, settings, list(by_name), measure)
    table, path = load_or_measure(*args, cfg.refresh, first_regime, on_regime)
    unstable = unstable_regimes(table.regimes)
    if unstable and not cfg.allow_unstable:  # kept by an earlier run with allow_unstable: not reused silently
        log.warning("latency table %s: regime(s) %s were measured on a busy machine; measuring again", path,
                    ", ".join(unstable))
        table, path = load_or_measure(*args, True, first_regime, on_regime)
    return table, path
