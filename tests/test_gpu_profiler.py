"""GPU profiler and GPU verification: pure parts and the whole pipeline on CPU; the CUDA parts where a GPU is lent."""

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

from allocator.app.verify_job import measure_speedup
from allocator.core.config import BudgetConfig, ProfileConfig, SpaceConfig
from allocator.core.errors import UserInputError
from allocator.core.space import ATTN, MLP, build_space
from allocator.model.export import PLAN_FILE, WEIGHTS_FILE, export_checkpoint
from allocator.model.sparse_export import build_deployable
from allocator.model.surgery import build_pruned_model, leading_levels
from kernels.sparse_linear import SparseLinear
from profilers.devices import DEVICES
from profilers.end_to_end import measure_models_gpu
from profilers.gpu import (
    device_copy,
    fixed_context_cache,
    forward_step,
    gpu_regimes,
    gpu_variants,
    memory_groups,
    profile_gpu,
    regime_costs,
    time_models,
    variant_bytes,
    weight_copies,
    weight_read_bytes,
)
from profilers.gpu_timing import CpuTimer, gpu_fingerprint, make_timer, parse_driver_version, rotation_count
from profilers.regimes import Regime, regimes_of
from profilers.registry import fingerprint_mismatch, get_cost_table
from profilers.table import load_table, save_table, table_key
from profilers.timing import TimingStats, interleaved_schedule, round_stats

from .plans import sample_plan

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (CUDA graphs, events, L2 rotation)")
# Small regimes: prefill and decode at 1, 4, 16, 64 over a short context.
CFG = ProfileConfig(repeats=2, warmup=1, decode_batches=[1], decode_context=16, prefill_length=16, l2_rotations=2)


def _monotone(table):
    for costs in table.regimes.values():
        for curve in costs.unit_ms.values():
            values = [curve[k] for k in sorted(curve)]
            assert values == sorted(values) and values[0] == 0.0  # non-decreasing in width, cheapest costs 0


# ---- pure functions ----

def test_rotation_count_exceeds_twice_l2():
    l2 = 50 * 2**20
    for per_copy in (1, 10_000, 3 * 2**20, 2 * l2 - 1, 2 * l2, 10 * l2):
        n = rotation_count(l2, per_copy, limit=10**9)
        assert n * per_copy > 2 * l2 and (n - 1) * per_copy <= 2 * l2  # enough, and no more than needed
    assert rotation_count(l2, 100 * l2) == 1  # a large model evicts L2 by itself
    assert rotation_count(l2, 1) == 1024  # capped: capture time
    assert rotation_count(0, 1000) == 1  # no L2 (CPU timer)
    assert rotation_count(l2, 1000, override=3) == 3
    with pytest.raises(ValueError, match="l2_rotations=-1"):
        rotation_count(l2, 1000, override=-1)


def test_schedule_is_a_permutation_per_round_and_deterministic():
    names = ["dense", "fixed", "attn=0", "attn=1", "mlp=32"]
    schedule = interleaved_schedule(names, 20, seed=7)
    assert len(schedule) == 20 and all(sorted(order) == sorted(names) for order in schedule)
    assert schedule == interleaved_schedule(names, 20, seed=7)
    assert schedule != interleaved_schedule(names, 20, seed=8)
    assert len({tuple(order) for order in schedule}) > 1  # reshuffled each round


def test_round_stats_drop_warmup_and_give_percentiles():
    stats = round_stats({"a": [100.0, 1.0, 2.0, 3.0, 4.0, 5.0]}, warmup=1)["a"]
    assert stats.samples_ms == [1.0, 2.0, 3.0, 4.0, 5.0] and stats.median_ms == 3.0
    assert stats.p10_ms == pytest.approx(1.4) and stats.p90_ms == pytest.approx(4.6)
    with pytest.raises(ValueError, match="not more than warmup=2"):
        round_stats({"a": [1.0, 2.0]}, warmup=2)


def test_memory_groups_fit_the_budget():
    sizes = {"a": 4, "b": 4, "c": 4, "huge": 20, "d": 1}
    assert memory_groups(sizes, None) == [list(sizes)]
    assert memory_groups(sizes, 8) == [["a", "b"], ["c"], ["huge"], ["d"]]  # an oversized one stands alone
    assert memory_groups({}, 8) == []


def _stats(ms: float) -> TimingStats:
    return TimingStats.of([ms, ms, ms])


def test_regime_costs_fixed_per_layer_and_cleaning():
    options = {ATTN: [0, 1, 2], MLP: [0, 32, 64, 96]}
    stats = {
        "dense": _stats(10.0), "fixed": _stats(1.0),
        "attn=0": _stats(7.0), "attn=1": _stats(8.5),  # attn: (T - T(attn=0)) / 3 layers
        "mlp=0": _stats(4.0), "mlp=32": _stats(7.0), "mlp=64": _stats(6.4),  # mlp=64 measured low: cleaned up
    }
    regime = Regime("decode_b1", "decode", 1, 16)
    costs = regime_costs(regime, 3, options, stats, {"x": 1})
    assert costs.fixed_ms == 1.0 and costs.dense_ms == 10.0 and costs.regime == asdict(regime) and costs.raw == {"x": 1}
    assert costs.unit_ms[ATTN] == pytest.approx({0: 0.0, 1: 0.5, 2: 1.0})
    assert costs.unit_ms[MLP] == pytest.approx({0: 0.0, 32: 1.0, 64: 1.0, 96: 2.0})
    assert costs.predict_ms({ATTN: [2, 2, 2], MLP: [96, 96, 96]}) == pytest.approx(1.0 + 3 * (1.0 + 2.0))
    stats["attn=1"] = _stats(6.0)  # faster than dropping: clipped at 0, never negative
    assert regime_costs(regime, 3, options, stats, {}).unit_ms[ATTN][1] == 0.0


def test_fingerprint_is_in_the_key_and_a_mismatch_names_the_field():
    h100 = gpu_fingerprint("NVIDIA H100 80GB HBM3", "12.4", "550.54.15", "2.13.0", "3.7.1", "bfloat16")
    assert h100 == {"device": "NVIDIA H100 80GB HBM3", "driver": "CUDA 12.4 / driver 550.54.15", "torch": "2.13.0",
                    "triton": "3.7.1", "dtype": "bfloat16"}
    assert gpu_fingerprint("x", None, None, "2.13.0", None, "bfloat16")["driver"] == "CUDA none / driver unknown"
    a100 = {**h100, "device": "NVIDIA A100-SXM4-80GB"}
    other_driver = {**h100, "driver": "CUDA 12.4 / driver 535.0"}
    keys = {table_key(f, {"hidden": 64}, {"attn": [0, 1]}, {}) for f in (h100, a100, other_driver)}
    assert len(keys) == 3
    assert "fingerprint field 'device' is 'NVIDIA A100-SXM4-80GB'" in fingerprint_mismatch(h100, a100)
    assert "fingerprint field 'driver'" in fingerprint_mismatch(h100, other_driver)
    assert fingerprint_mismatch(h100, dict(h100)) is None
    text = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\nGCC version: gcc"
    assert parse_driver_version(text) == "550.54.15" and parse_driver_version("nothing") is None


def test_regimes_cover_what_the_cpu_config_asks_for():
    cfg = ProfileConfig(decode_batches=[1, 8], gpu_decode_batches=[1, 4, 16, 64])
    names = [r.name for r in gpu_regimes(cfg)]
    assert names == ["prefill", "decode_b1", "decode_b4", "decode_b8", "decode_b16", "decode_b64"]
    assert {asdict(r)["name"] for r in regimes_of(cfg)} <= set(names)


# ---- models and steps on CPU ----

def test_variants_and_their_bytes(tiny):
    loaded, space = tiny
    shape, units = space.shape, space.units
    variants = gpu_variants(space)
    assert list(variants)[:2] == ["dense", "fixed"]
    assert set(variants) == {"dense", "fixed", "attn=0", "attn=1", "mlp=0", "mlp=32", "mlp=64", "mlp=96"}
    assert all(variants["fixed"][u.name] == u.options[0] for u in units)
    assert all(variants["attn=1"][u.name] == (1 if u.kind == ATTN else u.full) for u in units)
    model = device_copy(loaded.model, torch.device("cpu"), torch.bfloat16)
    regime = Regime("prefill", "prefill", 1, 16)
    read, own = variant_bytes(space, variants["dense"], regime, 2)
    step = forward_step(model, regime)
    assert read == weight_read_bytes(model) + step.kv_bytes  # the estimate is what the built model reads
    assert own == step.kv_bytes  # dense owns only its KV cache; its weights are the shared dense ones
    pruned = build_pruned_model(model, shape, variants["mlp=32"], leading_levels(model, shape))
    read, own = variant_bytes(space, variants["mlp=32"], regime, 2)
    assert read == weight_read_bytes(pruned) + forward_step(pruned, regime).kv_bytes
    assert own == step.kv_bytes + 3 * (3 * shape.hidden * 32 + shape.hidden) * 2


def test_sparse_variant_bytes_are_what_the_deployed_model_reads_and_copies(tiny):
    """A sparse variant as profiled (compressed SparseLinear buffers): the byte estimate, read off the format
    registry, is what the built model reads, and every weight copy owns its compressed weights."""
    loaded, space = tiny
    shape = space.shape
    space = build_space(shape, SpaceConfig(kind="mixed", mlp_step=32))
    units = space.units
    model = device_copy(loaded.model, torch.device("cpu"), torch.bfloat16)
    regime = Regime("decode_b1", "decode", 1, 16)
    for attn, mlp in (("unstructured70", "2:4"), ("block16x16-50", "unstructured30")):
        allocation = {u.name: attn if u.kind == ATTN else mlp for u in units}
        deployed = build_deployable(model, shape, allocation, leading_levels(model, shape))
        read, _ = variant_bytes(space, allocation, regime, 2)
        assert read == weight_read_bytes(deployed) + forward_step(deployed, regime).kv_bytes
        first, second = weight_copies(deployed, 2)
        a, b = first.model.layers[0].mlp.up_proj, second.model.layers[0].mlp.up_proj
        assert isinstance(a, SparseLinear) and a.weight_nbytes == b.weight_nbytes
        assert all(x.data_ptr() != y.data_ptr() for x, y in zip(a._data(), b._data()))


def test_device_copy_and_weight_copies_leave_the_original_alone(tiny):
    loaded, space = tiny
    dense = loaded.model
    before = {n: p.dtype for n, p in dense.named_parameters()}
    model = device_copy(dense, torch.device("cpu"), torch.bfloat16)
    assert {n: p.dtype for n, p in dense.named_parameters()} == before  # the search keeps its float32 model
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    first, second = weight_copies(model, 2)
    assert first is model
    w1, w2 = first.model.layers[0].mlp.up_proj.weight, second.model.layers[0].mlp.up_proj.weight
    assert w1.data_ptr() != w2.data_ptr() and torch.equal(w1, w2)
    assert first.model.embed_tokens.weight is second.model.embed_tokens.weight  # untied: only rows are read
    assert first.lm_head.weight.data_ptr() != second.lm_head.weight.data_ptr()


def test_fixed_context_decode_matches_a_dynamic_cache_and_does_not_grow(tiny):
    loaded, space = tiny
    shape, units = space.shape, space.units
    alloc = {u.name: (0 if (u.layer == 1 and u.kind == ATTN) else u.full) for u in units}  # a dropped attention too
    model = build_pruned_model(loaded.model, shape, alloc, leading_levels(loaded.model, shape))
    regime = Regime("decode_b4", "decode", 4, 16)
    step = forward_step(model, regime)
    first, again = step.run().logits, step.run().logits
    assert torch.equal(first, again)  # replays read the same 16 positions, as a graph replay does
    cache = fixed_context_cache(model, 4, 16, torch.Generator().manual_seed(0))
    dynamic = DynamicCache()
    for idx, layer in enumerate(cache.layers):
        dynamic.update(layer.keys[:, :, :16].clone(), layer.values[:, :, :16].clone(), idx)
    ids = torch.randint(0, model.config.vocab_size, (4, 1), generator=torch.Generator().manual_seed(0))
    positions = torch.full((4, 1), 16)
    with torch.inference_mode():
        fixed = model(ids, past_key_values=cache, position_ids=positions, use_cache=True, logits_to_keep=1).logits
        grown = model(ids, past_key_values=dynamic, position_ids=positions, use_cache=True, logits_to_keep=1).logits
    assert torch.allclose(fixed, grown, atol=1e-5)
    assert cache.get_seq_length() == 16 and cache.layers[1].keys.shape == (4, 1, 17, 1)


class _HostSyncs(TorchDispatchMode):
    """Records the ops that read a tensor's value on the host: under CUDA graph capture they are errors."""

    SYNCS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
             torch.ops.aten.nonzero.default)

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_steps_never_read_tensors_on_the_host(tiny):
    """What can be checked of CUDA-graph capturability without a GPU: no .item()/bool(tensor) in a step (a plain
    use_cache=False forward has one, so the probe does see them)."""
    loaded, space = tiny
    shape, units = space.shape, space.units
    model = device_copy(loaded.model, torch.device("cpu"), torch.bfloat16)
    alloc = {u.name: (0 if u.layer == 1 else u.options[1]) for u in units}
    for m in (model, build_pruned_model(model, shape, alloc, leading_levels(model, shape))):
        for regime in (Regime("decode_b4", "decode", 4, 16), Regime("prefill", "prefill", 2, 16)):
            step = forward_step(m, regime)
            step.run()
            with _HostSyncs() as probe:
                step.run()
            assert probe.seen == [], regime
    with torch.inference_mode(), _HostSyncs() as probe:
        model(torch.zeros(2, 8, dtype=torch.long), use_cache=False)
    assert probe.seen


def test_time_models_groups_share_the_anchor(monkeypatch):
    import profilers.gpu as gpu

    calls = []
    monkeypatch.setattr(gpu, "forward_step", lambda m, regime, seed=0: gpu.Step(lambda: calls.append(m.label), 0))
    monkeypatch.setattr(gpu, "weight_read_bytes", lambda m: 0)
    monkeypatch.setattr(gpu, "weight_copies", lambda m, n: [m] * n)
    build = {name: (lambda n=name: _Labelled(n)) for name in ("dense", "a", "b", "c")}
    stats, info = time_models(build, Regime("decode_b1", "decode", 1, 4), CpuTimer(), 1, 3, 2, [["a", "b"], ["c"]])
    assert len(stats["dense"].samples_ms) == 6 and all(len(stats[n].samples_ms) == 3 for n in "abc")
    assert info["rotations"] == {"dense": 2, "a": 2, "b": 2, "c": 2}
    assert len(info["rounds"]) == 6 and info["rounds"][0] == {"group": 0, "clock_mhz": None, "temperature_c": None}
    # per model: 2 copies x (1 preparing call + 4 rounds), the anchor timed in both groups
    assert calls.count("dense") == 2 * (1 + 8) and calls.count("a") == calls.count("c") == 2 * (1 + 4)


class _Labelled(torch.nn.Module):
    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label


# ---- the whole profiler on CPU ----

@pytest.fixture(scope="module")
def cpu_table(tiny, tmp_path_factory):
    loaded, space = tiny
    cache = tmp_path_factory.mktemp("gpu-cache")
    seen = []
    table, path = profile_gpu(loaded.model, space, CFG, "float32", cache, "decode_b1",
                              lambda r, c: seen.append(r), device="cpu")
    return table, path, cache, seen


def test_profile_on_cpu_gives_a_well_formed_table(tiny, cpu_table):
    loaded, space = tiny
    shape = space.shape
    table, path, cache, seen = cpu_table
    assert seen == ["decode_b1"] and path.is_file() and load_table(path) == table
    assert not list(path.parent.glob("*.partial.json"))
    assert table.source == "measured" and table.profile == CFG.name
    assert set(table.fingerprint) == {"device", "driver", "torch", "triton", "dtype"}
    assert table.fingerprint["dtype"] == "bfloat16" and table.fingerprint["torch"] == torch.__version__
    assert set(table.regimes) == {"prefill", "decode_b1", "decode_b4", "decode_b16", "decode_b64"}
    assert table.regimes["decode_b16"].regime == {"name": "decode_b16", "kind": "decode", "batch": 16, "length": 16}
    _monotone(table)
    for costs in table.regimes.values():
        dense = {kind: [max(costs.unit_ms[kind])] * shape.num_layers for kind in costs.unit_ms}
        assert costs.predict_ms(dense) > 0 and costs.fixed_ms > 0 and costs.dense_ms > 0
        assert all(costs.raw[name]["rotations"] == 2 for name in gpu_variants(space))  # l2_rotations=2
        assert len(costs.raw["dense"]["samples_ms"]) == CFG.repeats
        assert len(costs.raw["_rounds"]) == CFG.repeats and costs.raw["_rounds"][0]["clock_mhz"] is None
    again, same = profile_gpu(loaded.model, space, CFG, "float32", cache, device="cpu")
    assert same == path and again == table  # reused: the key matches
    assert loaded.model.lm_head.weight.dtype == torch.float32  # the host model is untouched


def test_registry_refuses_a_gpu_table_measured_on_another_device(tiny, cpu_table, tmp_path):
    _, space = tiny
    table, _, _, _ = cpu_table
    cfg = replace(CFG, name="h100")
    table = replace(table, profile="h100")
    save_table(table, tmp_path / "h100-measured-here.json")
    with pytest.raises(UserInputError, match=r"h100-measured-here.json \(fingerprint field 'device' is "):
        get_cost_table("h100", None, space, cfg, "float32", tmp_path / "cache", tables_dir=tmp_path)
    a100 = replace(table, fingerprint={**table.fingerprint, "device": DEVICES["a100"].name})
    save_table(a100, tmp_path / "h100-measured-here.json")
    with pytest.raises(UserInputError, match="fingerprint field 'device' is 'NVIDIA A100-SXM4-80GB', this device has "
                                             "'NVIDIA H100 80GB HBM3'"):
        get_cost_table("h100", None, space, cfg, "float32", tmp_path / "cache", tables_dir=tmp_path)
    h100 = replace(table, fingerprint={**table.fingerprint, "device": DEVICES["h100"].name})
    save_table(h100, tmp_path / "h100-measured-here.json")
    found, path = get_cost_table("h100", None, space, cfg, "float32", tmp_path / "cache", tables_dir=tmp_path)
    assert found == h100 and path == tmp_path / "h100-measured-here.json"


def test_registry_measures_a_present_gpu(tiny, tmp_path, monkeypatch):
    """Wiring only (no GPU here): a present GPU with no table, or refresh=true, goes to profile_gpu."""
    import profilers.registry as registry

    loaded, space = tiny

    calls = []

    def fake_profile(dense, space, cfg, dtype, cache_dir, first_regime, on_regime, device):
        calls.append((cfg.name, cfg.refresh, device))
        return "table", Path("t.json")

    monkeypatch.setattr(registry, "device_present", lambda name: name == "h100")
    monkeypatch.setattr(registry, "cuda_device_named", lambda name: torch.device("cuda", 0))
    monkeypatch.setattr(registry, "profile_gpu", fake_profile)
    cfg = replace(CFG, name="h100")
    table, _ = get_cost_table("h100", loaded.model, space, cfg, "float32", tmp_path, tables_dir=tmp_path)
    assert table == "table"
    get_cost_table("h100", loaded.model, space, replace(cfg, refresh=True), "float32", tmp_path)
    assert calls == [("h100", False, torch.device("cuda", 0)), ("h100", True, torch.device("cuda", 0))]
    roofline, _ = get_cost_table("h100", None, space, cfg, "float32", tmp_path, tables_dir=tmp_path)
    assert roofline.source == "roofline"  # no weights to time: the datasheet
    with pytest.raises(UserInputError, match="its weights must be loaded"):
        get_cost_table("h100", None, space, replace(cfg, refresh=True), "float32", tmp_path)
    with pytest.raises(UserInputError, match="NVIDIA A100-SXM4-80GB is not present"):
        get_cost_table("a100", None, space, replace(cfg, name="a100", refresh=True), "float32", tmp_path)


# ---- GPU verification ----

def _fake_export(path: Path, profile: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", WEIGHTS_FILE):
        (path / name).write_text("{}")
    sample_plan(profile={"name": profile, "fingerprint": {}, "table": "none"}).save(path / PLAN_FILE)
    return path


@pytest.mark.skipif(CUDA, reason="checks the error raised where CUDA is missing; this machine has CUDA")
def test_cuda_verification_without_cuda_is_a_clear_error(tiny, tmp_path):
    loaded, space = tiny
    run = _fake_export(tmp_path / "export", "h100")
    with pytest.raises(UserInputError, match=r"profile h100 \(NVIDIA H100 80GB HBM3\) needs a CUDA GPU, but "
                                             r"torch.cuda.is_available\(\) is False"):
        measure_speedup(run, ProfileConfig(name="h100"), "decode_b1")
    regime = Regime("decode_b1", "decode", 1, 8)
    with pytest.raises(UserInputError, match=r"torch.cuda.is_available\(\) is False"):
        measure_models_gpu({"dense": loaded.model}, regime, 0, 1, device="cuda")
    with pytest.raises(UserInputError, match=r"timing on cuda needs a CUDA GPU"):
        make_timer("cuda")


def test_gpu_verification_path_runs_on_cpu(tiny):
    """measure_models_gpu with device="cpu": the GPU verification's steps and interleaving, minus the graphs."""
    loaded, space = tiny
    shape, units = space.shape, space.units
    alloc = {u.name: u.options[1] for u in units}
    pruned = build_pruned_model(loaded.model, shape, alloc, leading_levels(loaded.model, shape))
    for regime in (Regime("decode_b4", "decode", 4, 16), Regime("prefill", "prefill", 1, 16)):
        stats = measure_models_gpu({"dense": loaded.model, "pruned": pruned}, regime, 1, 3, device="cpu")
        assert set(stats) == {"dense", "pruned"} and all(s.median_ms > 0 and len(s.samples_ms) == 3
                                                         for s in stats.values())


def test_gpu_branch_of_measure_speedup_on_cpu(tiny, cpu_table, tmp_path, monkeypatch):
    """verify_job's GPU branch (regime from the plan's table, deployment dtype, GPU timing path) with the CPU
    timer standing in for the GPU."""
    import allocator.app.verify_job as verify_job

    loaded, space = tiny

    shape, units = space.shape, space.units
    table, path, _, _ = cpu_table
    alloc = {u.name: u.options[1] for u in units}
    model = build_pruned_model(loaded.model, shape, alloc, leading_levels(loaded.model, shape))
    plan = sample_plan(alloc, budget={"regime": "prefill"}, predicted={"latency_ms": 1.0, "dense_latency_ms": 2.0},
                       profile={"name": "h100", "fingerprint": table.fingerprint, "table": str(path)})
    export_checkpoint(model, loaded.tokenizer, tmp_path / "run", plan)
    monkeypatch.setattr(verify_job, "cuda_device_for_profile", lambda name: torch.device("cpu"))
    result = measure_speedup(tmp_path / "run", replace(CFG, name="h100", verify_repeats=3), "decode_b4",
                             dense=loaded.model)
    assert result.regime == "decode_b4" and result.device == "cpu"
    assert len(result.pruned_stats.samples_ms) == 3 and result.latency_ms > 0
    widths = {ATTN: [1] * 3, MLP: [32] * 3}
    assert result.latency_prediction_error == pytest.approx(
        table.regimes["decode_b4"].predict_ms(widths) / result.latency_ms - 1.0)


# ---- on a GPU ----

@needs_cuda
def test_cuda_graph_step_replays_what_eager_computes(tiny):
    loaded, space = tiny
    timer = make_timer("cuda")
    model = device_copy(loaded.model, timer.device, torch.bfloat16)
    for regime in (Regime("decode_b4", "decode", 4, 32), Regime("prefill", "prefill", 2, 32)):
        eager = forward_step(model, regime, seed=3)
        expected = eager.run().logits.clone()
        graphed = forward_step(model, regime, seed=3)
        outputs = []
        sample = timer.prepare([lambda: outputs.append(graphed.run())])
        assert all(sample() > 0 for _ in range(5))
        torch.testing.assert_close(outputs[-1].logits, expected)  # the captured step's output, as replayed
    assert timer.l2_bytes > 0 and timer.memory_budget() > 0
    assert rotation_count(timer.l2_bytes, weight_read_bytes(model)) > 1  # a tiny model needs copies to leave L2


@needs_cuda
def test_profile_tiny_model_on_cuda(tiny, tmp_path):
    loaded, space = tiny
    table, path = profile_gpu(loaded.model, space, CFG, "float32", tmp_path, device="cuda")
    assert table.fingerprint["device"] == torch.cuda.get_device_name() and "CUDA" in table.fingerprint["driver"]
    assert table.settings["timer"] == "CudaTimer"
    _monotone(table)
    for costs in table.regimes.values():
        assert 0 < costs.fixed_ms <= costs.dense_ms
        assert all(costs.raw[name]["p10_ms"] <= costs.raw[name]["median_ms"] <= costs.raw[name]["p90_ms"]
                   for name in gpu_variants(space))


@needs_cuda
def test_end_to_end_verify_on_cuda(tiny, tmp_path):
    from allocator.app.search_job import run_search

    from .test_search_pipeline import tiny_job

    key = next((k for k, spec in DEVICES.items() if spec.is_gpu and spec.name == torch.cuda.get_device_name()), None)
    if key is None:
        pytest.skip(f"{torch.cuda.get_device_name()} is not one of profilers/devices.py's GPUs")
    job = tiny_job(tmp_path / "cache")
    job = replace(job, profile=replace(job.profile, name=key, l2_rotations=2), verify=True,
                  budget=BudgetConfig(speedup=None, sparsity=0.3))  # always feasible, whatever the GPU's costs
    plan = run_search(job, tmp_path / "run")  # measures the table on this GPU, exports, verifies on it
    measured = plan.measured
    assert plan.profile.source == "measured" and measured.device == torch.cuda.get_device_name()
    assert measured.latency_ms > 0 and measured.dense_latency_ms > 0
    assert "speedup_prediction_error" in json.loads((tmp_path / "run" / "plan.json").read_text())["measured"]
    again = measure_speedup(tmp_path / "run", job.profile, "decode_b4")
    assert again.regime == "decode_b4" and again.latency_ms > 0
