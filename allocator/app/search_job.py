"""`python -m allocator search`: model → space → latency table → level database → searcher → score → export."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from allocator.app.config import SearchJob
from allocator.app.pareto_plot import plot_pareto_front
from allocator.app.problem_file import write_problem
from allocator.app.profile_job import validate_profile_name
from allocator.app.report import (
    allocation_lines,
    export_lines,
    plot_allocation,
    summary_lines,
)
from allocator.app.verify_job import measure_speedup
from allocator.core.atomic_io import write_json_atomic
from allocator.core.budget import (
    budget_label,
    is_latency_budget,
    is_param_budget,
    memory_capacity,
    memory_costs,
    param_sparsity,
    target_params,
    validate_budget,
)
from allocator.core.config import ErrorMetric, Runtime, UnstructuredFormat, check_choice
from allocator.core.device import resolve_device
from allocator.core.errors import UserInputError
from allocator.core.formats import resolve_unstructured_format
from allocator.core.memory import kv_bytes
from allocator.core.plan import (
    NO_TABLE,
    PLAN_FILE,
    Plan,
    PlanBudget,
    PlanProfile,
    Predicted,
    Quality,
    SearcherInfo,
    Uniform,
)
from allocator.core.ray_cluster import session as ray_session
from allocator.core.ray_cluster import wants_ray
from allocator.core.space import (
    ATTN,
    ModelShape,
    Option,
    Space,
    build_space,
    option_params,
    sparse_patterns,
)
from allocator.levels.compress.outliers import OutlierNorms
from allocator.levels.database import LevelDatabase, open_or_build_database
from allocator.model.calibration_data import (
    CalibrationData,
    build_calibration_data,
    validate_data_config,
)
from allocator.model.engines import (
    NATIVE,
    check_model_support,
    export_formats,
    refresh_cards,
    validate_formats,
)
from allocator.model.loader import load_model, validate_model_config
from allocator.model.measure import fixed_bytes, weight_bytes
from allocator.model.placement import (
    Placement,
    inference_pass,
    on_cpu,
    place,
    resolve_placement,
    validate_placement,
)
from allocator.model.quality import kl_to_dense, perplexity
from allocator.model.sparse_export import build_deployable
from allocator.model.surgery import build_pruned_model
from profilers.devices import DEVICES
from profilers.prediction import (
    predicted_dense_ms,
    predicted_ms,
    target_latency_ms,
    unit_costs,
)
from profilers.regimes import find_regime
from profilers.registry import device_present, existing_cost_table, get_cost_table
from profilers.roofline import cheaper_unstructured_format
from profilers.table import CostTable, RegimeCosts
from search import SEARCHERS, Allocation, AllocationProblem, make_searcher
from search.bayes import BayesConfig
from search.fitness_engine import dense_log_probs, torch_threads
from search.ray_fitness import kl_fitness
from search.uniform import UniformSearcher

JOB_FILE = "search_job.yaml"


def validate_search_job(cfg: SearchJob) -> None:
    """Everything checkable without loading weights, so bad input costs one line and no waiting."""
    validate_placement(cfg.device, cfg.model.dtype, cfg.device_map)
    validate_model_config(cfg.model)
    validate_data_config(cfg.data)
    validate_budget(cfg.budget)
    validate_profile_name(cfg.profile.name)
    find_regime(cfg.profile, cfg.budget.regime)
    if cfg.searcher.name not in SEARCHERS:
        raise UserInputError(f"searcher.name={cfg.searcher.name!r} is unknown; known: {', '.join(SEARCHERS.names())}")
    sparse_patterns(cfg.space)
    check_choice("space.error_metric", cfg.space.error_metric, ErrorMetric)
    check_choice("space.unstructured_format", cfg.space.unstructured_format, UnstructuredFormat)
    validate_formats(cfg.export.formats)
    if not 1 <= cfg.space.fisher_sequences <= cfg.data.calib_sequences:
        raise UserInputError(
            f"space.fisher_sequences={cfg.space.fisher_sequences} must be in 1..data.calib_sequences={cfg.data.calib_sequences}"
        )
    if isinstance(cfg.fitness.sequences, bool) or not isinstance(cfg.fitness.sequences, int) or cfg.fitness.sequences < 1:
        raise UserInputError(f"fitness.sequences={cfg.fitness.sequences!r} must be an integer >= 1")
    if cfg.fitness.batch_size < 1:
        raise UserInputError(f"fitness.batch_size={cfg.fitness.batch_size} must be >= 1")
    validate_parallel(cfg)
    if cfg.score.kl_sequences > cfg.data.calib_sequences:
        raise UserInputError(
            f"score.kl_sequences={cfg.score.kl_sequences} exceeds data.calib_sequences={cfg.data.calib_sequences}"
        )


def validate_parallel(cfg: SearchJob) -> None:
    """The fitness cache, thread count and Ray worker options."""
    if isinstance(cfg.fitness.cache_gb, bool) or not isinstance(cfg.fitness.cache_gb, (int, float)) \
            or not cfg.fitness.cache_gb >= 0:
        raise UserInputError(f"fitness.cache_gb={cfg.fitness.cache_gb!r} must be a number of GB >= 0 (0: keep no "
                             "unit module beyond the current candidate's)")
    for key, value in (("fitness.threads", cfg.fitness.threads), ("workers", cfg.workers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserInputError(f"{key}={value!r} must be an integer >= 0 (0: {'torch default' if 'threads' in key else 'serial'})")
    if not cfg.ray.num_cpus > 0 or not cfg.ray.num_gpus >= 0:
        raise UserInputError(f"ray.num_cpus={cfg.ray.num_cpus} must be > 0 and ray.num_gpus={cfg.ray.num_gpus} >= 0")
    if wants_ray(cfg.workers, cfg.ray) and cfg.ray.num_gpus <= 0 and resolve_device(cfg.device).type == "cuda":
        raise UserInputError(f"device={cfg.device} with Ray workers: each worker scores on a GPU of its own, but "
                             f"ray.num_gpus={cfg.ray.num_gpus}; set ray.num_gpus=1 (or device=cpu)")


def memory_limit(cfg: SearchJob, dense: nn.Module, space: Space) -> tuple[list, float] | None:
    """(per-unit option bytes, capacity for the units) under budget.memory_gb, or None without a memory budget."""
    if cfg.budget.memory_gb is None:
        return None
    per_unit = memory_costs(cfg.budget, space, next(dense.parameters()).element_size())
    return per_unit, memory_capacity(cfg.budget, per_unit, fixed_bytes(dense, space))


def problem_cost_unit(cfg: SearchJob) -> str:
    """What build_problem's costs count (problem.json's cost_unit), by the same order of budget kinds."""
    if is_param_budget(cfg.budget):
        return "params"
    return "ms" if is_latency_budget(cfg.budget) else "bytes"


def build_problem(
    cfg: SearchJob,
    dense: nn.Module,
    space: Space,
    costs: RegimeCosts,
    db: LevelDatabase,
    target_ms: float | None,
) -> AllocationProblem:
    """The budget's costs: latency (ms, less the fixed part) under a speedup/latency target, kept weights under a
    sparsity one, bytes under memory alone; memory beside a target becomes the problem's second limit."""
    shape, units = space.shape, space.units
    memory = memory_limit(cfg, dense, space)
    second = None
    if is_param_budget(cfg.budget):
        unit_cost = [[float(option_params(shape, u.kind, k)) for k in u.options] for u in units]
        capacity = target_params(cfg.budget, space)
        second = memory
    elif is_latency_budget(cfg.budget):
        unit_cost = [unit_costs(costs, u) for u in units]
        capacity = target_ms - costs.fixed_ms
        second = memory
    else:
        unit_cost, capacity = memory
    return AllocationProblem(
        unit_names=tuple(u.name for u in units),
        unit_kinds=tuple(u.kind for u in units),
        options=tuple(u.options for u in units),
        costs=tuple(np.array(c) for c in unit_cost),
        errors=tuple(np.array([db.error(u.name, k, cfg.space.error_metric) for k in u.options]) for u in units),
        budget=capacity,
        kept_fractions=tuple(
            np.array([option_params(shape, u.kind, k) for k in u.options]) / option_params(shape, u.kind, u.full)
            for u in units
        ),
        second_costs=None if second is None else tuple(np.array(c) for c in second[0]),
        second_budget=None if second is None else second[1],
    )


NOT_PREDICTED = "no latency table: the budget reads none, and profile {profile} has none that costs no profiling"


def latency_table(
    cfg: SearchJob, dense: nn.Module, space: Space, check_budget
) -> tuple[CostTable, Path] | tuple[None, None]:
    """The latency table a latency budget prices with (loaded, or measured now). A parameter or memory-only budget
    reads no latency: it gets a table only where one costs no profiling (a CPU table already saved, a device's
    measured table or its roofline), for the predicted latency in the plan; else (None, None), and the plan says
    latency was not predicted."""
    p = cfg.profile
    if is_latency_budget(cfg.budget):
        return get_cost_table(p.name, dense, space, p, cfg.model.dtype, cfg.cache_dir, cfg.budget.regime, check_budget)
    found = existing_cost_table(p.name, space, p, cfg.model.dtype, cfg.cache_dir)
    if found is None:
        print(f"latency not predicted: {NOT_PREDICTED.format(profile=p.name)} (budget {budget_label(cfg.budget)}; "
              "python -m allocator profile measures one)")
        return None, None
    return found


@dataclass
class SearchSetup:
    """Everything a searcher needs, built (or loaded from the caches) once."""

    dense: nn.Module
    tokenizer: object
    space: Space
    table: CostTable | None  # None: the budget reads no latency and no table was free (see latency_table)
    table_path: Path | None
    costs: RegimeCosts | None
    target_ms: float | None
    data: CalibrationData
    db: LevelDatabase
    problem: AllocationProblem
    placement: Placement  # where the dense model is and its passes run (allocator/model/placement.py)


def auto_format_pricing(cfg: SearchJob, shape: ModelShape) -> Callable[[str], str]:
    """How space.unstructured_format=auto chooses for a regime: the format the roofline prices cheaper on the
    profile's device (profilers.roofline.cheaper_unstructured_format). A profile measured on this machine's CPU
    (cpu, llamacpp) is priced as the assumed CPU, which runs either format decompressed: bitmap."""
    device = DEVICES.get(cfg.profile.name, DEVICES["cpu-generic"])
    patterns = sparse_patterns(cfg.space)
    return lambda regime: cheaper_unstructured_format(device, shape, patterns, find_regime(cfg.profile, regime))


def prepare_search(cfg: SearchJob, fitness_pool: bool = False) -> SearchSetup:
    """Model, space, latency table, calibration data and level database, and the allocation problem they define.
    The data includes the fitness sequences when the searcher scores candidates, or when `fitness_pool` asks."""
    validate_search_job(cfg)
    torch.manual_seed(cfg.seed)
    loaded = load_model(cfg.model, cfg.cache_dir)
    dense = loaded.model
    # The unstructured format is resolved once, from the budget's regime: the table, the memory model, the export
    # and the plan all read it from the Space.
    shape = ModelShape.from_config(dense.config)
    unstructured = resolve_unstructured_format(cfg.space.unstructured_format, cfg.budget.regime,
                                               auto_format_pricing(cfg, shape))
    space = build_space(shape, cfg.space, unstructured)
    budget_ms: dict[str, float] = {}
    if is_param_budget(cfg.budget):  # unreachable budgets fail now, not after profiling
        target_params(cfg.budget, space)
    memory_limit(cfg, dense, space)

    def check_budget(regime: str, costs: RegimeCosts) -> None:
        if is_latency_budget(cfg.budget):
            budget_ms["target"] = target_latency_ms(cfg.budget, costs, space.units, cfg.profile.name)

    table, table_path = latency_table(cfg, dense, space, check_budget)
    costs = None if table is None else table.regime(cfg.budget.regime)
    # Moved to the device once, after the latency table (profilers copy what they time) and before the database.
    placement = resolve_placement(cfg.device, cfg.model.dtype, cfg.device_map, dense)
    dense = place(dense, placement)
    fitness_pool = fitness_pool or SEARCHERS.get(cfg.searcher.name).uses_fitness
    data = build_calibration_data(cfg.data, loaded.tokenizer, cfg.fitness.sequences if fitness_pool else 0)
    # OWL allocates by each layer's activation-outlier ratio: gathered on the database's calibration pass.
    outliers = OutlierNorms(cfg.fitness.sequences, cfg.fitness.batch_size) if cfg.searcher.name == "owl" else None
    # The levels are the engine's too (vLLM's zero query heads add nothing): built over the native space, a superset
    # of every engine's options, so each engine's search reads the one database of this model and data.
    levels_space = build_space(space.shape, replace(cfg.space, runtime=Runtime.native))
    db = open_or_build_database(
        dense, levels_space, data.calibration, loaded.fingerprint, data.fingerprint, cfg.space, cfg.cache_dir,
        also=[outliers] if outliers else [], device=cfg.device, workers=cfg.workers, ray=cfg.ray,
    )
    target_ms = budget_ms.get("target")
    problem = build_problem(cfg, dense, space, costs, db, target_ms)
    if outliers is not None:
        ratios = outliers.ratios()
        problem = replace(problem, outlier_ratios=tuple(ratios[u.layer] for u in space.units))
    return SearchSetup(dense, loaded.tokenizer, space, table, table_path, costs, target_ms, data, db, problem, placement)


def run_search(cfg: SearchJob, run_dir: Path) -> Plan:
    validate_search_job(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / JOB_FILE).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))  # what `export` re-runs
    # One Ray cluster (with workers) for the database build and the search's scoring, stopped before the scoring
    # and export below need the memory.
    with ray_session(cfg.workers, cfg.ray):
        setup = prepare_search(cfg)
        check_model_support(cfg.export.formats, setup.dense.config)  # before the search, not after it
        dense, tokenizer, space, costs, data, db, problem = (
            setup.dense, setup.tokenizer, setup.space, setup.costs, setup.data, setup.db, setup.problem
        )
        found = run_searcher(cfg, run_dir, problem, dense, space, db, data.fitness, setup.placement)
    shape, units = space.shape, space.units
    uniform = UniformSearcher().search(problem, seed=cfg.seed)
    allocations = {"searched": found.labels(problem), "uniform": uniform.labels(problem)}
    models = {name: build_pruned_model(dense, shape, alloc, db.source) for name, alloc in allocations.items()}
    kl, ppl = score_models(cfg, setup, models)
    # What is exported, verified and run is built on the CPU, from CPU tensors, so the files are a CPU run's files
    # whatever the device (on the default CPU `home` is the dense model itself).
    home = on_cpu(dense)
    # What is exported and run: sparse units in their compressed formats (the same model as the masked one).
    deployed = build_deployable(home, shape, allocations["searched"], db.source, unstructured_format=space.unstructured_format)
    # KV cache of budget.memory_batch sequences of budget.memory_context tokens (reported with or without a memory budget)
    dtype_bytes = next(dense.parameters()).element_size()
    b = cfg.budget
    kv = sum(
        kv_bytes(shape, allocations["searched"][u.name], b.memory_batch, b.memory_context, dtype_bytes, space.rules)
        for u in units if u.kind == ATTN
    )
    # The weights the plan's engine holds: natively the export's; elsewhere at the engine's shapes (zero-padded
    # query heads under vLLM, zero MLPs under llama.cpp), as the memory model prices them.
    served = deployed if space.runtime == Runtime.native else build_deployable(
        home, shape, allocations["searched"], db.source, space.rules)
    plan = make_plan(cfg, setup, allocations, found, uniform, kl, ppl, weight_bytes(served), weight_bytes(dense), kv)
    write_problem(run_dir, problem, problem_cost_unit(cfg), None if costs is None else costs.fixed_ms)
    if cfg.export.formats:
        export_formats(deployed, tokenizer, run_dir, plan, cfg.export.formats)
        plan = verified(cfg, run_dir, plan, home)
        refresh_cards(run_dir, plan, shape)  # the cards and plan.json of every export show what verify measured
    plan.save(run_dir / PLAN_FILE)
    plot_allocation(shape, allocations["searched"], allocations["uniform"], run_dir / "allocation.png")
    print("\n".join(allocation_lines(shape, allocations["searched"], allocations["uniform"]) + [""] + summary_lines(plan)
                    + export_lines(run_dir)))
    print(f"run directory: {run_dir}")
    return plan


def score_models(cfg: SearchJob, setup: SearchSetup, models: dict[str, nn.Module]) -> tuple[dict, dict]:
    """(KL to dense, held-out perplexity) by model name, perplexity also of "dense". Each pass runs where the
    placement says: on the device the dense model was placed on, or, dispatched over GPUs, one model at a time
    beside the dense one."""
    dense, data, batch = setup.dense, setup.data, cfg.score.batch_size
    tokens = data.calibration[: cfg.score.kl_sequences]
    if not setup.placement.dispatch:
        kl = kl_to_dense(dense, models, tokens, batch)
        ppl = {name: perplexity(m, data.heldout, batch) for name, m in {"dense": dense, **models}.items()}
        return kl, ppl
    kl, ppl = {}, {}
    with inference_pass(dense, setup.placement) as reference:
        ppl["dense"] = perplexity(reference, data.heldout, batch)
        for name, model in models.items():
            with inference_pass(model, setup.placement) as pruned:
                kl.update(kl_to_dense(reference, {name: pruned}, tokens, batch))
                ppl[name] = perplexity(pruned, data.heldout, batch)
    return kl, ppl


def verified(cfg: SearchJob, run_dir: Path, plan: Plan, dense: nn.Module) -> Plan:
    """The plan with what verify measured on the native export, or with why it did not run."""
    if not cfg.verify:
        return plan
    if NATIVE not in cfg.export.formats:
        plan = plan.with_verify_skipped(f"verify measures the native export; export.formats={cfg.export.formats} has none")
    elif not device_present(cfg.profile.name):  # timing here would measure this machine, not the plan's device
        plan = plan.with_verify_skipped(f"profile {cfg.profile.name} is for a device not present on this machine")
    else:
        return plan.with_measured(measure_speedup(run_dir, cfg.profile, cfg.budget.regime, dense=dense, plan=plan))
    print(f"verification skipped: {plan.verify_skipped}")
    return plan


def run_searcher(
    cfg: SearchJob,
    run_dir: Path,
    problem: AllocationProblem,
    dense: nn.Module,
    space: Space,
    db: LevelDatabase,
    pool: torch.Tensor | None,
    placement: Placement | None = None,
) -> Allocation:
    """Run the configured searcher (with the KL fitness engine on `pool`, the fitness sequences, if it scores real
    candidates); its trace and, for a multi-objective search, its Pareto front land in the run directory."""
    searcher_cfg = cfg.searcher
    if isinstance(searcher_cfg, BayesConfig) and not searcher_cfg.storage:  # a killed study resumes from here
        searcher_cfg = replace(searcher_cfg, storage=f"sqlite:///{(run_dir / 'study.db').resolve()}")
    searcher = make_searcher(searcher_cfg)
    fitness = None
    if searcher.uses_fitness:
        dense_logp = None
        if placement is not None and placement.dispatch:  # the dense pass spread over the GPUs; candidates at home
            with inference_pass(dense, placement) as spread, torch_threads(cfg.fitness.threads):
                dense_logp = dense_log_probs(spread, pool, cfg.fitness.batch_size)
        fitness = kl_fitness(dense, space, db.source, pool, cfg.fitness, cfg.workers, cfg.ray, dense_logp=dense_logp)
    try:
        found = searcher.search(problem, seed=cfg.seed, fitness=fitness)
    finally:
        if fitness is not None:
            fitness.close()  # Ray workers stop here, before scoring and export need the memory
    if "trace" in found.info:
        write_json_atomic(run_dir / "search_trace.json", found.info)
    if "pareto_front" in found.info:
        plot_pareto_front(found.info["pareto_front"], run_dir / "pareto.png", problem.budget, f"{cfg.model.name}: NSGA-II front")
    return found


def make_plan(
    cfg: SearchJob,
    setup: SearchSetup,
    allocations: dict[str, dict[str, Option]],
    found: Allocation,
    uniform: Allocation,
    kl: dict[str, float],
    ppl: dict[str, float],
    weights: int,
    dense_weights: int,
    kv_cache: int,
) -> Plan:
    """The run's plan, built once: `kl` and `ppl` by allocation name ("searched", "uniform"; ppl also "dense"),
    `weights` of the exported model, `kv_cache` bytes of the searched allocation at the budget's batch and context."""
    costs, units, table = setup.costs, setup.space.units, setup.table
    dense_ms = searched_ms = uniform_ms = None  # not predicted without a table
    if costs is not None:
        dense_ms = predicted_dense_ms(costs, units)
        searched_ms = predicted_ms(costs, units, allocations["searched"])
        uniform_ms = predicted_ms(costs, units, allocations["uniform"])
    info = found.info
    return Plan(
        allocation=allocations["searched"],
        unstructured_format=setup.space.unstructured_format,
        budget=PlanBudget(
            **asdict(cfg.budget),
            target_ms=setup.target_ms,
            target_params=float(setup.problem.budget) if is_param_budget(cfg.budget) else None,
        ),
        profile=PlanProfile(
            name=table.profile, source=table.source, fingerprint=table.fingerprint, table=str(setup.table_path)
        ) if table is not None else PlanProfile(name=cfg.profile.name, source=NO_TABLE, fingerprint={}, table=None),
        model=cfg.model.name,
        model_spec=replace(cfg.model),
        searcher=SearcherInfo(
            name=found.searcher,
            proxy_error=float(found.error),
            error_metric=ErrorMetric(cfg.space.error_metric),
            fitness=float(info["fitness"]) if "fitness" in info else None,
            tokens_spent=int(info["tokens_spent"]) if "tokens_spent" in info else None,
            evaluations=int(info["evaluations"]) if "evaluations" in info else None,
            seconds=float(info["seconds"]) if "seconds" in info else None,
        ),
        predicted=Predicted(
            latency_ms=searched_ms,
            dense_latency_ms=dense_ms,
            speedup=None if costs is None else dense_ms / searched_ms,
            param_sparsity=param_sparsity(setup.space, allocations["searched"]),
            weight_bytes=weights,
            dense_weight_bytes=dense_weights,
            kv_cache_bytes=kv_cache,
            memory_bytes=weights + kv_cache,
        ),
        uniform=Uniform(
            allocation=allocations["uniform"],
            proxy_error=float(uniform.error),
            predicted_latency_ms=uniform_ms,
            predicted_speedup=None if costs is None else dense_ms / uniform_ms,
            param_sparsity=param_sparsity(setup.space, allocations["uniform"]),
            kl=kl["uniform"],
            ppl_dense=ppl["dense"],
            ppl_pruned=ppl["uniform"],
        ),
        quality=Quality(kl=kl["searched"], ppl_dense=ppl["dense"], ppl_pruned=ppl["searched"]),
        runtime=None if setup.space.runtime == Runtime.native else setup.space.runtime,
    )
