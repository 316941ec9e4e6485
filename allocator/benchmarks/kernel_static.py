"""Static kernel benchmark: every sparse kernel variant compiled for a GPU target and read as SASS, no GPU needed.

For each kernel (bitmap, CSR8, N:M 2:4 and 4:8, BSR 16x16), weight shape (N, K) = (out, in) and M (rows of x) it takes the
launch the op would make on that device — the kernel module's own `launch_plan` / `kernel_arguments` (bitmap and
CSR8, their split-K from the device's SM count; N:M at decode, its `decode_plan`, and 2:4 at 5-16 rows, its
`pair_plan`) or every config the CUDA autotuner would time
(`candidate_configs`, N:M and BSR) — binds it with Triton's own JIT specialisation (pointer alignment, ints equal to 1
or divisible by 16), compiles it with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` and disassembles the cubin with the
`cuobjdump` shipped in the Triton wheel (profilers.sass).

Per variant it reports the hot loop (found by its backward branch) and its instructions per dense weight element:
loop-body instructions x loop trips (from the launch: tiles, steps or block groups per program) x warps, over all
programs, plus the code outside the loop once per program and warp, divided by N * K. CSR8 (kernels.csr8) has a
data-dependent loop nested in its hot loop (a row group's entries in one segment, to its longest row): its body
counts once per expected trip, for a uniformly random pattern of the variant's density (each row segment's stored
count binomial; `csr8_inner_trips`), the rest of the hot loop once per segment; the loop's barriers (BAR),
shuffles (SHFL) and shared-memory operations (LDS / STS / LDSM); registers and spills (cuobjdump -res-usage); whether
cp.async (LDGSTS), TMA (UTMALDG) or wgmma (HGMMA) appear. From the device registry (profilers.devices):
  issue-bound time  = warp-instructions / (SMs x 4 schedulers x clock),
  bytes-bound time  = (stored weight bytes + activations, allocator.core.formats.linear_work, + the split-K fp32
                      partial sums written and read back) / bandwidth,
  compute time      = 2 M x (weight elements multiplied) / dense tensor FLOP/s,
  PREDICTED time    = the largest of the three; cuBLAS's = max(dense bf16 bytes / bandwidth, 2 M N K / FLOP/s);
  PREDICTED speedup = cuBLAS's / the kernel's.
A prediction, not a measurement: static instruction counts (every instruction in the loop body once per trip, taken or
not), perfect overlap of issue and memory, no launch cost, no tail effects. Where the autotuner chooses among several
configs the row shows the one with the best prediction and how many were compiled.

python -m allocator.benchmarks.kernel_static [--arch 90 80] [--only bitmap70] [--shapes 4096x4096] [--ms 1 16]
  → runs/bench/kernels/static/sm<arch>.json and a table on stdout.

python -m allocator.benchmarks.kernel_static --issue-costs
  → the issue-cost sweep (ISSUE_VARIANTS x SHAPES x ISSUE_MS on sm_90, sm_89 and sm_80) written to
    kernels/issue_costs.json, the instructions per element the roofline prices issue with (kernels.issue_costs; the
    file ships with the package, regenerate it when a kernel or the pinned Triton changes), and each arch's rows to
    runs/bench/kernels/static/issue-sm<arch>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from allocator.core.atomic_io import write_json_atomic
from allocator.core.formats import export_format, linear_work
from allocator.core.patterns import SparsityPattern, kept_count
from kernels import bitmap, bsr, csr8, issue_costs, nm
from profilers import sass
from profilers.devices import DEVICES, DeviceSpec

DTYPE = torch.bfloat16
SHAPES: dict[str, tuple[int, int]] = {"4096x14336": (4096, 14336), "4096x4096": (4096, 4096)}  # (N out, K in)
MS = (1, 16, 256)  # decode (bitmap's one-warp decode kernel), the smallest tl.dot M, a prefill M
ARCH_DEVICE = {90: "h200", 89: "l4", 80: "a100"}  # whose rates (and SM count: split-K) an arch's launches use
VARIANTS = ("bitmap50", "bitmap70", "bitmap90", "csr8-50", "csr8-70", "csr8-90", "nm2:4", "nm4:8", "bsr16x16-70")
OUT_DIR = Path("runs/bench/kernels/static")
SASS_CACHE = Path("runs/cache/sass")  # disassemblies by cubin hash; Triton caches the compiles (~/.triton/cache)
# The issue-cost sweep: every kernel a plan can export (the default space's patterns, csr8 at every default
# unstructured sparsity, the N:M patterns the decode kernel runs), at the M of every regime's linears (decode
# batches 1-64, prefill 256-512 rows). Bitmap's code and loop trips do not depend on its sparsity: one density.
ISSUE_VARIANTS = ("bitmap70", *(f"csr8-{p}" for p in range(10, 100, 10)), "nm2:4", "nm4:8", "nm1:4", "nm2:8",
                  "bsr16x16-25", "bsr16x16-50", "bsr16x16-75")
ISSUE_MS = (1, 2, 4, 8, 16, 64, 256, 512)
ISSUE_ARCHS = (90, 89, 80)


@dataclass(frozen=True)
class Variant:
    name: str
    fmt: str  # kernels format
    pattern: SparsityPattern

    @classmethod
    def parse(cls, name: str) -> Variant:
        if name.startswith("bitmap"):
            return cls(name, "bitmap", SparsityPattern("unstructured", int(name[6:]) / 100))
        if name.startswith("csr8-"):
            return cls(name, "csr8", SparsityPattern("unstructured", int(name[5:]) / 100))
        if name.startswith("nm"):
            return cls(name, "nm", SparsityPattern.parse(name[2:]))
        if name.startswith("bsr"):
            return cls(name, "bsr", SparsityPattern.parse("block" + name[3:]))
        raise ValueError(f"unknown variant {name!r}; expected one of {', '.join(VARIANTS)} (or bitmap<pct>, "
                         "csr8-<pct>, nm<n>:<m>, bsr<r>x<c>-<pct>)")


def _meta(*shape: int, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


@dataclass
class Launch:
    """One kernel launch to compile: the JIT function, its arguments (meta tensors), constexprs, options, the
    number of programs, and the loop trips summed over all programs."""

    fn: object
    args: tuple
    constexprs: dict
    num_warps: int
    num_stages: int | None
    programs: int
    trips: int
    config: dict
    split_k: int
    inner_trips: float | None = None  # trips of a loop nested in the hot loop, over all programs (csr8)


def _bitmap_launch(n: int, k: int, m: int, sms: int) -> list[Launch]:
    tn, tk = bitmap.DEFAULT_TILE
    tiles = (-(-n // tn), -(-k // tk))
    w = bitmap.BitmapWeight((n, k), _meta(*tiles, tk // 32, tn, dtype=torch.int32),
                            _meta(tiles[0] * tiles[1] * tn + 1, dtype=torch.int32), _meta(n * k // 2))
    plan = bitmap.launch_plan(m, tiles, sms)
    x2 = _meta(m, k)
    args, constexprs = bitmap.kernel_arguments(x2, w, None, bitmap.buffers(plan, m, n, DTYPE, "meta"), plan)
    grid_m = plan.grid[0]
    # Every program walks its split's tiles of one tile row: each (M block, tile) pair once.
    return [Launch(plan.kernel, args, constexprs, plan.num_warps, None,
                   grid_m * tiles[0] * plan.split, grid_m * tiles[0] * tiles[1],
                   {"BLOCK_M": plan.block_m, "TILE": [tn, tk], "SPLIT_K": plan.split}, plan.split)]


def csr8_inner_trips(n: int, k: int, density: float, lanes: int) -> float:
    """Expected trips of csr8's entry loop over all programs (one row of x): per row group and segment, the most
    trips any of its rows needs (`lanes` chunks of VEC entries a trip, each (row, segment) padded to whole chunks),
    each row's stored count in a segment binomial(segment width, density) (a uniformly random pattern)."""
    total = 0.0
    widths = [min(csr8.SEG, k - s) for s in range(0, k, csr8.SEG)]
    rows_per_group = csr8.WARP // lanes
    groups = [min(rows_per_group, n - r) for r in range(0, n, rows_per_group)]
    for width in set(widths):
        counts = torch.arange(width + 1, dtype=torch.float64)
        d = torch.tensor(density, dtype=torch.float64)
        log_pmf = (torch.lgamma(torch.tensor(width + 1.0, dtype=torch.float64)) - torch.lgamma(counts + 1)
                   - torch.lgamma(width - counts + 1) + torch.xlogy(counts, d) + torch.xlogy(width - counts, 1 - d))
        chunks = torch.div(-(-counts // csr8.VEC) + lanes - 1, lanes, rounding_mode="floor")  # trips
        cdf = torch.zeros(int(chunks.max()) + 1, dtype=torch.float64).index_add_(0, chunks.long(), log_pmf.exp())
        cdf = cdf.cumsum(0).clamp(max=1.0)
        for rows in set(groups):
            expected_max = (1 - cdf[:-1] ** rows).sum().item()  # E[max] = sum over t >= 1 of P(max >= t)
            total += expected_max * widths.count(width) * groups.count(rows)
    return total


def _csr8_launch(n: int, k: int, m: int, density: float, sms: int) -> list[Launch]:
    segs = -(-k // csr8.SEG)
    kept = round(n * k * density)
    capacity = csr8.dot_elements((n, k), kept)
    w = csr8.CSR8Weight((n, k), _meta(n * segs + 1, dtype=torch.int32), _meta(capacity, dtype=torch.uint8),
                        _meta(capacity))
    plan = csr8.launch_plan(m, n, k, sms)
    args, constexprs = csr8.kernel_arguments(_meta(m, k), w, None, csr8.buffers(plan, m, n, DTYPE, "meta"), plan)
    grid_m, groups = plan.grid[0], plan.grid[1]
    # Each program walks its split's segments of one row group (each (M block, group, segment) once); per segment
    # the entry loop runs to the group's longest row.
    return [Launch(plan.kernel, args, constexprs, plan.num_warps, None, grid_m * groups * plan.split,
                   grid_m * groups * segs, {"BLOCK_M": plan.block_m, "LANES": plan.lanes, "SPLIT_K": plan.split}, plan.split,
                   grid_m * csr8_inner_trips(n, k, density, plan.lanes))]


def _nm_launches(n: int, k: int, m: int, pattern: SparsityPattern, sms: int) -> list[Launch]:
    bits = nm.index_bits(pattern.m)
    entries = k // pattern.m * pattern.n
    w = nm.NMWeight((n, k), pattern.n, pattern.m, _meta(n, entries), _meta(n, nm.packed_cols(entries, bits),
                                                                           dtype=torch.uint8))
    x2 = _meta(m, k)
    if nm.decodes(m, pattern.n, bits):  # what triton_matmul runs at decode: one fixed launch, no autotuning
        plan = nm.decode_plan(m, n, k, pattern.m, sms)
        args, meta = nm.decode_arguments(x2, w, None, *nm.decode_buffers(plan, m, n, DTYPE, "meta"), plan)
        steps = -(-(k // pattern.m) // plan.block_g)
        return [Launch(nm._nm_decode_kernel, args, meta, plan.num_warps, None, plan.grid[1] * plan.split,
                       plan.grid[1] * steps, {"BLOCK_M": plan.block_m, "BLOCK_N": nm.DECODE_BLOCK_N,
                                              "SPLIT_K": plan.split}, plan.split)]
    if nm.pair_kernel_runs(m, pattern.n, pattern.m, DTYPE.itemsize):  # 2:4 at 5-16 rows: one fixed launch
        plan = nm.pair_plan(m, n, k, sms)
        args, meta = nm.pair_arguments(x2, w, None, *nm.decode_buffers(plan, m, n, DTYPE, "meta"), plan)
        steps = -(-k // nm.PAIR_BLOCK_K)
        grid_m, blocks = plan.grid[0], plan.grid[1]
        return [Launch(nm._nm_pair_kernel, args, meta, plan.num_warps, nm.PAIR_NUM_STAGES, grid_m * blocks * plan.split,
                       grid_m * blocks * steps, {"BLOCK_M": plan.block_m, "BLOCK_N": nm.PAIR_BLOCK_N,
                                                 "BLOCK_K": nm.PAIR_BLOCK_K, "SPLIT_K": plan.split}, plan.split)]
    args, meta = nm.kernel_arguments(x2, w, None, *nm.buffers(m, n, DTYPE, "meta", None))
    launches = []
    for config in nm.candidate_configs(m, pattern.m):
        c = config.kwargs
        grid0 = -(-m // c["BLOCK_M"]) * -(-n // c["BLOCK_N"])
        steps = -(-(k // pattern.m) // (c["BLOCK_K"] // meta["MM_P2"]))
        per_split = -(-steps // c["SPLIT_K"])
        trips = sum(max(0, min(steps, (s + 1) * per_split) - s * per_split) for s in range(c["SPLIT_K"]))
        launches.append(Launch(nm._nm_matmul_kernel, args, {**meta, **c}, config.num_warps, config.num_stages,
                               grid0 * c["SPLIT_K"], grid0 * trips, dict(c), c["SPLIT_K"]))
    return launches


def _bsr_launches(n: int, k: int, m: int, pattern: SparsityPattern) -> list[Launch]:
    br, bc = pattern.block
    rows = n // br
    stored = kept_count(pattern, n, k) // (br * bc)
    w = bsr.BSRWeight((n, k), (br, bc), _meta(rows + 1, dtype=torch.int32), _meta(stored, dtype=torch.int32),
                      _meta(stored, br, bc))
    x2 = _meta(m, k)
    args, meta = bsr.kernel_arguments(x2, w, None, _meta(m, n))
    per_row, extra = divmod(stored, rows)  # kept blocks spread evenly over the block rows
    launches = []
    for config in bsr.candidate_configs(m, (br, bc)):
        c = config.kwargs
        grid_m = -(-m // c["BLOCK_M"])
        trips_per_m = extra * -(-(per_row + 1) // c["GROUP"]) + (rows - extra) * -(-per_row // c["GROUP"])
        launches.append(Launch(bsr._bsr_matmul_kernel, args, {**meta, **c}, config.num_warps, config.num_stages,
                               grid_m * rows, grid_m * trips_per_m, dict(c), 1))
    return launches


def compile_launch(launch: Launch, arch: int) -> triton.compiler.CompiledKernel:
    """Compile one launch for `arch` as the JIT would on that device: its binder specialises the arguments."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**launch.constexprs, "num_warps": launch.num_warps}
    if launch.num_stages is not None:
        kwargs["num_stages"] = launch.num_stages
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def analyse(launch: Launch, arch: int, workdir: Path) -> dict:
    """Compile, disassemble and count one launch."""
    kernel = compile_launch(launch, arch)
    cubin = kernel.asm["cubin"]
    listing = sass.parse(sass.disassemble(cubin, workdir, SASS_CACHE))
    loop = sass.hot_loop(listing)
    if loop is None:
        raise RuntimeError(f"{kernel.metadata.name}: no backward branch in its SASS, so no hot loop to count")
    body, whole = sass.census(loop.body), sass.census(listing)
    usage = sass.resource_usage(cubin, workdir)
    outside = whole["instructions"] - body["instructions"]
    warp_instructions = launch.num_warps * (body["instructions"] * launch.trips + outside * launch.programs)
    nested = {}
    if launch.inner_trips is not None:
        inner = sass.inner_loop(listing, loop)
        if inner is None:
            raise RuntimeError(f"{kernel.metadata.name}: no loop nested in its hot loop to count the inner trips of")
        size = len(inner.body)
        warp_instructions = launch.num_warps * ((body["instructions"] - size) * launch.trips
                                                + size * launch.inner_trips + outside * launch.programs)
        nested = {"inner_loop": sass.census(inner.body), "inner_trips_all_programs": launch.inner_trips}
    return {
        "kernel": kernel.metadata.name,
        "config": launch.config,
        "num_warps": launch.num_warps,
        "num_stages": kernel.metadata.num_stages,
        "programs": launch.programs,
        "loop_trips_all_programs": launch.trips,
        "loop": body,
        "loop_span": [hex(loop.start), hex(loop.end)],
        "backward_branches": loop.backward_branches,
        "kernel_instructions": whole["instructions"],
        "uses": {f: bool(whole[f]) for f in sass.FEATURES},
        "registers": usage["reg"],
        "spill_bytes": usage["stack"] + usage["local"],
        "shared_bytes": kernel.metadata.shared,
        "warp_instructions": warp_instructions,
        **nested,
    }


def predict(row: dict, variant: Variant, n: int, k: int, m: int, device: DeviceSpec) -> dict:
    """Issue-, bytes- and compute-bound times and the PREDICTED speedup over cuBLAS (see the module docstring)."""
    work = linear_work(variant.pattern, m, n, k, DTYPE, variant.fmt)
    dense = linear_work(None, m, n, k, DTYPE)
    partials = 2 * row["split_k"] * m * n * 4 if row["split_k"] > 1 else 0  # fp32 written, read back and summed
    issue_s = row["warp_instructions"] / device.issue_rate
    bytes_s = (work.bytes + partials) / device.bandwidth
    compute_s = work.flops / device.flops
    cublas_s = max(dense.bytes / device.bandwidth, dense.flops / device.flops)
    kernel_s = max(issue_s, bytes_s, compute_s)
    return {
        "issue_bound_us": issue_s * 1e6,
        "bytes_bound_us": bytes_s * 1e6,
        "compute_bound_us": compute_s * 1e6,
        "bound_by": ("issue", "bytes", "compute")[[issue_s, bytes_s, compute_s].index(kernel_s)],
        "cublas_roofline_us": cublas_s * 1e6,
        "predicted_speedup_vs_cublas": cublas_s / kernel_s,
        "ideal_bytes_speedup": cublas_s / max(work.bytes / device.bandwidth, compute_s),
    }


def run(variants: list[str], shapes: list[str], ms: list[int], arch: int, workdir: Path) -> list[dict]:
    device = DEVICES[ARCH_DEVICE[arch]]
    compiled: dict[tuple, list[dict]] = {}
    rows = []
    for name in variants:
        variant = Variant.parse(name)
        for shape_name in shapes:
            n, k = SHAPES[shape_name]
            for m in ms:
                if variant.fmt == "bitmap":
                    key = ("bitmap", n, k, m)
                    launches = _bitmap_launch(n, k, m, device.sms)
                elif variant.fmt == "csr8":  # the entry loop's trips depend on the density
                    key = ("csr8", variant.pattern.sparsity, n, k, m)
                    launches = _csr8_launch(n, k, m, 1 - variant.pattern.sparsity, device.sms)
                elif variant.fmt == "nm":
                    key = ("nm", variant.pattern.n, variant.pattern.m, n, k, m)
                    launches = _nm_launches(n, k, m, variant.pattern, device.sms)
                else:
                    key = ("bsr", variant.pattern.label, n, k, m)
                    launches = _bsr_launches(n, k, m, variant.pattern)
                if key not in compiled:  # bitmap's code does not depend on its sparsity: compile once
                    compiled[key] = [{**analyse(launch, arch, workdir), "split_k": launch.split_k}
                                     for launch in launches]
                candidates = [{**r, **predict(r, variant, n, k, m, device)} for r in compiled[key]]
                best = max(candidates, key=lambda r: r["predicted_speedup_vs_cublas"])
                rows.append({
                    "variant": name, "format": variant.fmt, "pattern": variant.pattern.label, "shape": [n, k], "m": m,
                    "dtype": "bfloat16", "candidates_compiled": len(candidates),
                    "loop_instructions_per_element": loop_instructions(best) / (n * k),
                    "instructions_per_element": best["warp_instructions"] / (n * k),
                    **best,
                })
    return rows


def loop_instructions(row: dict) -> float:
    """Warp-instructions the hot loop issues over all programs (its nested loop at its expected trips)."""
    body = row["loop"]["instructions"] * row["loop_trips_all_programs"]
    if "inner_loop" in row:
        size = row["inner_loop"]["instructions"]
        body += size * (row["inner_trips_all_programs"] - row["loop_trips_all_programs"])
    return body * row["num_warps"]


_ABBR = {"LANES": "l", "BLOCK_M": "m", "BLOCK_N": "n", "BLOCK_K": "k", "GROUP": "g", "SPLIT_K": "s"}


def table(rows: list[dict], arch: int) -> str:
    head = (f"sm_{arch} ({ARCH_DEVICE[arch]} rates), bf16; PREDICTED speedup over cuBLAS from static SASS counts "
            "(not measured)\n"
            f"{'variant':<12} {'N x K':<11} {'M':>4} {'cfg':<28} {'loop':>5} {'BAR':>4} {'SHFL':>4} {'SMEM':>4} "
            f"{'reg':>4} {'spill':>5} {'inst/el':>7} {'issue us':>8} {'bytes us':>8} {'cuBLAS us':>9} {'pred x':>6}")
    lines = [head]
    for r in rows:
        cfg = " ".join(f"{_ABBR[k]}{v}" for k, v in r["config"].items() if k in _ABBR) + f" w{r['num_warps']}"
        if "inner_loop" in r:
            cfg += f" in{r['inner_loop']['instructions']}x{r['inner_trips_all_programs'] / r['loop_trips_all_programs']:.1f}"
        feats = "".join(c for f, c in (("cp_async", "a"), ("tma", "t"), ("wgmma", "g")) if r["uses"][f])
        lines.append(
            f"{r['variant']:<12} {r['shape'][0]}x{r['shape'][1]:<6} {r['m']:>4} {cfg + (' ' + feats if feats else ''):<28}"
            f" {r['loop']['instructions']:>5} {r['loop']['bar']:>4} {r['loop']['shfl']:>4} {r['loop']['shared']:>4}"
            f" {r['registers']:>4} {r['spill_bytes']:>5} {r['instructions_per_element']:>7.3f}"
            f" {r['issue_bound_us']:>8.1f} {r['bytes_bound_us']:>8.1f} {r['cublas_roofline_us']:>9.1f}"
            f" {r['predicted_speedup_vs_cublas']:>6.2f}")
    lines.append("cfg: m/n/k = BLOCK_M/N/K, g = GROUP, s = SPLIT_K, w = warps, l = lanes per row, in<i>x<t> = a nested loop of i instructions "
                 "run t times per hot-loop trip (expected); a/t/g: cp.async / TMA / wgmma in the code; loop: instructions "
                 "per warp per trip; inst/el: warp-instructions per dense weight element")
    return "\n".join(lines)


def issue_points(rows: list[dict]) -> dict[str, list[dict]]:
    """The issue-cost file's entries for one arch, from its rows: per kernel (kernels.issue_costs.kernel_key), the
    instructions per dense element at each (density, shape, M)."""
    points: dict[str, list[dict]] = {}
    for r in rows:
        variant = Variant.parse(r["variant"])
        fmt, params = export_format(variant.pattern, variant.fmt)
        points.setdefault(issue_costs.kernel_key(fmt, params), []).append({
            "density": round(1 - variant.pattern.sparsity, 6), "shape": r["shape"], "m": r["m"],
            "per_element": r["instructions_per_element"]})
    return points


def _result(arch: int, rows: list[dict], seconds: float) -> dict:
    device = DEVICES[ARCH_DEVICE[arch]]
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "platform": platform.platform(), "gpu": None},
        "triton": triton.__version__,
        "target": {"backend": "cuda", "arch": arch, "warp_size": 32},
        "device_rates": {"profile": device.key, "sms": device.sms, "clock_hz": device.clock_hz,
                         "schedulers_per_sm": device.schedulers_per_sm, "bandwidth": device.bandwidth,
                         "flops": device.flops},
        "note": "static prediction from compiled SASS, not a measurement (see allocator/benchmarks/kernel_static.py)",
        "seconds": seconds,
        "rows": rows,
    }


def write_issue_costs(archs: list[int], out: Path, path: Path = issue_costs.ISSUE_COSTS) -> Path:
    """Run the issue-cost sweep on `archs` and write kernels/issue_costs.json (atomically; what the roofline reads)
    and each arch's rows to `out`/issue-sm<arch>.json."""
    archs_points = {}
    for arch in archs:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            rows = run(list(ISSUE_VARIANTS), list(SHAPES), list(ISSUE_MS), arch, Path(tmp))
        write_json_atomic(out / f"issue-sm{arch}.json", json.loads(json.dumps(_result(arch, rows,
                                                                                 time.perf_counter() - started))))
        archs_points[str(arch)] = dict(sorted(issue_points(rows).items()))
    write_json_atomic(path, {
        "command": "python -m allocator.benchmarks.kernel_static --issue-costs",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "triton": triton.__version__,
        "note": "warp-instructions per dense weight element of each sparse kernel as compiled for each SASS arch "
                "(static count of its SASS, allocator/benchmarks/kernel_static.py; launches sized for the arch's "
                f"device: {', '.join(f'sm_{a} {ARCH_DEVICE[a]}' for a in archs)}); read by kernels/issue_costs.py",
        "archs": archs_points,
    })
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=None, choices=sorted(ARCH_DEVICE),
                        help="default 90 80 (with --issue-costs: 90 89 80)")
    parser.add_argument("--only", nargs="+", default=list(VARIANTS), help="variants, e.g. bitmap70 csr8-70 nm2:4")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--ms", type=int, nargs="+", default=list(MS))
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--issue-costs", nargs="?", type=Path, const=issue_costs.ISSUE_COSTS, default=None,
                        metavar="PATH", help="run the issue-cost sweep and write it to PATH (default "
                                             "kernels/issue_costs.json); --only/--shapes/--ms do not apply")
    args = parser.parse_args(argv)
    if triton.knobs.runtime.interpret:
        raise SystemExit("kernel_static: TRITON_INTERPRET is set, so the kernels were built for the interpreter and "
                         "cannot be compiled; unset it")
    if args.issue_costs is not None:
        return [write_issue_costs(args.arch or list(ISSUE_ARCHS), args.out, args.issue_costs)]
    paths = []
    for arch in args.arch or [90, 80]:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            rows = run(args.only, args.shapes, args.ms, arch, Path(tmp))
        result = _result(arch, rows, time.perf_counter() - started)
        path = args.out / f"sm{arch}.json"
        write_json_atomic(path, json.loads(json.dumps(result)))
        print(table(rows, arch))
        print(f"wrote {path} ({result['seconds']:.1f} s)")
        paths.append(path)
    return paths


if __name__ == "__main__":
    main()
