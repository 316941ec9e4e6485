"""Typed configs of every stage (plain dataclasses, no Hydra): the app registers them in Hydra's ConfigStore, and
every layer reads them. A default states its reason where it has one."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Optional

from allocator.core.errors import UserInputError


class SpaceKind(StrEnum):
    """Which options a unit has (see SpaceConfig.kind)."""

    structured = "structured"
    unstructured = "unstructured"
    nm = "nm"
    mixed = "mixed"


class Runtime(StrEnum):
    """The engine the pruned model is served with (see SpaceConfig.runtime and the README's table per engine)."""

    native = "native"  # this project's loader and Triton runtime: every option, sparse ones compressed
    vllm = "vllm"  # vLLM's nemotron_nas (DeciLM block_configs)
    llamacpp = "llamacpp"  # llama.cpp's GGUF `deci` architecture


class PrunerName(StrEnum):
    """How a sparse option's mask (and weights) are chosen."""

    sparsegpt = "sparsegpt"
    wanda = "wanda"
    magnitude = "magnitude"


class UnstructuredFormat(StrEnum):
    """Kernel format unstructured sparse units are exported in (see SpaceConfig.unstructured_format)."""

    auto = "auto"
    bitmap = "bitmap"
    csr8 = "csr8"


class ErrorMetric(StrEnum):
    """Which per-level error the searchers add up (see SpaceConfig.error_metric)."""

    fisher = "fisher"
    relative = "relative"
    absolute = "absolute"


def check_choice(key: str, value: object, choices: type[StrEnum]) -> None:
    """Raise UserInputError unless `value` is one of the enum's values. Hydra rejects a bad value of a typed field at
    compose time; this covers configs built in Python."""
    if value not in set(choices):
        raise UserInputError(f"{key}={value!r} is unknown; valid: {', '.join(choices)}")


@dataclass
class ModelConfig:
    # "smollm2-135m" (embedded GGUF), "tiny-llama" (random, for tests), a local directory or a Hugging Face id.
    name: str = "smollm2-135m"
    dtype: str = "float32"
    # Shape of the random "tiny-llama" model (ignored for real models).
    tiny_layers: int = 2
    tiny_hidden: int = 64
    tiny_heads: int = 4
    tiny_kv_heads: int = 2
    tiny_intermediate: int = 128
    seed: int = 0


@dataclass
class SpaceConfig:
    # "structured": KV groups and neurons kept (structured OBS); "unstructured": every linear of a unit pruned to one
    # of `sparsities`; "nm": to one of `nm_patterns`; "mixed": all of those plus block sparsity (`block_sparsities`).
    kind: SpaceKind = SpaceKind.structured
    # Sparse options: fractions of a unit's weights removed, N:M patterns, block shape and block fractions.
    sparsities: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    nm_patterns: list[str] = field(default_factory=lambda: ["2:4", "4:8"])
    block: list[int] = field(default_factory=lambda: [16, 16])
    block_sparsities: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    # Pruner of the sparse options: "sparsegpt" (OBS reconstruction), "wanda" or "magnitude".
    pruner: PrunerName = PrunerName.sparsegpt
    # MLP widths kept in steps of this many neurons; must be a multiple of width_multiple.
    mlp_step: int = 128
    width_multiple: int = 8
    # Allow k = 0 (the whole attention or MLP block is dropped).
    allow_drop: bool = True
    # OBS dampening, relative to the mean Hessian diagonal.
    damp: float = 0.01
    # Which layer error the searchers add up: "fisher" (loss-aware, comparable across layers), "relative"
    # (||ΔWX||²/||WX||²) or "absolute" (||ΔWX||²).
    error_metric: ErrorMetric = ErrorMetric.fisher
    # Calibration sequences used for the output Fisher (gradients: costlier than the Hessian forward pass).
    fisher_sequences: int = 16
    # Kernel format of unstructured sparse units: "bitmap", "csr8" (per-value decode work, fast at small batch,
    # slow at prefill), or "auto": chosen once for budget.regime, the one the roofline prices cheaper on the profile's
    # device (allocator.core.formats.resolve_unstructured_format).
    unstructured_format: UnstructuredFormat = UnstructuredFormat.auto
    # The engine the plan is for: only options it runs at full benefit, each priced at the shape it runs.
    # "native": every option (this project's runtime); "vllm": structured, attention KV groups dividing the query
    # heads (queries stay all heads, zero-padded); "llamacpp": structured, a dropped MLP beside a kept attention
    # priced as a zero MLP of the smallest width (allocator/core/space.py run_shape).
    runtime: Runtime = Runtime.native


@dataclass
class ProfileConfig:
    name: str = "cpu"
    # Timed rounds (one call of every variant each) and discarded warm-up rounds per regime.
    repeats: int = 7
    warmup: int = 2
    # End-to-end verification: dense and pruned timed alternately this many rounds.
    verify_repeats: int = 15
    decode_batches: list[int] = field(default_factory=lambda: [1, 16])
    decode_context: int = 512
    prefill_batch: int = 1
    prefill_length: int = 512
    threads: int = 0  # 0: torch's default
    # GPU profiles (profilers/gpu.py) also measure decode at these batches (cheap there); with decode_batches above.
    gpu_decode_batches: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    # Weight copies a GPU step rotates through so each replay reads from memory, not L2; 0: from the L2 size.
    l2_rotations: int = 0
    # Measure again even when a table for this device fingerprint exists.
    refresh: bool = False
    # CPU tables: a regime measured while the machine was busy or unstable (profilers/stability.py) is measured
    # again this many times, then refused with the reason; allow_unstable keeps it instead, marked unstable.
    retries: int = 1
    allow_unstable: bool = False
    # Before each attempt, wait up to this long for other processes to leave the cores quiet (runs started together
    # on one cache: the others finish starting up and wait idle on the table's lock within seconds).
    quiet_wait_s: float = 60.0


@dataclass
class BudgetConfig:
    # Exactly one of speedup / latency_ms (in the regime below) / sparsity (share of the decoder layers' linear
    # weights removed, EvoPress's setting; exact, no headroom).
    speedup: Optional[float] = 1.5
    latency_ms: Optional[float] = None
    sparsity: Optional[float] = None
    # Memory (GB = 1e9 bytes): weights plus the KV cache of memory_batch sequences of memory_context tokens. Alone,
    # or as a second limit beside one of the targets above.
    memory_gb: Optional[float] = None
    memory_batch: int = 1
    memory_context: int = 2048
    regime: str = "prefill"
    # Plan this much faster than asked (0.05 = 5%): CPU timings drift by several percent between the profile and
    # the verification, and a plan exactly at the target misses it about half the time. Verification compares
    # the measurement with the target as asked.
    headroom: float = 0.05


@dataclass
class FitnessConfig:
    # Calibration-side sequences, after the data.calib_sequences the level database is built on (unseen by the
    # reconstruction), whose dense log-probabilities are cached for scoring candidates by KL to dense; an
    # evaluation on t tokens uses the first ceil(t / data.seq_len) of them.
    sequences: int = 16
    batch_size: int = 4
    # Built unit modules the fitness engine keeps, in GB (1e9 bytes) of their own tensors, least recently used out
    # first; one that fell out is rebuilt from its level file when a candidate needs it (same weights, same scores).
    # 8 GB holds every level of SmolLM2-135M in float32 in any space (computed from its shapes: structured 1.9 GB,
    # unstructured 3.8 GB, mixed 7.8 GB), so its searches build each level once, as before the bound; an 8B model's
    # levels (tens of GB) are read back from disk instead. With Ray, each worker has a cache of this size.
    cache_gb: float = 8.0
    # Intra-op threads every scoring forward pass runs on, in this process and in each Ray worker (0: torch's count
    # when the search starts). A matmul's sums depend on the thread count, so serial and Ray runs of one search
    # score bit-equal only on the same count: with workers=N on C cores, set C/N here and in the serial run.
    threads: int = 0


@dataclass
class RayConfig:
    # An existing Ray cluster ("auto" on one of its nodes, or host:6379 as `ray start --head` prints it); empty =
    # start a local cluster on this machine for `workers`.
    address: str = ""
    # What each worker reserves: one CPU process here; `ray.num_gpus=1` gives each worker one GPU of the cluster.
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class ScoreConfig:
    # Calibration sequences used for the KL score (subset of data.calib_sequences).
    kl_sequences: int = 8
    batch_size: int = 4


@dataclass
class DataConfig:
    # "python-docs": embedded corpus (no paths); "files": the text files / directories in `paths`.
    name: str = "python-docs"
    # Files, or directories searched recursively for *.txt and *.md (sorted, so the order is reproducible).
    paths: list[str] = field(default_factory=list)
    seq_len: int = 256
    calib_sequences: int = 32
    eval_sequences: int = 16
    # Share of documents (by content hash) held out for evaluation.
    heldout_fraction: float = 0.2


@dataclass
class ExportConfig:
    # Formats written, each to <run>/export/<format>/ (allocator/model/engines): "native" (this project's loader,
    # sparse units compressed), "dense" (plain transformers, original shapes, pruned rows zeroed), "decilm"
    # (Nemotron-NAS per-layer widths: transformers with trust_remote_code, vLLM), "gguf" (llama.cpp). The default is
    # native alone: the one verify measures, and the cheapest to write; [] exports nothing.
    formats: list[str] = field(default_factory=lambda: ["native"])
