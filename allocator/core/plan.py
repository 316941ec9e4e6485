"""`plan.json` as a typed object: what was asked, what was chosen, what it is predicted and measured to do.

Built once by the search job; read by verify, the report, export, the sweep summary and the runtime loader, all
through attributes. The JSON keeps the field names the untyped plan had, so runs written before the version field
existed still load (see `_upgrade_unversioned`).

Changing the schema (a field added to, renamed in or removed from any dataclass here, including the embedded
`BudgetConfig` and `ModelConfig`) means: bump PLAN_VERSION, add an upgrade from the previous version to
`_UPGRADES`, and update the field list pinned in tests/test_plan.py and the README's "What a run writes". A field
with a default that older plans lack (written always, marked omit_if_none so a missing one reads as its default)
needs no version: `unstructured_format`.
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass, field, fields, is_dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional, Union, get_args, get_origin, get_type_hints

from allocator.core.atomic_io import write_json_atomic
from allocator.core.budget import budget_label
from allocator.core.config import BudgetConfig, ErrorMetric, ModelConfig, Runtime
from allocator.core.errors import UserInputError
from allocator.core.space import Option

PLAN_VERSION = 3
PLAN_FILE = "plan.json"
# profile.source of a plan made without a latency table (a parameter or memory budget, none saved): its predicted
# latencies and speedups are null, and verify measures the speedup without comparing it with a prediction.
NO_TABLE = "none"
_OMIT = "omit_if_none"


def _when_set():
    """A field written only when it has a value (the untyped plan left such keys out), read back as None."""
    return field(default=None, metadata={_OMIT: True})


class PlanError(UserInputError):
    """A plan.json this code cannot read: a missing or mistyped field, or a version it does not know."""


@dataclass
class PlanBudget(BudgetConfig):
    """The budget as asked (the job's `budget` section) and what the search planned for."""

    # Latency planned for (the target less budget.headroom), in budget.regime; None without a latency target.
    target_ms: Optional[float] = None
    # Decoder linear weights the allocation may keep under a sparsity budget.
    target_params: Optional[float] = _when_set()

    def label(self) -> str:
        return budget_label(self)


@dataclass
class PlanProfile:
    name: str
    source: str  # "measured", "roofline" or NO_TABLE ("none": latency not predicted)
    fingerprint: dict[str, Any]  # the device fingerprint the latency table is keyed by ({} without a table)
    table: Optional[str]  # path of the latency table the plan was made with; None without one


@dataclass
class SearcherInfo:
    name: str
    proxy_error: float  # sum of the per-unit errors (error_metric) of the chosen options
    error_metric: ErrorMetric
    # Searchers that score real candidates: best KL fitness, forward tokens spent, evaluations, wall time.
    fitness: Optional[float] = _when_set()
    tokens_spent: Optional[int] = _when_set()
    evaluations: Optional[int] = _when_set()
    seconds: Optional[float] = _when_set()


@dataclass
class Predicted:
    """What the latency table and the memory model predict for the searched allocation (in budget.regime); the
    latencies and speedup are None when the plan had no latency table (profile.source NO_TABLE)."""

    latency_ms: Optional[float]
    dense_latency_ms: Optional[float]
    speedup: Optional[float]
    param_sparsity: Optional[float]  # share of the decoder linear weights removed; None in plans older than it
    weight_bytes: int  # the exported (deployable) model's weights
    dense_weight_bytes: int
    kv_cache_bytes: Optional[int]  # budget.memory_batch x budget.memory_context tokens; None in plans older than it
    memory_bytes: Optional[int]  # weights + KV cache; None in plans older than it


@dataclass
class Uniform:
    """The uniform allocation at the same budget, scored like the searched one."""

    allocation: dict[str, Option]
    proxy_error: float
    predicted_latency_ms: Optional[float]  # None without a latency table
    predicted_speedup: Optional[float]
    param_sparsity: Optional[float]  # None in plans older than it
    kl: float
    ppl_dense: float
    ppl_pruned: float


@dataclass
class Quality:
    kl: float  # KL to the dense model on calibration sequences
    ppl_dense: float  # held-out perplexity
    ppl_pruned: float


@dataclass
class Timing:
    """profilers.timing.TimingStats as written."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    samples_ms: list[float]


@dataclass
class MeasuredMemory:
    weight_bytes: int  # the reloaded model's weights
    kv_cache_bytes: float  # read off a real KV cache
    total_bytes: float


@dataclass
class Measured:
    """End-to-end verification of the exported model against the dense one."""

    regime: str
    latency_ms: float
    dense_latency_ms: float
    speedup: float
    predicted_speedup: Optional[float]  # the three are None for a plan without a latency table
    speedup_prediction_error: Optional[float]
    latency_prediction_error: Optional[float]
    pruned_stats: Timing
    dense_stats: Timing
    param_sparsity: Optional[float] = _when_set()  # under a sparsity budget, counted in the reloaded weights
    memory: Optional[MeasuredMemory] = _when_set()  # under a memory budget
    device: Optional[str] = _when_set()  # the GPU timed on, for a GPU profile
    target_met: Optional[bool] = _when_set()  # whenever a limit of the budget was checked
    verdict: Optional[str] = _when_set()
    # Version 2: absolute latency against the latency table, so a table that no longer describes the machine is
    # flagged even where the speedup (a ratio, in which a uniformly slow table cancels) looks right.
    predicted_latency_ms: Optional[float] = _when_set()  # the table's prediction for the pruned model, this regime
    predicted_dense_latency_ms: Optional[float] = _when_set()  # ... and for the dense model
    dense_prediction_error: Optional[float] = _when_set()  # predicted / measured dense latency - 1
    table_stale: Optional[bool] = _when_set()  # |dense_prediction_error| beyond the tolerance (verify_job.py)
    table_note: Optional[str] = _when_set()  # when stale: the mismatch and the command that re-measures the table


@dataclass
class Plan:
    allocation: dict[str, Option]  # unit name -> kept count or sparse option label
    budget: PlanBudget
    profile: PlanProfile
    model: str
    model_spec: ModelConfig
    searcher: SearcherInfo
    predicted: Predicted
    uniform: Uniform
    quality: Quality
    # Kernel format the unstructured sparse units are exported in (space.unstructured_format, resolved): always
    # written; a plan from before the choice existed exported bitmaps and loads with that default (no upgrade step).
    unstructured_format: str = field(default="bitmap", metadata={_OMIT: True})
    measured: Optional[Measured] = _when_set()
    verify_skipped: Optional[str] = _when_set()  # why verification did not run (a device not present here)
    # Version 3: the engine the plan was searched and priced for (space.runtime), written when not native.
    runtime: Optional[Runtime] = _when_set()
    version: int = PLAN_VERSION

    @property
    def engine(self) -> Runtime:
        """The engine the plan is for: its runtime, native when none is recorded."""
        return self.runtime or Runtime.native

    def with_measured(self, measured: Measured) -> Plan:
        """The plan with a verification's result (which replaces an earlier skip)."""
        return replace(self, measured=measured, verify_skipped=None)

    def with_verify_skipped(self, reason: str) -> Plan:
        return replace(self, measured=None, verify_skipped=reason)

    def to_json(self) -> dict:
        """A JSON-ready dict, `version` first."""
        data = _to_json(self)
        return {"version": data.pop("version"), **data}

    @classmethod
    def from_json(cls, data: Any, source: str = PLAN_FILE) -> Plan:
        """Read a plan of this or an earlier version; PlanError (a ValueError) names `source` and the field."""
        if not isinstance(data, dict):
            raise PlanError(f"{source}: a plan is a JSON object, got {type(data).__name__}")
        version = data.get("version", 0)  # 0: written before plans had a version
        if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= PLAN_VERSION:
            raise PlanError(
                f"{source}: plan version {version!r} is unknown; this sparsity-allocator reads versions up to "
                f"{PLAN_VERSION} (and plans without a version). A newer release wrote it?"
            )
        data = dict(data)
        while version < PLAN_VERSION:
            data = _UPGRADES[version](data)
            version += 1
        data["version"] = version
        return _build(cls, data, "", source)

    def save(self, path: str | Path) -> None:
        write_json_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise PlanError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_json(data, str(path))


# --- versions -------------------------------------------------------------------------------------------------------


def _upgrade_unversioned(data: dict) -> dict:
    """Plans written before the version field: the same fields, except in the oldest runs, whose later additions
    are filled with what those runs did (no headroom) or None where nothing was recorded."""
    data = dict(data)
    if isinstance(data.get("budget"), dict):
        budget = dict(data["budget"])
        budget.setdefault("headroom", 0.0)  # before budget.headroom, plans aimed at the target itself
        for key, default in (("sparsity", None), ("memory_gb", None), ("memory_batch", 1), ("memory_context", 2048)):
            budget.setdefault(key, default)  # budgets of those kinds did not exist yet: unused at these values
        data["budget"] = budget
    for section in ("predicted", "uniform"):
        if isinstance(data.get(section), dict):
            data[section] = {"param_sparsity": None, **data[section]}
    if isinstance(data.get("predicted"), dict):
        data["predicted"] = {"kv_cache_bytes": None, "memory_bytes": None, **data["predicted"]}
    measured = data.get("measured")
    if isinstance(measured, dict) and "prediction_error" in measured:  # one error, of the latency, was recorded
        measured = {k: v for k, v in measured.items() if k != "prediction_error"}
        measured.setdefault("latency_prediction_error", data["measured"]["prediction_error"])
        if "speedup_prediction_error" not in measured and measured.get("speedup"):
            measured["speedup_prediction_error"] = measured["predicted_speedup"] / measured["speedup"] - 1.0
        data["measured"] = measured
    return data


def _upgrade_1(data: dict) -> dict:
    """Version 2 added optional fields to `measured` (absolute latency against the table): a version-1 plan is
    read as it is, without them."""
    return dict(data)


def _upgrade_2(data: dict) -> dict:
    """Version 3 added the optional `runtime` (written for engines other than native): a version-2 plan is native."""
    return dict(data)


_UPGRADES: dict[int, Callable[[dict], dict]] = {0: _upgrade_unversioned, 1: _upgrade_1, 2: _upgrade_2}


# --- dataclasses <-> JSON -------------------------------------------------------------------------------------------


def _to_json(value: Any) -> Any:
    if is_dataclass(value):
        out = {}
        for f in fields(value):
            v = getattr(value, f.name)
            if v is None and f.metadata.get(_OMIT):
                continue
            out[f.name] = _to_json(v)
        return out
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def _build(cls: type, data: Any, where: str, source: str) -> Any:
    """`cls` from `data`: every field present (except those written only when set), none unknown, each of its type."""
    if not isinstance(data, dict):
        raise PlanError(f"{source}: field {where} must be an object, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PlanError(f"{source}: unknown field {_path(where, unknown[0])} (known: {', '.join(sorted(known))})")
    kwargs = {}
    for f in fields(cls):
        key = _path(where, f.name)
        if f.name not in data:
            if f.metadata.get(_OMIT):
                continue
            raise PlanError(f"{source}: missing field {key}")
        kwargs[f.name] = _value(hints[f.name], data[f.name], key, source)
    return cls(**kwargs)


def _path(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _value(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        choices = [a for a in args if a is not type(None)]
        if len(choices) == 1 and is_dataclass(choices[0]):  # Optional[section]: the section names its own errors
            return _build(choices[0], value, key, source)
        for arg in choices:
            try:
                return _value(arg, value, key, source)
            except PlanError:
                continue
        raise PlanError(f"{source}: field {key} must be {_type_name(tp)}, got {value!r}")
    if is_dataclass(tp):
        return _build(tp, value, key, source)
    if origin is dict:
        if not isinstance(value, dict):
            raise PlanError(f"{source}: field {key} must be an object, got {value!r}")
        _, item = get_args(tp)
        return {k: _value(item, v, f"{key}.{k}", source) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise PlanError(f"{source}: field {key} must be a list, got {value!r}")
        (item,) = get_args(tp)
        return [_value(item, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            raise PlanError(f"{source}: field {key}={value!r} is not one of {', '.join(str(v.value) for v in tp)}") from None
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise PlanError(f"{source}: field {key} must be {_type_name(tp)}, got {value!r}")


def _type_name(tp: Any) -> str:
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))
