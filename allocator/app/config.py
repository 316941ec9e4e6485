"""The jobs' Hydra schemas, registered in the ConfigStore (with every group schema from allocator.core.config and
each searcher's own config) so a typo or a wrong type fails at compose time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from allocator.core.config import (
    BudgetConfig,
    DataConfig,
    ExportConfig,
    FitnessConfig,
    ModelConfig,
    ProfileConfig,
    RayConfig,
    ScoreConfig,
    SpaceConfig,
)
from allocator.core.device import DEFAULT_DEVICE
from search import SEARCHERS, SearcherConfig


@dataclass
class SearchJob:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    searcher: SearcherConfig = field(default_factory=SearcherConfig)
    fitness: FitnessConfig = field(default_factory=FitnessConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    cache_dir: str = "runs/cache"
    # Where the level database is built and candidates are scored: cpu, cuda, cuda:N or auto (allocator/core/device.py;
    # default cpu, so results do not depend on the machine a run lands on).
    device: str = DEFAULT_DEVICE
    # How a model is placed on a CUDA device (allocator/model/placement.py): auto (one GPU when the weights fit 85%
    # of its free memory, else inference passes spread with accelerate over the GPUs, then CPU, then disk), single
    # (always one GPU) or dispatch (always spread). Ignored on the CPU.
    device_map: str = "auto"
    # Each format to <run>/export/<format>/ (default [native]; [] exports nothing and verifies nothing).
    export: ExportConfig = field(default_factory=ExportConfig)
    verify: bool = True  # measure the native export against the dense model (needs native among export.formats)
    seed: int = 0
    # Ray workers that build the level database's units and score a fitness-driven searcher's candidates in
    # parallel (0 or 1: in this process); the same database, and the same seed finds exactly what the serial search
    # finds. With ray.address set and workers=0: one per worker's worth of the cluster's CPUs (GPUs with
    # ray.num_gpus).
    workers: int = 0
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class ProfileJob:
    model: ModelConfig = field(default_factory=ModelConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    cache_dir: str = "runs/cache"


@dataclass
class ExportBudget:
    # Unset fields keep the source run's budget; setting one of speedup / latency_ms / sparsity replaces the target.
    speedup: Optional[float] = None
    latency_ms: Optional[float] = None
    sparsity: Optional[float] = None
    regime: Optional[str] = None


@dataclass
class ExportFormats:
    # None: the formats the source run exported ([native] if it exported none).
    formats: Optional[list[str]] = None


@dataclass
class ExportJob:
    # A search run directory (runs/search/<timestamp>): its model, data, space, profile and searcher are reused
    # (all cached), the allocation is solved again for this budget, and the pruned model is exported and verified.
    run: str = MISSING
    budget: ExportBudget = field(default_factory=ExportBudget)
    export: ExportFormats = field(default_factory=ExportFormats)
    verify: bool = True


@dataclass
class VerifyJob:
    # A search run directory (its export/native/ is measured) or a native export directory.
    run: str = MISSING
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    regime: Optional[str] = None  # default: the regime of the plan's budget
    cache_dir: str = "runs/cache"


@dataclass
class EvaluateText:
    # Perplexity text: a text file or a directory of *.txt / *.md, used whole (`data=<path>` on the command line).
    # Default: the run's held-out split.
    path: Optional[str] = None
    seq_len: Optional[int] = None  # tokens per block (default: the run's data.seq_len)


@dataclass
class EvaluateJob:
    # A search run directory (its model exported at the top or under export/native/) or an exported model directory.
    run: str = MISSING
    # lm-evaluation-harness tasks: registered names, task YAML files, or directories of task YAMLs (all their tasks).
    tasks: list[str] = field(default_factory=list)
    # Directories of task YAMLs whose task names `tasks` may use (lm-eval's --include_path).
    include_path: list[str] = field(default_factory=list)
    data: EvaluateText = field(default_factory=EvaluateText)
    perplexity: bool = True
    limit: Optional[int] = None  # examples per lm-eval task (default: all)
    num_fewshot: Optional[int] = None  # default: each task's own
    batch_size: int = 8
    dense: bool = True  # also evaluate the dense model the plan was made from, for comparison
    device: str = "cpu"
    # Models exported in the original architecture that ship their own modeling code (export format decilm).
    trust_remote_code: bool = False
    cache_dir: Optional[str] = None  # where the dense model is cached (default: the run's cache_dir)


GROUP_SCHEMAS: dict[str, Any] = {
    "model": ModelConfig,
    "data": DataConfig,
    "space": SpaceConfig,
    "profile": ProfileConfig,
    "budget": BudgetConfig,
}
JOB_SCHEMAS: dict[str, Any] = {
    "search": SearchJob,
    "profile": ProfileJob,
    "export": ExportJob,
    "verify": VerifyJob,
    "evaluate": EvaluateJob,
}


def register_configs() -> None:
    cs = ConfigStore.instance()
    for command, schema in JOB_SCHEMAS.items():
        cs.store(name=f"{command}_schema", node=schema)
    # Group schemas live in their own "schema" group (YAMLs extend them with `/schema/<group>@_here_`), so they
    # are not listed as choices when Hydra names the options of a group.
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group="schema", name=group, node=schema)
    # One schema per searcher (its own options on top of SearcherConfig): conf/searcher/<name>.yaml extends it.
    for name in SEARCHERS:
        cs.store(group="schema/searcher", name=name, node=SEARCHERS.get(name).Config)
