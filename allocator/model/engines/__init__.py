"""Export formats for serving engines: one writer per format (`native`, `dense`, `decilm`, `gguf`), each writing a
self-contained directory `<run>/export/<format>/` from the pruned model built by allocator.model.surgery.

A writer is `write(model, tokenizer, out_dir: Path, plan: Plan | None) -> None`, registered with
`@EXPORT_FORMATS.register("<name>")` in its own module under this package; the modules are imported on first use so
that an engine's optional dependency loads only when its format is asked for. `model` is the deployable model (the
native one: structured units shrunk, sparse units as SparseLinear); `allocator.model.engines.layers` turns its units
into plain dense tensors and pads them to the shapes an engine runs.

`export_formats` runs the writers, then gives every directory the plan and a model card (engines/card.py); a module
may define `HOW_TO_LOAD` (markdown, `{path}` for the directory) and `card_notes(shape, allocation) -> list[str]`
(how it lays the allocation out) for its card, and `MODEL_TYPES` (the config model_types it can express)."""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn
from tqdm import tqdm

from allocator.core.errors import UserInputError
from allocator.core.plan import Plan
from allocator.core.registry import Registry
from allocator.core.space import ModelShape
from allocator.model.engines.card import write_card

ExportWriter = Callable[[nn.Module, object, Path, "Plan | None"], None]
EXPORT_FORMATS: Registry[ExportWriter] = Registry("export format")
FORMAT_MODULES = ("native", "dense", "decilm", "gguf")  # allocator/model/engines/<name>.py
EXPORT_DIR = "export"  # <run>/export/<format>/
NATIVE = "native"


def validate_formats(formats: Sequence[str]) -> None:
    """One line naming the first unknown or repeated format and the valid ones (before any heavy work)."""
    for i, name in enumerate(formats):
        if name not in FORMAT_MODULES:
            raise UserInputError(f"export.formats: unknown format {name!r}; valid: {', '.join(FORMAT_MODULES)}")
        if name in formats[:i]:
            raise UserInputError(f"export.formats: format {name!r} is listed twice")


def export_writer(name: str) -> ExportWriter:
    """The writer of format `name` (UserInputError naming the known formats otherwise)."""
    validate_formats([name])
    if name not in EXPORT_FORMATS:
        importlib.import_module(f"{__name__}.{name}")
    return EXPORT_FORMATS.get(name)


def format_module(name: str):
    """The module of format `name` (its card reads the optional `HOW_TO_LOAD` markdown and `card_notes`)."""
    validate_formats([name])
    return importlib.import_module(f"{__name__}.{name}")


def check_model_support(formats: Sequence[str], config) -> None:
    """One line for a format that cannot express the model's architecture (a module's `MODEL_TYPES`, when it has
    one, lists those it can), checked once the model is loaded, before the search."""
    for name in formats:
        types = getattr(format_module(name), "MODEL_TYPES", None)
        if types is not None and config.model_type not in types:
            raise UserInputError(
                f"export format {name!r} supports model_type {', '.join(types)}; this model is {config.model_type!r} "
                "(native and dense export every supported model)"
            )


def export_dir(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / EXPORT_DIR / name


def exported_formats(run_dir: Path) -> list[str]:
    """The formats a run directory holds (in FORMAT_MODULES order)."""
    return [name for name in FORMAT_MODULES if export_dir(run_dir, name).is_dir()]


def export_formats(
    model: nn.Module, tokenizer, run_dir: Path, plan: Plan | None, formats: Sequence[str]
) -> dict[str, Path]:
    """Write each format to `<run_dir>/export/<format>/` (replacing what an earlier export left there), each with the
    plan and a model card; returns format → directory."""
    validate_formats(formats)
    shape = ModelShape.from_config(model.config)
    written = {}
    for name in tqdm(formats, desc="export", unit="format", disable=len(formats) < 2):
        out = export_dir(run_dir, name)
        if out.exists():  # a stale file of another export would make the directory lie about what it holds
            shutil.rmtree(out)
        out.mkdir(parents=True)
        export_writer(name)(model, tokenizer, out, plan)
        write_card(out, name, shape, plan, model.config)
        written[name] = out
    return written


def refresh_cards(run_dir: Path, plan: Plan, shape: ModelShape) -> None:
    """After verification: the measured plan into every export directory of `run_dir`, and their cards rewritten."""
    for name in exported_formats(run_dir):
        write_card(export_dir(run_dir, name), name, shape, plan)
