"""Sweep summary: a synthetic 2 profiles x 3 budgets sweep (one run interrupted, two never started), and a real
`search -m` sweep on the tiny model whose Hydra callback writes the summary."""

import json
from pathlib import Path

import pytest
import yaml

from allocator.__main__ import main as cli_main
from allocator.app.sweep_summary import summarize_sweep
from allocator.core.plan import Plan

from .conftest import run_cli
from .plans import sample_measured, sample_plan

LAYERS, KV, MLP_FULL = 4, 2, 128
BUDGETS = (1.25, 1.5, 2.0)


def mlp_kept(profile: str, speedup: float) -> list[int]:
    """cpu and h100 agree at 1.25x; at 1.5x h100 keeps layer 2 whole and drops half of layer 3 instead."""
    base = {1.25: [128, 96, 96, 128], 1.5: [96, 64, 64, 96], 2.0: [64, 32, 32, 64]}[speedup]
    return [96, 64, 128, 32] if (profile, speedup) == ("h100", 1.5) else base


def fake_plan(profile: str, speedup: float) -> Plan:
    mlp = mlp_kept(profile, speedup)
    allocation = {}
    for i in range(LAYERS):
        allocation[f"layer{i:02d}.attn"] = KV
        allocation[f"layer{i:02d}.mlp"] = mlp[i]
    plan = sample_plan(
        allocation,
        budget={"speedup": speedup, "regime": "prefill", "headroom": 0.05, "target_ms": 10 / speedup},
        profile={"name": profile, "source": "measured" if profile == "cpu" else "roofline"},
        predicted={"latency_ms": 9.5 / speedup, "dense_latency_ms": 10.0, "speedup": speedup * 1.05,
                   "param_sparsity": 1 - sum(mlp) / (LAYERS * MLP_FULL), "weight_bytes": 3 * 2**20},
        quality={"kl": speedup / 10, "ppl_dense": 10.0, "ppl_pruned": 10 * speedup},
        uniform={"allocation": allocation, "predicted_speedup": speedup, "kl": speedup / 5, "ppl_dense": 10.0,
                 "ppl_pruned": 12 * speedup},
    )
    if profile == "cpu":
        return plan.with_measured(
            sample_measured(speedup=speedup * 0.98, latency_ms=10.2 / speedup, verdict="TARGET MISSED by 2.0%"))
    # GPU profiles are not verified on a machine without that GPU
    return plan.with_verify_skipped(f"profile {profile} is for a device not present on this machine")


def problem(full_mlp: int) -> dict:
    units = []
    for i in range(LAYERS):
        units.append({"name": f"layer{i:02d}.attn", "kind": "attn", "options": list(range(KV + 1))})
        units.append({"name": f"layer{i:02d}.mlp", "kind": "mlp", "options": list(range(0, full_mlp + 1, 32))})
    return {"units": units}


@pytest.fixture()
def synthetic_sweep(tmp_path: Path) -> Path:
    """Jobs in Hydra's order (budget outer, h100 before cpu), so job order is not the summary's order. The sweep
    asked for a 3.0x budget too, which was never started; h100 at 2.0x was interrupted (no plan)."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    task = ["budget.speedup=1.25,1.5,2.0,3.0", "profile=h100,cpu"]
    multirun = {"hydra": {"overrides": {"task": task},
                          "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                                      "params": None}}}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    num = 0
    for speedup in BUDGETS:
        for profile in ("h100", "cpu"):
            run = sweep / f"{num}_budget.speedup={speedup},profile={profile}"
            (run / ".hydra").mkdir(parents=True)
            (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"budget.speedup={speedup}", f"profile={profile}"]))
            if (profile, speedup) != ("h100", 2.0):
                fake_plan(profile, speedup).save(run / "plan.json")
                (run / "problem.json").write_text(json.dumps(problem(MLP_FULL)))
            num += 1
    return sweep


def test_rows_sorted_by_profile_then_budget(synthetic_sweep):
    summary = summarize_sweep(synthetic_sweep)
    rows = summary["rows"]
    assert [(r["profile"], r["budget"]["speedup"]) for r in rows] == [
        ("cpu", 1.25), ("cpu", 1.5), ("cpu", 2.0), ("h100", 1.25), ("h100", 1.5)
    ]
    cpu, h100 = rows[0], rows[3]
    assert (cpu["source"], h100["source"]) == ("measured", "roofline")
    assert cpu["measured_speedup"] == pytest.approx(1.25 * 0.98) and cpu["verdict"].startswith("TARGET MISSED")
    assert h100["measured_speedup"] is None and h100["verdict"] is None
    assert cpu["predicted_speedup"] == pytest.approx(1.3125) and cpu["ppl"] == 12.5 and cpu["uniform_ppl"] == 15.0
    assert cpu["kl"] == pytest.approx(0.125) and cpu["weight_bytes"] == 3 * 2**20
    assert cpu["kept_fraction"]["mlp"] == [1.0, 0.75, 0.75, 1.0] and cpu["kept_fraction"]["attn"] == [1.0] * LAYERS
    assert cpu["overrides"] == ["budget.speedup=1.25", "profile=cpu"] and cpu["other_overrides"] == []
    assert json.loads((synthetic_sweep / "summary.json").read_text()) == json.loads(json.dumps(summary))

    md = (synthetic_sweep / "summary.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| cpu") or line.startswith("| h100")]
    assert [tuple(line.split(" | ")[:3]) for line in table] == [
        ("| cpu", "measured", "speedup 1.25x (prefill)"), ("| cpu", "measured", "speedup 1.50x (prefill)"),
        ("| cpu", "measured", "speedup 2.00x (prefill)"), ("| h100", "roofline", "speedup 1.25x (prefill)"),
        ("| h100", "roofline", "speedup 1.50x (prefill)"),
    ]
    assert "| cpu | measured | speedup 1.25x (prefill) | 1.312 |" in md
    assert "| h100 | roofline | speedup 1.25x (prefill) | 1.312 | 7.60 | — | not verified |" in md
    assert h100["verify_skipped"].startswith("profile h100 is for a device not present")


def test_missing_runs_are_listed(synthetic_sweep):
    missing = summarize_sweep(synthetic_sweep)["missing"]
    assert missing[0] == {"run": "4_budget.speedup=2.0,profile=h100", "overrides": ["budget.speedup=2.0", "profile=h100"],
                          "reason": "no plan.json"}
    assert [(m["reason"], m["overrides"]) for m in missing[1:]] == [
        ("not started", ["budget.speedup=3.0", "profile=h100"]), ("not started", ["budget.speedup=3.0", "profile=cpu"])
    ]
    md = (synthetic_sweep / "summary.md").read_text()
    assert "## Missing runs" in md and "- 4_budget.speedup=2.0,profile=h100: no plan.json" in md
    assert "(no directory): not started (budget.speedup=3.0 profile=cpu)" in md


def test_allocation_differences_between_profiles(synthetic_sweep):
    diffs = summarize_sweep(synthetic_sweep)["allocation_differences"]
    assert [(d["budget"], d["profiles"]) for d in diffs] == [  # 2.0x was run on cpu only
        ("speedup 1.25x (prefill)", ["cpu", "h100"]), ("speedup 1.50x (prefill)", ["cpu", "h100"])
    ]
    same, apart = diffs
    for kind in ("attn", "mlp"):
        assert same["kinds"][kind]["mean_abs_diff"] == 0.0 and same["kinds"][kind]["most_different_layers"] == []
    assert apart["kinds"]["attn"]["mean_abs_diff"] == 0.0
    mlp = apart["kinds"]["mlp"]  # cpu [96, 64, 64, 96] vs h100 [96, 64, 128, 32], of 128
    assert mlp["mean_abs_diff"] == pytest.approx((0.5 + 0.5) / LAYERS) and mlp["max_abs_diff"] == pytest.approx(0.5)
    assert mlp["most_different_layers"] == [{"layer": 2, "kept": {"cpu": 0.5, "h100": 1.0}},
                                            {"layer": 3, "kept": {"cpu": 0.75, "h100": 0.25}}]
    md = (synthetic_sweep / "summary.md").read_text()
    assert "| speedup 1.25x (prefill) | cpu vs h100 | mlp | 0.000 | identical |" in md
    assert "| speedup 1.50x (prefill) | cpu vs h100 | mlp | 0.250 | L2 (0.50 vs 1.00), L3 (0.75 vs 0.25) |" in md


def test_plot_and_summarize_command(synthetic_sweep, capsys):
    (synthetic_sweep / "sweep.png").unlink(missing_ok=True)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["summarize", str(synthetic_sweep)])
    assert exit_.value.code == 0
    assert "| profile | source | budget |" in capsys.readouterr().out
    assert (synthetic_sweep / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit) as exit_:
        cli_main(["summarize", str(synthetic_sweep / "nope")])
    assert exit_.value.code == 2 and "does not exist" in capsys.readouterr().err


TINY = ["model=tiny-llama", "data.seq_len=64", "data.calib_sequences=8", "data.eval_sequences=4", "space.mlp_step=32",
        "space.fisher_sequences=4", "profile.repeats=2", "profile.warmup=1", "profile.decode_batches=[1]",
        "profile.decode_context=64", "profile.prefill_length=64", "profile.allow_unstable=true"]


def test_real_sweep_writes_summary_at_the_end(tmp_path):
    sweep = tmp_path / "sweep"
    done = run_cli("search", "-m", *TINY, "profile=cpu", "budget.speedup=1.2,1.3", "verify=false",
                   f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((sweep / "summary.json").read_text())
    assert [(r["profile"], r["source"], r["budget"]["speedup"]) for r in summary["rows"]] == [
        ("cpu", "measured", 1.2), ("cpu", "measured", 1.3)
    ]
    assert summary["missing"] == [] and summary["allocation_differences"] == []  # one profile: nothing to compare
    for r in summary["rows"]:
        assert r["predicted_speedup"] >= r["budget"]["speedup"] and r["ppl"] > 0 and r["uniform_ppl"] > 0
        assert r["measured_speedup"] is None and 0 < r["param_sparsity"] < 1
        assert all(0 <= f <= 1 for f in r["kept_fraction"]["mlp"])
    assert "| cpu | measured | speedup 1.20x (prefill) |" in done.stdout  # printed at the end of the sweep
    assert (sweep / "summary.md").read_text() in done.stdout
    assert (sweep / "sweep.png").stat().st_size > 0


def test_memory_budgets_are_labelled_and_ordered(tmp_path):
    from allocator.app.sweep_summary import _budget_key

    memory_only = {"speedup": None, "latency_ms": None, "sparsity": None, "memory_gb": 0.4, "memory_batch": 1,
                   "memory_context": 2048, "regime": "prefill"}
    tighter = {**memory_only, "memory_gb": 0.3}
    longer = {**memory_only, "memory_context": 4096}  # the same GB holding a larger KV cache is tighter too
    assert sorted([tighter, longer, memory_only], key=_budget_key) == [memory_only, longer, tighter]
    sweep = tmp_path / "sweep"
    for i, budget in enumerate((memory_only, longer)):
        plan = fake_plan("cpu", 1.25)
        sample_plan(plan.allocation, budget=budget, measured=plan.measured).save(sweep / f"{i}_memory" / "plan.json")
    rows = summarize_sweep(sweep)["rows"]
    assert [r["budget_label"] for r in rows] == ["memory 0.4 GB (KV cache: batch 1 x 2048 tokens)",
                                                 "memory 0.4 GB (KV cache: batch 1 x 4096 tokens)"]
    assert [r["budget"]["memory_context"] for r in rows] == [2048, 4096]


def test_an_unreadable_plan_is_listed_not_fatal(synthetic_sweep):
    bad = synthetic_sweep / "1_budget.speedup=1.25,profile=cpu" / "plan.json"
    bad.write_text(json.dumps({**json.loads(bad.read_text()), "version": 9}))
    summary = summarize_sweep(synthetic_sweep)
    assert len(summary["rows"]) == 4
    (missing,) = [m for m in summary["missing"] if m["run"] == "1_budget.speedup=1.25,profile=cpu"]
    assert missing["reason"].startswith(f"unreadable plan.json: {bad}: plan version 9 is unknown")
