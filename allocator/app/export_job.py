"""`python -m allocator export run=<search run> [budget.latency_ms=...] [export.formats=[native,dense,decilm]]`: the
allocation solved again for a new target from a past run's caches, exported in the formats asked (default: the
run's own)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from omegaconf import OmegaConf

from allocator.app.config import ExportJob, SearchJob
from allocator.app.search_job import JOB_FILE, run_search
from allocator.core.config import BudgetConfig, ExportConfig
from allocator.core.plan import Plan
from search import SEARCHERS


def load_search_job(run: Path) -> SearchJob:
    saved = run / JOB_FILE
    if not saved.is_file():
        raise FileNotFoundError(f"run={run} is not a search run directory: {saved} is missing")
    saved_cfg = OmegaConf.load(saved)
    if isinstance(saved_cfg.get("export"), bool):  # runs from before export.formats: export=true wrote the native one
        saved_cfg.export = {"formats": ["native"] if saved_cfg.export else []}
    # The searcher section has that searcher's own schema: start from it so its options merge and stay typed.
    searcher_schema = SEARCHERS.get(saved_cfg.searcher.name).Config()
    merged = OmegaConf.merge(OmegaConf.structured(SearchJob(searcher=searcher_schema)), saved_cfg)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def run_export(cfg: ExportJob, out_dir: Path) -> Plan:
    job = load_search_job(Path(cfg.run))
    budget: BudgetConfig = job.budget
    targets = {"speedup": cfg.budget.speedup, "latency_ms": cfg.budget.latency_ms, "sparsity": cfg.budget.sparsity}
    if any(v is not None for v in targets.values()):
        budget = replace(budget, **targets)
    if cfg.budget.regime is not None:
        budget = replace(budget, regime=cfg.budget.regime)
    formats = cfg.export.formats if cfg.export.formats is not None else job.export.formats or ["native"]
    job = replace(job, budget=budget, export=ExportConfig(formats=list(formats)), verify=cfg.verify)
    return run_search(job, out_dir)
