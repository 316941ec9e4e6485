"""Export formats for serving engines: one writer per format (`native`, `dense`, `decilm`, `gguf`), each writing a
self-contained directory `<run>/export/<format>/` from the pruned model built by allocator.model.surgery.

A writer is `write(model, tokenizer, out_dir: Path, plan: Plan | None) -> None`, registered with
`@EXPORT_FORMATS.register("<name>")` in its own module under this package; the modules are imported on first use so
that an engine's optional dependency loads only when its format is asked for."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from torch import nn

from allocator.core.plan import Plan
from allocator.core.registry import Registry

ExportWriter = Callable[[nn.Module, object, Path, "Plan | None"], None]
EXPORT_FORMATS: Registry[ExportWriter] = Registry("export format")
FORMAT_MODULES = ("native", "dense", "decilm", "gguf")  # allocator/model/engines/<name>.py


def export_writer(name: str) -> ExportWriter:
    """The writer of format `name` (ValueError naming the known formats otherwise)."""
    if name in FORMAT_MODULES and name not in EXPORT_FORMATS:
        importlib.import_module(f"{__name__}.{name}")
    return EXPORT_FORMATS.get(name)
