"""The level database built on Ray workers (workers=2, a local cluster on this machine) is the serial build's, byte for
byte: same key, same files, same level tensors and errors; an interrupted parallel build leaves only whole units and
resumes to the same database; and the CLI's `workers=2` builds its database on the workers."""

from __future__ import annotations

import filecmp
import logging
import os
from pathlib import Path

import pytest
import torch

from allocator.core.config import RayConfig, SpaceConfig
from allocator.core.space import build_space
from allocator.levels.compress.calibration_pass import Collector
from allocator.levels.database import open_or_build_database

from .conftest import run_cli

# As tests/test_ray_workers.py sets them, and before Ray is first imported (Ray reads RAY_AUTH_MODE then; a driver
# and a cluster that disagree on it cannot talk): token authentication, no usage report from a cluster that must not
# reach outside the machine.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray")

WORKERS_LINE = "units built on 2 Ray workers"


@pytest.fixture(scope="module")
def cluster():
    """A local 2-CPU Ray cluster (no dashboard, no usage report) the module's builds join instead of starting one."""
    from allocator.core.ray_cluster import connect

    n, started = connect(2, RayConfig())
    assert n == 2
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def calibration(tiny):
    loaded, _ = tiny
    return torch.randint(0, loaded.model.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(5))


def build(tiny, calibration, kind: str, cache: Path, workers: int = 0, also=()) -> Path:
    loaded, space = tiny
    cfg = SpaceConfig(kind=kind, mlp_step=32, fisher_sequences=3)
    space = build_space(space.shape, cfg)
    db = open_or_build_database(loaded.model, space, calibration, "tiny", "calibration", cfg, cache, batch_size=3,
                                also=also, workers=workers)
    return db.root


def assert_identical(got: Path, want: Path) -> None:
    """Same database key (directory name), same files, every file's bytes equal."""
    assert got.name == want.name
    names = sorted(p.relative_to(want) for p in want.rglob("*"))
    assert names == sorted(p.relative_to(got) for p in got.rglob("*"))
    files = [str(n) for n in names if (want / n).is_file()]
    assert any(f.endswith(".safetensors") for f in files) and any(f.endswith("errors.json") for f in files)
    match, mismatch, errors = filecmp.cmpfiles(want, got, files, shallow=False)
    assert (mismatch, errors) == ([], []) and len(match) == len(files)


@pytest.mark.parametrize("kind", ["structured", "unstructured", "mixed"])
def test_workers_build_the_serial_database_bit_for_bit(tiny, calibration, cluster, tmp_path, caplog, kind):
    serial = build(tiny, calibration, kind, tmp_path / "serial")
    with caplog.at_level(logging.INFO, logger="allocator.levels.database"):
        parallel = build(tiny, calibration, kind, tmp_path / "workers", workers=2)
    assert WORKERS_LINE in caplog.text  # built on the workers, not here
    assert_identical(parallel, serial)
    assert ray.is_initialized()  # a cluster the build joined is left running for the next stage


class FailsAtLayer(Collector):
    """Rides on the build's layer stream and raises when the stream reaches layer `index`."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def attach(self, index: int, layer):
        if index == self.index:
            raise KeyboardInterrupt(f"stopped at layer {index}")
        return []


def test_an_interrupted_parallel_build_leaves_whole_units_and_resumes(tiny, calibration, cluster, tmp_path):
    serial = build(tiny, calibration, "unstructured", tmp_path / "serial")
    cache = tmp_path / "workers"
    with pytest.raises(KeyboardInterrupt):
        build(tiny, calibration, "unstructured", cache, workers=2, also=[FailsAtLayer(2)])
    root = cache / "databases" / serial.name
    left = sorted(p.name for p in root.iterdir())
    assert "manifest.json" not in left and len(left) < 6  # layer 2 never ran
    for name in left:  # no temporary, and each unit whole (identical to the serial build's)
        assert not name.startswith(".tmp-") and (root / name / "errors.json").is_file()
        assert not filecmp.dircmp(root / name, serial / name).diff_files
    resumed = build(tiny, calibration, "unstructured", cache, workers=2)
    assert_identical(resumed, serial)


def test_cli_builds_its_database_on_the_workers(tmp_path):
    """`search workers=2` (its own local cluster) writes the database the serial command writes, on the workers."""
    common = ["search", "model=tiny-llama", "model.tiny_layers=3", "data.seq_len=32", "data.calib_sequences=8",
              "data.eval_sequences=2", "space=unstructured", "space.mlp_step=32", "space.fisher_sequences=3",
              "budget=sparsity", "budget.sparsity=0.4", "searcher=evo", "searcher.generations=2",
              "searcher.offspring=2", "searcher.stage_tokens=[32]", "searcher.stage_survivors=[1]",
              "fitness.sequences=2", "fitness.batch_size=2", "score.kl_sequences=2", "export.formats=[]",
              "verify=false"]
    serial = run_cli(*common, f"cache_dir={tmp_path / 'serial'}", cwd=tmp_path)
    assert serial.returncode == 0, serial.stderr[-3000:]
    workers = run_cli(*common, f"cache_dir={tmp_path / 'workers'}", "workers=2", cwd=tmp_path)
    assert workers.returncode == 0, workers.stderr[-3000:]
    assert WORKERS_LINE in workers.stderr + workers.stdout and WORKERS_LINE not in serial.stderr + serial.stdout
    (want,) = (tmp_path / "serial" / "databases").iterdir()
    (got,) = (tmp_path / "workers" / "databases").iterdir()
    assert_identical(got, want)
