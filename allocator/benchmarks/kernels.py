"""GPU benchmark of the sparse-format kernels against cuBLAS dense and torch's own 2:4 semi-structured matmul.

Kernels, all bf16 (the precision the latency tables and the roofline price), y = x W^T for x (M, K) and W (N, K):
- cublas-dense: F.linear on the pruned weight stored dense (the baseline every speedup is relative to);
- torch-2:4-cusparselt / torch-2:4-cutlass: torch.sparse.to_sparse_semi_structured (sparse tensor cores), 50 % only;
- triton-nm-2:4 (kernels.nm), triton-bitmap (kernels.bitmap), triton-csr8 (kernels.csr8: unstructured, per-stored-value
  decode kernel), triton-bsr-16x16 / -32x32 (kernels.bsr);
on Llama-3-8B's (4096x4096, 14336x4096, 4096x14336) and SmolLM2-135M's (576x576, 1536x576, 576x1536) weight
shapes, M = 1 .. 1024, 50 / 70 / 90 % sparsity. Unsupported combinations are recorded with their reason.

Timing: each variant's call is captured in a CUDA graph over enough copies of its weight that the copies exceed
2x L2 (a deployed model is far larger than L2; one small weight replayed alone would be served from it), the
replay timed with CUDA events and divided by the copies. Variants of one (shape, M) are sampled in a fresh seeded
order each round, so drift hits all alike; speedups are medians of per-round ratios to cuBLAS.

Roofline model (`roofline_ideal_speedup`): in the memory-bound regime (small M) a linear costs its bytes over the
memory bandwidth, so the ideal speedup of a format is (dense weight bytes + activation bytes) / (format `nbytes` +
activation bytes), activations being x read and y written once in bf16. `fraction_of_ideal` = measured speedup /
ideal. It only bounds kernels that are memory bound: `dense_memory_bound` says whether dense cuBLAS is, on a GPU
whose datasheet numbers profilers.devices knows. Where it is compute bound, formats that expand to dense tiles
(bitmap, N:M, BSR) can at best match dense, and only the 2:4 sparse tensor cores can beat it.

--quick: two shapes, M 1/16/256, 10 repeats, and N:M / BSR at one fixed config per M (the first autotune candidate)
instead of autotuning every shape and M; sized for a few minutes of one GPU (not yet timed on one).
The CUTLASS 2:4 path is skipped, with its reason, off SM 8.x.

python -m allocator.benchmarks.kernels [--quick]  →  runs/bench/kernels/<gpu-name>[-quick].json and .png
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F

from allocator.benchmarks.common import environment, spread, write_result
from allocator.core.errors import UserInputError
from allocator.core.patterns import SparsityPattern, magnitude_prune
from kernels.errors import UnsupportedShape
from profilers.timing import interleaved_schedule

DTYPE = torch.bfloat16
ELEMENT_BYTES = DTYPE.itemsize
SHAPES: dict[str, tuple[int, int]] = {  # (N, K) = (out_features, in_features)
    "llama3-8b attn q/o": (4096, 4096),
    "llama3-8b mlp gate/up": (14336, 4096),
    "llama3-8b mlp down": (4096, 14336),
    "smollm2-135m attn q/o": (576, 576),
    "smollm2-135m mlp gate/up": (1536, 576),
    "smollm2-135m mlp down": (576, 1536),
}
MS = (1, 4, 16, 64, 256, 1024)
SPARSITIES = (0.5, 0.7, 0.9)
PLOT_SHAPE = (4096, 14336)
QUICK_SHAPES = ("llama3-8b mlp down", "smollm2-135m mlp down")
QUICK_MS = (1, 16, 256)
BSR_BLOCKS = ((16, 16), (32, 32))
MAX_COPIES = 1024  # bounds capture time for tiny compressed weights
WARMUP_CALLS = 3  # eager calls before capture: autotuning, lazy cuBLAS/cuSPARSELt initialisation
TOLERANCE = 2e-2  # max |y - y_dense| relative to max |y_dense|: bf16 outputs (8-bit mantissa), different summation orders
BASELINE = "cublas-dense"


@dataclass(frozen=True)
class Spec:
    kernel: str  # name in the results
    fmt: str  # "dense", "2:4", "bitmap", "csr8", "bsr"
    sparsity: float
    block: tuple[int, int] | None = None  # bsr only

    @property
    def label(self) -> str:
        return self.kernel if self.fmt in ("dense", "2:4") else f"{self.kernel} {round(self.sparsity * 100)}%"

    @property
    def pattern(self) -> SparsityPattern | None:
        """The sparsity pattern the weight is pruned to (None: the dense baseline)."""
        if self.fmt == "dense":
            return None
        if self.fmt == "2:4":
            return SparsityPattern("nm", n=2, m=4)
        if self.fmt == "bsr":
            assert self.block is not None
            return SparsityPattern("block", self.sparsity, block=self.block)
        return SparsityPattern("unstructured", self.sparsity)


@dataclass(frozen=True)
class Settings:
    quick: bool
    shapes: dict[str, tuple[int, int]]
    ms: tuple[int, ...]
    sparsities: tuple[float, ...]
    repeats: int
    warmup_rounds: int
    # N:M and BSR at one fixed config per M (the first the CUDA autotuner would time) instead of autotuning at every
    # shape and M, which takes most of a short device budget; their times are then those of that config, not of the
    # autotuned best.
    fixed_configs: bool = False


# ---- pure helpers (tested without a GPU) ----

def settings(quick: bool) -> Settings:
    if quick:
        return Settings(True, {k: SHAPES[k] for k in QUICK_SHAPES}, QUICK_MS, SPARSITIES, repeats=10, warmup_rounds=2,
                        fixed_configs=True)
    return Settings(False, dict(SHAPES), MS, SPARSITIES, repeats=50, warmup_rounds=5)


def variant_specs(sparsities: tuple[float, ...]) -> list[Spec]:
    """The baseline first, then every kernel at every sparsity it supports (2:4 formats only at 50 %)."""
    specs = [Spec(BASELINE, "dense", 0.0)]
    if 0.5 in sparsities:
        specs += [Spec("torch-2:4-cusparselt", "2:4", 0.5), Spec("torch-2:4-cutlass", "2:4", 0.5),
                  Spec("triton-nm-2:4", "2:4", 0.5)]
    for s in sparsities:
        specs += [Spec("triton-bitmap", "bitmap", s), Spec("triton-csr8", "csr8", s)]
        specs += [Spec(f"triton-bsr-{b[0]}x{b[1]}", "bsr", s, b) for b in BSR_BLOCKS]
    return specs


def roofline_ideal_speedup(dense_bytes: float, sparse_bytes: float, activation_bytes: float = 0.0) -> float:
    """Speedup over dense when both read their weights (and the same activations) at full memory bandwidth."""
    if dense_bytes <= 0 or sparse_bytes <= 0 or activation_bytes < 0:
        raise ValueError(f"bytes must be positive (dense={dense_bytes}, sparse={sparse_bytes}) and "
                         f"activation_bytes={activation_bytes} >= 0")
    return (dense_bytes + activation_bytes) / (sparse_bytes + activation_bytes)


def activation_bytes(m: int, n: int, k: int) -> int:
    return ELEMENT_BYTES * m * (k + n)


def dense_memory_bound(m: int, n: int, k: int, bandwidth: float | None, flops: float | None) -> bool | None:
    """Whether dense x W^T takes longer to move its bytes than to do its FLOPs (None: device numbers unknown)."""
    if not bandwidth or not flops:
        return None
    nbytes = ELEMENT_BYTES * n * k + activation_bytes(m, n, k)
    return nbytes / bandwidth >= 2.0 * m * n * k / flops


def summarise(samples: list[float]) -> dict:
    """Median and nearest-rank p10/p90 (common.spread) without the raw samples, which would bloat the JSON."""
    if not samples:
        raise ValueError("no samples to summarise")
    out = spread(samples)
    out.pop("samples")
    return out


def paired_speedup(baseline_us: list[float], variant_us: list[float]) -> dict:
    """Per-round baseline/variant ratios, summarised: samples of one round share the GPU's momentary state."""
    if len(baseline_us) != len(variant_us) or not baseline_us:
        raise ValueError(f"need equally many rounds, got {len(baseline_us)} and {len(variant_us)}")
    return summarise([b / v for b, v in zip(baseline_us, variant_us)])


def result_name(gpu_name: str, quick: bool) -> str:
    """File stem for a GPU: its name with runs of anything but letters, digits, '.', '-' turned into '_'."""
    stem = re.sub(r"[^A-Za-z0-9.-]+", "_", gpu_name).strip("_") or "unknown-gpu"
    return f"{stem}-quick" if quick else stem


# ---- pruning: weights with each format's pattern at an exact sparsity (pure torch, any device) ----

def pruned_weight(base: torch.Tensor, spec: Spec) -> torch.Tensor:
    """`base` pruned to the spec's pattern by magnitude with the mask selection every pruner and the export use
    (allocator.core.patterns.select_mask): unstructured per row, N:M per group, blocks over the whole weight (so
    block-rows end up uneven, as in a pruned model)."""
    return base if spec.pattern is None else magnitude_prune(base, spec.pattern)


# ---- building the variants (CUDA) ----

@dataclass
class Variant:
    spec: Spec
    dense: torch.Tensor  # the pruned weight, dense: what the kernel must reproduce
    call: Callable[[torch.Tensor, object], torch.Tensor]  # (x, weight copy) -> y
    copies: list[object]  # the weight (compressed or not) several times over, for L2 rotation
    nbytes: int  # of one copy


def _kernel_module(name: str) -> ModuleType:
    """Imported only when used, so a missing format module costs its variants, not the benchmark."""
    return importlib.import_module(f"kernels.{name}")


def _export_format(spec: Spec) -> tuple[str, dict]:
    """(kernel format, compress parameters) the export stores the spec's pattern in (allocator.core.formats), or
    csr8, the alternative format for unstructured patterns."""
    from allocator.core.formats import export_format  # loads the kernels: only when a variant is built

    assert spec.pattern is not None
    return export_format(spec.pattern, "csr8" if spec.fmt == "csr8" else None)


def _clone(w: object) -> object:
    return type(w).from_tensors({k: v.clone() for k, v in w.tensors().items()})  # type: ignore[attr-defined]


def fixed_config(fmt: str, params: dict, m: int) -> dict | None:
    """The config a fixed-config run launches N:M or BSR with at m rows of x: the first of the CUDA autotuner's
    candidates (tiles, split, warps, stages); None for bitmap and for N:M at decode (its decode kernel, or at 5-16
    rows the 2:4 pair kernel, which the op runs there, has one fixed launch and no autotuning)."""
    if fmt == "nm":
        nm = _kernel_module("nm")
        n, group = params["n"], params["m"]
        if nm.decodes(m, n, nm.index_bits(group)) or nm.pair_kernel_runs(m, n, group, ELEMENT_BYTES):
            return None
        config = nm.candidate_configs(m, group)[0]
    elif fmt == "bsr":
        config = _kernel_module("bsr").candidate_configs(m, params["block"])[0]
    else:
        return None
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def cutlass_unsupported(capability: tuple[int, int] | None) -> str | None:
    """Why torch's CUTLASS 2:4 path cannot run on a GPU of compute `capability` (None: no GPU), or None. Its
    kernels are built for SM 8.x; off it the call may fail or fault the CUDA context every later variant shares."""
    if capability is None:
        return "no CUDA GPU"
    if capability[0] != 8:
        return f"torch's CUTLASS 2:4 kernels run on SM 8.x only; this GPU is sm_{capability[0]}{capability[1]}"
    return None


def _semi_structured(dense: torch.Tensor, cutlass: bool) -> object:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    if cutlass:
        capability = torch.cuda.get_device_capability(dense.device) if dense.device.type == "cuda" else None
        reason = cutlass_unsupported(capability)
        if reason:
            raise UnsupportedShape(f"skipped: {reason}")
    if not cutlass and not torch.backends.cusparselt.is_available():
        raise RuntimeError("cuSPARSELt is not available in this torch build")
    previous = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass
    try:
        return to_sparse_semi_structured(dense)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = previous


def _semi_structured_nbytes(w: object) -> int:
    """The packed values (with metadata, cuSPARSELt) plus separate metadata (CUTLASS) that a matmul reads."""
    return sum(t.numel() * t.element_size() for t in (getattr(w, "packed", None), getattr(w, "meta", None))
               if t is not None)


def build_variant(spec: Spec, base: torch.Tensor, l2_bytes: int, fixed_configs: bool = False) -> Variant:
    from profilers.gpu_timing import rotation_count

    dense = pruned_weight(base, spec)
    if spec.fmt == "dense":
        call, first = F.linear, dense
        nbytes = dense.numel() * dense.element_size()

        def make() -> object:
            return dense.clone()
    elif spec.kernel.startswith("torch-2:4"):
        cutlass = spec.kernel.endswith("cutlass")
        call, first = F.linear, _semi_structured(dense, cutlass)
        nbytes = _semi_structured_nbytes(first)

        def make() -> object:
            return _semi_structured(dense, cutlass)
    else:
        fmt, params = _export_format(spec)
        module = _kernel_module(fmt)
        first = module.compress(dense, **params)
        call, nbytes = module.triton_matmul, int(first.nbytes)
        if fixed_configs and fmt in ("nm", "bsr"):
            def call(x: torch.Tensor, w: object, module: ModuleType = module, fmt: str = fmt,
                     params: dict = params) -> torch.Tensor:
                config = fixed_config(fmt, params, x.numel() // x.shape[-1])
                return module.triton_matmul(x, w) if config is None else module.triton_matmul(x, w, config=config)

        def make() -> object:
            return _clone(first)
    count = rotation_count(l2_bytes, nbytes, limit=MAX_COPIES)
    return Variant(spec, dense, call, [first] + [make() for _ in range(count - 1)], nbytes)


# ---- timing (CUDA) ----

def make_sampler(calls: list[Callable[[], object]]) -> tuple[Callable[[], float], str, object]:
    """(sample() -> µs per call, timing method, what must stay alive). A CUDA graph over all calls; eager calls
    between CUDA events where capture fails (a kernel that syncs or reads the host)."""
    for _ in range(WARMUP_CALLS):
        calls[0]()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    method = "cuda-graph"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # as CudaTimer: warm the capture stream's allocator and workspaces
            calls[0]()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            for call in calls:
                call()

        def run() -> None:
            graph.replay()
    except Exception as exc:  # capture failed: time the same calls eagerly
        torch.cuda.synchronize()
        method = f"eager ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"

        def run() -> None:
            for call in calls:
                call()
    for _ in range(2):
        run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def sample() -> float:
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / len(calls)

    return sample, method, (graph, calls)


def wall_clock_sampler(calls: list[Callable[[], object]]) -> tuple[Callable[[], float], str, object]:
    """make_sampler's CPU twin (tests, the GPU campaign's --dry-run): µs per call by the wall clock, no graph."""
    def sample() -> float:
        start = time.perf_counter()
        for call in calls:
            call()
        return (time.perf_counter() - start) * 1e6 / len(calls)

    return sample, "wall-clock", calls


def _error(y: torch.Tensor, expect: torch.Tensor) -> float:
    return float((y.float() - expect.float()).abs().max() / expect.float().abs().max().clamp_min(1e-6))


def _row(spec: Spec, name: str, n: int, k: int, m: int, status: str, reason: str | None = None,
         **extra: object) -> dict:
    return {"shape_name": name, "shape": [n, k], "M": m, "kernel": spec.kernel, "format": spec.fmt,
            "sparsity": spec.sparsity, "block": list(spec.block) if spec.block else None, "label": spec.label,
            "status": status, "reason": reason, **extra}


Sampler = Callable[[list[Callable[[], object]]], tuple[Callable[[], float], str, object]]


def bench_shape(name: str, n: int, k: int, cfg: Settings, device_numbers: tuple[float | None, float | None],
                l2_bytes: int, seed: int = 0, device: str = "cuda", sampler: Sampler = make_sampler) -> list[dict]:
    """Rows for every variant and M on one weight shape. `device` and `sampler` are for tests of the bookkeeping
    on CPU (Triton's interpreter, a wall-clock sampler)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    base = (torch.randn(n, k, generator=gen, device=device) * 0.02).to(DTYPE)
    variants: dict[str, Variant] = {}
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    for spec in variant_specs(cfg.sparsities):
        try:
            variants[spec.label] = build_variant(spec, base, l2_bytes, cfg.fixed_configs)
        except Exception as exc:  # an unsupported shape/device/backend is a result, not a crash
            skipped[spec.label] = f"{type(exc).__name__}: {exc}"
    dense_bytes = n * k * ELEMENT_BYTES
    for m in cfg.ms:
        x = torch.randn(m, k, generator=gen, device=device).to(DTYPE)
        samplers: dict[str, tuple[Callable[[], float], str, object]] = {}
        errors: dict[str, float] = {}
        failed = dict(skipped)
        for label, v in variants.items():
            try:
                y = v.call(x, v.copies[0])
                errors[label] = _error(y, F.linear(x, v.dense))
                samplers[label] = sampler([lambda w=w, v=v: v.call(x, w) for w in v.copies])
            except Exception as exc:
                failed[label] = f"{type(exc).__name__}: {exc}"
        samples: dict[str, list[float]] = {label: [] for label in samplers}
        for r, order in enumerate(interleaved_schedule(list(samplers), cfg.warmup_rounds + cfg.repeats, seed=m)):
            for label in order:
                t = samplers[label][0]()
                if r >= cfg.warmup_rounds:
                    samples[label].append(t)
        bandwidth, flops = device_numbers
        bound = dense_memory_bound(m, n, k, bandwidth, flops)
        for spec in variant_specs(cfg.sparsities):
            label = spec.label
            if label not in samples:
                rows.append(_row(spec, name, n, k, m, "skipped", failed.get(label, "not built")))
                continue
            v = variants[label]
            ideal = roofline_ideal_speedup(dense_bytes, v.nbytes, activation_bytes(m, n, k))
            speedup = (paired_speedup(samples[BASELINE], samples[label]) if BASELINE in samples else None)
            rows.append(_row(
                spec, name, n, k, m, "ok" if errors[label] <= TOLERANCE else "wrong-result",
                None if errors[label] <= TOLERANCE else f"max relative error {errors[label]:.3g} > {TOLERANCE}",
                timing=samplers[label][1], copies=len(v.copies), us=summarise(samples[label]),
                speedup_vs_cublas=speedup, weight_bytes=v.nbytes, dense_weight_bytes=dense_bytes,
                ideal_speedup=ideal,
                fraction_of_ideal=speedup["median"] / ideal if speedup else None,
                dense_memory_bound=bound, max_rel_error=errors[label]))
        ok = [r for r in rows if r["M"] == m and r["status"] == "ok" and r["speedup_vs_cublas"]]
        print(f"{name} ({n}x{k}) M={m}: " + ", ".join(
            f"{r['label']} {r['speedup_vs_cublas']['median']:.2f}x" for r in ok if r["kernel"] != BASELINE))
        del samplers, samples
        gc.collect()
        torch.cuda.empty_cache()
    del variants
    gc.collect()
    torch.cuda.empty_cache()
    return rows


# ---- environment, plot, entry point ----

def gpu_environment() -> dict:
    import triton

    from profilers.gpu_timing import driver_version

    props = torch.cuda.get_device_properties(0)
    cusparselt = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
    return {
        **environment(),
        "device": "cuda",
        "gpu": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "sm_count": props.multi_processor_count,
        "l2_bytes": int(props.L2_cache_size),
        "driver": driver_version() or _nvidia_smi_driver(),
        "cuda": torch.version.cuda,
        "cusparselt": cusparselt,
        "triton": triton.__version__,
    }


def _nvidia_smi_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def plot_speedups(rows: list[dict], shape: tuple[int, int], path: Path, title: str) -> Path | None:
    """Median speedup vs M (p10-p90 bars) per kernel and sparsity on one shape; dotted: that variant's ideal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if tuple(r["shape"]) == shape and r["status"] == "ok" and r["speedup_vs_cublas"]
          and r["kernel"] != BASELINE]
    if not ok:
        return None
    fig, ax = plt.subplots(figsize=(9, 5.5))
    labels = list(dict.fromkeys(r["label"] for r in ok))
    colors = plt.get_cmap("tab20")(range(len(labels)))
    for label, color in zip(labels, colors):
        pts = sorted((r for r in ok if r["label"] == label), key=lambda r: r["M"])
        ms = [r["M"] for r in pts]
        med = [r["speedup_vs_cublas"]["median"] for r in pts]
        lo = [r["speedup_vs_cublas"]["median"] - r["speedup_vs_cublas"]["p10"] for r in pts]
        hi = [r["speedup_vs_cublas"]["p90"] - r["speedup_vs_cublas"]["median"] for r in pts]
        ax.errorbar(ms, med, yerr=[lo, hi], marker="o", ms=3, capsize=2, color=color, label=label)
        ax.plot(ms, [r["ideal_speedup"] for r in pts], ls=":", color=color, lw=1)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("M (rows of x: tokens)")
    ax.set_ylabel("speedup vs cuBLAS dense (median, p10-p90)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def main(quick: bool = False) -> dict:
    from profilers.devices import DEVICES
    from profilers.gpu_timing import require_cuda

    require_cuda("the kernel benchmark (python -m allocator.benchmarks.kernels)")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise UserInputError("TRITON_INTERPRET is set: the Triton kernels would run in the interpreter, not on the "
                             "GPU; unset it to benchmark")
    cfg = settings(quick)
    env = gpu_environment()
    device_spec = next((d for d in DEVICES.values() if d.is_gpu and d.name == env["gpu"]), None)
    numbers = (device_spec.bandwidth, device_spec.flops) if device_spec else (None, None)
    rows: list[dict] = []
    for name, (n, k) in cfg.shapes.items():
        rows += bench_shape(name, n, k, cfg, numbers, env["l2_bytes"])
    result = {
        "what": "bf16 y = x W^T: sparse-format Triton kernels and torch 2:4 vs cuBLAS dense, per weight shape, M "
                "and sparsity",
        "environment": env,
        "settings": {
            "quick": cfg.quick, "dtype": str(DTYPE), "shapes": cfg.shapes, "M": list(cfg.ms),
            "sparsities": list(cfg.sparsities), "bsr_blocks": [list(b) for b in BSR_BLOCKS],
            "repeats": cfg.repeats, "warmup_rounds": cfg.warmup_rounds, "warmup_calls": WARMUP_CALLS,
            "configs": ("fixed: N:M and BSR at the first autotune candidate per M (fixed_config), not autotuned"
                        if cfg.fixed_configs else "N:M and BSR autotuned per shape and M"),
            "timing": "CUDA graph over L2-rotated weight copies (their bytes > 2x L2, at most "
                      f"{MAX_COPIES}), CUDA events, µs per call; rounds interleave variants in seeded orders",
            "pruning": "magnitude masks by allocator.core.patterns.select_mask, as exported: bitmap: per row; "
                       "2:4: top-2 of each 4; bsr: global top blocks by summed |w|; weights N(0, 0.02^2)",
            "roofline_model": "ideal = (dense weight bytes + activation bytes) / (format nbytes + activation "
                              "bytes), activations = 2 B * M * (K + N); valid where dense is memory bound",
            "device_numbers": {"bandwidth": numbers[0], "flops": numbers[1]},
            "tolerance": TOLERANCE,
        },
        "results": rows,
    }
    stem = result_name(env["gpu"], quick)
    path = write_result("kernels", stem, result)
    plot_speedups(rows, PLOT_SHAPE, path.with_suffix(".png"),
                  f"{PLOT_SHAPE[0]}x{PLOT_SHAPE[1]} bf16 on {env['gpu']}: speedup vs cuBLAS (dotted: roofline ideal)")
    return result


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m allocator.benchmarks.kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"shapes {', '.join(QUICK_SHAPES)}; M {QUICK_MS}; 10 repeats; N:M and BSR at one "
                             "fixed config per M (no autotuning)")
    args = parser.parse_args(argv)
    try:
        main(quick=args.quick)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
