"""One prepared run on a lent GPU: every GPU measurement the project needs, in one call of a few minutes.

Steps, each in its own process under its own timeout, output tee'd to <out>/<step>.log, results under <out>:
  probe     nvidia-smi, versions (python, torch, triton, transformers), device name, SMs, L2, cuSPARSELt
  ceilings  device-to-device copy bandwidth and the bf16 matmul rate on random data (the two ceilings), and the
            per-kernel overhead of a linear inside a CUDA graph (what the roofline's `launch_s` assumes)
  kernels   the decode benchmark (allocator.benchmarks.kernels, bf16): bitmap / csr8 / N:M / BSR vs cuBLAS and
            torch's 2:4 on 4096x14336 and 14336x4096 at M = 1, 16, 256 and 50 / 70 / 90 %, each checked against
            the dense product
  occupancy the one-warp decode kernels (bitmap, csr8, 2:4) at M = 1, 16 with split-K aiming at 8 ... 128 programs
            per SM, against cuBLAS
  smoke     every kernel (bitmap, csr8, 2:4, 4:8, BSR) compiled, against float64 at M = 1, 3, 16, 17, 70, with bias,
            forced split-K values, and each format's custom op captured in a CUDA graph and replayed on new inputs
  tests     the test files that run on CUDA when it is present (the compiled kernels, the GPU profiler, placement)
  tables    latency tables (profilers.gpu.profile_gpu: prefill, decode at batch 1/4/16/64) of random-weight models
            of SmolLM2-135M's and Llama-3-8B's shapes, for the h200 profile
  verify    allocations of each model (SmolLM2: the plans in runs/bench/gpu/smollm2-135m-plans.json, made by
            `python -m allocator search profile=h200 ...`; Llama-3-8B: uniform and seeded random ones) built as the
            export builds them (build_deployable) and timed against the dense model, interleaved, in every regime:
            each table's prediction against the measurement
  mixed     only if time remains: SmolLM2's mixed-space tables (sparse units in the model), csr8 then bitmap
Latency depends on shapes, not on weight values, so the models are random (N(0, 0.02)); their allocations are
timed as deployed, not scored.

`--dry-run` runs the same steps on the CPU at tiny sizes (kernels in Triton's interpreter, wall-clock timers), so a
device call cannot fail on a typo; tests/test_gpu_campaign.py runs it. `--archive F` packs <out> into F after every
step, so what finished comes back even if the call is cut short.

python -m allocator.benchmarks.gpu_campaign --out DIR [--dry-run] [--budget-s 500] [--only STEP ...] [--archive F]
python -m allocator.benchmarks.gpu_campaign --collect-plans RUN [RUN ...]  (the verify step's SmolLM2 plans)
python -m allocator.benchmarks.gpu_report DIR [DIR ...]  (what came back, filed into the repository)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from allocator.benchmarks.scale import SHAPES
from allocator.core.atomic_io import write_json_atomic

REPO = Path(__file__).resolve().parents[2]
PLANS = REPO / "runs" / "bench" / "gpu" / "smollm2-135m-plans.json"
DTYPE = torch.bfloat16
REL_TOL = 1e-2  # ||y - y64|| / ||y64||: bf16 operands and outputs land between 1e-3 and 1e-2 (METHOD.md)

# Real shapes (Llama config fields). SmolLM2-135M: the embedded model's config as transformers loads it; Llama-3-8B:
# its published shape (allocator.benchmarks.scale.SHAPES, from meta-llama/Meta-Llama-3-8B's config.json).
MODELS: dict[str, dict] = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                         tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5),
    "llama3-8b": dict(SHAPES["llama3-8b"], head_dim=128, max_position_embeddings=8192, tie_word_embeddings=False,
                      rms_norm_eps=1e-5),
    # --dry-run only: two layers, two MLP widths
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
                 rope_theta=10000.0, rms_norm_eps=1e-5),
}
# Space per model: SmolLM2's is the default structured space (its table serves `search profile=h200` as is); Llama's
# MLP in steps of 1024 neurons (15 widths, not 113: each width is a whole 8B model built and timed per regime), so a
# search uses it with space.mlp_step=1024.
SPACES: dict[str, dict] = {"smollm2-135m": {}, "llama3-8b": {"mlp_step": 1024}, "tiny": {}}


@dataclass(frozen=True)
class Step:
    run: Callable[[Path, bool], None]
    cap_s: float  # its timeout
    min_s: float  # not started with less left than this
    reserved: bool = True  # earlier steps leave it min_s; False: it runs only on what they leave


def cuda_device(dry: bool) -> torch.device:
    if dry:
        return torch.device("cpu")
    from profilers.gpu_timing import require_cuda

    require_cuda("the GPU campaign (without --dry-run)")
    return torch.device("cuda")


def write(path: Path, data: dict, quiet: bool = False) -> None:
    write_json_atomic(path, data)  # whole or not at all, should the step be killed mid-write
    if not quiet:
        print(f"wrote {path}", flush=True)


def median_time_s(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    """Median seconds of one call: CUDA events around each call after 3 warm-up calls (wall clock on CPU)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def graph_sampler(dry: bool):
    from allocator.benchmarks.kernels import make_sampler, wall_clock_sampler

    return wall_clock_sampler if dry else make_sampler


# ---- probe ----

def _run_text(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return out.stdout + out.stderr
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{cmd[0]}: {type(exc).__name__}: {exc}"


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def probe(out: Path, dry: bool) -> None:
    info: dict = {
        "python": platform.python_version(), "platform": platform.platform(), "executable": sys.executable,
        "cpus": os.cpu_count(), "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
        "packages": {n: _version(n) for n in ("torch", "triton", "transformers", "accelerate", "safetensors", "numpy",
                                              "scipy", "hydra-core", "omegaconf", "optuna", "deap", "gguf", "cmaes",
                                              "filelock", "pytest", "pytest-xdist")},
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                    sms=props.multi_processor_count, l2_bytes=int(props.L2_cache_size),
                    memory_bytes=int(props.total_memory),
                    cusparselt=torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None)
    (out / "nvidia-smi.txt").write_text(_run_text(["nvidia-smi"]) + "\n" + _run_text(
        ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,"
         "temperature.gpu,memory.used,memory.total", "--format=csv"]))
    write(out / "probe.json", info)
    print(json.dumps(info, indent=1, default=str))


# ---- ceilings ----

def copy_bandwidth(nbytes: int, device: torch.device) -> float:
    """Device-to-device copy of `nbytes` of random bf16, bytes read + bytes written per second."""
    src = torch.randn(nbytes // 2, device=device, dtype=DTYPE)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_time_s(lambda: dst.copy_(src), 20, device)


def matmul_rate(n: int, device: torch.device) -> float:
    """FLOP/s of an n x n x n bf16 matmul on random data."""
    a, b = (torch.randn(n, n, device=device, dtype=DTYPE) for _ in "ab")
    return 2 * n ** 3 / median_time_s(lambda: a @ b, 10, device)


# Linear shapes (N, K) of both models whose per-call time inside a CUDA graph gives the overhead over their bytes.
LAUNCH_SHAPES = ((576, 576), (1536, 576), (576, 1536), (4096, 4096), (14336, 4096), (4096, 14336))


def ceilings(out: Path, dry: bool) -> None:
    import torch.nn.functional as F

    from profilers.gpu_timing import rotation_count

    device = cuda_device(dry)
    copy_bytes, mm = (1 << 22, 256) if dry else (1 << 31, 8192)  # 2 GiB: far past the 60 MB L2
    bandwidth = copy_bandwidth(copy_bytes, device)
    flops = matmul_rate(mm, device)
    l2 = int(torch.cuda.get_device_properties(0).L2_cache_size) if device.type == "cuda" else 0
    sampler = graph_sampler(dry)
    launch = []
    for n, k in (((64, 128),) if dry else LAUNCH_SHAPES):
        nbytes = n * k * DTYPE.itemsize
        weights = [torch.randn(n, k, device=device, dtype=DTYPE) for _ in range(rotation_count(l2, nbytes))]
        x = torch.randn(1, k, device=device, dtype=DTYPE)
        sample, method, keep = sampler([lambda w=w, x=x: F.linear(x, w) for w in weights])
        us = sorted(sample() for _ in range(15))[7]
        launch.append({"shape": [n, k], "copies": len(weights), "us_per_call": us, "timing": method,
                       "bytes_us": nbytes / bandwidth * 1e6, "overhead_us": us - nbytes / bandwidth * 1e6})
        del weights, keep
    small = sorted(r["overhead_us"] for r in launch if r["shape"][0] * r["shape"][1] <= 1536 * 576)
    result = {"copy_bytes": copy_bytes, "copy_bandwidth": bandwidth, "matmul_n": mm, "matmul_flops": flops,
              "linear_in_graph": launch,
              # the smallest linears are all overhead: their bytes take < 0.5 µs at the measured bandwidth
              "launch_s": small[len(small) // 2] * 1e-6 if small else None}
    write(out / "ceilings.json", result)
    print(f"copy {bandwidth / 1e12:.3f} TB/s, bf16 matmul {flops / 1e12:.1f} TFLOP/s, per-linear overhead in a "
          f"graph {result['launch_s'] and result['launch_s'] * 1e6:.2f} µs")


# ---- smoke: compiled kernels against float64 ----

# (pattern label, unstructured format): every exportable kernel
SMOKE_PATTERNS = (("unstructured70", "bitmap"), ("unstructured70", "csr8"), ("2:4", None), ("4:8", None),
                  ("block16x16-50", None))


def _rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got = got.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def _check(fmt: str, pattern, call: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dense: torch.Tensor,
           bias: torch.Tensor | None, **fields: object) -> dict:
    """One check of y = call(x) against x W^T + b in float64."""
    ref = x.double() @ dense.double().T + (bias.double() if bias is not None else 0)
    t0 = time.perf_counter()
    try:
        err = _rel_error(call(x), ref)
        status = "ok" if err <= REL_TOL else "wrong"
    except Exception as exc:
        err, status = None, f"error: {type(exc).__name__}: {str(exc)[:300]}"
    return {"format": fmt, "pattern": str(pattern), "shape": list(dense.shape), "M": x.shape[0],
            "bias": bias is not None, **fields, "rel_error": err, "status": status,
            "seconds": time.perf_counter() - t0}


def graph_replay(linear, x: torch.Tensor) -> torch.Tensor:
    """linear(x) through its custom op captured in a CUDA graph on other inputs, then replayed with x copied in and
    the output poisoned (the replay must write every element). Eager on CPU."""
    if x.device.type != "cuda":
        return linear(x)
    static_x = torch.randn_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        linear(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        y = linear(static_x)
    static_x.copy_(x)
    y.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    return y.clone()


def smoke(out: Path, dry: bool) -> None:
    import importlib

    from allocator.core.formats import export_format
    from allocator.core.patterns import SparsityPattern, magnitude_prune
    from kernels.sparse_linear import SparseLinear

    device = cuda_device(dry)
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = ((64, 256),) if dry else ((512, 1536), (576, 576))
    ms = (1, 3, 17) if dry else (1, 3, 16, 17, 70)
    rows: list[dict] = []

    def add(row: dict) -> None:  # every failure printed and the file rewritten as it comes: a timeout loses nothing
        rows.append(row)
        if row["status"] != "ok":
            print("FAILED", row, flush=True)
        write(out / "smoke.json", {"checks": len(rows), "failed": sum(r["status"] != "ok" for r in rows),
                                   "tolerance": REL_TOL, "rows": rows}, quiet=True)

    for label, fmt_override in SMOKE_PATTERNS:
        pattern = SparsityPattern.parse(label)
        fmt, params = export_format(pattern, fmt_override)
        module = importlib.import_module(f"kernels.{fmt}")
        for n, k in shapes:
            dense = magnitude_prune(torch.randn(n, k, generator=gen, device=device).to(DTYPE), pattern)
            w = module.compress(dense, **params)
            bias = torch.randn(n, generator=gen, device=device).to(DTYPE)
            for m in ms:
                # forced splits (bitmap, csr8) at one and at 17 rows; bias with and without at the default split
                splits = (None, 1, 3) if fmt in ("bitmap", "csr8") and m in (1, 17) else (None,)
                for split in splits:
                    kwargs = {} if split is None else {"split_k": split}
                    for b in (None, bias) if split is None else (bias,):
                        x = torch.randn(m, k, generator=gen, device=device).to(DTYPE)  # fresh inputs every check
                        add(_check(fmt, pattern, partial(module.triton_matmul, w=w, bias=b, **kwargs), x, dense, b,
                                   split_k=split))
        print(f"smoke {pattern}: {sum(r['status'] == 'ok' for r in rows)}/{len(rows)} ok so far", flush=True)
        # the custom op a model runs, captured in a CUDA graph and replayed on new inputs
        linear = SparseLinear.from_dense(dense, bias, fmt, **params)
        for m in (1, 16):
            x = torch.randn(m, dense.shape[1], generator=gen, device=device).to(DTYPE)
            add(_check(fmt, pattern, partial(graph_replay, linear), x, dense, bias, graph=True))
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"smoke: {len(rows) - len(failed)}/{len(rows)} checks passed (rel. error <= {REL_TOL})")
    if failed:
        sys.exit(1)


# ---- kernels: the decode benchmark ----

KERNEL_SHAPES = {"llama3-8b mlp down": (4096, 14336), "llama3-8b mlp gate/up": (14336, 4096)}


def kernels(out: Path, dry: bool) -> None:
    from allocator.benchmarks import kernels as kb

    device = cuda_device(dry)
    if dry:
        cfg = kb.Settings(True, {"tiny": (64, 256)}, (1, 16), (0.7,), repeats=2, warmup_rounds=1, fixed_configs=True)
        env, numbers, l2 = {"device": "cpu"}, (None, None), 0
    else:
        from profilers.devices import DEVICES

        cfg = kb.Settings(True, dict(KERNEL_SHAPES), (1, 16, 256), (0.5, 0.7, 0.9), repeats=12, warmup_rounds=2,
                          fixed_configs=True)
        env = kb.gpu_environment()
        spec = next((d for d in DEVICES.values() if d.is_gpu and d.name == env["gpu"]), None)
        numbers = (spec.bandwidth, spec.flops) if spec else (None, None)
        l2 = env["l2_bytes"]
    rows: list[dict] = []
    for name, (n, k) in cfg.shapes.items():
        rows += kb.bench_shape(name, n, k, cfg, numbers, l2, device=device.type, sampler=graph_sampler(dry))
        write(out / "kernels.json", {"environment": env, "dtype": str(kb.DTYPE), "shapes": cfg.shapes,
                                     "M": list(cfg.ms), "sparsities": list(cfg.sparsities), "repeats": cfg.repeats,
                                     "configs": "N:M and BSR at the first autotune candidate per M", "results": rows})


# ---- occupancy: split-K (programs per SM) of the one-warp decode kernels ----

SWEEP_PPS = (8, 32, 64, 128)  # one-warp programs per SM that split-K aims for (kernels' PROGRAMS_PER_SM)


def occupancy(out: Path, dry: bool) -> None:
    """bitmap, csr8 (50/70/90 %) and 2:4 at M = 1 and 16 with each module's PROGRAMS_PER_SM set to each of
    SWEEP_PPS while its calls are captured (the launch plan reads it at call time), against cuBLAS, interleaved: how
    many one-warp programs per SM it takes to hide the gathers' latency."""
    import importlib

    import torch.nn.functional as F

    from allocator.benchmarks import kernels as kb

    device = cuda_device(dry)
    l2 = int(torch.cuda.get_device_properties(0).L2_cache_size) if device.type == "cuda" else 0
    sampler = graph_sampler(dry)
    shapes = {"tiny": (64, 256)} if dry else KERNEL_SHAPES
    specs = [kb.Spec(f"triton-{f}", f, s) for f in ("bitmap", "csr8") for s in ((0.7,) if dry else (0.5, 0.7, 0.9))]
    specs.append(kb.Spec("triton-nm-2:4", "2:4", 0.5))
    sweep = SWEEP_PPS[:2] if dry else SWEEP_PPS
    rows = []
    for name, (n, k) in shapes.items():
        gen = torch.Generator(device=device).manual_seed(0)
        base = (torch.randn(n, k, generator=gen, device=device) * 0.02).to(DTYPE)
        dense = kb.build_variant(kb.Spec(kb.BASELINE, "dense", 0.0), base, l2)
        variants = [kb.build_variant(spec, base, l2) for spec in specs]
        for m in (1, 16):
            x = torch.randn(m, k, generator=gen, device=device).to(DTYPE)
            samplers = {("cublas", 0): sampler([lambda w=w, x=x: F.linear(x, w) for w in dense.copies])}
            errors = {}
            for v in variants:
                module = importlib.import_module(f"kernels.{kb._export_format(v.spec)[0]}")
                names = [a for a in ("PROGRAMS_PER_SM", "PAIR_PROGRAMS_PER_SM") if hasattr(module, a)]
                for pps in sweep:
                    saved = {a: getattr(module, a) for a in names}
                    for a in names:
                        setattr(module, a, pps)
                    try:
                        y = v.call(x, v.copies[0])
                        errors[(v.spec.label, pps)] = _rel_error(y, x.double() @ v.dense.double().T)
                        samplers[(v.spec.label, pps)] = sampler([lambda w=w, v=v, x=x: v.call(x, w)
                                                                 for w in v.copies])
                    finally:
                        for a, value in saved.items():
                            setattr(module, a, value)
            samples: dict = {key: [] for key in samplers}
            keys = list(samplers)
            for r in range(14):
                random.Random(r).shuffle(keys)
                for key in keys:
                    samples[key].append(samplers[key][0]())
            base_us = samples[("cublas", 0)][2:]
            for (label, pps), times in samples.items():
                times = times[2:]  # warm-up rounds
                ratios = sorted(b / t for b, t in zip(base_us, times))
                rows.append({"shape": [n, k], "M": m, "kernel": label, "programs_per_sm": pps,
                             "us": sorted(times)[len(times) // 2], "speedup_vs_cublas": ratios[len(ratios) // 2],
                             "p10": ratios[len(ratios) // 10], "p90": ratios[-1 - len(ratios) // 10],
                             "rel_error": errors.get((label, pps)), "timing": samplers[(label, pps)][1]})
                if label != "cublas":
                    print(f"{n}x{k} M={m} {label} {pps}/SM: {rows[-1]['us']:.1f} us, "
                          f"{rows[-1]['speedup_vs_cublas']:.2f}x", flush=True)
            write(out / "occupancy.json", {"sweep": list(sweep), "rows": rows})
            del samplers
        del variants, dense


# ---- tests ----

CUDA_TESTS = ("tests/test_kernels_bitmap.py", "tests/test_kernels_csr8.py", "tests/test_kernels_nm.py",
              "tests/test_kernels_bsr.py", "tests/test_gpu_profiler.py", "tests/test_placement.py",
              "tests/test_device.py", "tests/test_gpu_ready.py", "tests/test_kernels_bench.py")


def tests(out: Path, dry: bool) -> None:
    files = ["tests/test_device.py"] if dry else list(CUDA_TESTS)
    workers = [] if dry else ["-n", "8"]  # xdist: compiles on 8 of the 16 cores at once
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *workers, *files,
           f"--junitxml={out / 'tests.xml'}"]
    print(" ".join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=REPO).returncode
    sys.exit(rc)


# ---- models, tables, verify ----

def model_config(name: str):
    """The Llama config of one of MODELS (no special tokens: nothing is tokenized)."""
    from transformers import LlamaConfig

    fields = dict(MODELS[name])
    rope = {"rope_theta": fields.pop("rope_theta"), "rope_type": "default"}
    return LlamaConfig(**fields, rope_parameters=rope, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def random_model(name: str, device: torch.device):
    """A random-weight Llama of the model's real shapes, in bf16 on `device` (built there: an 8B model's init on the
    CPU would take minutes), rotary frequencies in float32 as a loaded model keeps them."""
    from transformers import LlamaForCausalLM

    config = model_config(name)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
        model = model.to(DTYPE).eval()
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model


def model_space(name: str):
    """The space each model's table is measured in (SPACES)."""
    from allocator.core.config import SpaceConfig
    from allocator.core.space import ModelShape, build_space

    return build_space(ModelShape.from_config(model_config(name)), SpaceConfig(**SPACES[name]))


def profile_config(dry: bool):
    from allocator.core.config import ProfileConfig

    if dry:
        return ProfileConfig(name="h200", repeats=2, warmup=1, decode_batches=[1], gpu_decode_batches=[1, 4],
                             decode_context=16, prefill_length=16, verify_repeats=2)
    return ProfileConfig(name="h200")


def campaign_models(dry: bool) -> tuple[str, ...]:
    return ("tiny",) if dry else ("smollm2-135m", "llama3-8b")


def tables(out: Path, dry: bool) -> None:
    from profilers.gpu import profile_gpu

    device = cuda_device(dry)
    for name in campaign_models(dry):
        t0 = time.perf_counter()
        model = random_model(name, device)
        table, path = profile_gpu(model, model_space(name), profile_config(dry), "bfloat16",
                                  out / "cache", device=device)
        (out / "tables").mkdir(exist_ok=True)
        shutil.copy(path, out / "tables" / f"{name}--{path.name}")
        print(f"{name}: table {path.name} in {time.perf_counter() - t0:.0f} s: " + ", ".join(
            f"{r} dense {c.dense_ms:.3f} ms" for r, c in table.regimes.items()), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def model_table(out: Path, name: str):
    from profilers.table import load_table

    found = sorted((out / "tables").glob(f"{name}--*.json"))
    if not found:
        raise FileNotFoundError(f"no table of {name} under {out / 'tables'}: run the tables step first")
    return load_table(found[0])


def allocations(name: str, space, seed: int = 0) -> dict[str, dict]:
    """SmolLM2: the searched plans (PLANS, made in its default structured space) and two uniform allocations (3/4
    and 1/2 of each unit kept); other models, or SmolLM2 without PLANS: the two uniform and three seeded random."""
    uniform = {f"uniform-{fraction}": {u.name: min(u.options, key=lambda o: abs(o - fraction * u.full))
                                       for u in space.units}
               for fraction in (0.75, 0.5)}
    if name == "smollm2-135m" and PLANS.is_file():
        plans = json.loads(PLANS.read_text())["plans"]
        return {**{plan_name: plan["allocation"] for plan_name, plan in plans.items()}, **uniform}
    rng = random.Random(seed)
    return {**uniform, **{f"random-{i}": {u.name: rng.choice(u.options) for u in space.units} for i in range(3)}}


def collect_plans(runs: list[Path], path: Path = PLANS) -> dict:
    """The allocations (and what each plan was searched for) of `python -m allocator search` run directories, for
    the verify step to time on the GPU."""
    plans = {}
    for run in runs:
        plan = json.loads((run / "plan.json").read_text())
        plans[run.name] = {"budget": plan["budget"], "profile": plan["profile"]["name"],
                           "table_source": plan["profile"].get("source"), "searcher": plan["searcher"],
                           "predicted": plan["predicted"], "allocation": plan["allocation"]}
    result = {"what": "SmolLM2-135M allocations searched with profile=h200 (its roofline table) on the CPU",
              "plans": plans}
    write(path, result)
    return result


def verify(out: Path, dry: bool) -> None:
    from allocator.core.space import ATTN, MLP, unit_name
    from allocator.model.sparse_export import build_deployable
    from allocator.model.surgery import leading_levels
    from profilers.gpu import gpu_regimes, time_models, variant_groups
    from profilers.gpu_timing import make_timer

    device = cuda_device(dry)
    cfg = profile_config(dry)
    rows: list[dict] = []
    timed: dict[str, dict] = {}
    for name in campaign_models(dry):
        model = random_model(name, device)
        space = model_space(name)
        table = model_table(out, name)
        allocs = timed[name] = allocations(name, space)
        source = leading_levels(model, space.shape)
        timer = make_timer(device)
        layers = space.shape.num_layers
        for regime in gpu_regimes(cfg):
            def deployable(alloc: dict, model=model, space=space, source=source):  # as the export builds it
                return build_deployable(model, space.shape, alloc, source, space.rules, space.unstructured_format)

            build = {"dense": lambda model=model: model}
            build.update({a: partial(deployable, alloc) for a, alloc in allocs.items()})
            groups = variant_groups(space, {"dense": space.dense_allocation(), **allocs}, regime, timer,
                                    cfg.l2_rotations, DTYPE.itemsize)
            stats, info = time_models(build, regime, timer, cfg.warmup, cfg.verify_repeats, cfg.l2_rotations, groups,
                                      desc=f"verify {name} {regime.name}")
            costs = table.regime(regime.name)
            dense_ms = stats["dense"].median_ms
            for a, alloc in allocs.items():
                widths = {kind: [alloc[unit_name(i, kind)] for i in range(layers)] for kind in (ATTN, MLP)}
                predicted, measured = costs.predict_ms(widths), stats[a].median_ms
                rows.append({"model": name, "allocation": a, "regime": regime.name, "predicted_ms": predicted,
                             "measured_ms": measured, "p10_ms": stats[a].p10_ms if hasattr(stats[a], "p10_ms")
                             else None, "error": predicted / measured - 1.0,
                             "dense_measured_ms": dense_ms, "dense_table_ms": costs.dense_ms,
                             "measured_speedup": dense_ms / measured, "predicted_speedup": costs.dense_ms / predicted,
                             "rotations": info["rotations"].get(a), "stats": stats[a].__dict__})
                print(f"{name} {regime.name} {a}: predicted {predicted:.3f} ms, measured {measured:.3f} ms "
                      f"({(predicted / measured - 1) * 100:+.1f}%)", flush=True)
            write(out / "verify.json", {"rows": rows, "allocations": timed})
        del model, source
        timer.release()
    errors = sorted(abs(r["error"]) for r in rows)
    print(f"verify: {len(rows)} points, median |error| {errors[len(errors) // 2] * 100:.1f}%, "
          f"max {errors[-1] * 100:.1f}%")


def mixed_tables(out: Path, dry: bool) -> None:
    """Latency tables of SmolLM2's shapes in the default mixed space (sparse units in the real model), csr8 (what
    `unstructured_format=auto` picks for decode at batch <= 4 on an H200) first, then bitmap. Each regime is saved as
    it finishes (profile_gpu's partial table), so a cut-short run keeps what it measured."""
    from allocator.core.config import SpaceConfig, SpaceKind
    from allocator.core.space import ModelShape, build_space
    from profilers.gpu import profile_gpu

    device = cuda_device(dry)
    name = "tiny" if dry else "smollm2-135m"
    model = random_model(name, device)
    shape = ModelShape.from_config(model.config)
    for fmt in ("csr8", "bitmap"):
        t0 = time.perf_counter()
        small = {"sparsities": [0.5], "nm_patterns": ["2:4"], "block_sparsities": [0.5]} if dry else {}
        space = build_space(shape, SpaceConfig(kind=SpaceKind.mixed, **SPACES[name], **small), fmt)
        _, path = profile_gpu(model, space, profile_config(dry), "bfloat16", out / "cache", device=device)
        (out / "tables").mkdir(exist_ok=True)
        shutil.copy(path, out / "tables" / f"{name}-mixed-{fmt}--{path.name}")
        print(f"{name} mixed {fmt}: table {path.name} in {time.perf_counter() - t0:.0f} s", flush=True)


STEPS: dict[str, Step] = {
    "probe": Step(probe, 40, 5),
    "ceilings": Step(ceilings, 45, 10),
    "kernels": Step(kernels, 110, 30),
    "occupancy": Step(occupancy, 120, 30, reserved=False),
    # caps from the H200 run (runs/bench/gpu/NVIDIA_H200-campaign.json): smoke reached 96 of 102 checks in 90 s,
    # the CUDA tests 340 of 418 in 75 s (cold Triton caches: each distinct launch compiles once)
    "smoke": Step(smoke, 150, 20),
    "tests": Step(tests, 150, 30),
    "tables": Step(tables, 200, 100),
    "verify": Step(verify, 120, 60),
    "mixed": Step(mixed_tables, 240, 45, reserved=False),  # only if time remains
}


# ---- the driver ----

def run_logged(cmd: list[str], log: Path, timeout: float, env: dict) -> tuple[int | None, float]:
    """Run `cmd` in its own process group with output to stdout and `log`; killed (group and all) at `timeout`.
    Returns (exit code, None when killed; seconds)."""
    t0 = time.monotonic()
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True, text=True, bufsize=1)

        def pump() -> None:
            for line in proc.stdout:  # type: ignore[union-attr]
                sys.stdout.write(line)
                sink.write(line)
            sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        reader.join(timeout=10)
    return rc, time.monotonic() - t0


def pack(out: Path, archive: Path) -> None:
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(out, arcname=out.name)
    tmp.replace(archive)


def summary(out: Path, status: dict) -> str:
    """The short table printed last."""
    lines = ["step       status     seconds"]
    lines += [f"{s:<10} {v['status']:<10} {v.get('seconds', 0):7.0f}" for s, v in status.items()]

    def load(name: str) -> dict | None:
        path = out / name
        return json.loads(path.read_text()) if path.is_file() else None

    if (c := load("ceilings.json")):
        lines.append(f"copy {c['copy_bandwidth'] / 1e12:.2f} TB/s, bf16 mm {c['matmul_flops'] / 1e12:.0f} TFLOP/s, "
                     f"linear overhead {c['launch_s'] and c['launch_s'] * 1e6:.2f} µs")
    if (s := load("smoke.json")):
        lines.append(f"smoke: {s['checks'] - s['failed']}/{s['checks']} passed")
    if (k := load("kernels.json")):
        for r in k["results"]:
            if r["status"] == "ok" and r.get("speedup_vs_cublas") and r["kernel"] != "cublas-dense" and (
                    r["sparsity"] in (0.5, 0.7) and r["M"] in (1, 16)):
                lines.append(f"  {r['shape'][0]}x{r['shape'][1]} M={r['M']:<3} {r['label']:<24} "
                             f"{r['speedup_vs_cublas']['median']:.2f}x (ideal {r['ideal_speedup']:.2f}x)")
    if (v := load("verify.json")):
        for model in dict.fromkeys(r["model"] for r in v["rows"]):
            errs = sorted(abs(r["error"]) for r in v["rows"] if r["model"] == model)
            lines.append(f"verify {model}: {len(errs)} points, median |err| {errs[len(errs) // 2] * 100:.1f}%, "
                         f"max {errs[-1] * 100:.1f}%")
    return "\n".join(lines)


def run_all(out: Path, dry: bool, budget_s: float, only: list[str] | None, archive: Path | None) -> dict:
    unknown = sorted(set(only or ()) - set(STEPS))
    if unknown:
        raise SystemExit(f"unknown step(s) {', '.join(unknown)}; valid: {', '.join(STEPS)}")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    if dry:
        env["TRITON_INTERPRET"] = "1"  # the kernels in Triton's interpreter, as the CPU tests run them
    start = time.monotonic()
    status: dict[str, dict] = {}
    chosen = [name for name in STEPS if not only or name in only]
    for i, name in enumerate(chosen):
        step = STEPS[name]
        # what is left, less the least each later step needs: a slow step cannot starve the ones after it
        left = budget_s - (time.monotonic() - start) - sum(STEPS[later].min_s for later in chosen[i + 1:]
                                                           if STEPS[later].reserved)
        timeout = min(step.cap_s, left)
        if timeout < step.min_s:
            status[name] = {"status": "skipped", "reason": f"{left:.0f} s of the budget left, needs {step.min_s:.0f}"}
        else:
            print(f"==== {name} (timeout {timeout:.0f} s) ====", flush=True)
            cmd = [sys.executable, "-m", "allocator.benchmarks.gpu_campaign", "--step", name, "--out", str(out)]
            rc, seconds = run_logged(cmd + (["--dry-run"] if dry else []), out / f"{name}.log", timeout, env)
            status[name] = {"status": "timeout" if rc is None else "ok" if rc == 0 else f"rc={rc}",
                            "seconds": seconds}
        write(out / "campaign.json", {"dry_run": dry, "budget_s": budget_s, "steps": status})
        if archive is not None:
            pack(out, archive)
    print("==== summary ====\n" + summary(out, status), flush=True)
    return status


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m allocator.benchmarks.gpu_campaign",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="directory for logs and results")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny sizes")
    parser.add_argument("--budget-s", type=float, default=500, help="wall-clock seconds for all steps")
    parser.add_argument("--only", nargs="+", metavar="STEP", help=f"steps to run, of: {', '.join(STEPS)}")
    parser.add_argument("--archive", type=Path, help="tar.gz of --out written after every step")
    parser.add_argument("--collect-plans", nargs="+", type=Path, metavar="RUN",
                        help=f"write the plans of these search runs to {PLANS.relative_to(REPO)} and exit")
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)  # one step, in this process
    args = parser.parse_args(argv)
    if args.collect_plans:
        collect_plans(args.collect_plans)
        return
    if args.out is None:
        parser.error("--out is required")
    if args.step:
        args.out.mkdir(parents=True, exist_ok=True)
        STEPS[args.step].run(args.out, args.dry_run)
        return
    run_all(args.out, args.dry_run, args.budget_s, args.only, args.archive)


if __name__ == "__main__":
    main()
