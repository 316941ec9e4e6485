"""The GPU campaign (allocator.benchmarks.gpu_campaign) end to end in its --dry-run: every step on the CPU at tiny
sizes, in the processes, timeouts and files the device call uses, so that call cannot fail on a typo."""

import json
import subprocess
import sys
import tarfile

import pytest

from allocator.benchmarks import gpu_campaign as gc
from allocator.core.config import SpaceConfig
from allocator.core.space import ModelShape, build_space
from tests.conftest import REPO


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("campaign") / "c"
    archive = out.parent / "c.tar.gz"
    proc = subprocess.run([sys.executable, "-m", "allocator.benchmarks.gpu_campaign", "--out", str(out), "--dry-run",
                           "--archive", str(archive)], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**gc.os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, archive, proc.stdout


def test_every_step_runs_and_reports(dry_run):
    out, archive, stdout = dry_run
    steps = json.loads((out / "campaign.json").read_text())["steps"]
    assert list(steps) == list(gc.STEPS)
    assert {s["status"] for s in steps.values()} == {"ok"}, steps
    assert stdout.rstrip().splitlines()[-1].startswith("verify tiny:")  # the summary table is printed last
    for step in gc.STEPS:
        assert (out / f"{step}.log").stat().st_size > 0
    with tarfile.open(archive) as tar:  # what comes back from the device
        names = tar.getnames()
    assert "c/verify.json" in names and "c/tables" in names


def test_results_have_their_numbers(dry_run):
    out, _, _ = dry_run
    smoke = json.loads((out / "smoke.json").read_text())
    assert smoke["failed"] == 0 and smoke["checks"] == len(smoke["rows"]) > 40
    assert {r["format"] for r in smoke["rows"]} == {"bitmap", "csr8", "nm", "bsr"}
    assert any(r.get("graph") for r in smoke["rows"]) and any(r["split_k"] == 3 for r in smoke["rows"])
    ceilings = json.loads((out / "ceilings.json").read_text())
    assert ceilings["copy_bandwidth"] > 0 and ceilings["matmul_flops"] > 0
    kernels = json.loads((out / "kernels.json").read_text())
    ok = [r for r in kernels["results"] if r["status"] == "ok"]
    assert {r["kernel"] for r in ok} >= {"cublas-dense", "triton-bitmap", "triton-csr8"}
    assert all(r["speedup_vs_cublas"]["median"] > 0 for r in ok)
    table = json.loads(next((out / "tables").glob("tiny--h200-*.json")).read_text())
    assert table["source"] == "measured" and set(table["regimes"]) == {"prefill", "decode_b1", "decode_b4"}
    assert table["fingerprint"]["dtype"] == "bfloat16"
    rows = json.loads((out / "verify.json").read_text())["rows"]
    assert len(rows) == 5 * 3  # 5 allocations x 3 regimes
    for r in rows:
        assert r["measured_ms"] > 0 and r["predicted_ms"] > 0
        assert r["error"] == pytest.approx(r["predicted_ms"] / r["measured_ms"] - 1)


def test_allocations_are_in_the_space_and_plans_come_first(tmp_path, monkeypatch):
    shape = ModelShape(num_layers=4, hidden=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate=256, vocab=99)
    space = build_space(shape, SpaceConfig(mlp_step=32))
    allocs = gc.allocations("tiny", space)
    assert list(allocs) == ["uniform-0.75", "uniform-0.5", "random-0", "random-1", "random-2"]
    for alloc in allocs.values():
        assert all(alloc[u.name] in u.options for u in space.units)
    assert allocs == gc.allocations("tiny", space)  # seeded
    run = tmp_path / "s15"
    run.mkdir()
    plan = {"budget": {"speedup": 1.5}, "profile": {"name": "h200", "source": "roofline"},
            "searcher": {"name": "milp"}, "predicted": {"latency_ms": 1.0}, "allocation": allocs["random-1"]}
    (run / "plan.json").write_text(json.dumps(plan))
    monkeypatch.setattr(gc, "PLANS", tmp_path / "plans.json")
    gc.collect_plans([run], gc.PLANS)
    allocs = gc.allocations("smollm2-135m", space)
    assert list(allocs)[0] == "s15" and allocs["s15"] == plan["allocation"]


def test_a_step_past_its_timeout_is_killed(tmp_path):
    t0 = gc.time.monotonic()
    rc, seconds = gc.run_logged([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                                tmp_path / "log", 2.0, dict(gc.os.environ))
    assert rc is None and seconds < 20 and gc.time.monotonic() - t0 < 20
    assert "started" in (tmp_path / "log").read_text()


def test_unknown_step_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown step.*nope.*valid: probe"):
        gc.run_all(tmp_path, True, 10, ["nope"], None)


def test_report_files_the_results(dry_run, tmp_path):
    from allocator.benchmarks.gpu_report import join_static, report

    out, _, _ = dry_run
    tables, bench = tmp_path / "tables", tmp_path / "bench"
    tables.mkdir()
    result = report([out], tables, bench)
    assert sorted(p.name for p in tables.iterdir()) == sorted(p.name.split("--")[1] for p in (out / "tables").iterdir())
    assert result["smoke"]["failed"] == 0 and next(iter(result["tests"].values()))["failures"] == 0
    assert all(r["roofline_ms"] > 0 for r in result["verify"])
    assert (bench / "gpu" / "unknown-gpu-verify.png").stat().st_size > 0
    assert set(result["table_vs_roofline"]["tiny"]) == {"prefill", "decode_b1", "decode_b4"}
    static = {"rows": [{"variant": "csr8-70", "shape": [4096, 14336], "m": 1, "predicted_speedup_vs_cublas": 2.1,
                        "bound_by": "issue"}]}
    row = {"kernel": "triton-csr8", "sparsity": 0.7, "shape": [4096, 14336], "M": 1}
    assert join_static([row], static)[0]["static_predicted_speedup"] == 2.1
    assert join_static([{**row, "M": 16}], static)[0]["static_predicted_speedup"] is None
