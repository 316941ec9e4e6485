"""Runs sharing one cache at once: each cache entry (converted model, latency table, level database) is built by one
process under its lock while the others wait and reuse it; temporaries of killed builders are removed, a live
builder's never are; runs started in the same second get run directories of their own."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from allocator.core.cache_lock import LOCKS_DIR, CacheLock
from allocator.core.config import ModelConfig, SpaceConfig
from allocator.levels.database import database_key, open_or_build_database
from allocator.model import loader
from profilers.table import RegimeCosts, load_or_measure, table_key

from .conftest import REPO

TINY = [
    "model=tiny-llama", "model.tiny_layers=3", "data.seq_len=64", "data.calib_sequences=8", "data.eval_sequences=4",
    "space.mlp_step=32", "space.fisher_sequences=4", "profile.decode_batches=[1]", "profile.decode_context=64",
    "profile.prefill_length=64", "budget.speedup=1.3",
]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-") or ".partial." in p.name]


def test_four_concurrent_searches_on_one_empty_cache_build_each_entry_once(tmp_path):
    """The default CPU profile: one run measures the table under its lock, after waiting (profile.quiet_wait_s) for
    the other three to finish starting up and wait idle on that lock, so the busy-machine checks pass; on a machine
    other jobs keep busy it is refused instead (profilers/stability.py, tests/test_table_stability.py)."""
    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "allocator", "search", *TINY, "verify=false", f"cache_dir={cache}"]
    procs = [subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    text = "\n".join(outputs)
    (database,) = (cache / "databases").iterdir()
    assert sorted(p.name for p in database.iterdir() if p.is_dir()) == [
        f"layer{i:02d}.{kind}" for i in range(3) for kind in ("attn", "mlp")
    ]
    (table,) = (cache / "profiles").iterdir()
    assert table.name.startswith("cpu-") and table.suffix == ".json"
    assert text.count("measuring regime prefill") == 1  # measured once, reused by the other three
    assert temporaries(cache) == []
    # Besides its entries the cache holds its lock files, under .locks/ only.
    assert {p.name for p in cache.iterdir()} == {"databases", "profiles", LOCKS_DIR}
    assert all(p.suffix == ".lock" for p in (cache / LOCKS_DIR).rglob("*") if p.is_file())
    # One process built the database; the other three reused it (after waiting for its lock, when they came early).
    assert text.count("level database: building") == 1 and text.count("level database: reusing") == 3
    # Started in the same second, yet each run has a directory of its own.
    runs = sorted((tmp_path / "runs" / "search").iterdir())
    assert len(runs) == 4 and all((run / "plan.json").is_file() for run in runs)


MEASURE_ONCE = """
import sys, time
from pathlib import Path
from profilers.table import RegimeCosts, load_or_measure
cache, count = Path(sys.argv[1]), Path(sys.argv[2])

def measure(name):
    with count.open("a") as f:
        f.write(name + "\\n")
    time.sleep(1.0)  # a measurement the others must not repeat
    return RegimeCosts({"name": name}, 1.0, 10.0 + time.time() % 1, {"mlp": {0: 0.0, 1: 9.0}})

table, path = load_or_measure("cpu", cache, {"device": "test"}, {"layers": 1}, {"mlp": [0, 1]}, {}, ["prefill", "decode"],
                              measure)
print(path.name, table.regime("prefill").dense_ms, table.regime("decode").dense_ms)
"""


def test_four_processes_measure_a_latency_table_once(tmp_path):
    cache, count = tmp_path / "cache", tmp_path / "measured.txt"
    procs = [subprocess.Popen([sys.executable, "-c", MEASURE_ONCE, str(cache), str(count)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    assert sorted(count.read_text().split()) == ["decode", "prefill"]  # one process measured; three reused
    assert len({out for out, _ in results}) == 1  # the same table, read from the same file
    (table,) = (cache / "profiles").iterdir()
    assert table.name == results[0][0].split()[0] and temporaries(cache) == []


HOLD_LOCK = """
import sys
from pathlib import Path
from allocator.core.cache_lock import CacheLock
cache, root = map(Path, sys.argv[1:3])
with CacheLock(cache, root, "level database"):
    (root / ".tmp-layer00.mlp-live").mkdir()  # the unit it is writing
    print("holding", flush=True)
    sys.stdin.read()  # until killed
"""


def test_a_killed_builders_temporaries_are_removed_and_a_live_builders_are_not(tiny, tmp_path):
    loaded, space = tiny
    cache = tmp_path / "cache"
    cfg = SpaceConfig(mlp_step=32, fisher_sequences=2)
    root = cache / "databases" / database_key("model", "data", space.units, cfg)
    root.mkdir(parents=True)
    killed = root / ".tmp-layer00.attn-killed"  # a builder killed before its rename left this
    killed.mkdir()
    (killed / "32.safetensors").write_bytes(b"half a file")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(cache), str(root)], env=ENV,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        live = root / ".tmp-layer00.mlp-live"
        built = []
        calibration = torch.randint(0, 256, (4, 32))
        builder = threading.Thread(target=lambda: built.append(open_or_build_database(
            loaded.model, space, calibration, "model", "data", cfg, cache, batch_size=2)))
        builder.start()
        time.sleep(2.0)
        # Waiting for the live builder's lock: nothing of the directory is touched, not even the killed one's.
        assert builder.is_alive() and live.is_dir() and killed.is_dir() and not built
        holder.kill()  # the kernel releases a killed holder's lock: now both directories are leftovers
        holder.wait(timeout=60)
        builder.join(timeout=300)
        assert not builder.is_alive() and built
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=60)
    assert temporaries(root) == []
    assert all((root / u.name / "errors.json").is_file() for u in space.units)
    assert set(built[0].errors) == {u.name for u in space.units}


def test_removing_temporaries_needs_the_lock_and_keeps_to_its_entry(tmp_path):
    cache = tmp_path / "cache"
    profiles = cache / "profiles"
    profiles.mkdir(parents=True)
    fingerprint, shape, options, settings = {"device": "test"}, {"layers": 1}, {"mlp": [0, 1]}, {"repeats": 1}
    path = profiles / f"cpu-{table_key(fingerprint, shape, options, settings)}.json"
    own = [profiles / f".tmp-{path.name}-abc.json", profiles / f".tmp-{path.stem}.partial.json-def.json"]
    other = profiles / ".tmp-cpu-0123456789abcdef.json-ghi.json"  # another table's writer may still be live
    for p in [*own, other]:
        p.write_text("{")
    lock = CacheLock(cache, path, "latency table")
    assert lock.path == cache / LOCKS_DIR / "profiles" / f"{path.name}.lock"
    with pytest.raises(RuntimeError, match="needs the lock"):
        lock.remove_stale(profiles)
    with pytest.raises(ValueError):
        CacheLock(cache, tmp_path / "elsewhere", "not in the cache")

    measured = []

    def measure(name: str) -> RegimeCosts:
        measured.append(name)
        return RegimeCosts({"name": name}, 1.0, 10.0, {"mlp": {0: 0.0, 1: 9.0}})

    table, saved = load_or_measure("cpu", cache, fingerprint, shape, options, settings, ["prefill"], measure)
    assert saved == path and measured == ["prefill"] and table.regime("prefill").dense_ms == 10.0
    assert not any(p.exists() for p in own) and other.is_file()
    # The second caller finds the table and measures nothing.
    load_or_measure("cpu", cache, fingerprint, shape, options, settings, ["prefill"], measure)
    assert measured == ["prefill"]


def test_concurrent_loads_convert_a_gguf_once(monkeypatch, tmp_path):
    """Two loads of an embedded (GGUF) model on one empty cache: one converts, the other waits and loads the result;
    a killed conversion's directory is removed, another model's is not."""
    try:
        loader._embedded_gguf("smollm2-135m")
    except Exception as exc:  # the GGUF ships in a package of its own
        pytest.skip(f"the embedded SmolLM2 GGUF is not installed: {exc}")
    cache = tmp_path / "cache"
    conversions = []

    def fake_convert(gguf: Path, target: Path) -> None:  # a tiny Llama saved where the conversion would go
        conversions.append(target)
        time.sleep(1.0)  # long enough for the other load to find the lock held
        tiny = loader.load_model(ModelConfig(name="tiny-llama", tiny_layers=1), cache)
        tiny.model.save_pretrained(target)
        tiny.tokenizer.save_pretrained(target)

    monkeypatch.setattr(loader, "_convert_gguf", fake_convert)
    digest = loader._file_digest(loader._embedded_gguf("smollm2-135m"))
    models = cache / "models"
    models.mkdir(parents=True)
    killed = models / f".tmp-smollm2-135m-{digest[:12]}-killed"
    other = models / ".tmp-another-model-0123456789ab-live"
    killed.mkdir()
    other.mkdir()
    loaded = []
    threads = [threading.Thread(target=lambda: loaded.append(loader.load_model(ModelConfig(name="smollm2-135m"), cache)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(loaded) == 2 and conversions == [models / f"smollm2-135m-{digest[:12]}"]
    assert not killed.exists() and other.is_dir()
