"""`python -m allocator verify`: measure an exported model end to end against the dense one; compare with the plan."""

from __future__ import annotations

import shlex
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoConfig

from allocator.app.config import VerifyJob
from allocator.core.config import (
    BudgetConfig,
    ModelConfig,
    ProfileConfig,
    Runtime,
    SpaceConfig,
)
from allocator.core.plan import PLAN_FILE, Measured, MeasuredMemory, Plan, Timing
from allocator.core.space import (
    ATTN,
    MLP,
    NATIVE,
    EngineRules,
    ModelShape,
    Option,
    build_space,
    is_sparse,
    unit_name,
)
from allocator.model.engines import EXPORT_DIR, refresh_cards
from allocator.model.engines.card import write_card
from allocator.model.loader import DTYPES, load_model
from allocator.model.measure import (
    decoder_weight_count,
    measured_kv_bytes_per_token,
    weight_bytes,
)
from allocator.model.runtime import load_plan, load_pruned, native_dir
from allocator.model.surgery import (
    SPARSE_KEY,
    WIDTHS_KEY,
    allocation_from_widths,
    to_engine_shape,
)
from profilers.end_to_end import measure_models, measure_models_gpu
from profilers.gpu import find_gpu_regime
from profilers.gpu_timing import cuda_device_for_profile
from profilers.llamacpp import LLAMACPP_DEVICE, time_gguf_export
from profilers.regimes import Regime, find_regime
from profilers.registry import LLAMACPP
from profilers.roofline import deploy_dtype
from profilers.table import load_table
from profilers.timing import paired_ratio

# A measured table whose dense prediction is further than this from the dense model measured by verify no longer
# describes the machine. Between a profile and a verify on a quiet machine the dense time drifts by a few percent
# (budget.headroom plans 5% for it); a table measured under load was off by 855% (10,602 vs 1,110 ms).
TABLE_TOLERANCE = 0.25
# ProfileConfig fields that select a CPU table (its cache key and regimes); the refresh command repeats them.
_TABLE_KEYS = ("repeats", "warmup", "decode_batches", "decode_context", "prefill_batch", "prefill_length", "threads",
               "gpu_decode_batches", "l2_rotations")



def predicted_latency(
    plan: Plan, regime: str, widths: dict[str, list[Option]]
) -> tuple[float, float] | tuple[None, None]:
    """(pruned, dense) latency that the plan's table predicts in `regime`; `widths`: per kind, each layer's option.
    (None, None) for a plan made without a table (a parameter or memory budget): nothing was predicted."""
    if plan.profile.table is None:
        return None, None
    if regime == plan.budget.regime:
        return plan.predicted.latency_ms, plan.predicted.dense_latency_ms
    costs = load_table(Path(plan.profile.table)).regime(regime)
    full = {kind: max(k for k in costs.unit_ms[kind] if not is_sparse(k)) for kind in widths}
    dense_widths = {kind: [full[kind]] * len(ks) for kind, ks in widths.items()}
    return costs.predict_ms(widths), costs.predict_ms(dense_widths)


def _planned_regime(plan: Plan, profile: ProfileConfig, name: str) -> Regime:
    """The regime as the plan's table measured it (batch, context), so the GPU times what was predicted."""
    table = None if plan.profile.table is None else Path(plan.profile.table)
    if table is not None and table.is_file():
        return Regime(**load_table(table).regime(name).regime)
    return find_gpu_regime(profile, name)


def engine_rules(run: Path, plan: Plan, shape: ModelShape) -> EngineRules:
    """The engine rules the plan was priced with: its run's space (search_job.yaml) rebuilt, or the default space
    for its runtime where that file is missing."""
    if plan.engine == Runtime.native:
        return NATIVE
    from allocator.app.search_job import JOB_FILE

    space = OmegaConf.structured(SpaceConfig(runtime=plan.engine))
    if (run / JOB_FILE).is_file():
        space = OmegaConf.merge(space, OmegaConf.load(run / JOB_FILE).get("space", {}))
    return build_space(shape, OmegaConf.to_object(space)).rules


def _time_in_torch(
    plan: Plan, profile: ProfileConfig, regime_name: str, dense: nn.Module, model: nn.Module, gpu: torch.device | None
) -> tuple[Regime, dict]:
    """Dense and pruned timed interleaved in this project's runtime: on this CPU, or on the plan's GPU."""
    if gpu is None:
        regime = find_regime(profile, regime_name)
        return regime, measure_models({"dense": dense, "pruned": model}, regime, profile.warmup, profile.verify_repeats)
    regime = _planned_regime(plan, profile, regime_name)
    dtype = DTYPES[plan.profile.fingerprint.get("dtype") or deploy_dtype(plan.model_spec.dtype)]
    return regime, measure_models_gpu({"dense": dense, "pruned": model}, regime, profile.warmup,
                                      profile.verify_repeats, gpu, dtype, profile.l2_rotations)


def measure_speedup(
    run: Path, profile: ProfileConfig, regime_name: str, cache_dir: str = "runs/cache",
    dense: nn.Module | None = None, plan: Plan | None = None,
) -> Measured:
    """Reload the native export (what a user gets), time it and the dense model interleaved: on this CPU, or
    on the plan's GPU when its profile is one (CUDA graphs, as profilers/gpu.py measured the table). A plan for
    another engine (plan.runtime) is timed at the shapes that engine runs, as its table was measured."""
    plan = plan if plan is not None else load_plan(run)
    gpu = cuda_device_for_profile(plan.profile.name)  # before any loading: no usable GPU fails at once
    model, tokenizer, _ = load_pruned(run)
    if dense is None:
        dense = load_model(plan.model_spec, cache_dir).model
    shape = ModelShape.from_config(dense.config)
    recorded = getattr(model.config, WIDTHS_KEY)  # read before the engine's shapes replace the pruned modules
    rules = engine_rules(run, plan, shape)
    if plan.profile.name == LLAMACPP:  # what was planned runs in llama.cpp: the gguf export timed by llama-bench
        regime = _planned_regime(plan, profile, regime_name)
        stats = time_gguf_export(run, model, tokenizer, dense, regime, profile, cache_dir)  # its writer pads itself
        model = to_engine_shape(model, dense, shape, rules)
    else:
        model = to_engine_shape(model, dense, shape, rules)
        regime, stats = _time_in_torch(plan, profile, regime_name, dense, model, gpu)
    allocation = allocation_from_widths(recorded, getattr(model.config, SPARSE_KEY, None))
    layers = len(recorded["attn_kv_groups"])
    widths = {kind: [allocation[unit_name(i, kind)] for i in range(layers)] for kind in (ATTN, MLP)}
    predicted_ms, predicted_dense = predicted_latency(plan, regime.name, widths)
    measured_ms, dense_ms = stats["pruned"].median_ms, stats["dense"].median_ms
    predicted = predicted_ms is not None  # a plan without a table: the speedup is measured, nothing compared
    dense_error = predicted_dense / dense_ms - 1.0 if predicted else None
    stale = predicted and plan.profile.source == "measured" and abs(dense_error) > TABLE_TOLERANCE  # a roofline is no measurement
    note = None
    if stale:
        note = (
            f"the latency table no longer describes this machine: it predicts {predicted_dense:.1f} ms for the dense "
            f"model, measured {dense_ms:.1f} ms ({dense_error * 100:+.0f}%, tolerance ±{TABLE_TOLERANCE * 100:.0f}%), "
            f"and {predicted_ms:.1f} ms for the pruned one, measured {measured_ms:.1f} ms (the table was measured on a "
            f"busy machine, or this machine is busy now or has changed). Re-measure it on a quiet machine: {refresh_command(run, plan)} "
            "(or add profile.refresh=true to the search command), then search again"
        )
    speedup = paired_ratio(stats["dense"], stats["pruned"])
    budget = plan.budget
    memory = None
    if budget.memory_gb is not None:  # weights as loaded, KV cache read off a real cache
        kv = measured_kv_bytes_per_token(model) * budget.memory_batch * budget.memory_context
        weights = weight_bytes(model)
        memory = MeasuredMemory(weight_bytes=weights, kv_cache_bytes=kv, total_bytes=weights + kv)
    measured = Measured(
        regime=regime.name,
        latency_ms=measured_ms,
        dense_latency_ms=dense_ms,
        speedup=speedup,
        predicted_speedup=predicted_dense / predicted_ms if predicted else None,
        speedup_prediction_error=predicted_dense / predicted_ms / speedup - 1.0 if predicted else None,
        latency_prediction_error=predicted_ms / measured_ms - 1.0 if predicted else None,
        pruned_stats=Timing(**asdict(stats["pruned"])),
        dense_stats=Timing(**asdict(stats["dense"])),
        # a weight budget: counted in the reloaded model
        param_sparsity=(1.0 - decoder_weight_count(model) / decoder_weight_count(dense)
                        if budget.sparsity is not None else None),
        memory=memory,
        device=(LLAMACPP_DEVICE if plan.profile.name == LLAMACPP else None if gpu is None
                else torch.cuda.get_device_name(gpu) if gpu.type == "cuda" else str(gpu)),
        predicted_latency_ms=predicted_ms,
        predicted_dense_latency_ms=predicted_dense,
        dense_prediction_error=dense_error,
        table_stale=stale if predicted else None,
        table_note=note,
    )
    verdict = budget_verdict(budget, measured, regime.name == budget.regime)
    if verdict is not None:
        measured = replace(measured, target_met=verdict[0], verdict=verdict[1])
    return measured


def _override(key: str, value: object) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, (list, tuple)):
        text = "[" + ",".join(str(v) for v in value) + "]"
    else:
        text = str(value)
    return shlex.quote(f"{key}={text}")


def _changed(section: str, values: dict, defaults: object, keys) -> list[str]:
    return [_override(f"{section}.{k}", values[k]) for k in keys if k in values and values[k] != getattr(defaults, k)]


def refresh_command(run: Path, plan: Plan) -> str:
    """`python -m allocator profile ... profile.refresh=true` with the model, space and profile settings the plan's
    table was measured with (read from the run's search_job.yaml; the model alone where that file is missing)."""
    from allocator.app.search_job import JOB_FILE

    args = [] if plan.profile.name == "cpu" else [_override("profile", plan.profile.name)]
    saved = run / JOB_FILE
    if saved.is_file():
        job = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
        model, space, profile = job.get("model", {}), job.get("space", {}), job.get("profile", {})
        args.append(_override("model", model.get("name", plan.model_spec.name)))
        args += _changed("model", model, ModelConfig(), [f.name for f in fields(ModelConfig) if f.name != "name"])
        args.append(_override("space", space.get("kind", "structured")))
        args += _changed("space", space, SpaceConfig(), [f.name for f in fields(SpaceConfig) if f.name != "kind"])
        args += _changed("profile", profile, ProfileConfig(), _TABLE_KEYS)
        if job.get("cache_dir", "runs/cache") != "runs/cache":
            args.append(_override("cache_dir", job["cache_dir"]))
    else:
        spec = asdict(plan.model_spec)
        args.append(_override("model", plan.model_spec.name))
        args += _changed("model", spec, ModelConfig(), [k for k in spec if k != "name"])
    return " ".join(["python -m allocator profile", *args, "profile.refresh=true"])


def budget_verdict(budget: BudgetConfig, measured: Measured, same_regime: bool) -> tuple[bool, str] | None:
    """Whether the measured model meets every limit it was planned for, and by how much each missed if not
    (None when no limit applies: a latency target checked in another regime)."""
    checks: list[tuple[bool, float, str]] = []  # (met, shortfall, text)
    if budget.sparsity is not None:
        s = measured.param_sparsity
        checks.append((s >= budget.sparsity - 1e-9, budget.sparsity - s,
                       f"parameter sparsity {s:.4f} vs target {budget.sparsity:.4f} (counted in the exported weights)"))
    if budget.memory_gb is not None:
        total, cap = measured.memory.total_bytes, budget.memory_gb * 1e9
        checks.append((total <= cap, total / cap - 1.0,
                       f"memory {total / 1e9:.4f} GB (weights as loaded + measured KV cache) vs {budget.memory_gb} GB"))
    if same_regime and budget.speedup is not None:
        speedup = measured.speedup
        checks.append((speedup >= budget.speedup, 1.0 - speedup / budget.speedup,
                       f"measured speedup {speedup:.3f}x vs target {budget.speedup:.3f}x"))
    elif same_regime and budget.latency_ms is not None:
        ms = measured.latency_ms
        checks.append((ms <= budget.latency_ms, ms / budget.latency_ms - 1.0,
                       f"measured latency {ms:.1f} ms vs target {budget.latency_ms:.1f} ms"))
    if not checks:
        return None
    texts = [("target met" if met else f"TARGET MISSED by {short * 100:.1f}%") + f": {text}" for met, short, text in checks]
    return all(met for met, _, _ in checks), "; ".join(texts)


def save_measured(run: Path, plan: Plan) -> None:
    """The verified plan into the run (or export) directory, and into every export's plan.json and model card."""
    plan.save(run / PLAN_FILE)
    native = native_dir(run)
    shape = ModelShape.from_config(AutoConfig.from_pretrained(native))
    if run.parent.name == EXPORT_DIR:  # an export directory verified on its own
        write_card(run, run.name, shape, plan)
    else:
        refresh_cards(run, plan, shape)


def run_verify(cfg: VerifyJob) -> Measured:
    run = Path(cfg.run)
    plan = load_plan(run)
    regime = cfg.regime or plan.budget.regime
    measured = measure_speedup(run, cfg.profile, regime, cfg.cache_dir)
    if regime == plan.budget.regime:
        save_measured(run, plan.with_measured(measured))
    measured_text = (f"measured {measured.speedup:.2f}x ({measured.latency_ms:.1f} ms vs dense "
                     f"{measured.dense_latency_ms:.1f} ms)")
    if measured.predicted_speedup is None:
        print(f"{run} ({regime}): {measured_text}; latency was not predicted (the plan has no latency table)")
    else:
        print(
            f"{run} ({regime}): predicted speedup {measured.predicted_speedup:.2f}x, {measured_text}, speedup "
            f"prediction error {measured.speedup_prediction_error * 100:+.1f}%"
        )
    if measured.predicted_latency_ms is not None:
        print(
            f"absolute latency: predicted {measured.predicted_latency_ms:.1f} ms, measured {measured.latency_ms:.1f} ms "
            f"({measured.latency_prediction_error * 100:+.1f}%); dense: table {measured.predicted_dense_latency_ms:.1f} "
            f"ms, measured {measured.dense_latency_ms:.1f} ms ({measured.dense_prediction_error * 100:+.1f}%)"
        )
    if measured.verdict is not None:
        print(measured.verdict)
    if measured.table_note is not None:
        print(f"WARNING: {measured.table_note}")
    return measured
