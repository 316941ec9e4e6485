"""One unit's levels, built from tensors alone: the statistics its layer's calibration pass gathered and the unit's
weights travel as a `UnitInputs` (no model), `build_unit_levels` turns them into every option's level tensors and
errors, and `write_unit` writes those atomically into the database. The serial build and the Ray workers
(allocator/levels/parallel_build.py) run exactly this code, so both write the same bytes."""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from allocator.core.cache_lock import TMP_PREFIX
from allocator.core.space import Option, Unit, is_sparse, option_key, sparse_pattern
from allocator.levels.compress.structured_obs import PrunedLevel, structured_obs_sweep
from allocator.levels.sparse_levels import BlockCall, block_output_errors, prune_unit
from allocator.model.surgery import group_rows

__all__ = ["SparseInputs", "UnitInputs", "UnitLevels", "build_unit_levels", "fisher_error", "level_file", "write_unit"]


def level_file(root: Path, unit: str, option: Option) -> Path:
    return root / unit / f"{option_key(option)}.safetensors"


def _to(value, device: torch.device):
    """`value` (a tensor, or tuples / dicts / lists of them) on `device`; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


@dataclass
class SparseInputs:
    """What a unit's sparse (pattern) levels need beyond its structured ones: the dense block (the attention or MLP
    module, whose forward measures the output error), the input Hessian of each of its linears (by
    sparse_levels.HESSIAN_OF key), the tokens those Hessians sum over, the dense block's recorded calls, the token
    scale of their errors, and the pruner's name."""

    block: nn.Module
    hessians: dict[str, torch.Tensor]
    tokens: int
    calls: list[BlockCall]
    scale: float
    pruner: str


@dataclass
class UnitInputs:
    """Everything one unit's levels are built from: its output projection's weight (o_proj / down_proj) and that
    projection's input Hessian, the unit's output Fisher, the column group one structured option removes, the
    damping, and the sparse inputs when the unit has pattern options."""

    unit: Unit
    weight: torch.Tensor
    hessian: torch.Tensor
    fisher: torch.Tensor
    group: int
    damp: float
    sparse: SparseInputs | None = None

    def to(self, device: torch.device) -> UnitInputs:
        """These inputs on `device`: tensors moved (no copy where they are there already), the block copied rather
        than moved so the model it came from keeps its own."""
        sparse = self.sparse
        if sparse is not None:
            block = sparse.block
            if next(block.parameters()).device != device:
                block = copy.deepcopy(block).to(device)
            calls = [BlockCall(_to(c.args, device), _to(c.kwargs, device), c.output.to(device)) for c in sparse.calls]
            sparse = replace(sparse, block=block, hessians=_to(sparse.hessians, device), calls=calls)
        return replace(self, weight=self.weight.to(device), hessian=self.hessian.to(device),
                       fisher=self.fisher.to(device), sparse=sparse)


@dataclass
class UnitLevels:
    """A unit's built levels: each option's errors ({"absolute", "relative", "fisher"}) and the tensors of the
    options that store weights (on the CPU, contiguous, as they are written)."""

    unit: Unit
    errors: dict[Option, dict[str, float]] = field(default_factory=dict)
    tensors: dict[Option, dict[str, torch.Tensor]] = field(default_factory=dict)


def fisher_error(weight: torch.Tensor, hessian: torch.Tensor, level: PrunedLevel, group: int, fisher: torch.Tensor) -> float:
    """½ Σ_c F_c (ΔW H ΔWᵀ)_cc: the per-channel output error weighted by the loss's sensitivity to that channel."""
    if level.kept_groups.numel() * group == weight.shape[1]:
        return 0.0  # the dense level: ΔW = 0 (and a (d_out, d_in) x (d_in, d_in) float64 product saved)
    pruned = torch.zeros_like(weight, dtype=torch.float64)
    pruned[:, group_rows(level.kept_groups, group)] = level.weight.double()
    delta = weight.double() - pruned
    return 0.5 * float(fisher @ ((delta @ hessian) * delta).sum(dim=1))


def _structured_levels(inputs: UnitInputs, out: UnitLevels) -> None:
    unit = inputs.unit
    widths = tuple(o for o in unit.options if not is_sparse(o))
    levels = structured_obs_sweep(inputs.weight, inputs.hessian, inputs.group, widths, damp=inputs.damp)
    for kept, level in levels.items():
        out.errors[kept] = {
            "absolute": level.error,
            "relative": level.relative_error,
            "fisher": fisher_error(inputs.weight, inputs.hessian, level, inputs.group, inputs.fisher),
        }
        if 0 < kept < unit.full:  # dense and dropped need no stored weights
            out.tensors[kept] = {"kept": level.kept_groups.cpu().contiguous(),
                                 "out_weight": level.weight.cpu().contiguous()}


def _sparse_levels(inputs: UnitInputs, sparse: SparseInputs, out: UnitLevels) -> None:
    unit = inputs.unit
    patterns = [sparse_pattern(o) for o in unit.options if is_sparse(o)]
    levels = prune_unit(sparse.block, unit.kind, sparse.hessians, sparse.tokens, patterns, sparse.pruner, inputs.damp)
    for label, weights in levels.items():
        out.errors[label] = block_output_errors(sparse.block, sparse.calls, weights, inputs.fisher, sparse.scale)
        out.tensors[label] = {name: w.cpu().contiguous() for name, w in weights.items()}


def build_unit_levels(inputs: UnitInputs) -> UnitLevels:
    """Every option's level of the unit: structured OBS for the widths, then the sparse pruner for the patterns."""
    out = UnitLevels(inputs.unit)
    _structured_levels(inputs, out)
    if inputs.sparse is not None:
        _sparse_levels(inputs, inputs.sparse, out)
    return out


def write_unit(root: Path, levels: UnitLevels) -> None:
    """Write one unit's levels and errors into a temporary directory, then rename it into place (atomic): an
    interrupted write leaves only a temporary, which the next holder of the database's lock removes."""
    unit = levels.unit
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"{TMP_PREFIX}{unit.name}-"))
    try:
        for option, tensors in levels.tensors.items():
            save_file(tensors, level_file(tmp.parent, tmp.name, option))
        (tmp / "errors.json").write_text(json.dumps({option_key(k): v for k, v in levels.errors.items()}))
        os.replace(tmp, root / unit.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
