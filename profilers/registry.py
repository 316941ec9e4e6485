"""Profile name → how its latency table is obtained: measured on this CPU, a measured table of the named device
when one exists, measured on it when it is present (profilers/gpu.py), else that device's roofline.
`get_cost_table` is the one entry point of the jobs."""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from allocator.core.cache_lock import TMP_PREFIX, CacheLock
from allocator.core.config import ProfileConfig
from allocator.core.errors import UserInputError
from allocator.core.registry import Registry
from allocator.core.space import Space
from profilers.cpu import cached_cpu_table, profile_cpu
from profilers.devices import DEVICES, DeviceSpec, name_matches
from profilers.gpu import profile_gpu
from profilers.gpu_timing import cuda_device_named
from profilers.regimes import Regime, regimes_of
from profilers.roofline import deploy_dtype, roofline_table
from profilers.table import CostTable, RegimeCosts, cpu_fingerprint, load_table, save_table, table_key, table_runtime

log = logging.getLogger(__name__)

# Measured tables committed with the repository: profilers/tables/<profile>-*.json.
TABLES_DIR = Path(__file__).resolve().parent / "tables"
LLAMACPP = "llamacpp"  # llama.cpp on this CPU (llama-bench), the runtime of `gguf` exports

OnRegime = Optional[Callable[[str, RegimeCosts], None]]
# (name, dense, space, cfg, dtype, cache_dir, first_regime, on_regime, tables_dir) → (table, its file)
Obtain = Callable[..., tuple[CostTable, Path]]
PROFILES: Registry[Obtain] = Registry("profile")


def get_cost_table(
    name: str,
    dense: nn.Module | None,
    space: Space,
    cfg: ProfileConfig,
    dtype: str,
    cache_dir: str | Path,
    first_regime: str | None = None,
    on_regime: OnRegime = None,
    *,
    tables_dir: Path | None = None,
) -> tuple[CostTable, Path]:
    """The latency table of profile `name` and its file; table.source says "measured" or "roofline"."""
    if name not in PROFILES:
        raise UserInputError(f"profile={name!r} is unknown; known: {', '.join(PROFILES.names())}")
    tables_dir = TABLES_DIR if tables_dir is None else tables_dir
    obtain = PROFILES.get(name)
    return obtain(name, dense, space, cfg, dtype, Path(cache_dir), first_regime, on_regime, tables_dir)


def existing_cost_table(
    name: str, space: Space, cfg: ProfileConfig, dtype: str, cache_dir: str | Path, *, tables_dir: Path | None = None
) -> tuple[CostTable, Path] | None:
    """A latency table of profile `name` that costs no measurement: a CPU table this machine already saved, a
    measured table of the device (cache or repository), else the device's roofline; None for a CPU with none saved.
    For budgets that read no latency: predictions where they are free, never a profile."""
    if name not in PROFILES:
        raise UserInputError(f"profile={name!r} is unknown; known: {', '.join(PROFILES.names())}")
    if name == "cpu":
        return cached_cpu_table(space, cfg, dtype, cache_dir)
    if name == LLAMACPP:
        from profilers.llamacpp import cached_llamacpp_table

        return cached_llamacpp_table(space, cfg, cache_dir)
    tables_dir = TABLES_DIR if tables_dir is None else tables_dir
    # no model (dense=None) and no refresh: a measured table or the roofline, never a measurement on the device
    return _device_table(DEVICES[name], name, None, space, replace(cfg, refresh=False), dtype, Path(cache_dir), None,
                         None, tables_dir)


def device_present(name: str) -> bool:
    """Whether end-to-end timing on this machine measures the profile's device."""
    if name in ("cpu", LLAMACPP):
        return True
    spec = DEVICES[name]
    if not spec.is_gpu or not torch.cuda.is_available():
        return False
    return any(name_matches(spec.name, torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count()))


def fingerprint_mismatch(expected: dict, found: dict) -> str | None:
    """The first field in which a table's fingerprint differs from this device's, worded; None if all agree."""
    for key, value in expected.items():
        if found.get(key) != value:
            return f"fingerprint field {key!r} is {found.get(key)!r}, this device has {value!r}"
    return None


def _load(path: Path) -> CostTable:
    try:
        return load_table(path)
    except ValueError as exc:  # names the file; a UserInputError reaches the CLI as one line
        raise UserInputError(str(exc)) from None


def _measured_cpu(
    name: str, dense: nn.Module | None, space: Space, cfg: ProfileConfig, dtype: str,
    cache_dir: Path, first_regime: str | None, on_regime: OnRegime, tables_dir: Path,
) -> tuple[CostTable, Path]:
    if dense is None:
        raise UserInputError("profile=cpu measures the model: its weights must be loaded")
    # profile_cpu calls on_regime after the first regime, so a budget fails before the other regimes are measured.
    # The fingerprint is part of its file name, so only a renamed or copied file can disagree below.
    table, path = profile_cpu(dense, space, cfg, dtype, cache_dir, first_regime, on_regime)
    reason = fingerprint_mismatch(cpu_fingerprint(dtype, torch.get_num_threads()), table.fingerprint)
    if reason is not None:
        raise UserInputError(f"latency table {path} was measured on another device ({reason}); "
                             "re-measure with profile.refresh=true")
    return table, path


def _covers(table: CostTable, space: Space, regimes: list[Regime]) -> bool:
    """The table is for this model, space and engine and has every regime asked for (else it is another model's
    table)."""
    return (
        table.model_shape == asdict(space.shape)
        and table.options == space.options
        and table.settings.get("unstructured_format", "bitmap") == space.unstructured_format
        and table_runtime(table) == space.runtime
        and all(r.name in table.regimes and table.regimes[r.name].regime == asdict(r) for r in regimes)
    )


def find_measured(
    spec: DeviceSpec, space: Space, regimes: list[Regime], dtype: str, dirs: list[Path]
) -> tuple[CostTable, Path] | None:
    """A measured table of `spec` for this model, from `dirs` in order; refused, naming the field, if the only
    ones for this model were measured on another device or in another precision."""
    expected = {"device": spec.name, "dtype": deploy_dtype(dtype)}
    refused = []
    for directory in dirs:
        for path in sorted(directory.glob(f"{spec.key}-*.json")):
            if path.name.startswith(f"{spec.key}-roofline-") or path.name.endswith(".partial.json"):
                continue
            table = _load(path)
            if table.source != "measured" or not _covers(table, space, regimes):
                continue
            reason = fingerprint_mismatch(expected, table.fingerprint)
            if reason is None:
                return table, path
            refused.append(f"{path} ({reason})")
    if refused:
        raise UserInputError(
            f"measured latency table for profile {spec.key} refused: {'; '.join(refused)}. Re-measure it on "
            f"{spec.name}, or move it away to plan with the roofline"
        )
    return None


def _device_table(
    spec: DeviceSpec, name: str, dense: nn.Module | None, space: Space, cfg: ProfileConfig,
    dtype: str, cache_dir: Path, first_regime: str | None, on_regime: OnRegime, tables_dir: Path,
) -> tuple[CostTable, Path]:
    present = spec.is_gpu and device_present(name)
    if cfg.refresh:  # a generic CPU is no machine to measure
        if not spec.is_gpu:
            raise UserInputError(f"profile.refresh=true: profile {name} is an assumed device, not one to measure; "
                                 "use profile=cpu to measure this machine")
        if not present:
            raise UserInputError(f"profile.refresh=true: cannot measure profile {name}: device {spec.name} is not "
                                 "present on this machine")
        return _measured_gpu(spec, name, dense, space, cfg, dtype, cache_dir, first_regime, on_regime)
    regimes = regimes_of(cfg)
    found = find_measured(spec, space, regimes, dtype, [cache_dir / "profiles", tables_dir])
    if found is not None:
        table, path = found
        log.info("latency table: measured table of %s: %s", spec.name, path)
    elif present and dense is not None:  # the device is here: measure it rather than trust its datasheet
        return _measured_gpu(spec, name, dense, space, cfg, dtype, cache_dir, first_regime, on_regime)
    else:
        table = roofline_table(spec, space, regimes, dtype)
        key = table_key(table.fingerprint, table.model_shape, table.options, table.settings)
        path = cache_dir / "profiles" / f"{name}-roofline-{key}.json"
        with CacheLock(cache_dir, path, "roofline table") as lock:  # one writer at a time; its leftovers cleaned
            lock.remove_stale(path.parent, f"{TMP_PREFIX}{path.name}-")
            save_table(table, path)  # so a plan names the table it was made with
        log.info("latency table: no measured table of %s, roofline from its datasheet: %s", spec.name, path)
    if on_regime is not None and first_regime is not None:
        on_regime(first_regime, table.regime(first_regime))
    return table, path


def _measured_gpu(
    spec: DeviceSpec, name: str, dense: nn.Module | None, space: Space, cfg: ProfileConfig,
    dtype: str, cache_dir: Path, first_regime: str | None, on_regime: OnRegime,
) -> tuple[CostTable, Path]:
    """Measure (or reuse this GPU's cached measurement of) the table on the present device. The table's file name
    holds its fingerprint's key (device, driver, torch, triton, dtype), so it is only reused under the same ones."""
    if dense is None:
        raise UserInputError(f"measuring profile {name} on {spec.name} times the model: its weights must be loaded")
    device = cuda_device_named(spec.name)
    if device is None:
        raise UserInputError(f"cannot measure profile {name}: device {spec.name} is not present on this machine")
    return profile_gpu(dense, space, replace(cfg, name=name), dtype, cache_dir, first_regime, on_regime,
                       device=device)


def _measured_llamacpp(
    name: str, dense: nn.Module | None, space: Space, cfg: ProfileConfig, dtype: str,
    cache_dir: Path, first_regime: str | None, on_regime: OnRegime, tables_dir: Path,
) -> tuple[CostTable, Path]:
    """llama.cpp on this CPU (profilers/llamacpp.py; imported here so llama.cpp is only built when asked for).
    The model's dtype does not enter: variants are written as the gguf export writes them (f16)."""
    from profilers.llamacpp import profile_llamacpp

    return profile_llamacpp(dense, space, cfg, cache_dir, first_regime, on_regime)


PROFILES.register("cpu")(_measured_cpu)
PROFILES.register(LLAMACPP)(_measured_llamacpp)
for _key, _spec in DEVICES.items():
    PROFILES.register(_key)(partial(_device_table, _spec))
