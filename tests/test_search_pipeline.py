"""The whole search command on the tiny random Llama: profile, database, DP, scoring, export, verify."""

import json
from dataclasses import replace

import pytest
import torch

from allocator.app.config import SearchJob
from allocator.app.search_job import prepare_search, run_search
from allocator.core.config import (
    BudgetConfig,
    DataConfig,
    FitnessConfig,
    ModelConfig,
    ProfileConfig,
    ScoreConfig,
    SpaceConfig,
)
from allocator.core.plan import PLAN_VERSION, Plan
from allocator.core.space import ModelShape, build_space
from allocator.levels.database import LevelDatabase
from allocator.model.runtime import load_pruned
from allocator.model.surgery import build_pruned_model
from search.evo import EvoConfig

from .conftest import run_cli


def tiny_job(cache_dir) -> SearchJob:
    return SearchJob(
        model=ModelConfig(name="tiny-llama", tiny_layers=3),
        data=DataConfig(seq_len=64, calib_sequences=8, eval_sequences=4),
        space=SpaceConfig(mlp_step=32, fisher_sequences=4),
        # allow_unstable: the pipeline, not the table's figures, is tested here (tests/test_table_stability.py)
        profile=ProfileConfig(repeats=2, warmup=1, decode_batches=[1], decode_context=64, prefill_length=64,
                              allow_unstable=True),
        budget=BudgetConfig(speedup=1.3),
        score=ScoreConfig(kl_sequences=4, batch_size=4),
        cache_dir=str(cache_dir),
    )


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    run_dir = tmp_path_factory.mktemp("run")
    plan = run_search(tiny_job(cache), run_dir)
    return plan, run_dir, cache


def test_plan_has_every_documented_field(searched):
    plan, run_dir, _ = searched
    saved = json.loads((run_dir / "plan.json").read_text())
    assert saved == plan.to_json() and Plan.load(run_dir / "plan.json") == plan
    assert saved["version"] == PLAN_VERSION and saved["searcher"]["error_metric"] == "fisher"
    for key in ("allocation", "budget", "profile", "predicted", "measured", "quality", "uniform"):
        assert key in saved
    assert set(saved["predicted"]) >= {"latency_ms", "speedup", "weight_bytes"}
    assert set(saved["measured"]) >= {"latency_ms", "speedup"}
    assert set(saved["quality"]) == {"kl", "ppl_dense", "ppl_pruned"}
    assert set(saved["uniform"]) >= {"kl", "ppl_dense", "ppl_pruned"}
    assert saved["profile"]["fingerprint"]["torch"] == torch.__version__
    assert saved["predicted"]["latency_ms"] <= saved["budget"]["target_ms"] + 1e-9
    assert saved["predicted"]["weight_bytes"] < saved["predicted"]["dense_weight_bytes"]
    assert (run_dir / "allocation.png").stat().st_size > 0


def test_exported_model_equals_the_scored_stitched_model(searched):
    plan, run_dir, cache = searched
    job = tiny_job(cache)
    from allocator.model.loader import load_model

    dense = load_model(job.model, cache).model
    shape = ModelShape.from_config(dense.config)
    space = build_space(shape, job.space)
    units = space.units
    (db_root,) = (cache / "databases").iterdir()
    stitched = build_pruned_model(dense, shape, plan.allocation, LevelDatabase(db_root, units).source)
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == ["native"]  # export.formats defaults to [native]
    reloaded, _, reloaded_plan = load_pruned(run_dir / "export" / "native")
    assert reloaded_plan == plan  # the export's plan.json carries the verified plan too
    ids = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, stitched(ids).logits, rtol=0, atol=0)


def test_second_run_reuses_caches_and_finds_the_same_allocation(searched, tmp_path, caplog):
    plan, _, cache = searched
    job = replace(tiny_job(cache), verify=False)
    with caplog.at_level("INFO"):
        again = run_search(job, tmp_path)
    assert again.allocation == plan.allocation and again.measured is None
    assert "latency table: reusing" in caplog.text and "level database: reusing" in caplog.text


def test_fitness_searchers_score_on_calibration_text_the_database_never_saw(searched, tmp_path):
    _, _, cache = searched
    evo = EvoConfig(name="evo", generations=2, offspring=2, stage_tokens=[64], stage_survivors=[1])
    job = replace(tiny_job(cache), searcher=evo, fitness=FitnessConfig(sequences=3, batch_size=2), verify=False)
    setup = prepare_search(job)
    pool, calibration = setup.data.fitness, setup.data.calibration
    assert pool.shape == (3, 64) and not any(torch.equal(p, c) for p in pool for c in calibration)
    plan = run_search(job, tmp_path)
    trace = json.loads((tmp_path / "search_trace.json").read_text())
    # The parent, then 2 offspring per generation, each on 1 sequence (a repeated candidate costs nothing).
    assert 0 < trace["tokens_spent"] == 64 * trace["evaluations"] <= 64 * (1 + 2 * 2)
    assert plan.allocation and plan.predicted.latency_ms <= plan.budget.target_ms + 1e-9
    assert plan.searcher.name == "evo" and plan.searcher.tokens_spent == trace["tokens_spent"]


def test_cli_rejects_bad_input_with_one_line(searched, tmp_path):
    _, _, cache = searched
    common = ["model=tiny-llama", f"cache_dir={cache}", "data.seq_len=64", "space.mlp_step=32", "space.fisher_sequences=4", "data.calib_sequences=8",
              "profile.repeats=2", "profile.warmup=1", "profile.decode_batches=[1]", "profile.decode_context=64",
              "profile.prefill_length=64", "model.tiny_layers=3", "profile.allow_unstable=true"]
    unreachable = run_cli("search", *common, "budget.speedup=50", cwd=tmp_path)
    assert unreachable.returncode == 2
    assert "error: budget.speedup=50.0 is unreachable on profile cpu (regime prefill): achievable speedup" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr

    missing = run_cli("search", *common, "data=does/not/exist.txt", cwd=tmp_path)
    assert missing.returncode == 2 and "does/not/exist.txt" in missing.stderr and "Traceback" not in missing.stderr

    arch = tmp_path / "gpt2-model"
    arch.mkdir()
    (arch / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    unknown = run_cli("search", f"model={arch}", cwd=tmp_path)
    assert unknown.returncode == 2
    assert "architecture 'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3" in unknown.stderr

    typo = run_cli("search", "budget.speedupp=2", cwd=tmp_path)
    assert typo.returncode != 0 and "speedupp" in typo.stderr and "Traceback" not in typo.stderr
    wrong_type = run_cli("search", "budget.speedup=fast", cwd=tmp_path)
    assert wrong_type.returncode != 0 and "fast" in wrong_type.stderr

    no_pool = run_cli("search", "searcher=evo", "fitness.sequences=0", cwd=tmp_path)
    assert no_pool.returncode == 2 and "fitness.sequences=0 must be an integer >= 1" in no_pool.stderr

    unknown_searcher = run_cli("search", "searcher=nope", cwd=tmp_path)
    assert unknown_searcher.returncode != 0 and "dp" in unknown_searcher.stderr

    unknown_format = run_cli("search", "export.formats=[native,onnx]", cwd=tmp_path)
    assert unknown_format.returncode == 2 and "Traceback" not in unknown_format.stderr
    assert "error: export.formats: unknown format 'onnx'; valid: native, dense, decilm, gguf" in unknown_format.stderr

    command = run_cli("serach", cwd=tmp_path)
    assert command.returncode == 2 and "usage: python -m allocator {search,profile,export,verify," in command.stderr


def test_export_with_new_latency_target_and_verify(searched, tmp_path):
    plan, run_dir, cache = searched
    target = plan.predicted.dense_latency_ms / 1.15
    exported = run_cli("export", f"run={run_dir}", f"budget.latency_ms={target}", f"hydra.run.dir={tmp_path / 'exp'}",
                       "export.formats=[native,dense]", cwd=run_dir.parent)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "exp" / "export").iterdir()) == ["dense", "native"]
    assert f"export dense   {tmp_path / 'exp' / 'export' / 'dense'}/" in exported.stdout
    new_plan = Plan.load(tmp_path / "exp" / "plan.json")  # written by the CLI: a typed plan
    assert new_plan.budget.latency_ms == pytest.approx(target) and new_plan.budget.speedup is None
    assert new_plan.predicted.latency_ms <= target + 1e-9
    assert new_plan.model_spec == plan.model_spec and new_plan.measured.regime == new_plan.budget.regime
    verified = run_cli("verify", f"run={tmp_path / 'exp'}", "profile.repeats=2", "profile.warmup=1",
                       "profile.decode_batches=[1]", "profile.decode_context=64", "profile.prefill_length=64",
                       f"cache_dir={cache}", cwd=run_dir.parent)
    assert verified.returncode == 0, verified.stderr[-2000:]
    assert "predicted speedup" in verified.stdout and "measured" in verified.stdout
    reverified = Plan.load(tmp_path / "exp" / "plan.json")  # verify replaced the measurement, nothing else
    assert reverified.measured != new_plan.measured and replace(reverified, measured=new_plan.measured) == new_plan
    for name in ("native", "dense"):  # and the exports' plans and model cards show it
        export = tmp_path / "exp" / "export" / name
        assert Plan.load(export / "plan.json") == reverified
        assert f"speedup {reverified.measured.speedup:.2f}x" in (export / "README.md").read_text()


def test_runs_from_before_export_formats_still_export_and_verify(searched, tmp_path):
    """An older run directory: `export: true` in its search_job.yaml, the checkpoint at its top level."""
    import shutil

    from allocator.app.config import VerifyJob
    from allocator.app.export_job import load_search_job
    from allocator.app.verify_job import run_verify

    _plan, run_dir, cache = searched
    old = tmp_path / "old"
    old.mkdir()
    saved = (run_dir / "search_job.yaml").read_text()
    assert "export:\n  formats:\n  - native\n" in saved
    (old / "search_job.yaml").write_text(saved.replace("export:\n  formats:\n  - native\n", "export: true\n"))
    assert load_search_job(old).export.formats == ["native"]
    for item in (run_dir / "export" / "native").iterdir():
        shutil.copy(item, old / item.name)
    job = tiny_job(cache)
    measured = run_verify(VerifyJob(run=str(old), profile=job.profile, cache_dir=str(cache)))
    assert measured.speedup > 0 and Plan.load(old / "plan.json").measured == measured
