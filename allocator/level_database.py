"""The level database: every (unit, option) pruned once by structured OBS, stored as safetensors with its error.

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

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from allocator.compress.hessians import collect_hessians
from allocator.compress.fisher import collect_output_fisher
from allocator.compress.structured_obs import PrunedLevel, structured_obs_sweep
from allocator.config import SpaceConfig
from allocator.pruned_model import LevelSource, UnitWeights, decoder_layers, group_rows
from allocator.space import ATTN, ModelShape, Unit, unit_name

log = logging.getLogger(__name__)
DATABASE_VERSION = 2
# fisher: loss-aware estimate (default); relative: ||ΔWX||²/||WX||²; absolute: ||ΔWX||².
ERROR_METRICS = ("fisher", "relative", "absolute")


def database_key(model_fp: str, data_fp: str, units: list[Unit], cfg: SpaceConfig) -> str:
    blob = json.dumps(
        [DATABASE_VERSION, model_fp, data_fp, [(u.name, u.options) for u in units], cfg.damp, cfg.fisher_sequences],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class LevelDatabase:
    """Read side: errors in memory, weights loaded lazily per level."""

    def __init__(self, root: Path, units: list[Unit]) -> None:
        self.root = root
        self.units = {u.name: u for u in units}
        self.errors: dict[str, dict[int, dict[str, float]]] = {}
        for unit in units:
            data = json.loads((root / unit.name / "errors.json").read_text())
            self.errors[unit.name] = {int(k): v for k, v in data.items()}

    def error(self, unit: str, kept: int, metric: str) -> float:
        return self.errors[unit][kept][metric]

    def level(self, layer: int, kind: str, kept: int) -> UnitWeights:
        tensors = load_file(self.root / unit_name(layer, kind) / f"{kept}.safetensors")
        return UnitWeights(tensors["kept"], tensors["out_weight"])

    @property
    def source(self) -> LevelSource:
        return self.level


def fisher_error(weight: torch.Tensor, hessian: torch.Tensor, level: PrunedLevel, group: int, fisher: torch.Tensor) -> float:
    """½ Σ_c F_c (ΔW H ΔWᵀ)_cc: the per-channel output error weighted by the loss's sensitivity to that channel."""
    pruned = torch.zeros_like(weight, dtype=torch.float64)
    pruned[:, group_rows(level.kept_groups, group)] = level.weight.double()
    delta = weight.double() - pruned
    return 0.5 * float(fisher @ ((delta @ hessian) * delta).sum(dim=1))


def _build_unit(
    unit: Unit, weight: torch.Tensor, hessian: torch.Tensor, fisher: torch.Tensor, group: int, damp: float, root: Path
) -> None:
    levels = structured_obs_sweep(weight, hessian, group, unit.options, damp=damp)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{unit.name}-"))
    errors = {}
    for kept, level in levels.items():
        errors[kept] = {
            "absolute": level.error,
            "relative": level.relative_error,
            "fisher": fisher_error(weight, hessian, level, group, fisher),
        }
        if 0 < kept < unit.full:  # dense and dropped need no stored weights
            save_file(
                {"kept": level.kept_groups.contiguous(), "out_weight": level.weight.contiguous()},
                tmp / f"{kept}.safetensors",
            )
    (tmp / "errors.json").write_text(json.dumps(errors))
    os.replace(tmp, root / unit.name)


def open_or_build_database(
    model: torch.nn.Module,
    shape: ModelShape,
    units: list[Unit],
    calibration: torch.Tensor,
    model_fp: str,
    data_fp: str,
    cfg: SpaceConfig,
    cache_dir: str | Path,
    batch_size: int = 8,
) -> LevelDatabase:
    root = Path(cache_dir) / "databases" / database_key(model_fp, data_fp, units, cfg)
    todo = [u for u in units if not (root / u.name / "errors.json").is_file()]
    if not todo:
        log.info("level database: reusing %s", root)
        return LevelDatabase(root, units)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # leftovers of an interrupted build
        shutil.rmtree(stale, ignore_errors=True)
    log.info("level database: building %d of %d units into %s", len(todo), len(units), root)
    attn_h, mlp_h = collect_hessians(model, calibration, batch_size)
    attn_f, mlp_f = collect_output_fisher(model, calibration[: cfg.fisher_sequences], batch_size)
    layers = decoder_layers(model)
    for unit in tqdm(todo, desc="structured OBS levels", unit="unit", leave=False):
        layer = layers[unit.layer]
        if unit.kind == ATTN:
            weight, hessian, fisher = layer.self_attn.o_proj.weight, attn_h[unit.layer], attn_f[unit.layer]
            group = shape.heads_per_group * shape.head_dim
        else:
            weight, hessian, fisher, group = layer.mlp.down_proj.weight, mlp_h[unit.layer], mlp_f[unit.layer], 1
        _build_unit(unit, weight.detach(), hessian, fisher, group, cfg.damp, root)
    (root / "manifest.json").write_text(json.dumps({"version": DATABASE_VERSION, "units": [u.name for u in units]}))
    return LevelDatabase(root, units)
