"""Latency tables: one versioned JSON per (device fingerprint, model shape, options, settings), with cleaning."""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from allocator.core.atomic_io import write_json_atomic
from allocator.core.cache_lock import TMP_PREFIX, CacheLock
from allocator.core.config import Runtime
from allocator.core.space import Option, Space, is_sparse, parse_option_key

log = logging.getLogger(__name__)

TABLE_VERSION = 1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_fingerprint(dtype: str, threads: int) -> dict:
    return {
        "device": cpu_name(),
        "machine": platform.machine(),
        "threads": threads,
        "torch": torch.__version__,
        "dtype": dtype,
    }


@dataclass
class RegimeCosts:
    regime: dict  # Regime fields
    fixed_ms: float  # every unit at its cheapest option (dropped, where allowed): embeddings, norms, lm_head, ...
    dense_ms: float  # the dense model, measured end to end
    unit_ms: dict[str, dict[Option, float]]  # kind → option → per-layer cost (widths cleaned: non-increasing with pruning)
    raw: dict[str, dict] = field(default_factory=dict)  # variant → TimingStats fields, as measured
    # CPU tables: spread, dense re-checks, other processes' CPU and the verdict (profilers/stability.py); None in
    # tables measured before it was recorded, and in GPU and roofline tables.
    stability: dict | None = None

    def predict_ms(self, widths: dict[str, list[Option]]) -> float:
        """fixed + Σ per-unit costs, for a {kind: [option per layer]} description."""
        return self.fixed_ms + sum(self.unit_ms[kind][k] for kind, ks in widths.items() for k in ks)


@dataclass
class CostTable:
    profile: str
    source: str  # "measured" (on the profile's device) or "roofline" (from its datasheet: profilers/roofline.py)
    fingerprint: dict
    model_shape: dict
    options: dict[str, list[int]]
    settings: dict
    regimes: dict[str, RegimeCosts]
    version: int = TABLE_VERSION

    def regime(self, name: str) -> RegimeCosts:
        if name not in self.regimes:
            raise ValueError(f"regime {name!r} is not in profile {self.profile!r}; known: {', '.join(self.regimes)}")
        return self.regimes[name]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "CostTable":
        regimes = {}
        for name, r in data["regimes"].items():
            unit_ms = {
                kind: {parse_option_key(str(k)): float(v) for k, v in costs.items()} for kind, costs in r["unit_ms"].items()
            }
            regimes[name] = RegimeCosts(r["regime"], float(r["fixed_ms"]), float(r["dense_ms"]), unit_ms, r["raw"],
                                         r.get("stability"))
        fields = {k: data[k] for k in ("profile", "source", "fingerprint", "model_shape", "options", "settings")}
        return cls(**fields, regimes=regimes, version=data["version"])


def runtime_settings(space: Space) -> dict:
    """The engine a table prices for, for its settings (so its cache key): only when not native, so the tables of
    native spaces keep their keys."""
    return {} if space.runtime == Runtime.native else {"runtime": str(space.runtime)}


def table_runtime(table: CostTable) -> str:
    """The engine a table prices for (tables without the setting are native)."""
    return table.settings.get("runtime", str(Runtime.native))


def table_key(fingerprint: dict, model_shape: dict, options: dict, settings: dict) -> str:
    blob = json.dumps([TABLE_VERSION, fingerprint, model_shape, options, settings], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_table(table: CostTable, path: Path) -> None:
    write_json_atomic(path, table.to_json())


def load_table(path: Path) -> CostTable:
    try:
        data = json.loads(path.read_text())
        if data.get("version") != TABLE_VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {TABLE_VERSION}")
        return CostTable.from_json(data)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"latency table {path} is corrupt or of another format ({exc}); delete it to re-measure") from None


def load_or_measure(
    profile: str,
    cache_dir: str | Path,
    fingerprint: dict,
    model_shape: dict,
    options: dict,
    settings: dict,
    regime_names: list[str],
    measure: Callable[[str], RegimeCosts],
    refresh: bool = False,
    first_regime: str | None = None,
    on_regime: Callable[[str, RegimeCosts], None] | None = None,
) -> tuple[CostTable, Path]:
    """The cached table for this key, or one measured regime by regime with `measure` (`first_regime` first, so
    `on_regime` can check a budget before the others are spent on). Regimes measured so far are kept in a partial
    table, so an interrupted profile resumes where it stopped. Concurrent callers measure once: the others wait for
    the table's lock, then reuse what the first saved (with `refresh`, a table saved while they waited)."""
    path = Path(cache_dir) / "profiles" / f"{profile}-{table_key(fingerprint, model_shape, options, settings)}.json"
    if path.is_file() and not refresh:
        return _reuse(path, first_regime, on_regime), path
    seen = _mtime(path)
    partial = path.with_suffix(".partial.json")
    with CacheLock(cache_dir, path, "latency table") as lock:
        for name in (path.name, partial.name):  # a killed profiler's unfinished atomic writes
            lock.remove_stale(path.parent, f"{TMP_PREFIX}{name}-")
        if path.is_file() and (not refresh or _mtime(path) != seen):
            log.info("latency table: measured by another process while this one waited")
            return _reuse(path, first_regime, on_regime), path
        table = CostTable(profile, "measured", fingerprint, model_shape, options, settings, {})
        if partial.is_file() and not refresh:
            table.regimes = load_table(partial).regimes
            log.info("latency table: resuming %s (%s measured)", partial, ", ".join(table.regimes) or "nothing")
        for name in sorted(regime_names, key=lambda n: n != first_regime):
            if name not in table.regimes:
                table.regimes[name] = measure(name)
                save_table(table, partial)
            if on_regime is not None and name == first_regime:
                on_regime(name, table.regimes[name])
        save_table(table, path)
        partial.unlink(missing_ok=True)
    log.info("latency table: measured and saved to %s", path)
    return table, path


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _reuse(path: Path, first_regime: str | None, on_regime: Callable[[str, RegimeCosts], None] | None) -> CostTable:
    table = load_table(path)
    log.info("latency table: reusing %s (fingerprint matches)", path)
    if on_regime is not None and first_regime is not None:
        on_regime(first_regime, table.regime(first_regime))
    return table


def base_cost(costs: dict[Option, float]) -> float:
    """What an option is costed above: the narrowest width's value, or a sparse option's when lower (noise can put
    a wider width below the narrowest; those are clipped, not made the base)."""
    narrowest = min(k for k in costs if not is_sparse(k))
    return min([costs[narrowest], *(v for k, v in costs.items() if is_sparse(k))])


def clean_curve(costs: dict[Option, float]) -> dict[Option, float]:
    """Widths non-increasing as pruning grows: walking from the most pruned width up, a cost never falls below the
    one before. Rounding up keeps predictions pessimistic, so a plan that fits the table also fits the device.
    Sparse options have no order among themselves (a format may cost more than dense) and pass unchanged."""
    out: dict[Option, float] = {}
    running = 0.0
    for kept in sorted(k for k in costs if not is_sparse(k)):
        running = max(running, costs[kept])
        out[kept] = running
    out.update({k: v for k, v in costs.items() if is_sparse(k)})
    return out
