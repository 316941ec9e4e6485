"""space.runtime: each engine gets only the options it runs at full benefit, each priced at the shape it runs
(vLLM: every query head, the pruned ones zero; llama.cpp: a dropped MLP beside a kept attention as a zero MLP of the
smallest width), and native spaces keep their options, costs and cache keys."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from allocator.app.config import SearchJob
from allocator.app.search_job import run_search
from allocator.app.verify_job import engine_rules
from allocator.core.budget import memory_costs
from allocator.core.config import (
    BudgetConfig,
    DataConfig,
    ModelConfig,
    ProfileConfig,
    Runtime,
    ScoreConfig,
    SpaceConfig,
)
from allocator.core.errors import UserInputError
from allocator.core.memory import kv_bytes, option_bytes, unit_weight_bytes
from allocator.core.plan import Plan
from allocator.core.space import ATTN, LLAMACPP_ZERO_MLP, MLP, ModelShape, build_space, run_shape
from allocator.model.loader import load_model
from allocator.model.measure import fixed_bytes, weight_bytes
from allocator.model.runtime import load_pruned
from allocator.model.sparse_export import build_deployable
from allocator.model.surgery import (
    build_engine_model,
    build_pruned_model,
    decoder_layers,
    leading_levels,
    to_engine_shape,
)
from profilers.devices import DEVICES
from profilers.gpu import forward_step
from profilers.regimes import Regime
from profilers.roofline import attention_unit_seconds, mlp_unit_seconds, roofline_table
from profilers.table import table_key

SMOLLM2 = ModelShape(num_layers=30, hidden=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate=1536,
                     vocab=49152)
LLAMA3_8B = ModelShape(num_layers=32, hidden=4096, num_heads=32, num_kv_heads=8, head_dim=128, intermediate=14336,
                       vocab=128256)
# A tiny Llama with SmolLM2's head layout (9 query heads over 3 KV groups), so vLLM's rule removes a width.
TINY9 = ModelConfig(name="tiny-llama", tiny_layers=3, tiny_hidden=72, tiny_heads=9, tiny_kv_heads=3)
REGIMES = [Regime("prefill", "prefill", 1, 512), Regime("decode_b16", "decode", 16, 512)]
H100 = DEVICES["h100"]


def space_of(shape: ModelShape, runtime: str, **cfg):
    return build_space(shape, SpaceConfig(runtime=runtime, **cfg))


@pytest.mark.parametrize("shape,vllm_attention", [(SMOLLM2, [0, 1, 3]), (LLAMA3_8B, [0, 1, 2, 4, 8])])
def test_option_sets_per_runtime(shape, vllm_attention):
    native, vllm, llamacpp = (space_of(shape, r) for r in ("native", "vllm", "llamacpp"))
    assert native.options[ATTN] == llamacpp.options[ATTN] == list(range(shape.num_kv_heads + 1))
    assert vllm.options[ATTN] == vllm_attention  # KV groups dividing the query heads: n_heads_in_group integral
    assert native.options[MLP] == vllm.options[MLP] == llamacpp.options[MLP]  # every width exact in both engines
    assert (native.rules.zero_mlp, vllm.rules.zero_mlp, llamacpp.rules.zero_mlp) == (0, 0, LLAMACPP_ZERO_MLP)
    assert [u.options for u in vllm.units if u.kind == ATTN] == [tuple(vllm_attention)] * shape.num_layers


def test_tiny_llama_option_sets(tiny):
    loaded, _ = tiny  # 4 query heads over 2 KV groups: every count divides 4
    shape = ModelShape.from_config(loaded.model.config)
    assert space_of(shape, "vllm", mlp_step=32).options == space_of(shape, "native", mlp_step=32).options
    assert space_of(shape, "vllm", mlp_step=32).options[ATTN] == [0, 1, 2]
    assert space_of(shape, "llamacpp", mlp_step=32).rules.zero_mlp == LLAMACPP_ZERO_MLP == 1
    without_drop = space_of(SMOLLM2, "vllm", allow_drop=False)
    assert without_drop.options[ATTN] == [1, 3] and 0 not in without_drop.options[MLP]


@pytest.mark.parametrize("kind", ["unstructured", "nm", "mixed"])
@pytest.mark.parametrize("runtime", ["vllm", "llamacpp"])
def test_sparse_spaces_fail_on_engines_in_one_line(kind, runtime):
    with pytest.raises(UserInputError, match=rf"^space.kind={kind} with space.runtime={runtime}: {runtime} runs no "
                                             r"sparse weights .*; valid: space.kind=structured, or space.runtime=native"):
        space_of(SMOLLM2, runtime, kind=kind)
    assert space_of(SMOLLM2, "native", kind=kind).has_sparse


def test_bad_runtime_in_python_fails_naming_the_valid_ones():
    with pytest.raises(UserInputError, match=r"^space.runtime='tgi' is unknown; valid: native, vllm, llamacpp$"):
        space_of(SMOLLM2, "tgi")


def test_vllm_k1_costs_a_9_query_head_1_kv_head_attention():
    """Roofline and memory model: vLLM's k = 1 of SmolLM2 is an attention of 9 query heads over 1 KV head (q_proj
    and o_proj full, k_proj and v_proj one head, a KV cache of one head), dearer than the native k = 1 (3 heads)."""
    rules = space_of(SMOLLM2, "vllm").rules
    nine_over_one = replace(SMOLLM2, num_kv_heads=1)  # dense: 9 query heads, 1 KV head
    assert run_shape(SMOLLM2, ATTN, 1, rules) == replace(nine_over_one, num_heads=9)
    for regime in REGIMES:
        vllm = attention_unit_seconds(H100, SMOLLM2, regime, 1, rules)
        assert vllm == attention_unit_seconds(H100, nine_over_one, regime, 1)
        assert vllm > attention_unit_seconds(H100, SMOLLM2, regime, 1)
        assert attention_unit_seconds(H100, SMOLLM2, regime, 3, rules) == attention_unit_seconds(H100, SMOLLM2, regime, 3)
    for batch, context in [(1, 2048), (8, 4096)]:
        vllm = option_bytes(SMOLLM2, ATTN, 1, batch, context, 2, rules)
        assert vllm == option_bytes(nine_over_one, ATTN, 1, batch, context, 2)
        hidden, d = SMOLLM2.hidden, SMOLLM2.head_dim
        assert vllm == 2 * (2 * hidden * 9 * d + 2 * hidden * d + hidden) + 2 * batch * context * d * 2
        assert vllm - option_bytes(SMOLLM2, ATTN, 1, batch, context, 2) == 2 * 2 * hidden * 6 * d  # 6 zero heads
    assert kv_bytes(SMOLLM2, 1, 1, 100, 2, rules) == kv_bytes(SMOLLM2, 1, 1, 100, 2)  # the cache holds k heads


def test_dropped_units_per_engine():
    """vLLM and llama.cpp give a dropped attention no KV cache (natively: DroppedAttention's one-scalar marker); a
    dropped MLP is free in vLLM and costs the one-neuron zero MLP the gguf export writes in llama.cpp."""
    vllm, llamacpp = space_of(SMOLLM2, "vllm").rules, space_of(SMOLLM2, "llamacpp").rules
    assert kv_bytes(SMOLLM2, 0, 1, 100, 2) == 2 * 100 * 2 and kv_bytes(SMOLLM2, 0, 1, 100, 2, vllm) == 0
    assert kv_bytes(SMOLLM2, 0, 1, 100, 2, llamacpp) == 0
    assert unit_weight_bytes(SMOLLM2, MLP, 0, 2, vllm) == 0
    assert unit_weight_bytes(SMOLLM2, MLP, 0, 2, llamacpp) == unit_weight_bytes(SMOLLM2, MLP, LLAMACPP_ZERO_MLP, 2) > 0
    for regime in REGIMES:
        assert mlp_unit_seconds(H100, SMOLLM2, regime, 0, vllm) == 0.0
        assert mlp_unit_seconds(H100, SMOLLM2, regime, 0, llamacpp) == mlp_unit_seconds(H100, SMOLLM2, regime, LLAMACPP_ZERO_MLP)
        assert attention_unit_seconds(H100, SMOLLM2, regime, 2, llamacpp) == attention_unit_seconds(
            H100, SMOLLM2, regime, 2)  # per-layer head counts: exact


def test_tables_price_the_engine_shape_and_native_keys_stay():
    native, vllm = space_of(SMOLLM2, "native"), space_of(SMOLLM2, "vllm")
    tables = {name: roofline_table(H100, s, REGIMES, "bfloat16") for name, s in (("native", native), ("vllm", vllm))}
    assert "runtime" not in tables["native"].settings and tables["vllm"].settings["runtime"] == "vllm"
    for regime in REGIMES:
        ms = {name: t.regime(regime.name).unit_ms for name, t in tables.items()}
        assert ms["vllm"][ATTN][1] == pytest.approx(1e3 * attention_unit_seconds(H100, SMOLLM2, regime, 1, vllm.rules))
        assert ms["vllm"][ATTN][1] > ms["native"][ATTN][1] and ms["vllm"][MLP] == ms["native"][MLP]
    # same options, another engine: another key (tiny-llama's 4 heads over 2 groups, every width allowed in vLLM)
    tiny = ModelShape(3, 64, 4, 2, 16, 128, 257)
    keys = {r: table_key(t.fingerprint, t.model_shape, t.options, t.settings)
            for r in Runtime for t in [roofline_table(H100, space_of(tiny, r, mlp_step=32), REGIMES, "float32")]}
    assert len(set(keys.values())) == 3
    assert memory_costs(BudgetConfig(), vllm, 2)[0] != memory_costs(BudgetConfig(), native, 2)[0]


@pytest.fixture(scope="module")
def tiny9(tmp_path_factory):
    loaded = load_model(TINY9, tmp_path_factory.mktemp("cache"))
    return loaded.model, ModelShape.from_config(loaded.model.config)


@pytest.mark.parametrize("runtime", ["vllm", "llamacpp"])
def test_engine_models_have_the_engine_shape_and_the_pruned_outputs(tiny9, runtime):
    """What the profilers time for an engine: its shapes (all query heads under vLLM, zero MLPs under llama.cpp),
    with the pruned model's outputs, in prefill and in a decode step over a KV cache."""
    dense, shape = tiny9
    rules = space_of(shape, runtime, mlp_step=32).rules
    allocation = {"layer00.attn": 1, "layer00.mlp": 0, "layer01.attn": 0, "layer01.mlp": 0, "layer02.attn": 3,
                  "layer02.mlp": 64}
    source = leading_levels(dense, shape)
    pruned, engine = build_pruned_model(dense, shape, allocation, source), build_engine_model(dense, shape, allocation,
                                                                                            source, rules)
    layers = decoder_layers(engine)
    if runtime == "vllm":
        assert layers[0].self_attn.q_proj.out_features == 9 * shape.head_dim  # 3 real heads, 6 zero ones
        assert layers[0].self_attn.k_proj.out_features == shape.head_dim
        assert int(layers[0].self_attn.q_proj.weight.abs().sum(1).count_nonzero()) == 3 * shape.head_dim
    else:
        assert layers[0].mlp.down_proj.in_features == LLAMACPP_ZERO_MLP and not layers[0].mlp.down_proj.weight.any()
        assert layers[1].mlp.down_proj.in_features == LLAMACPP_ZERO_MLP  # priced so: the zero MLP's cost in every layer
    ids = torch.randint(0, shape.vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(engine(ids).logits, pruned(ids).logits, rtol=0, atol=1e-5)
        step = {name: m(ids[:, :8], use_cache=True) for name, m in (("engine", engine), ("pruned", pruned))}
        nxt = {name: m(ids[:, 8:9], past_key_values=step[name].past_key_values).logits
               for name, m in (("engine", engine), ("pruned", pruned))}
    torch.testing.assert_close(nxt["engine"], nxt["pruned"], rtol=0, atol=1e-5)
    deployed = build_deployable(dense, shape, allocation, source, rules)
    decode = forward_step(deployed, Regime("decode_b2", "decode", 2, 16))  # the GPU profiler's fixed-context step
    decode.run()


def test_vllm_padding_is_placed_per_kv_head(tmp_path):
    """8 query heads over 4 KV groups kept at 2 KV heads: vLLM runs 4 query slots per KV head, each kept group's 2
    real heads in the first slots of its own KV head. The outputs match the pruned model's; a real head moved
    under the other KV head changes them (the check is not vacuous)."""
    dense = load_model(replace(TINY9, tiny_hidden=64, tiny_heads=8, tiny_kv_heads=4), tmp_path).model
    shape = ModelShape.from_config(dense.config)
    rules = space_of(shape, "vllm", mlp_step=32).rules
    assert space_of(shape, "vllm", mlp_step=32).options[ATTN] == [0, 1, 2, 4]
    allocation = {f"layer{i:02d}.{k}": (2 if k == ATTN else 128) for i in range(3) for k in (ATTN, MLP)}
    source = leading_levels(dense, shape)
    pruned, engine = build_pruned_model(dense, shape, allocation, source), build_engine_model(dense, shape, allocation,
                                                                                            source, rules)
    ids = torch.randint(0, shape.vocab, (1, 10), generator=torch.Generator().manual_seed(1))
    d = shape.head_dim
    with torch.no_grad():
        torch.testing.assert_close(engine(ids).logits, pruned(ids).logits, rtol=0, atol=1e-5)
        attn = decoder_layers(engine)[0].self_attn
        swap = torch.arange(8 * d)
        swap[d:2 * d], swap[4 * d:5 * d] = torch.arange(4 * d, 5 * d), torch.arange(d, 2 * d)  # slot 1 <-> slot 4
        attn.q_proj.weight.data = attn.q_proj.weight.data[swap]
        attn.o_proj.weight.data = attn.o_proj.weight.data[:, swap]
        assert not torch.allclose(engine(ids).logits, pruned(ids).logits, atol=1e-3)


def tiny_job(cache, runtime: str) -> SearchJob:
    return SearchJob(
        model=TINY9,
        data=DataConfig(seq_len=64, calib_sequences=8, eval_sequences=4),
        space=SpaceConfig(mlp_step=32, fisher_sequences=4, runtime=runtime),
        profile=ProfileConfig(name="h100"),
        budget=BudgetConfig(speedup=2.0),  # on this tiny model's roofline launches dominate: attention must go too
        score=ScoreConfig(kl_sequences=4, batch_size=4),
        cache_dir=str(cache),
        verify=False,
    )


def test_engine_searches_pick_their_options_price_their_weights_and_share_the_level_database(tmp_path):
    cache = tmp_path / "cache"
    plans = {r: run_search(tiny_job(cache, r), tmp_path / r) for r in ("vllm", "llamacpp", "native")}
    vllm = plans["vllm"]
    problem = json.loads((tmp_path / "vllm" / "problem.json").read_text())
    assert {tuple(u["options"]) for u in problem["units"] if u["kind"] == ATTN} == {(0, 1, 3)}  # what it chose from
    attention = [k for name, k in vllm.allocation.items() if name.endswith(ATTN)]
    assert set(attention) <= {0, 1, 3} and set(attention) != {3}  # pruned, with widths vLLM runs
    assert vllm.runtime == Runtime.vllm and json.loads((tmp_path / "vllm" / "plan.json").read_text())["runtime"] == "vllm"
    assert plans["native"].runtime is None and Plan.load(tmp_path / "native" / "plan.json").engine == Runtime.native
    table = json.loads(Path(vllm.profile.table).read_text())
    assert table["settings"]["runtime"] == "vllm" and table["options"]["attn"] == [0, 1, 3]
    assert len(list((cache / "databases").iterdir())) == 1  # the native levels serve every engine
    assert vllm.predicted.speedup >= 2.0

    dense = load_model(TINY9, cache).model
    shape = ModelShape.from_config(dense.config)
    for runtime in ("vllm", "llamacpp"):
        plan, run = plans[runtime], tmp_path / runtime
        space = build_space(shape, tiny_job(cache, runtime).space)
        assert engine_rules(run, plan, shape) == space.rules  # verify rebuilds the rules from the run's job
        # the plan's weights are the engine's (padded heads, zero MLPs), as the memory model prices them
        priced = fixed_bytes(dense, space) + sum(
            unit_weight_bytes(shape, u.kind, plan.allocation[u.name], 4, space.rules) for u in space.units)
        assert plan.predicted.weight_bytes == priced
        exported, _, _ = load_pruned(run)
        ids = torch.randint(0, shape.vocab, (1, 12), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            expected = exported(ids).logits
            engine = to_engine_shape(exported, dense, shape, space.rules)  # what verify times for this engine
            torch.testing.assert_close(engine(ids).logits, expected, rtol=0, atol=1e-5)
        assert weight_bytes(engine) == priced


@pytest.mark.parametrize("runtime", ["vllm", "llamacpp"])
def test_measured_tables_time_the_engine_shapes_under_their_own_key(tiny9, runtime, tmp_path):
    """The CPU profiler and the GPU profiler's pipeline (device="cpu") build their variants at the engine's shapes
    and save the table under a key of its own, with the engine in its settings; the native table keeps its key."""
    from profilers.cpu import profile_cpu
    from profilers.gpu import profile_gpu

    dense, shape = tiny9
    cfg = ProfileConfig(repeats=2, warmup=0, decode_batches=[1], decode_context=16, prefill_length=16,
                        allow_unstable=True, threads=1, gpu_decode_batches=[1], l2_rotations=1)
    engine, native = space_of(shape, runtime, mlp_step=32), space_of(shape, "native", mlp_step=32)
    for profile in (lambda s: profile_cpu(dense, s, cfg, "float32", tmp_path),
                    lambda s: profile_gpu(dense, s, cfg, "float32", tmp_path, device="cpu")):
        (table, path), (native_table, native_path) = profile(engine), profile(native)
        assert table.settings["runtime"] == runtime and "runtime" not in native_table.settings and path != native_path
        assert table.options == engine.options and set(table.regimes) >= {"prefill", "decode_b1"}
