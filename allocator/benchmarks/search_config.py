"""The search job the model benchmarks run on: the `python -m allocator search` config for some overrides, composed
by Hydra the way the CLI composes it. Its own module so that benchmarks which need no search job (the kernel
benchmark) load no Hydra."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from allocator.app.config import SearchJob, register_configs

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def search_job(overrides: list[str]) -> SearchJob:
    """The `python -m allocator search` config for these overrides (composed the same way the CLI does)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return OmegaConf.to_object(compose("search", overrides=overrides))  # type: ignore[return-value]
