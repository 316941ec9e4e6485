"""The documented loader of exported models: `load_pruned(path)` rebuilds per-layer widths, then loads weights.

`path` is a `native` export directory (`<run>/export/native/`), or a run directory that holds one; a run directory
written before `export/` existed holds the checkpoint at its top level and loads too.

Plain transformers cannot build per-layer head/neuron counts, so the dense architecture is instantiated
empty (meta device, no memory), shrunk to the recorded widths and filled from the checkpoint; sparse units get
SparseLinear modules (compressed formats, run by the Triton kernels on a GPU; on a CPU each decompresses its weight
once, on its first call, and runs the dense GEMM, as the CPU profiler prices it)."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from allocator.core.plan import PLAN_FILE, Plan
from allocator.core.space import ModelShape
from allocator.model.engines import EXPORT_DIR, NATIVE, export_dir, exported_formats
from allocator.model.export import WEIGHTS_FILE
from allocator.model.loader import load_tokenizer
from allocator.model.surgery import SPARSE_KEY, WIDTHS_KEY, shrink_to_widths


def native_dir(path: str | Path) -> Path:
    """The native checkpoint's directory of `path`: `<path>/export/native/` in a run directory, else `path` itself
    (a native export directory, or an older run directory with the checkpoint at its top level)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"exported model directory {path} does not exist")
    native = export_dir(path, NATIVE)
    if native.is_dir():
        return native
    if (path / EXPORT_DIR).is_dir() and not (path / WEIGHTS_FILE).is_file():
        held = ", ".join(exported_formats(path)) or "nothing"
        raise FileNotFoundError(
            f"{path} has no native export ({native} is missing; {path / EXPORT_DIR} holds {held}): load_pruned and "
            "verify read the native format; export it with export.formats=[native,...]"
        )
    return path


def _check_export_dir(path: Path, *names: str) -> None:
    for name in ("config.json", WEIGHTS_FILE, *names):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not an exported model: {name} is missing")


def load_plan(path: str | Path) -> Plan:
    """The plan of a run directory (its plan.json) or of an export directory (PlanError, a ValueError, names a field
    it cannot read)."""
    path = Path(path)
    if (path / PLAN_FILE).is_file():
        return Plan.load(path / PLAN_FILE)
    native = native_dir(path)
    _check_export_dir(native, PLAN_FILE)
    return Plan.load(native / PLAN_FILE)


def load_pruned(path: str | Path) -> tuple[nn.Module, object, Plan | None]:
    """(model in eval mode, tokenizer, plan) of a native export (or a run directory holding one); plan None for one
    exported without a plan."""
    path = native_dir(path)
    _check_export_dir(path)
    plan = Plan.load(path / PLAN_FILE) if (path / PLAN_FILE).is_file() else None
    config = AutoConfig.from_pretrained(path)
    widths = getattr(config, WIDTHS_KEY, None)
    if widths is None:
        raise ValueError(f"{path}/config.json has no {WIDTHS_KEY}: not written by sparsity-allocator's export")
    state = load_file(path / WEIGHTS_FILE)
    dtype = state["model.embed_tokens.weight"].dtype
    with init_empty_weights(include_buffers=False):  # rotary buffers stay real, parameters cost nothing
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    sparse = getattr(config, SPARSE_KEY, None)
    shrink_to_widths(model, ModelShape.from_config(config), widths, sparse)
    if sparse:  # sparse units: SparseLinear modules rebuilt from their compressed tensors
        from allocator.model.sparse_export import (
            load_sparse_units,  # kernels load only for sparse exports
        )

        load_sparse_units(model, state)
    tied = getattr(config, "tie_word_embeddings", False)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - ({"lm_head.weight"} if tied else set()):
        raise ValueError(f"{path}: checkpoint does not match its widths (missing {missing}, unexpected {unexpected})")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        for p in model.parameters():
            p.requires_grad_(False)
    return model.eval(), load_tokenizer(path), plan
