"""The level database: every (unit, option) pruned once (structured OBS for widths, a sparse pruner for pattern
options), stored as safetensors with its error.

Keyed by a content hash of model, calibration data and options; built unit by unit with atomic renames, so an
interrupted build resumes where it stopped and never leaves a half-written entry."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from allocator.core.atomic_io import write_json_atomic
from allocator.core.cache_lock import TMP_PREFIX, CacheLock
from allocator.core.config import SpaceConfig
from allocator.core.device import resolve_device
from allocator.core.space import (
    ATTN,
    MLP,
    Option,
    Space,
    Unit,
    is_sparse,
    option_key,
    parse_option_key,
    sparse_pattern,
    unit_name,
)
from allocator.levels.compress.calibration_pass import Collector
from allocator.levels.compress.fisher import OutputFisher
from allocator.levels.compress.layer_stream import stream_fisher, stream_layers
from allocator.levels.compress.linear_hessians import InputHessians
from allocator.levels.compress.structured_obs import PrunedLevel, structured_obs_sweep
from allocator.levels.sparse_levels import HESSIAN_OF, BlockCalls, block_output_errors, prune_unit, unit_block
from allocator.model.offload import LayerWeights
from allocator.model.surgery import (
    UNIT_LINEARS,
    LevelSource,
    SparseUnitWeights,
    UnitWeights,
    decoder_layers,
    group_rows,
)

log = logging.getLogger(__name__)
DATABASE_VERSION = 2
# fisher: loss-aware estimate (default); relative: ||ΔWX||²/||WX||²; absolute: ||ΔWX||².


def has_sparse(unit: Unit) -> bool:
    return any(is_sparse(o) for o in unit.options)


def database_key(model_fp: str, data_fp: str, units: list[Unit], cfg: SpaceConfig) -> str:
    content = [DATABASE_VERSION, model_fp, data_fp, [(u.name, u.options) for u in units], cfg.damp, cfg.fisher_sequences]
    if any(has_sparse(u) for u in units):  # structured-only databases keep their key
        content.append(cfg.pruner)
    blob = json.dumps(content, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def level_file(root: Path, unit: str, option: Option) -> Path:
    return root / unit / f"{option_key(option)}.safetensors"


class LevelDatabase:
    """Read side: errors in memory, weights loaded lazily per level."""

    def __init__(self, root: Path, units: list[Unit]) -> None:
        self.root = root
        self.units = {u.name: u for u in units}
        self.errors: dict[str, dict[Option, dict[str, float]]] = {}
        for unit in units:
            data = json.loads((root / unit.name / "errors.json").read_text())
            self.errors[unit.name] = {parse_option_key(k): v for k, v in data.items()}

    def error(self, unit: str, kept: Option, metric: str) -> float:
        return self.errors[unit][kept][metric]

    def level(self, layer: int, kind: str, kept: Option) -> UnitWeights | SparseUnitWeights:
        tensors = load_file(level_file(self.root, unit_name(layer, kind), kept))
        if is_sparse(kept):
            return SparseUnitWeights(tensors)
        return UnitWeights(tensors["kept"], tensors["out_weight"])

    @property
    def source(self) -> LevelSource:
        return self.level


def fisher_error(weight: torch.Tensor, hessian: torch.Tensor, level: PrunedLevel, group: int, fisher: torch.Tensor) -> float:
    """½ Σ_c F_c (ΔW H ΔWᵀ)_cc: the per-channel output error weighted by the loss's sensitivity to that channel."""
    if level.kept_groups.numel() * group == weight.shape[1]:
        return 0.0  # the dense level: ΔW = 0 (and a (d_out, d_in) x (d_in, d_in) float64 product saved)
    pruned = torch.zeros_like(weight, dtype=torch.float64)
    pruned[:, group_rows(level.kept_groups, group)] = level.weight.double()
    delta = weight.double() - pruned
    return 0.5 * float(fisher @ ((delta @ hessian) * delta).sum(dim=1))


def _structured_levels(
    unit: Unit, weight: torch.Tensor, hessian: torch.Tensor, fisher: torch.Tensor, group: int, damp: float, tmp: Path
) -> dict[Option, dict[str, float]]:
    widths = tuple(o for o in unit.options if not is_sparse(o))
    levels = structured_obs_sweep(weight, hessian, group, widths, damp=damp)
    errors: dict[Option, dict[str, float]] = {}
    for kept, level in levels.items():
        errors[kept] = {
            "absolute": level.error,
            "relative": level.relative_error,
            "fisher": fisher_error(weight, hessian, level, group, fisher),
        }
        if 0 < kept < unit.full:  # dense and dropped need no stored weights
            save_file(
                {"kept": level.kept_groups.cpu().contiguous(), "out_weight": level.weight.cpu().contiguous()},
                level_file(tmp.parent, tmp.name, kept),
            )
    return errors


# The input Hessian structured OBS prunes a unit against: its output projection's (o_proj / down_proj).
STRUCTURED_HESSIAN = {ATTN: "o", MLP: "down"}


def unit_hessians(unit: Unit) -> set[str]:
    """The input Hessians a unit's levels need: its output projection's, and every linear's if it has sparse options."""
    if has_sparse(unit):
        return {HESSIAN_OF[name] for name in UNIT_LINEARS[unit.kind]}
    return {STRUCTURED_HESSIAN[unit.kind]}


class CalibrationStatistics:
    """What the levels of `units` need: their input Hessians over all calibration sequences, their output Fisher,
    and (for the units with sparse options) the dense blocks' inputs and outputs, both over the first
    `cfg.fisher_sequences`. The layer-streamed build fills the Hessians and block calls one layer at a time and
    frees them once that layer's levels are written, so at most one layer's are held."""

    def __init__(self, units: list[Unit], calibration: torch.Tensor, cfg: SpaceConfig) -> None:
        self.hessians = InputHessians({(u.layer, key) for u in units for key in unit_hessians(u)})
        self.fisher = OutputFisher({(u.layer, u.kind) for u in units}, cfg.fisher_sequences)
        self.calls = BlockCalls({(u.layer, u.kind) for u in units if has_sparse(u)}, cfg.fisher_sequences)
        # Calibration tokens the Hessians sum over, per token the sparse errors are measured on.
        self.scale = calibration.numel() / calibration[: cfg.fisher_sequences].numel()

    @property
    def collectors(self) -> list[Collector]:
        """The forward-only collectors (the Fisher has a gradient stream of its own)."""
        return [self.hessians] + ([self.calls] if self.calls.calls else [])

    def release(self, unit: Unit) -> None:
        """Free what only `unit` used, once its levels are built."""
        self.hessians.release(unit.layer, unit_hessians(unit))
        self.calls.calls.pop((unit.layer, unit.kind), None)


def _sparse_levels(
    model: torch.nn.Module, unit: Unit, stats: CalibrationStatistics, fisher: torch.Tensor, cfg: SpaceConfig, tmp: Path
) -> dict[Option, dict[str, float]]:
    block = unit_block(model, unit.layer, unit.kind)
    patterns = [sparse_pattern(o) for o in unit.options if is_sparse(o)]
    levels = prune_unit(block, unit.kind, unit.layer, stats.hessians, patterns, cfg.pruner, cfg.damp)
    calls = stats.calls.calls[(unit.layer, unit.kind)]
    errors: dict[Option, dict[str, float]] = {}
    for label, weights in levels.items():
        errors[label] = block_output_errors(block, calls, weights, fisher, stats.scale)
        save_file({name: w.cpu().contiguous() for name, w in weights.items()}, level_file(tmp.parent, tmp.name, label))
    return errors


def _build_unit(build_levels, unit: Unit, root: Path) -> None:
    """Write one unit's levels and errors into a temporary directory, then rename it into place (atomic)."""
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"{TMP_PREFIX}{unit.name}-"))
    try:
        errors = build_levels(tmp)
        (tmp / "errors.json").write_text(json.dumps({option_key(k): v for k, v in errors.items()}))
        os.replace(tmp, root / unit.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def open_or_build_database(
    model: torch.nn.Module,
    space: Space,
    calibration: torch.Tensor,
    model_fp: str,
    data_fp: str,
    cfg: SpaceConfig,
    cache_dir: str | Path,
    batch_size: int = 8,
    also: Sequence[Collector] = (),
    device: str | torch.device | None = None,
    offload_activations: bool = False,
    weights: LayerWeights | None = None,
) -> LevelDatabase:
    """The level database of the space's units, built (what is missing of it) layer by layer from `calibration` in
    batches of `batch_size` sequences, on `device` (default: where the model is; see allocator/core/device.py);
    `offload_activations` keeps the activations between layers on the CPU; an offloaded model (decoder layers on the
    meta device) has its layers materialised one at a time from `weights`. The collectors in `also` ride on the
    build's layer stream (on a stream of their own when nothing is left to build)."""
    device = model.get_input_embeddings().weight.device if device is None else resolve_device(device)
    store = torch.device("cpu") if offload_activations else device
    units = space.units
    root = Path(cache_dir) / "databases" / database_key(model_fp, data_fp, units, cfg)

    def missing() -> list[Unit]:
        return [u for u in units if not (root / u.name / "errors.json").is_file()]

    if missing():
        # Concurrent runs build once: the others wait for the lock, then find every unit built.
        with CacheLock(cache_dir, root, "level database") as lock:
            root.mkdir(parents=True, exist_ok=True)
            lock.remove_stale(root)  # a killed builder's unit directories (every builder of root holds this lock)
            todo = missing()
            if todo:
                _build_units(model, space, calibration, cfg, root, todo, batch_size, also, device, store, weights)
                write_json_atomic(root / "manifest.json", {"version": DATABASE_VERSION, "units": [u.name for u in units]})
                return LevelDatabase(root, units)
    log.info("level database: reusing %s", root)
    if also:
        stream_layers(model, calibration, batch_size, also, device=device, store=store, weights=weights,
                      desc="statistics")
    return LevelDatabase(root, units)


def _build_units(
    model: torch.nn.Module, space: Space, calibration: torch.Tensor, cfg: SpaceConfig, root: Path, todo: list[Unit],
    batch_size: int, also: Sequence[Collector], device: torch.device, store: torch.device,
    weights: LayerWeights | None,
) -> None:
    """Build the `todo` units' levels into `root` (the caller holds root's lock): the output Fisher from a gradient
    stream first (every unit's errors weigh by it), then one forward stream in which each layer's Hessians and
    block calls are gathered, its units' levels built and written, and those statistics freed before the next
    layer."""
    shape, units = space.shape, space.units
    log.info("level database: building %d of %d units into %s", len(todo), len(units), root)
    stats = CalibrationStatistics(todo, calibration, cfg)
    stream_fisher(model, calibration, batch_size, stats.fisher, lowest=min(u.layer for u in todo), device=device,
                  store=store, weights=weights)
    by_layer: dict[int, list[Unit]] = {}
    for unit in todo:
        by_layer.setdefault(unit.layer, []).append(unit)
    sparse = any(has_sparse(u) for u in todo)
    layers = decoder_layers(model)
    bar = tqdm(total=len(todo), desc=f"{cfg.kind} levels ({cfg.pruner if sparse else 'OBS'})", unit="unit",
               leave=False)

    def build_layer(index: int) -> None:
        """Layer `index` has seen every batch (and is on the device): build, write and free its units."""
        for unit in by_layer.get(index, []):
            layer = layers[unit.layer]
            weight = (layer.self_attn.o_proj if unit.kind == ATTN else layer.mlp.down_proj).weight.detach()
            hessian = stats.hessians.hessian(unit.layer, STRUCTURED_HESSIAN[unit.kind])
            fisher = stats.fisher.fisher(unit.layer, unit.kind).to(device)
            group = shape.heads_per_group * shape.head_dim if unit.kind == ATTN else 1

            def build_levels(tmp: Path, unit=unit, weight=weight, hessian=hessian, fisher=fisher, group=group):
                errors = _structured_levels(unit, weight, hessian, fisher, group, cfg.damp, tmp)
                if has_sparse(unit):
                    errors.update(_sparse_levels(model, unit, stats, fisher, cfg, tmp))
                return errors

            _build_unit(build_levels, unit, root)
            stats.release(unit)
            bar.update()

    # Layers above the last one with work are streamed only when other statistics (`also`) want every layer.
    count = len(layers) if also else max(by_layer) + 1
    try:
        stream_layers(model, calibration, batch_size, [*stats.collectors, *also], build_layer, device=device,
                      store=store, layers=count, weights=weights, desc="calibration layers")
    finally:
        bar.close()
