"""The Ray cluster a run's workers live on: the level database build (allocator/levels/parallel_build.py) and the
search's scoring (search/ray_fitness.py) both start or join it here, so `workers=N`, `ray.address` and
`ray.num_cpus` / `ray.num_gpus` mean the same thing to both. Ray is imported only when workers are asked for: a
serial run, and a machine without Ray, never need it."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from allocator.core.config import RayConfig
from allocator.core.errors import UserInputError

__all__ = ["connect", "ray_module", "session", "wants_ray"]

# The checkout the driver runs (allocator/core/ray_cluster.py → repository root): workers import it, not whatever
# else is installed.
CHECKOUT = Path(__file__).resolve().parents[2]


def wants_ray(workers: int, cfg: RayConfig) -> bool:
    """Whether `workers` / `cfg` ask for Ray workers (more than one worker, or an existing cluster's address)."""
    return workers > 1 or bool(cfg.address)


def ray_module():
    try:
        import ray
    except ImportError:
        raise UserInputError("workers > 1 or ray.address need Ray: pip install -e '.[ray]' (pinned in pyproject.toml)")
    return ray


class _Session:
    """The enclosing `session`s: how deep, and whether a stage inside them started Ray (theirs to stop)."""

    depth = 0
    started = False


def connect(workers: int, cfg: RayConfig) -> tuple[int, bool]:
    """(number of workers, whether the caller started Ray and so stops it). An address joins that cluster; else a
    local cluster with exactly the resources of `workers` workers is started on this machine (no dashboard, no usage
    report). A cluster this process already joined (an earlier stage's) is reused as it is; one started inside a
    `session` is the session's to stop."""
    ray = ray_module()
    started = False
    if not ray.is_initialized():
        if cfg.address:
            ray.init(address=cfg.address, logging_level=logging.WARNING)
        else:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a local cluster reports nothing outside
            path = os.pathsep.join(p for p in (str(CHECKOUT), os.environ.get("PYTHONPATH", "")) if p)
            ray.init(  # "local": a new cluster, even when another one on this machine would be found and joined
                address="local", num_cpus=max(1, round(workers * cfg.num_cpus)), num_gpus=round(workers * cfg.num_gpus),
                include_dashboard=False, logging_level=logging.WARNING, runtime_env={"env_vars": {"PYTHONPATH": path}},
            )
        if _Session.depth:
            _Session.started = True
        else:
            started = True
    if workers <= 1:  # ray.address without workers: as many as the cluster's resources hold
        resources = ray.cluster_resources()
        key, per = ("GPU", cfg.num_gpus) if cfg.num_gpus > 0 else ("CPU", cfg.num_cpus)
        workers = int(resources.get(key, 0) // per)
        if workers < 1:
            raise UserInputError(f"ray.address={cfg.address!r}: the cluster has {resources.get(key, 0)} {key}, "
                                 f"not enough for one worker of ray.num_{key.lower()}s={per}")
    return workers, started


@contextmanager
def session(workers: int, cfg: RayConfig) -> Iterator[None]:
    """One cluster for every stage inside the block (the database build, then the search's scoring): the first
    stage that needs workers starts it (connect), the later ones join it, and it is stopped when the block ends.
    Started lazily, by the first stage that needs it, so a run whose stages all find their results cached never
    imports or starts Ray. (Importing Ray patches inspect.isgenerator; the python-docs corpus is read in a fresh
    interpreter, allocator/model/python_docs.py, so that cannot change the calibration data.)"""
    if not wants_ray(workers, cfg):
        yield
        return
    _Session.depth += 1
    try:
        yield
    finally:
        _Session.depth -= 1
        if not _Session.depth and _Session.started:
            _Session.started = False
            ray_module().shutdown()
