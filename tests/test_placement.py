"""device= / device_map= / model.dtype honoured by every stage (allocator/model/placement.py): the placement decision,
accelerate's dispatch (run for real on the CPU, over "cpu" and "disk"), the fitness engine, scoring and export in
bfloat16, the default CPU unchanged, and the CLI end to end. Tests that take a device run on the CPU and, where CUDA
is visible, on CUDA too (skipped with the reason otherwise)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import safe_open

from allocator.app.config import SearchJob
from allocator.app.search_job import (
    prepare_search,
    run_search,
    run_searcher,
    score_models,
    validate_search_job,
)
from allocator.core.config import (
    BudgetConfig,
    DataConfig,
    FitnessConfig,
    ModelConfig,
    ScoreConfig,
    SpaceConfig,
)
from allocator.core.errors import UserInputError
from allocator.model.loader import load_model
from allocator.model.placement import (
    FIT_FRACTION,
    Placement,
    inference_pass,
    input_device,
    max_memory,
    needs_dispatch,
    on_cpu,
    validate_placement,
)
from allocator.model.quality import kl_to_dense, perplexity
from allocator.model.runtime import load_pruned
from allocator.model.surgery import build_pruned_model, decoder_layers
from search.evo import EvoConfig
from search.fitness_engine import StitchedKLFitness

from .conftest import run_cli

GB = 1 << 30
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


# --- the decision, a pure function of sizes ---------------------------------------------------------------------


def test_a_model_is_dispatched_only_on_cuda_and_only_when_it_does_not_fit() -> None:
    free = 80 * GB
    fits, too_big = int(FIT_FRACTION * free) - 1, int(FIT_FRACTION * free) + 1
    assert not needs_dispatch("auto", "cuda", fits, free)
    assert needs_dispatch("auto", "cuda", too_big, free)
    assert needs_dispatch("auto", "cuda", 140 * GB, free)  # a 70B model in bf16 on one 80 GB GPU
    assert not needs_dispatch("single", "cuda", 140 * GB, free)  # the user asked for one GPU
    assert needs_dispatch("dispatch", "cuda", 1, free)  # ... or for a dispatch
    assert not needs_dispatch("auto", "cpu", 140 * GB, 0)  # on the CPU the model is where it lives anyway
    assert not needs_dispatch("dispatch", "cpu", 1, 0)


def test_max_memory_leaves_headroom_on_every_gpu() -> None:
    assert max_memory([80 * GB, 40 * GB], 256 * GB) == {
        0: int(FIT_FRACTION * 80 * GB), 1: int(FIT_FRACTION * 40 * GB), "cpu": 256 * GB
    }
    assert max_memory([], 8 * GB) == {"cpu": 8 * GB}


def test_bad_device_map_and_combinations_fail_with_one_line() -> None:
    with pytest.raises(UserInputError, match="device_map='spread' is unknown; valid: auto, single, dispatch") as err:
        validate_placement("cpu", "float32", "spread")
    assert "\n" not in str(err.value)
    with pytest.raises(UserInputError, match="device_map=dispatch spreads a model over GPUs, but device=cpu"):
        validate_placement("cpu", "float32", "dispatch")
    cfg = SearchJob(model=ModelConfig(name="tiny-llama"), device_map="everywhere")
    with pytest.raises(UserInputError, match="device_map='everywhere'"):
        validate_search_job(cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (without one device=cuda fails first)")
def test_ray_workers_on_a_gpu_need_a_gpu_each() -> None:
    cfg = SearchJob(model=ModelConfig(name="tiny-llama"), device="cuda", workers=2)
    with pytest.raises(UserInputError, match="each worker scores on a GPU of its own, but ray.num_gpus=0.0"):
        validate_search_job(cfg)
    cfg.ray.num_gpus = 1.0
    validate_search_job(cfg)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_every_dtype_runs_on_the_cpu(dtype, tmp_path) -> None:
    """float16 matmuls work on the CPU in this torch (2.13), so no dtype is refused there: a forward in each."""
    assert validate_placement("cpu", dtype, "auto") == torch.device("cpu")
    model = load_model(ModelConfig(name="tiny-llama", dtype=dtype), tmp_path).model
    logits = model(torch.arange(16).unsqueeze(0)).logits
    assert logits.dtype == getattr(torch, dtype) and torch.isfinite(logits).all()


# --- accelerate's dispatch, for real on the CPU ------------------------------------------------------------------


def spread_map(model) -> dict[str, str]:
    """Embedding and first layer in memory, the other layers, final norm and lm_head offloaded to disk."""
    layers = len(decoder_layers(model))
    return {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
            **{f"model.layers.{i}": "disk" for i in range(1, layers)}, "model.norm": "disk", "lm_head": "disk"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_dispatched_pass_gives_the_plain_models_logits_and_leaves_it_unchanged(dtype, tmp_path) -> None:
    model = load_model(ModelConfig(name="tiny-llama", tiny_layers=3, dtype=dtype), tmp_path).model
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = model(tokens).logits
    tensors = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]}
    with inference_pass(model, device_map=spread_map(model)) as dispatched:
        # Really offloaded: the disk layers' weights are on the meta device until a hook loads them for their turn.
        assert decoder_layers(dispatched)[2].mlp.down_proj.weight.is_meta
        assert input_device(dispatched) == torch.device("cpu")
        got = dispatched(tokens).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    after = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]}
    assert after.keys() == tensors.keys() and all(after[n] is tensors[n] for n in tensors)
    assert not hasattr(model, "hf_device_map") and "to" not in model.__dict__
    torch.testing.assert_close(model(tokens).logits, expected, rtol=0, atol=0)


def test_a_dispatched_dense_pass_does_not_touch_a_pruned_model_sharing_its_tensors(tmp_path) -> None:
    cfg = tiny_job(tmp_path / "cache", "float32")
    setup = prepare_search(cfg)
    allocation = {u.name: u.options[len(u.options) // 2] for u in setup.space.units}
    pruned = build_pruned_model(setup.dense, setup.space.shape, allocation, setup.db.source)
    tokens = setup.data.calibration[:2]
    expected = kl_to_dense(setup.dense, {"p": pruned}, tokens, 2)
    with inference_pass(setup.dense, device_map=spread_map(setup.dense)) as dense, \
            inference_pass(pruned, device_map=spread_map(pruned)) as spread:
        assert kl_to_dense(dense, {"p": spread}, tokens, 2) == expected
    assert kl_to_dense(setup.dense, {"p": pruned}, tokens, 2) == expected


def test_the_search_jobs_dispatched_passes_score_what_the_placed_model_scores(tmp_path) -> None:
    """The pipeline's dispatch path, run for real: a placement that dispatches (on this CPU accelerate's map puts
    everything on "cpu", behind its hooks) gives the scores and the fitness the model placed on one device gives.
    Only the GPUs the map would spread over on a real machine are missing here."""
    cfg = tiny_job(tmp_path / "cache", "float32")
    setup = prepare_search(cfg)
    spread = replace(setup, placement=Placement(torch.device("cpu"), dispatch=True))
    with inference_pass(setup.dense, spread.placement) as dispatched:
        assert dispatched.hf_device_map == {"": "cpu"} and hasattr(dispatched, "_hf_hook")  # really behind hooks
    allocations = {"a": {u.name: u.options[len(u.options) // 2] for u in setup.space.units},
                   "b": {u.name: u.options[-1 if i % 2 else 0] for i, u in enumerate(setup.space.units)}}
    models = {n: build_pruned_model(setup.dense, setup.space.shape, a, setup.db.source) for n, a in allocations.items()}
    assert score_models(cfg, spread, models) == score_models(cfg, setup, models)
    found = {}
    for name, s in (("placed", setup), ("dispatched", spread)):
        found[name] = run_searcher(cfg, tmp_path / name, s.problem, s.dense, s.space, s.db, s.data.fitness, s.placement)
    assert found["dispatched"].choice == found["placed"].choice
    assert found["dispatched"].info["fitness"] == found["placed"].info["fitness"]
    assert not hasattr(setup.dense, "hf_device_map")


def test_on_cpu_copies_only_what_is_elsewhere(tmp_path) -> None:
    model = load_model(ModelConfig(name="tiny-llama"), tmp_path).model
    assert on_cpu(model) is model  # the default CPU run writes from the model itself


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cpu_of_a_gpu_model_is_a_cpu_copy(tmp_path) -> None:
    model = load_model(ModelConfig(name="tiny-llama"), tmp_path).model.to("cuda")
    copy = on_cpu(model)
    assert all(p.device.type == "cpu" for p in copy.parameters())
    assert all(p.device.type == "cuda" for p in model.parameters())
    for (name, a), (_, b) in zip(copy.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b.cpu()), name


# --- the stages in bfloat16, on each device ----------------------------------------------------------------------


def tiny_job(cache_dir, dtype: str, device: str = "cpu", **changes) -> SearchJob:
    # A parameter budget needs no latency table: nothing is profiled on this shared CPU.
    return SearchJob(
        model=ModelConfig(name="tiny-llama", tiny_layers=3, dtype=dtype),
        data=DataConfig(seq_len=32, calib_sequences=8, eval_sequences=2),
        space=SpaceConfig(mlp_step=32, fisher_sequences=3),
        budget=BudgetConfig(speedup=None, sparsity=0.4),
        searcher=EvoConfig(generations=2, offspring=2, stage_tokens=[32], stage_survivors=[1]),
        fitness=FitnessConfig(sequences=4, batch_size=2),
        score=ScoreConfig(kl_sequences=4, batch_size=4),
        cache_dir=str(cache_dir),
        device=device,
        **changes,
    )


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {(dtype, device): prepare_search(tiny_job(cache, dtype, device))
            for dtype in ("float32", "bfloat16") for device in ("cpu", "cuda")
            if device == "cpu" or torch.cuda.is_available()}


def candidates(space, n: int, seed: int = 0) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    return [tuple(int(rng.integers(len(u.options))) for u in space.units) for _ in range(n)]


@pytest.mark.parametrize("device", DEVICES)
def test_the_fitness_engine_runs_in_bfloat16_on_the_device_and_scores_near_float32(setups, device) -> None:
    full, half = setups[("float32", device)], setups[("bfloat16", device)]
    choices = candidates(half.space, 6)
    engines = {}
    for name, setup in (("fp32", full), ("bf16", half)):
        assert input_device(setup.dense).type == setup.placement.device.type == device and not setup.placement.dispatch
        engines[name] = StitchedKLFitness(setup.dense, setup.space, setup.db.source, setup.data.fitness, batch_size=2)
    bf16 = engines["bf16"]
    assert bf16.pool.device.type == device and bf16._dense_logp.device.type == device
    for u, j in enumerate(choices[0]):  # every unit module of a candidate is built in bfloat16, on the device
        for module in bf16._build_unit(u, j).values():
            for t in module.parameters():
                assert t.dtype == torch.bfloat16 and t.device.type == device
    tokens = 4 * 32
    want, got = engines["fp32"].score(choices, tokens), bf16.score(choices, tokens)
    # bf16 keeps 8 mantissa bits; measured: these KLs (1e-3..8e-3) agree to about 1%.
    np.testing.assert_allclose(got, want, rtol=0.05, atol=1e-5)
    assert np.argmin(got) == np.argmin(want)


@pytest.mark.parametrize("device", DEVICES)
def test_scoring_runs_in_bfloat16_on_the_device_near_float32(setups, device) -> None:
    results = {}
    for dtype in ("float32", "bfloat16"):
        setup = setups[(dtype, device)]
        allocation = {u.name: u.options[len(u.options) // 2] for u in setup.space.units}
        pruned = build_pruned_model(setup.dense, setup.space.shape, allocation, setup.db.source)
        assert {p.dtype for p in pruned.parameters()} == {getattr(torch, dtype)}
        assert {p.device.type for p in pruned.parameters()} == {device}
        kl = kl_to_dense(setup.dense, {"p": pruned}, setup.data.calibration[:4], 2)["p"]
        results[dtype] = kl, perplexity(pruned, setup.data.heldout, 2), perplexity(setup.dense, setup.data.heldout, 2)
    (kl32, ppl32, dense32), (kl16, ppl16, dense16) = results["float32"], results["bfloat16"]
    assert kl32 > 1e-4  # a KL the comparison can see (measured 2.3e-4 in both, 1% apart)
    assert kl16 == pytest.approx(kl32, rel=0.05, abs=1e-6)
    assert ppl16 == pytest.approx(ppl32, rel=0.005) and dense16 == pytest.approx(dense32, rel=0.005)


# --- whole runs ------------------------------------------------------------------------------------------------


def export_tensors(run_dir) -> dict[str, torch.Tensor]:
    with safe_open(run_dir / "export" / "native" / "model.safetensors", "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)


def test_explicit_device_cpu_equals_the_default_bit_for_bit(tmp_path) -> None:
    cache = tmp_path / "cache"
    default = replace(tiny_job(cache, "float32"), verify=False)
    assert SearchJob().device == "cpu" and SearchJob().device_map == "auto"
    plans = {}
    for name, job in (("default", default), ("explicit", replace(default, device="cpu", device_map="single"))):
        plans[name] = run_search(job, tmp_path / name)
    a, b = plans["default"], plans["explicit"]
    assert a.allocation == b.allocation and a.quality == b.quality and a.uniform == b.uniform
    assert a.searcher.fitness == b.searcher.fitness
    left, right = export_tensors(tmp_path / "default"), export_tensors(tmp_path / "explicit")
    assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.mark.parametrize("device", DEVICES)
def test_a_bfloat16_run_exports_bfloat16_cpu_tensors_that_reload_to_the_scored_model(tmp_path, device) -> None:
    job = replace(tiny_job(tmp_path / "cache", "bfloat16", device), verify=False)
    plan = run_search(job, tmp_path / "run")
    tensors = export_tensors(tmp_path / "run")
    floats = {k: t for k, t in tensors.items() if t.is_floating_point()}
    assert floats and {t.dtype for t in floats.values()} == {torch.bfloat16}
    # What the export holds is the model the run scored: the pruned model of the plan's allocation, built on the
    # CPU from the dense bf16 model and the levels, gives the reloaded export's logits exactly.
    setup = prepare_search(job)  # cached: the same levels
    reloaded, _, _ = load_pruned(tmp_path / "run")
    built = build_pruned_model(on_cpu(setup.dense), setup.space.shape, plan.allocation, setup.db.source)
    ids = setup.data.heldout[:1].cpu()
    assert {p.dtype for p in reloaded.parameters() if p.is_floating_point()} == {torch.bfloat16}
    torch.testing.assert_close(reloaded(ids).logits, built(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_cli_search_in_bfloat16_end_to_end(tmp_path, device) -> None:
    result = run_cli(
        "search", "model=tiny-llama", f"device={device}", "model.dtype=bfloat16", "searcher=evo",
        "searcher.generations=2", "searcher.offspring=2", "searcher.stage_tokens=[64]", "searcher.stage_survivors=[1]",
        "fitness.sequences=3", "fitness.batch_size=2", f"cache_dir={tmp_path / 'cache'}", "data.seq_len=64",
        "space.mlp_step=32", "space.fisher_sequences=4", "data.calib_sequences=8", "data.eval_sequences=4",
        "score.kl_sequences=4", "score.batch_size=4", "model.tiny_layers=3", "profile=h100", "budget.speedup=1.3",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    [run] = list((tmp_path / "runs" / "search").iterdir())
    plan = json.loads((run / "plan.json").read_text())
    assert plan["model_spec"]["dtype"] == "bfloat16" and plan["searcher"]["name"] == "evo"
    assert 0 <= plan["quality"]["kl"] < 1 and plan["quality"]["ppl_pruned"] > 1
    assert {t.dtype for t in export_tensors(run).values() if t.is_floating_point()} == {torch.bfloat16}
