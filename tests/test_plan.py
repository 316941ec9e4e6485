"""The typed plan: JSON round trip, file save/load, clear errors on bad plans, plans written before the version
field, and the budget's one description."""

import json
from dataclasses import fields, is_dataclass, replace
from typing import Union, get_args, get_origin, get_type_hints

import pytest

from allocator.app.report import summary_lines
from allocator.core.budget import budget_label
from allocator.core.config import BudgetConfig, ErrorMetric, Runtime
from allocator.core.errors import UserInputError
from allocator.core.plan import PLAN_VERSION, Plan, PlanError

from .conftest import REPO, run_cli
from .plans import sample_measured, sample_plan

LEGACY_PLAN = REPO / "runs" / "bench" / "memory" / "smollm2_memory_0.4gb_plan.json"  # written before versions

# Every field of version 1, as JSON paths. Changing the schema must bump PLAN_VERSION and add an upgrade
# (allocator/core/plan.py) so runs on disk stay readable; then update this list and the README.
V1_FIELDS = """
allocation budget.speedup budget.latency_ms budget.sparsity budget.memory_gb budget.memory_batch budget.memory_context
budget.regime budget.headroom budget.target_ms budget.target_params profile.name profile.source profile.fingerprint
profile.table model model_spec.name model_spec.dtype model_spec.tiny_layers model_spec.tiny_hidden
model_spec.tiny_heads model_spec.tiny_kv_heads model_spec.tiny_intermediate model_spec.seed searcher.name
searcher.proxy_error searcher.error_metric searcher.fitness searcher.tokens_spent searcher.evaluations
searcher.seconds predicted.latency_ms predicted.dense_latency_ms predicted.speedup predicted.param_sparsity
predicted.weight_bytes predicted.dense_weight_bytes predicted.kv_cache_bytes predicted.memory_bytes uniform.allocation
uniform.proxy_error uniform.predicted_latency_ms uniform.predicted_speedup uniform.param_sparsity uniform.kl
uniform.ppl_dense uniform.ppl_pruned quality.kl quality.ppl_dense quality.ppl_pruned measured.regime
measured.latency_ms measured.dense_latency_ms measured.speedup measured.predicted_speedup
measured.speedup_prediction_error measured.latency_prediction_error measured.pruned_stats.median_ms
measured.pruned_stats.p10_ms measured.pruned_stats.p90_ms measured.pruned_stats.samples_ms
measured.dense_stats.median_ms measured.dense_stats.p10_ms measured.dense_stats.p90_ms measured.dense_stats.samples_ms
measured.param_sparsity measured.memory.weight_bytes measured.memory.kv_cache_bytes measured.memory.total_bytes
measured.device measured.target_met measured.verdict verify_skipped version
""".split()
# Version 2 added, all optional: absolute latency against the latency table (allocator/app/verify_job.py).
V2_FIELDS = V1_FIELDS + """
measured.predicted_latency_ms measured.predicted_dense_latency_ms measured.dense_prediction_error
measured.table_stale measured.table_note
""".split()
# Added within version 2 with a default (no upgrade step): a plan without it exported bitmaps and loads as such.
V2_FIELDS += ["unstructured_format"]
# Version 3 added, optional: the engine the plan is for (space.runtime), written when not native.
V3_FIELDS = V2_FIELDS + ["runtime"]


def full_plan() -> Plan:
    """Every optional field set too."""
    return sample_plan(
        budget={"memory_gb": 0.4, "target_params": 1e6},
        searcher={"fitness": 0.25, "tokens_spent": 640, "evaluations": 10, "seconds": 3.5},
        measured=sample_measured(param_sparsity=0.31, device="cpu"),
    )


def schema_fields(cls, prefix: str = "") -> list[str]:
    out = []
    for f in fields(cls):
        tp = get_type_hints(cls)[f.name]
        if get_origin(tp) is Union:
            tp = next(a for a in get_args(tp) if a is not type(None))
        out += schema_fields(tp, f"{prefix}{f.name}.") if is_dataclass(tp) else [prefix + f.name]
    return out


def test_schema_is_version_3():
    assert PLAN_VERSION == 3
    assert sorted(schema_fields(Plan)) == sorted(V3_FIELDS)


def test_version_2_plan_is_native_and_runtime_round_trips():
    """A version-2 plan (no runtime) is a native plan; a plan for another engine writes and reads its runtime."""
    data = {**full_plan().to_json(), "version": 2}
    plan = Plan.from_json(data)
    assert plan.runtime is None and plan.engine == Runtime.native and "runtime" not in plan.to_json()
    assert plan.to_json() == {**data, "version": 3}
    vllm = replace(plan, runtime=Runtime.vllm)
    written = json.loads(json.dumps(vllm.to_json()))
    assert written["runtime"] == "vllm" and Plan.from_json(written).engine == Runtime.vllm
    with pytest.raises(PlanError, match=r"field runtime must be Runtime or null, got 'tgi'"):
        Plan.from_json({**written, "runtime": "tgi"})


def test_version_1_plan_loads_and_is_saved_as_version_3():
    """A version-1 plan (no absolute-latency fields) reads as it is; written back, only the version changes."""
    data = {**full_plan().to_json(), "version": 1}
    plan = Plan.from_json(data)
    assert plan.measured.table_stale is None and plan.measured.predicted_latency_ms is None
    assert plan.to_json() == {**data, "version": 3}
    stale = sample_measured(predicted_latency_ms=7256.0, predicted_dense_latency_ms=10602.0,
                            dense_prediction_error=10602.0 / 1110.0 - 1, table_stale=True, table_note="refresh it")
    assert Plan.from_json(json.loads(json.dumps(full_plan().with_measured(stale).to_json()))).measured == stale


@pytest.mark.parametrize("plan", [sample_plan(), full_plan(), sample_plan(verify_skipped="no such GPU here")])
def test_json_round_trip(plan, tmp_path):
    data = plan.to_json()
    assert list(data)[0] == "version" and data["version"] == PLAN_VERSION
    assert Plan.from_json(json.loads(json.dumps(data))) == plan
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan
    assert json.loads((tmp_path / "plan.json").read_text()) == data


def test_unstructured_format_is_recorded_and_old_plans_load_as_bitmap():
    data = sample_plan().to_json()
    assert data["unstructured_format"] == "bitmap"  # written always
    del data["unstructured_format"]  # a plan written before the choice existed
    assert Plan.from_json(json.loads(json.dumps(data))).unstructured_format == "bitmap"
    csr8 = replace(sample_plan(), unstructured_format="csr8")
    assert Plan.from_json(json.loads(json.dumps(csr8.to_json()))).unstructured_format == "csr8"


def test_unset_optional_fields_are_left_out_as_before():
    data = sample_plan().to_json()
    assert "measured" not in data and "verify_skipped" not in data and "target_params" not in data["budget"]
    assert set(data["searcher"]) == {"name", "proxy_error", "error_metric"}
    assert data["budget"]["latency_ms"] is None  # the job's budget section is written whole, unset targets as null
    assert data["searcher"]["error_metric"] == "fisher" and type(data["searcher"]["error_metric"]) is str


def test_verification_is_a_typed_update():
    skipped = sample_plan().with_verify_skipped("profile h100 is for a device not present on this machine")
    verified = skipped.with_measured(sample_measured())
    assert verified.measured == sample_measured() and verified.verify_skipped is None
    assert skipped.measured is None and verified.allocation == skipped.allocation


def _without(data: dict, path: str) -> dict:
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node[p]
    del node[last]
    return data


@pytest.mark.parametrize("path", ["predicted.latency_ms", "budget.headroom", "quality", "measured.pruned_stats.p10_ms",
                                  "model_spec.dtype", "allocation"])
def test_missing_field_names_file_and_field(path, tmp_path):
    data = _without(full_plan().to_json(), path)
    with pytest.raises(PlanError, match=rf"^plan\.json: missing field {path}$"):
        Plan.from_json(data)
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"^{tmp_path}/plan\.json: missing field {path}$"):
        Plan.load(tmp_path / "plan.json")


@pytest.mark.parametrize("version", [4, 99, -1, "1", 1.0, None, True])
def test_unknown_version_is_a_clear_error(version):
    data = {**sample_plan().to_json(), "version": version}
    with pytest.raises(PlanError, match=rf"^run/plan\.json: plan version {version!r} is unknown; this "
                                        rf"sparsity-allocator reads versions up to 3 \(and plans without a version\)"):
        Plan.from_json(data, "run/plan.json")


def test_wrong_types_and_unknown_fields_are_clear_errors(tmp_path):
    cases = [
        (("predicted", "speedup", "fast"), r"field predicted\.speedup must be float or null, got 'fast'"),
        (("predicted", "weight_bytes", 1.5), r"field predicted\.weight_bytes must be int, got 1\.5"),
        (("budget", "memory_gb", "big"), r"field budget\.memory_gb must be float or null, got 'big'"),
        (("searcher", "error_metric", "squared"), r"field searcher\.error_metric='squared' is not one of fisher, "),
        (("budget", "speedupp", 2.0), r"unknown field budget\.speedupp \(known: "),
        (("allocation", "layer00.attn", [2]), r"field allocation\.layer00\.attn must be int or str, got \[2\]"),
    ]
    for (section, key, value), message in cases:
        data = full_plan().to_json()
        data[section][key] = value
        with pytest.raises(PlanError, match="^plan.json: " + message):
            Plan.from_json(data)
    (tmp_path / "plan.json").write_text("{not json")
    with pytest.raises(PlanError, match=rf"^{tmp_path}/plan\.json: not valid JSON"):
        Plan.load(tmp_path / "plan.json")
    with pytest.raises(PlanError, match="a plan is a JSON object, got list"):
        Plan.from_json([])
    assert issubclass(PlanError, ValueError) and issubclass(PlanError, UserInputError)  # the CLI prints one line


def test_plan_written_before_versions_loads_unchanged():
    """A real run's plan from before the version field (the memory-budget benchmark's): read as it is, and
    written back with only the version and the format it exported (bitmap, the only one then) added."""
    data = json.loads(LEGACY_PLAN.read_text())
    assert "version" not in data
    plan = Plan.load(LEGACY_PLAN)
    assert plan.budget.memory_gb == 0.4 and plan.measured.memory.total_bytes <= 0.4e9 and plan.measured.target_met
    assert plan.searcher.error_metric is ErrorMetric.fisher and plan.model_spec.name == "smollm2-135m"
    assert plan.unstructured_format == "bitmap"
    assert plan.to_json() == {"version": PLAN_VERSION, **data, "unstructured_format": "bitmap"}


def test_oldest_plans_are_upgraded():
    """The first plans (no headroom, one latency prediction error, no parameter sparsity or memory figures)."""
    newest = sample_plan(measured=sample_measured()).to_json()
    data = {k: v for k, v in newest.items() if k != "version"}
    data["budget"] = {"speedup": 1.5, "latency_ms": None, "regime": "prefill", "target_ms": 8.0}
    for key in ("param_sparsity", "kv_cache_bytes", "memory_bytes"):
        del data["predicted"][key]
    del data["uniform"]["param_sparsity"]
    data["measured"] = {k: v for k, v in data["measured"].items()
                        if k not in ("speedup_prediction_error", "latency_prediction_error", "memory", "target_met",
                                     "verdict")}
    data["measured"]["prediction_error"] = 0.04
    plan = Plan.from_json(data)
    assert plan.budget.headroom == 0.0 and plan.budget.sparsity is None and plan.budget.memory_gb is None
    assert plan.predicted.param_sparsity is None and plan.predicted.memory_bytes is None
    assert plan.uniform.param_sparsity is None
    assert plan.measured.latency_prediction_error == 0.04
    assert plan.measured.speedup_prediction_error == pytest.approx(1.52 / 1.5 - 1.0)
    assert Plan.from_json(plan.to_json()) == plan  # saved again, it is a current-version plan
    assert "parameter sparsity" not in "\n".join(summary_lines(plan))


def test_one_budget_description_everywhere():
    assert budget_label(BudgetConfig(speedup=1.5)) == "speedup 1.50x (prefill)"
    assert budget_label(BudgetConfig(speedup=None, latency_ms=12.34, regime="decode_b1")) == "12.3 ms (decode_b1)"
    assert budget_label(BudgetConfig(speedup=None, sparsity=0.5)) == "sparsity 50%"
    memory = "memory 0.4 GB (KV cache: batch 4 x 512 tokens)"
    assert budget_label(BudgetConfig(speedup=None, memory_gb=0.4, memory_batch=4, memory_context=512)) == memory
    assert budget_label(BudgetConfig(speedup=1.5, memory_gb=0.4, memory_batch=4, memory_context=512)) == (
        "speedup 1.50x (prefill) + " + memory)
    plan = full_plan()
    assert plan.budget.label() == budget_label(plan.budget)
    lines = summary_lines(plan)
    assert lines[0] == f"profile cpu (measured), budget {plan.budget.label()}, planned for 7.6 ms"
    assert lines[1].startswith("predicted (prefill): 7.5 ms, speedup 1.60x")
    assert plan.measured.verdict in lines


def test_cli_verify_names_an_unreadable_plan(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "model.safetensors"):
        (run / name).write_text("{}")
    (run / "plan.json").write_text(json.dumps({**sample_plan().to_json(), "version": 7}))
    done = run_cli("verify", f"run={run}", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"error: {run}/plan.json: plan version 7 is unknown" in done.stderr


def test_plan_without_a_latency_table_round_trips():
    """A parameter or memory budget with no table saved: profile source "none", no predicted latency or speedup
    (the plan, its uniform and its verification), and the plan reads back as written."""
    from dataclasses import replace

    from allocator.core.plan import NO_TABLE

    plan = full_plan()
    plan = replace(
        plan,
        profile=replace(plan.profile, source=NO_TABLE, fingerprint={}, table=None),
        predicted=replace(plan.predicted, latency_ms=None, dense_latency_ms=None, speedup=None),
        uniform=replace(plan.uniform, predicted_latency_ms=None, predicted_speedup=None),
        measured=replace(plan.measured, predicted_speedup=None, speedup_prediction_error=None,
                         latency_prediction_error=None),
    )
    data = plan.to_json()
    assert data["profile"]["table"] is None and data["predicted"]["speedup"] is None
    assert Plan.from_json(json.loads(json.dumps(data))) == plan
