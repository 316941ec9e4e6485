"""`python -m allocator export run=<search run> [budget.latency_ms=...]`: latency-target export from a past run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from omegaconf import OmegaConf

from allocator.config import BudgetConfig, ExportJob, SearchJob
from allocator.search_job import JOB_FILE, run_search


def load_search_job(run: Path) -> SearchJob:
    saved = run / JOB_FILE
    if not saved.is_file():
        raise FileNotFoundError(f"run={run} is not a search run directory: {saved} is missing")
    merged = OmegaConf.merge(OmegaConf.structured(SearchJob), OmegaConf.load(saved))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def run_export(cfg: ExportJob, out_dir: Path) -> dict:
    job = load_search_job(Path(cfg.run))
    budget: BudgetConfig = job.budget
    if cfg.budget.speedup is not None or cfg.budget.latency_ms is not None:
        budget = replace(budget, speedup=cfg.budget.speedup, latency_ms=cfg.budget.latency_ms)
    if cfg.budget.regime is not None:
        budget = replace(budget, regime=cfg.budget.regime)
    job = replace(job, budget=budget, export=True, verify=cfg.verify)
    return run_search(job, out_dir)
