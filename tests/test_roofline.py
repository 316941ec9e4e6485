"""Roofline latency tables for devices that are not present, and the profile registry that picks them."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from allocator.app.profile_job import validate_profile_name
from allocator.app.search_job import run_search
from allocator.core.config import BudgetConfig, ProfileConfig, SpaceConfig
from allocator.core.errors import UserInputError
from allocator.core.patterns import SparsityPattern
from allocator.core.space import ModelShape, build_space
from profilers.devices import DEVICES
from profilers.regimes import Regime, regimes_of
from profilers.registry import PROFILES, device_present, get_cost_table
from profilers.roofline import ideal_decode_speedup, linear_cost, roofline_table, weight_bytes_per_element
from profilers.table import load_table, save_table

from .conftest import run_cli
from .test_search_pipeline import tiny_job

LLAMA3_8B = ModelShape(num_layers=32, hidden=4096, num_heads=32, num_kv_heads=8, head_dim=128, intermediate=14336,
                       vocab=128256)
REGIMES = [Regime("prefill", "prefill", 1, 512), Regime("decode_b1", "decode", 1, 512), Regime("decode_b16", "decode", 16, 512)]
TINY_PROFILE = ProfileConfig(name="h100", decode_batches=[1], decode_context=64, prefill_length=64)


@pytest.mark.parametrize(
    "label, per_element",
    [
        # Bitmap: the values kept per row of 4096 (50%: 2048, 70%: 4096 - round(2867.2), 90%: 4096 - round(3686.4)),
        # one bit per element, an int32 offset per row of each 16x64 tile (+1): 4096x4096 has 16384 tiles.
        ("unstructured50", 2048 / 4096 * 2 + 1 / 8 + 4 * (16384 * 16 + 1) / 4096**2),
        ("unstructured70", 1229 / 4096 * 2 + 1 / 8 + 4 * (16384 * 16 + 1) / 4096**2),
        ("unstructured90", 410 / 4096 * 2 + 1 / 8 + 4 * (16384 * 16 + 1) / 4096**2),
        ("2:4", (2 * 2 + 2 * 2 / 8) / 4),  # per group of 4: two values, two 2-bit indices
        ("4:8", (4 * 2 + 4 * 4 / 8) / 8),  # per group of 8: four values, four 4-bit indices (3 bits round up to 4)
        # BSR: half the 16x16 blocks with an int32 column index each, int32 row pointers per block row (+1).
        ("block16x16-50", 0.5 * (2 + 4 / 256) + 4 * (256 + 1) / 4096**2),
    ],
)
def test_ideal_decode_speedup_is_the_stored_byte_ratio(label, per_element):
    pattern = SparsityPattern.parse(label)
    assert weight_bytes_per_element(pattern, 4096, 4096) == pytest.approx(per_element, rel=1e-12)
    assert ideal_decode_speedup(pattern, 4096, 4096) == pytest.approx(2 / per_element, rel=1e-12)
    assert weight_bytes_per_element(None, 4096, 4096) == 2


def test_decode_is_memory_bound_and_large_prefill_compute_bound_on_h100():
    h100 = DEVICES["h100"]
    assert linear_cost(h100, None, 1, 4096, 4096).bound == "memory"
    assert linear_cost(h100, None, 4096, 4096, 4096).bound == "compute"
    # FLOPs: the bitmap and N:M kernels expand tiles to dense before the MMA (dense FLOPs); BSR multiplies its
    # stored blocks only. At M = 4096 all three are issue-bound: their compiled loops (kernels/issue_costs.json)
    # issue more warp-instructions than the tensor cores need time for, so each costs more than its FLOPs.
    dense = linear_cost(h100, None, 4096, 4096, 4096)
    for label, flops in (("2:4", dense.flops), ("unstructured70", dense.flops), ("block16x16-50", dense.flops / 2)):
        cost = linear_cost(h100, SparsityPattern.parse(label), 4096, 4096, 4096)
        assert cost.flops == flops and cost.bound == "issue"
        assert cost.seconds == pytest.approx(cost.instructions / h100.issue_rate + h100.launch_s)
        assert cost.seconds > flops / h100.flops + h100.launch_s
    with pytest.raises(ValueError, match="in=6 is not divisible by m=4"):
        linear_cost(h100, SparsityPattern.parse("2:4"), 1, 6, 8)


def _assert_consistent(table, shape, units):
    for costs in table.regimes.values():
        for curve in costs.unit_ms.values():
            values = [curve[k] for k in sorted(curve)]
            assert values == sorted(values) and values[0] == 0.0  # non-decreasing in width, dropping costs nothing
        full = costs.fixed_ms + shape.num_layers * sum(costs.unit_ms[u.kind][u.full] for u in units[:2])
        assert costs.dense_ms == pytest.approx(full)


def test_roofline_tables_for_tiny_and_llama3_8b(tiny, tmp_path):
    _, space = tiny
    shape, units = space.shape, space.units
    tiny_table = roofline_table(DEVICES["h100"], space, regimes_of(TINY_PROFILE), "float32")
    assert tiny_table.source == "roofline" and tiny_table.fingerprint["dtype"] == "bfloat16"
    _assert_consistent(tiny_table, shape, units)
    save_table(tiny_table, tmp_path / "t.json")
    assert load_table(tmp_path / "t.json") == tiny_table  # the CPU profiler's format, JSON round trip

    space8b = build_space(LLAMA3_8B, SpaceConfig())
    table = roofline_table(DEVICES["h100"], space8b, REGIMES, "bfloat16")
    _assert_consistent(table, LLAMA3_8B, space8b.units)
    # Decode at batch 1 reads every decoder weight and lm_head once (the embedding table only a row): ~14 GB at
    # 3.35 TB/s = 4.2 ms, plus a few hundred kernel launches.
    weights = LLAMA3_8B.num_layers * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + 4096 * 128256
    bytes_bound_ms = 2 * weights / 3.35e12 * 1e3
    decode = table.regimes["decode_b1"].dense_ms
    assert bytes_bound_ms < decode < bytes_bound_ms + 2.5 and 4.5 < decode < 7.0
    # Prefill of 512 tokens is compute bound: ~2 FLOPs per weight per token at 989 TFLOP/s.
    assert table.regimes["prefill"].dense_ms > 2 * weights * 512 / 989.5e12 * 1e3


def test_faster_device_gives_lower_latency():
    space = build_space(LLAMA3_8B, SpaceConfig())
    dense = {
        key: {n: c.dense_ms for n, c in roofline_table(DEVICES[key], space, REGIMES, "bfloat16").regimes.items()}
        for key in ("h200", "h100", "a100", "rtx4090", "l4", "cpu-generic")
    }
    decode = [d["decode_b1"] for d in dense.values()]
    assert decode == sorted(decode)  # ordered by memory bandwidth
    assert dense["h100"]["prefill"] < dense["a100"]["prefill"] < dense["rtx4090"]["prefill"] < dense["l4"]["prefill"]


def test_unknown_profile_lists_the_known_ones(tiny, tmp_path):
    loaded, space = tiny
    assert set(PROFILES.names()) >= {"cpu", "h100", "h200", "a100", "l4", "rtx4090", "cpu-generic"}
    for call in (
        lambda: validate_profile_name("tpu"),
        lambda: get_cost_table("tpu", loaded.model, space, TINY_PROFILE, "float32", tmp_path),
    ):
        with pytest.raises(UserInputError, match="profile='tpu' is unknown; known: a100, cpu, cpu-generic, h100"):
            call()


def _fake_measured(tiny, path, **fingerprint):
    """The roofline table re-labelled as a measurement of an H100 (costs doubled, so it is told apart)."""
    _, space = tiny
    table = roofline_table(DEVICES["h100"], space, regimes_of(TINY_PROFILE), "float32")
    table = replace(table, source="measured",
                    fingerprint={"device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16", "torch": "2.4.0", **fingerprint})
    for costs in table.regimes.values():
        costs.fixed_ms *= 2
    save_table(table, path)
    return table


def test_measured_table_is_preferred_over_the_roofline(tiny, tmp_path):
    loaded, space = tiny
    tables, cache = tmp_path / "tables", tmp_path / "cache"
    roofline, path = get_cost_table("h100", None, space, TINY_PROFILE, "float32", cache, tables_dir=tables)
    assert roofline.source == "roofline" and path.parent == cache / "profiles" and path.name.startswith("h100-roofline-")
    assert load_table(path) == roofline  # written, so a plan can name it

    other_model = _fake_measured(tiny, tables / "h100-other.json")
    other_model.model_shape = {**other_model.model_shape, "hidden": 4096}
    save_table(other_model, tables / "h100-other.json")  # another model's table: not for this one, not refused
    assert get_cost_table("h100", None, space, TINY_PROFILE, "float32", cache, tables_dir=tables)[0] == roofline

    measured = _fake_measured(tiny, tables / "h100-committed.json")
    seen = []
    table, found = get_cost_table("h100", None, space, TINY_PROFILE, "float32", cache, "prefill",
                                  lambda r, c: seen.append((r, c.fixed_ms)), tables_dir=tables)
    assert table == measured and table.source == "measured" and found == tables / "h100-committed.json"
    assert seen == [("prefill", measured.regimes["prefill"].fixed_ms)]
    # The cache is looked at too (where a measurement on the device itself would be written).
    (cache / "profiles" / "h100-local.json").write_text((tables / "h100-committed.json").read_text())
    (tables / "h100-committed.json").unlink()
    assert get_cost_table("h100", None, space, TINY_PROFILE, "float32", cache, tables_dir=tables)[1] == (
        cache / "profiles" / "h100-local.json"
    )


def test_mismatched_fingerprint_is_refused_naming_the_field(tiny, tmp_path):
    _, space = tiny
    path = tmp_path / "h100-a100.json"
    _fake_measured(tiny, path, device="NVIDIA A100-SXM4-80GB")
    with pytest.raises(UserInputError, match=r"h100-a100.json \(fingerprint field 'device' is 'NVIDIA A100-SXM4-80GB'"):
        get_cost_table("h100", None, space, TINY_PROFILE, "float32", tmp_path / "cache", tables_dir=tmp_path)
    _fake_measured(tiny, path, dtype="float16")
    with pytest.raises(UserInputError, match="fingerprint field 'dtype' is 'float16', this device has 'bfloat16'"):
        get_cost_table("h100", None, space, TINY_PROFILE, "float32", tmp_path / "cache", tables_dir=tmp_path)


def test_corrupt_table_is_named(tiny, tmp_path):
    _, space = tiny
    for text in ("{not json", json.dumps({"version": 1, "regimes": {}})):
        (tmp_path / "h100-broken.json").write_text(text)
        with pytest.raises(UserInputError, match=f"latency table {tmp_path / 'h100-broken.json'} is corrupt"):
            get_cost_table("h100", None, space, TINY_PROFILE, "float32", tmp_path / "cache", tables_dir=tmp_path)


def test_refresh_needs_the_device(tiny, tmp_path):
    _, space = tiny
    assert device_present("cpu") and not device_present("cpu-generic")
    if not torch.cuda.is_available():
        assert not device_present("h100")
        with pytest.raises(UserInputError, match="NVIDIA H100 80GB HBM3 is not present on this machine"):
            get_cost_table("h100", None, space, replace(TINY_PROFILE, refresh=True), "float32", tmp_path)
    with pytest.raises(UserInputError, match="use profile=cpu to measure this machine"):
        get_cost_table("cpu-generic", None, space, replace(TINY_PROFILE, refresh=True), "float32", tmp_path)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


TINY_OVERRIDES = [
    "model=tiny-llama", "model.tiny_layers=3", "data.seq_len=64", "data.calib_sequences=8", "data.eval_sequences=4",
    "space.mlp_step=32", "space.fisher_sequences=4", "profile.decode_batches=[1]", "profile.decode_context=64",
    "profile.prefill_length=64",
]


def test_search_on_h100_roofline_end_to_end(cache, tmp_path):
    done = run_cli("search", *TINY_OVERRIDES, "profile=h100", "budget.speedup=1.3", "verify=false", f"cache_dir={cache}",
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["profile"]["name"] == "h100" and plan["profile"]["source"] == "roofline"
    assert plan["profile"]["fingerprint"]["device"] == "NVIDIA H100 80GB HBM3"
    assert load_table(Path(plan["profile"]["table"])).source == "roofline"
    assert plan["predicted"]["speedup"] >= 1.3 and "measured" not in plan
    assert "profile h100 (roofline)" in done.stdout

    profiled = run_cli("profile", *[o for o in TINY_OVERRIDES if not o.startswith("data.")],
                       "profile=a100", f"cache_dir={cache}", f"hydra.run.dir={tmp_path / 'prof'}", cwd=tmp_path)
    assert profiled.returncode == 0, profiled.stderr[-2000:]
    assert "latency table (roofline, NVIDIA A100-SXM4-80GB)" in profiled.stdout


def test_verification_is_skipped_for_a_device_not_present(cache, tmp_path, capsys):
    if device_present("h100"):
        pytest.skip("an H100 is present: verification would measure it")
    job = replace(tiny_job(cache), profile=replace(TINY_PROFILE, repeats=2, warmup=1), budget=BudgetConfig(speedup=1.3),
                  verify=True)
    plan = run_search(job, tmp_path)
    assert plan.measured is None and "not present" in plan.verify_skipped
    assert json.loads((tmp_path / "plan.json").read_text())["verify_skipped"] == plan.verify_skipped
    assert "verification skipped: profile h100 is for a device not present" in capsys.readouterr().out
