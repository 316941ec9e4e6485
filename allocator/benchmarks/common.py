"""What every benchmark records beside its numbers, the default search job it runs on, and where the JSON goes."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from allocator.core.atomic_io import write_json_atomic
from allocator.app.config import SearchJob, register_configs
from profilers.table import cpu_name

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def search_job(overrides: list[str]) -> SearchJob:
    """The `python -m allocator search` config for these overrides (composed the same way the CLI does)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return OmegaConf.to_object(compose("search", overrides=overrides))  # type: ignore[return-value]


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
