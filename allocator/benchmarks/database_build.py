"""Cold level-database build of a real model (default SmolLM2-135M, the default run's data and space), timed, and
optionally compared with a database another build wrote (levels allclose, errors to a relative tolerance).

    python -m allocator.benchmarks.database_build --space structured --db-cache /tmp/db-fresh \
        [--model-cache runs/cache] [--compare runs/cache/databases/<key>] [--label after] [--units 12] [--workers 2]

--workers N builds the units' levels on N Ray workers (a local cluster started for the build); the JSON records the
load average around the build, since a shared machine's other jobs change the wall time.

The database goes under --db-cache (use a fresh directory for a cold build); the converted model is read from
--model-cache. JSON: runs/bench/database_build/<space>-<label>.json. The script uses only the build API that the
pre-streaming code also has, so it can time that code too (PYTHONPATH=<old checkout> python <this file> ...)."""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import resource
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from allocator.benchmarks.common import environment, write_result
from allocator.core.config import DataConfig, ModelConfig, SpaceConfig
from allocator.core.space import ModelShape, Space, build_space
from allocator.levels.database import database_key, open_or_build_database
from allocator.model.calibration_data import build_calibration_data
from allocator.model.loader import load_model


def compare_databases(got: Path, want: Path, units: list[str]) -> dict:
    """Largest relative difference of any error, and largest absolute / relative difference of any level tensor;
    and whether every unit's files are byte-identical (same names, same bytes)."""
    worst_error = worst_abs = worst_rel = 0.0
    levels = 0
    identical = all(_same_files(got / unit, want / unit) for unit in units)
    for unit in units:
        a = json.loads((got / unit / "errors.json").read_text())
        b = json.loads((want / unit / "errors.json").read_text())
        if a.keys() != b.keys():
            raise ValueError(f"{unit}: options differ")
        for option, metrics in b.items():
            for metric, value in metrics.items():
                diff = abs(a[option][metric] - value)
                worst_error = max(worst_error, diff / abs(value) if value else diff)
        for path in sorted((want / unit).glob("*.safetensors")):
            x, y = load_file(got / unit / path.name), load_file(path)
            for key in y:
                if x[key].dtype != y[key].dtype or x[key].shape != y[key].shape:
                    raise ValueError(f"{unit}/{path.name}/{key}: dtype or shape differs")
                d = (x[key].double() - y[key].double()).abs()
                worst_abs = max(worst_abs, float(d.max()) if d.numel() else 0.0)
                scale = float(y[key].double().abs().max()) if d.numel() else 0.0
                worst_rel = max(worst_rel, float(d.max()) / scale if scale else 0.0)
            levels += 1
    return {"units": len(units), "level_files": levels, "max_error_rel_diff": worst_error,
            "max_level_abs_diff": worst_abs, "max_level_diff_over_max_abs": worst_rel, "byte_identical": identical}


def _same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in b.iterdir())
    if names != sorted(p.name for p in a.iterdir()):
        return False
    match, _mismatch, _errors = filecmp.cmpfiles(a, b, names, shallow=False)
    return len(match) == len(names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--space", default="structured", choices=["structured", "unstructured", "nm", "mixed"])
    parser.add_argument("--model-cache", default="runs/cache", help="where the converted model is (or goes)")
    parser.add_argument("--db-cache", required=True, help="cache directory the database is built into")
    parser.add_argument("--units", type=int, default=0, help="build only the first N units (0: all)")
    parser.add_argument("--compare", help="a database directory to compare the built one with")
    parser.add_argument("--label", default="run")
    parser.add_argument("--workers", type=int, default=0, help="build the levels on this many Ray workers (0: here)")
    args = parser.parse_args()

    loaded = load_model(ModelConfig(name=args.model), args.model_cache)
    data = build_calibration_data(DataConfig(), loaded.tokenizer)
    cfg = SpaceConfig(kind=args.space)
    space = build_space(ModelShape.from_config(loaded.model.config), cfg)
    if args.units:
        space = Space(space.shape, space.units[: args.units])
    key = database_key(loaded.fingerprint, data.fingerprint, space.units, cfg)
    if (Path(args.db_cache) / "databases" / key).exists():
        raise SystemExit(f"{args.db_cache} already holds database {key}: give a fresh --db-cache for a cold build")
    extra = {"workers": args.workers} if args.workers else {}  # only then: older checkouts lack the argument
    load_before = os.getloadavg()
    start = time.perf_counter()
    db = open_or_build_database(loaded.model, space, data.calibration, loaded.fingerprint, data.fingerprint, cfg,
                                args.db_cache, **extra)
    seconds = time.perf_counter() - start
    result = {
        "model": args.model, "space": args.space, "units": len(space.units), "database_key": key,
        "build_seconds": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "torch_threads": torch.get_num_threads(), "workers": args.workers, "label": args.label,
        "cpu_count": os.cpu_count(), "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg(),
        "environment": environment(),
    }
    if args.compare:
        result["compared_with"] = args.compare
        result["comparison"] = compare_databases(db.root, Path(args.compare), [u.name for u in space.units])
    print(json.dumps(result, indent=1))
    write_result("database_build", f"{args.model}-{args.space}-{args.label}", result)


if __name__ == "__main__":
    main()
