"""The level database: every (unit, option) pruned once (structured OBS for widths, a sparse pruner for pattern
options), stored as safetensors with its error.

Keyed by a content hash of model, calibration data and options; built unit by unit with atomic renames, so an
interrupted build resumes where it stopped and never leaves a half-written entry."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from allocator.core.atomic_io import write_json_atomic
from allocator.core.cache_lock import CacheLock
from allocator.core.config import RayConfig, SpaceConfig
from allocator.core.device import resolve_device
from allocator.core.ray_cluster import wants_ray
from allocator.core.space import (
    ATTN,
    MLP,
    ModelShape,
    Option,
    Space,
    Unit,
    is_sparse,
    parse_option_key,
    unit_name,
)
from allocator.levels.compress.calibration_pass import Collector
from allocator.levels.compress.fisher import OutputFisher
from allocator.levels.compress.layer_stream import stream_fisher, stream_layers
from allocator.levels.compress.linear_hessians import InputHessians
from allocator.levels.parallel_build import RayUnitBuilder
from allocator.levels.sparse_levels import HESSIAN_OF, BlockCalls, unit_block
from allocator.levels.unit_levels import (
    SparseInputs,
    UnitInputs,
    UnitLevels,
    build_unit_levels,
    level_file,
    write_unit,
)
from allocator.model.offload import LayerWeights
from allocator.model.surgery import (
    UNIT_LINEARS,
    LevelSource,
    SparseUnitWeights,
    UnitWeights,
    decoder_layers,
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


def unit_inputs(
    model: torch.nn.Module, unit: Unit, stats: CalibrationStatistics, shape: ModelShape, cfg: SpaceConfig,
    device: torch.device,
) -> UnitInputs:
    """What `unit`'s levels are built from, once its layer has seen every calibration batch (and is resident)."""
    layer = decoder_layers(model)[unit.layer]
    sparse = None
    if has_sparse(unit):
        sparse = SparseInputs(
            block=unit_block(model, unit.layer, unit.kind),
            hessians={key: stats.hessians.hessian(unit.layer, key) for key in unit_hessians(unit)},
            tokens=stats.hessians.tokens, calls=stats.calls.calls[(unit.layer, unit.kind)], scale=stats.scale,
            pruner=cfg.pruner,
        )
    return UnitInputs(
        unit=unit,
        weight=(layer.self_attn.o_proj if unit.kind == ATTN else layer.mlp.down_proj).weight.detach(),
        hessian=stats.hessians.hessian(unit.layer, STRUCTURED_HESSIAN[unit.kind]),
        fisher=stats.fisher.fisher(unit.layer, unit.kind).to(device),
        group=shape.heads_per_group * shape.head_dim if unit.kind == ATTN else 1,
        damp=cfg.damp,
        sparse=sparse,
    )


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
    workers: int = 0,
    ray: RayConfig | None = None,
) -> LevelDatabase:
    """The level database of the space's units, built (what is missing of it) layer by layer from `calibration` in
    batches of `batch_size` sequences, on `device` (default: where the model is; see allocator/core/device.py);
    `offload_activations` keeps the activations between layers on the CPU; an offloaded model (decoder layers on the
    meta device) has its layers materialised one at a time from `weights`. The collectors in `also` ride on the
    build's layer stream (on a stream of their own when nothing is left to build). With `workers` > 1 or
    `ray.address`, the units' levels are built on Ray workers (allocator/levels/parallel_build.py) while the stream
    goes on; the database (its key, every level and error) is the same either way."""
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
                _build_units(model, space, calibration, cfg, root, todo, batch_size, also, device, store, weights,
                             workers, ray or RayConfig())
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
    weights: LayerWeights | None, workers: int, ray: RayConfig,
) -> None:
    """Build the `todo` units' levels into `root` (the caller holds root's lock): the output Fisher from a gradient
    stream first (every unit's errors weigh by it), then one forward stream in which each layer's Hessians and
    block calls are gathered, its units' levels built (here, or on Ray workers) and written, and those statistics
    freed before the next layer."""
    shape, units = space.shape, space.units
    log.info("level database: building %d of %d units into %s", len(todo), len(units), root)
    stats = CalibrationStatistics(todo, calibration, cfg)
    stream_fisher(model, calibration, batch_size, stats.fisher, lowest=min(u.layer for u in todo), device=device,
                  store=store, weights=weights)
    by_layer: dict[int, list[Unit]] = {}
    for unit in todo:
        by_layer.setdefault(unit.layer, []).append(unit)
    sparse = any(has_sparse(u) for u in todo)
    bar = tqdm(total=len(todo), desc=f"{cfg.kind} levels ({cfg.pruner if sparse else 'OBS'})", unit="unit",
               leave=False)

    def written(levels: UnitLevels) -> None:
        write_unit(root, levels)
        bar.update()

    pool = RayUnitBuilder(workers, ray, device, written) if wants_ray(workers, ray) else None
    if pool is not None:
        log.info("level database: units built on %d Ray workers (%d threads each)", pool.workers, pool.threads)

    def build_layer(index: int) -> None:
        """Layer `index` has seen every batch (and is on the device): build and write its units (or hand them to
        the workers), and free their statistics."""
        here = by_layer.get(index, [])
        if pool is not None:  # copied into Ray's object store: the statistics can go as soon as this returns
            pool.submit([unit_inputs(model, unit, stats, shape, cfg, device) for unit in here])
        for unit in here:
            if pool is None:
                written(build_unit_levels(unit_inputs(model, unit, stats, shape, cfg, device)))
            stats.release(unit)

    # Layers above the last one with work are streamed only when other statistics (`also`) want every layer.
    count = len(decoder_layers(model)) if also else max(by_layer) + 1
    finished = False
    try:
        stream_layers(model, calibration, batch_size, [*stats.collectors, *also], build_layer, device=device,
                      store=store, layers=count, weights=weights, desc="calibration layers")
        finished = True
    finally:
        try:
            if pool is not None:
                pool.close(wait=finished)  # the layers still on the workers are written here
        finally:
            bar.close()
