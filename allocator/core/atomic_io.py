"""Atomic writes: a crash or interrupt never leaves a half-written file where a reader expects a whole one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_json_atomic(path: Path, data: dict) -> None:
    """The temporary is named after its target (`.tmp-<name>-*`), so whoever holds the lock of a cache entry can
    tell that entry's leftovers from another's (allocator/core/cache_lock.py); a failed write removes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
