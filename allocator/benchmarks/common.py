"""What every benchmark records beside its numbers, and where the JSON goes (the search job the model benchmarks run
on is composed in allocator/benchmarks/search_config.py, so that this module loads no Hydra)."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch

from allocator.core.atomic_io import write_json_atomic
from profilers.table import cpu_name


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cpu",
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def spread(samples: list[float]) -> dict:
    ordered = sorted(samples)
    n = len(ordered)
    return {
        "median": statistics.median(ordered),
        "p10": ordered[max(0, round(0.1 * (n - 1)))],
        "p90": ordered[min(n - 1, round(0.9 * (n - 1)))],
        "n": n,
        "samples": samples,
    }


def write_result(topic: str, name: str, result: dict) -> Path:
    path = Path("runs/bench") / topic / f"{name}.json"
    write_json_atomic(path, {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "environment": environment(), **result})
    print(f"wrote {path}")
    return path
