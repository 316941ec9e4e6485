"""`python -m allocator evaluate run=<dir>`: perplexity on text and lm-evaluation-harness tasks, for the exported
(pruned) model and the dense model it was made from; results in <run>/evaluate/<timestamp>.json.

lm-eval runs through its `HFLM` wrapper on the model object this project loads (`HFLM(pretrained=model, ...)`), so
a native export (per-layer widths, compressed sparse units, which plain transformers cannot build) is evaluated as
it is served by this project's runtime. Task data comes from the user's environment: lm-eval's registered tasks
read their datasets from the Hugging Face cache or hub, local task YAMLs from wherever they point."""

from __future__ import annotations

import difflib
import json
import platform
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from allocator.app.config import EvaluateJob
from allocator.core.atomic_io import write_json_atomic
from allocator.core.config import DataConfig
from allocator.core.device import resolve_device
from allocator.core.errors import UserInputError
from allocator.core.plan import PLAN_FILE, Plan
from allocator.model.calibration_data import build_calibration_data, text_blocks
from allocator.model.engines import EXPORT_DIR, NATIVE
from allocator.model.quality import perplexity

RESULTS_DIR = "evaluate"  # <run>/evaluate/<timestamp>.json
RESULTS_VERSION = 1
JOB_FILE = "search_job.yaml"  # allocator.app.search_job.JOB_FILE (not imported: that module loads every searcher)
TASK_SUFFIXES = (".yaml", ".yml")
# Export formats this job loads, in the order a run directory's are tried: native (this project's runtime), then
# the original architecture (dense), then decilm (needs trust_remote_code=true).
LOADABLE_FORMATS = (NATIVE, "dense", "decilm")


# --- what `run=` points at ------------------------------------------------------------------------------------------


def find_model_dir(path: str | Path) -> tuple[Path, Path]:
    """(model directory, run directory) of `run=`: a search run directory with its export under export/<format>/
    (native first, then the transformers-loadable formats) or, in the layout before export formats, at its top; or
    an exported model directory itself. The run directory is where results go and where search_job.yaml (the
    held-out split's recipe) is looked for: for <run>/export/<format>/ it is <run>."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run={path}: no such directory")
    for fmt in LOADABLE_FORMATS:
        if (path / EXPORT_DIR / fmt / "config.json").is_file():
            return path / EXPORT_DIR / fmt, path
    if (path / "config.json").is_file():
        in_run = path.parent.name == EXPORT_DIR and (path.parents[1] / JOB_FILE).is_file()
        return path, path.parents[1] if in_run else path
    raise FileNotFoundError(
        f"run={path} holds no exported model: no config.json there or in {EXPORT_DIR}/{{{','.join(LOADABLE_FORMATS)}}}/"
        " (a run searched with export.formats=[] has none: python -m allocator export run=<dir>; a gguf export is "
        "evaluated with llama.cpp)"
    )


def load_exported(model_dir: Path, trust_remote_code: bool = False) -> tuple[nn.Module, object, Plan | None]:
    """(model in eval mode, tokenizer, plan or None) of an exported model directory: a native export (per-layer
    widths) through allocator.model.runtime.load_pruned, one in the original architecture through transformers."""
    from allocator.model.runtime import load_pruned
    from allocator.model.surgery import WIDTHS_KEY

    config = json.loads((model_dir / "config.json").read_text())
    if WIDTHS_KEY in config:
        return load_pruned(model_dir)
    if "auto_map" in config and not trust_remote_code:
        raise UserInputError(f"{model_dir} ships its own modeling code (config.json auto_map); evaluating it runs that "
                             "code: pass trust_remote_code=true if you trust it")
    from transformers import AutoModelForCausalLM

    from allocator.model.loader import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    plan = Plan.load(model_dir / PLAN_FILE) if (model_dir / PLAN_FILE).is_file() else None
    return model.eval(), load_tokenizer(model_dir), plan


def _saved_search_job(run_dir: Path) -> dict[str, Any] | None:
    saved = run_dir / JOB_FILE
    return OmegaConf.to_container(OmegaConf.load(saved), resolve=True) if saved.is_file() else None


# --- lm-eval tasks --------------------------------------------------------------------------------------------------


@dataclass
class TaskSelection:
    specs: list[str]  # what lm-eval loads: registered names and task YAML paths
    include_path: list[str] = field(default_factory=list)


def resolve_tasks(tasks: list[str], include_path: list[str]):
    """(TaskSelection, lm-eval TaskManager): each entry of `tasks` a registered name (lm-eval's own tasks and those
    of `include_path`), a task YAML file, or a directory of task YAMLs (every task in it). Checked before any model
    loads; an unknown name fails in one line with the closest names."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserInputError("tasks need lm-evaluation-harness: pip install 'sparsity-allocator[eval]' "
                             "(perplexity alone does not)") from None
    for d in include_path:
        if not Path(d).is_dir():
            raise UserInputError(f"include_path={d!r} is not a directory of task YAMLs")
    dirs = [t for t in tasks if Path(t).is_dir()]
    manager = TaskManager(include_path=[*include_path, *dirs] or None)
    specs: list[str] = []
    for task in tasks:
        path = Path(task)
        if path.is_dir():
            found = TaskManager(include_path=task, include_defaults=False).all_subtasks
            if not found:
                raise UserInputError(f"tasks: directory {task!r} defines no lm-eval task (no task YAML in it)")
            specs += found
        elif path.suffix in TASK_SUFFIXES and path.is_file():
            specs.append(str(path))
        elif task in manager.all_tasks:
            specs.append(task)
        else:
            close = difflib.get_close_matches(task, manager.all_tasks, n=3)
            hint = f"; close: {', '.join(close)}" if close else ""
            raise UserInputError(
                f"tasks: {task!r} is not an lm-eval task name (of {len(manager.all_tasks)} known), a task YAML file "
                f"or a directory of them{hint}"
            )
    return TaskSelection(specs, [*include_path, *dirs]), manager


def run_lm_eval(model: nn.Module, tokenizer, selection: TaskSelection, manager, cfg: EvaluateJob) -> dict:
    """{task: {"metrics": {metric: value}, "samples": n, "version": v}} for one model through HFLM."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from allocator.model.byte_tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):  # tiny test models: HFLM takes only transformers tokenizers
        tokenizer = tokenizer.to_transformers()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    out = simple_evaluate(model=lm, tasks=selection.specs, task_manager=manager, limit=cfg.limit,
                          num_fewshot=cfg.num_fewshot, log_samples=False)
    samples = out.get("n-samples", {})
    return {
        name: {
            "metrics": {k: v for k, v in metrics.items() if "," in k},  # "<metric>,<filter>": values only
            "samples": samples.get(name, {}).get("effective"),
            "version": out.get("versions", {}).get(name),
        }
        for name, metrics in out["results"].items()
    }


# --- the job --------------------------------------------------------------------------------------------------------


def validate_evaluate_job(cfg: EvaluateJob) -> None:
    if cfg.batch_size < 1:
        raise UserInputError(f"batch_size={cfg.batch_size} must be >= 1")
    if cfg.limit is not None and cfg.limit < 1:
        raise UserInputError(f"limit={cfg.limit} must be >= 1 (examples per task), or unset for all")
    if cfg.data.seq_len is not None and cfg.data.seq_len < 2:
        raise UserInputError(f"data.seq_len={cfg.data.seq_len} must be >= 2 (a block predicts all but its first token)")
    if cfg.data.seq_len is not None and cfg.data.path is None:
        raise UserInputError("data.seq_len applies to data=<path> text; the default held-out split keeps the run's "
                             "data.seq_len")
    if not cfg.perplexity and not cfg.tasks:
        raise UserInputError("nothing to evaluate: perplexity=false and no tasks")
    resolve_device(cfg.device)  # the search job's resolver: the same names, the same one-line errors
    if cfg.data.path is not None and not Path(cfg.data.path).exists():
        raise FileNotFoundError(f"data={cfg.data.path}: no such file or directory")


@dataclass
class PerplexityText:
    blocks: torch.Tensor  # (n, seq_len) int64
    source: str  # in words, for the results


def perplexity_text(cfg: EvaluateJob, tokenizer, saved_job: dict | None) -> PerplexityText:
    """`data=` text used whole, else the run's held-out split rebuilt from its search_job.yaml (the same blocks the
    search scored the plan's perplexities on)."""
    run_data = DataConfig()
    if saved_job is not None and "data" in saved_job:
        run_data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), saved_job["data"]))
    if cfg.data.path is not None:
        seq_len = cfg.data.seq_len or run_data.seq_len
        return PerplexityText(text_blocks([cfg.data.path], tokenizer, seq_len), f"{cfg.data.path} (whole text)")
    if saved_job is None:
        raise UserInputError(f"run={cfg.run}: no {JOB_FILE} to rebuild the run's held-out split from; pass "
                             "data=<text file or dir>, or perplexity=false")
    heldout = build_calibration_data(run_data, tokenizer).heldout
    names = run_data.name if run_data.name != "files" else f"files {list(run_data.paths)}"
    return PerplexityText(heldout, f"held-out split of the run's data ({names})")


def evaluate_model(model: nn.Module, tokenizer, text: PerplexityText | None, selection: TaskSelection | None,
                   manager, cfg: EvaluateJob) -> dict:
    model = model.to(resolve_device(cfg.device))
    result: dict[str, Any] = {}
    if text is not None:
        result["perplexity"] = perplexity(model, text.blocks, cfg.batch_size)  # moved to the model's device there
    if selection is not None:
        result["tasks"] = run_lm_eval(model, tokenizer, selection, manager, cfg)
    return result


def _results_path(run_dir: Path) -> Path:
    """<run>/evaluate/<UTC timestamp>.json, reserved by creating it (a second evaluation started in the same second
    gets -2): the atomic write then replaces the empty file."""
    out = run_dir / RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d_%H-%M-%S")
    n = 1
    while True:
        path = out / (f"{stamp}.json" if n == 1 else f"{stamp}-{n}.json")
        try:
            path.open("x").close()
            return path
        except FileExistsError:
            n += 1


def _environment(cfg: EvaluateJob) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    import transformers

    try:
        lm_eval = version("lm_eval")
    except PackageNotFoundError:  # perplexity alone runs without it
        lm_eval = None

    resolved = resolve_device(cfg.device)
    if resolved.type == "cuda":
        device = torch.cuda.get_device_name(resolved)
    else:
        device = platform.processor() or platform.machine()
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "lm_eval": lm_eval, "device": cfg.device, "device_name": device}


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "-" if value is None else str(value)


def results_table(models: dict[str, dict]) -> list[str]:
    """Rows: perplexity, then each task's metrics (standard errors stay in the JSON); a column per model."""
    names = list(models)
    rows: list[tuple[str, list[Any]]] = []
    if any("perplexity" in m for m in models.values()):
        rows.append(("perplexity", [models[n].get("perplexity") for n in names]))
    tasks = next((m["tasks"] for m in models.values() if "tasks" in m), {})
    for task, entry in tasks.items():
        for metric in entry["metrics"]:
            if "_stderr" not in metric:
                label = f"{task} {metric.removesuffix(',none')}"
                values = [models[n].get("tasks", {}).get(task, {}).get("metrics", {}).get(metric) for n in names]
                rows.append((label, values))
    width = max((len(label) for label, _ in rows), default=0)
    lines = [f"{'':{width}}  " + "  ".join(f"{n:>10}" for n in names)]
    lines += [f"{label:{width}}  " + "  ".join(f"{_fmt(v):>10}" for v in values) for label, values in rows]
    return lines


def run_evaluate(cfg: EvaluateJob) -> Path:
    """Evaluate the exported model (and the dense one), write <run>/evaluate/<timestamp>.json, print a table."""
    validate_evaluate_job(cfg)
    model_dir, run_dir = find_model_dir(cfg.run)
    selection, manager = resolve_tasks(cfg.tasks, cfg.include_path) if cfg.tasks else (None, None)
    saved_job = _saved_search_job(run_dir)
    model, tokenizer, plan = load_exported(model_dir, cfg.trust_remote_code)
    if plan is None and (run_dir / PLAN_FILE).is_file():
        plan = Plan.load(run_dir / PLAN_FILE)
    text = perplexity_text(cfg, tokenizer, saved_job) if cfg.perplexity else None
    models = {"pruned": {"source": str(model_dir), **evaluate_model(model, tokenizer, text, selection, manager, cfg)}}
    del model
    notes = []
    if cfg.dense and plan is None:
        notes.append("dense model not evaluated: the export has no plan.json naming it")
    elif cfg.dense:
        from allocator.model.loader import load_model

        cache_dir = cfg.cache_dir or (saved_job or {}).get("cache_dir") or "runs/cache"
        dense = load_model(plan.model_spec, cache_dir)
        models["dense"] = {"source": plan.model_spec.name,
                           **evaluate_model(dense.model, dense.tokenizer, text, selection, manager, cfg)}
    result = {
        "version": RESULTS_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "run": str(run_dir),
        "model_dir": str(model_dir),
        "settings": {k: v for k, v in OmegaConf.to_container(OmegaConf.structured(cfg)).items() if k != "run"},
        "perplexity_text": None if text is None else {
            "source": text.source, "sequences": text.blocks.shape[0], "seq_len": text.blocks.shape[1],
            "tokens": text.blocks.numel()},
        "tasks": None if selection is None else selection.specs,
        "models": models,
        # the search's own held-out perplexities, for comparison with the default text
        "plan_quality": None if plan is None else {"ppl_dense": plan.quality.ppl_dense,
                                                   "ppl_pruned": plan.quality.ppl_pruned},
        "notes": notes,
        "environment": _environment(cfg),
    }
    path = _results_path(run_dir)
    write_json_atomic(path, result)
    if text is not None:
        print(f"perplexity on {text.source}: {text.blocks.shape[0]} blocks x {text.blocks.shape[1]} tokens")
    print("\n".join([*results_table(models), *notes, f"results: {path}"]))
    return path
