"""Roofline latency model: a kernel costs max(bytes / bandwidth, FLOPs / throughput, warp-instructions / issue rate)
plus a launch overhead.

Per linear it prices the kernel the exported model runs: a dense GEMM at the shape the space's engine runs
(allocator.core.space.run_shape: the kept width, or under vLLM every query head, zero-padded), or on a GPU the
sparse option's export format (a CPU has no sparse kernel: SparseLinear decompresses once and runs the dense GEMM,
so there a sparse unit costs its full-width dense unit), whose bytes and FLOPs come from the format registry (allocator.core.formats), so the
roofline prices the model that is exported. Unstructured options are priced in the format the plan exports (the
Space's unstructured_format) in every regime; a scalar format (csr8: no tensor cores) has its FLOPs priced at the
CUDA-core rate, which is what its prefill costs. From those it builds a CostTable in the CPU profiler's format, so the
search plans for a device that is not present (source "roofline") exactly as it does with a measured table."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch

from allocator.core.formats import (
    SCALAR_FORMATS,
    UNSTRUCTURED_FORMATS,
    KernelWork,
    format_choice,
    linear_work,
)
from allocator.core.patterns import SparsityPattern
from allocator.core.space import (
    ATTN,
    MLP,
    NATIVE,
    EngineRules,
    ModelShape,
    Option,
    Space,
    is_sparse,
    kept_width,
    option_params,
    run_shape,
    runs,
    sparse_pattern,
    unit_linear_shapes,
)
from profilers.devices import DeviceSpec, scalar_flops
from profilers.regimes import Regime
from profilers.table import CostTable, RegimeCosts, clean_curve, runtime_settings

log = logging.getLogger(__name__)

# Part of the table's cache key: a change of the model writes a new table.
METHOD = ("roofline v3: max(bytes/bandwidth, flops/throughput, sparse kernels' warp-instructions/issue rate) + launch "
          "per kernel; 16-bit weights and activations; sparse linears as allocator.core.formats stores and runs them, "
          "their issue from kernels/issue_costs.json; on a CPU as the dense unit")

DTYPE = torch.bfloat16  # these devices serve LLMs in 16 bits whatever dtype the host search loads
ELEMENT_BYTES = DTYPE.itemsize


def deploy_dtype(dtype: str) -> str:
    """The precision a device table is for: the model's if it is 16-bit, else bf16 (a float32 host model is
    served in bf16 on these devices)."""
    return dtype if dtype in ("bfloat16", "float16") else "bfloat16"


def weight_bytes_per_element(
    pattern: SparsityPattern | None, out_features: int, in_features: int, fmt: str | None = None
) -> float:
    """Bytes an (out, in) linear's kernel reads per element of the dense weight: dense (`pattern` None) or in the
    pattern's export format (or `fmt`), values and metadata."""
    return linear_work(pattern, 1, out_features, in_features, DTYPE, fmt).weight_bytes / (out_features * in_features)


def ideal_decode_speedup(pattern: SparsityPattern, out_features: int, in_features: int, fmt: str | None = None) -> float:
    """Decode at M = 1 reads every weight once and is memory bound: the speedup is the ratio of weight bytes."""
    return ELEMENT_BYTES / weight_bytes_per_element(pattern, out_features, in_features, fmt)


@dataclass(frozen=True)
class KernelCost:
    bytes: float
    flops: float
    seconds: float
    bound: str  # "memory", "compute" or "issue": which roof the kernel sits under
    instructions: float = 0.0


def kernel_cost(
    device: DeviceSpec, nbytes: float, flops: float, tensor_cores: bool = True, instructions: float = 0.0
) -> KernelCost:
    """`tensor_cores` False: the FLOPs run at the CUDA-core rate (a scalar format: csr8). `instructions`: the
    warp-instructions a sparse kernel issues (KernelWork.warp_instructions), at the device's issue rate."""
    rate = device.flops if tensor_cores else scalar_flops(device)
    roofs = {"memory": nbytes / device.bandwidth, "compute": flops / rate,
             "issue": instructions / device.issue_rate if instructions else 0.0}
    bound = max(roofs, key=roofs.__getitem__)  # ties go to the first: memory, then compute
    return KernelCost(nbytes, flops, roofs[bound] + device.launch_s, bound, instructions)


def work_cost(device: DeviceSpec, work: KernelWork) -> KernelCost:
    return kernel_cost(device, work.bytes, work.flops, work.tensor_cores, work.warp_instructions)


def linear_cost(
    device: DeviceSpec, pattern: SparsityPattern | None, m: int, in_features: int, out_features: int,
    fmt: str | None = None,
) -> KernelCost:
    """y = x W^T for M rows of x with W (out x in) dense (`pattern` None) or stored and run as `pattern` is
    exported, or in `fmt` (allocator.core.formats: its stored bytes, the FLOPs of the weight elements its kernel
    multiplies: bitmap and N:M expand tiles to dense before the MMA, BSR multiplies its stored blocks only, and the
    warp-instructions its kernel issues on the device's architecture)."""
    return work_cost(device, linear_work(pattern, m, out_features, in_features, DTYPE, fmt, device.arch))


def _elementwise(device: DeviceSpec, nbytes: float) -> float:
    return kernel_cost(device, nbytes, 0.0).seconds


def _norm_work(m: int, hidden: int) -> KernelWork:
    return KernelWork(ELEMENT_BYTES * hidden, ELEMENT_BYTES * 2 * m * hidden, 0)  # read the weight and x, write y


def _norm(device: DeviceSpec, m: int, hidden: int) -> float:
    return work_cost(device, _norm_work(m, hidden)).seconds


def unit_weight_kernels(
    shape: ModelShape, kind: str, option: Option, m: int, rules: EngineRules = NATIVE,
    unstructured_format: str = "bitmap", arch: int = 0,
) -> list[KernelWork]:
    """The kernels of a unit that read weights, for m rows: its norm, and its linears dense at the shape the engine
    runs (run_shape: zero-padded heads and neurons included) or in the sparse option's export format (unstructured
    ones in `unstructured_format`, the plan's Space's; with `arch`, their issued instructions there); none when the
    unit does not run (its norm goes with the block)."""
    run = run_shape(shape, kind, option, rules)
    if not runs(run, kind):
        return []
    pattern = sparse_pattern(option) if is_sparse(option) else None
    fmt = None if pattern is None else format_choice(pattern, unstructured_format)
    linears = [linear_work(pattern, m, rows, cols, DTYPE, fmt, arch) for rows, cols in unit_linear_shapes(run, kind)]
    return [_norm_work(m, shape.hidden), *linears]


def unit_weight_bytes(
    shape: ModelShape, kind: str, option: Option, rules: EngineRules = NATIVE, unstructured_format: str = "bitmap"
) -> int:
    """Weight bytes a unit's kernels read per step, 16-bit: what the exported checkpoint stores for the unit."""
    return sum(work.weight_bytes for work in unit_weight_kernels(shape, kind, option, 1, rules, unstructured_format))


def _unit_kernels_seconds(
    device: DeviceSpec, shape: ModelShape, kind: str, option: Option, m: int, rules: EngineRules,
    unstructured_format: str,
) -> float:
    if is_sparse(option) and not device.is_gpu:  # a CPU runs SparseLinear decompressed: the full-width dense unit
        option = kept_width(shape, kind, option)
    kernels = unit_weight_kernels(shape, kind, option, m, rules, unstructured_format, device.arch)
    return sum(work_cost(device, w).seconds for w in kernels)


def tokens(regime: Regime) -> int:
    """Rows every linear sees: all prompt tokens in prefill, one new token per sequence in decode."""
    return regime.batch * regime.length if regime.kind == "prefill" else regime.batch


def attention_core_seconds(device: DeviceSpec, run: ModelShape, regime: Regime) -> float:
    """Scores and weighted values of an attention of run shape `run` (run_shape): its query heads over its KV
    heads. Decode streams the KV cache (K and V, 16 bits each); prefill is fused (flash) attention: Q, K, V, O once
    through memory, causal half of the score/value FLOPs."""
    kept, heads = run.num_kv_heads, run.num_heads
    if kept == 0:
        return 0.0
    kv_bytes = regime.batch * regime.length * kept * run.head_dim * 2 * ELEMENT_BYTES
    if regime.kind == "decode":
        flops = 2 * 2 * regime.batch * heads * regime.length * run.head_dim
        return kernel_cost(device, kv_bytes, flops).seconds
    qo_bytes = regime.batch * regime.length * heads * run.head_dim * 2 * ELEMENT_BYTES
    flops = 2 * 2 * regime.batch * heads * regime.length * regime.length * run.head_dim / 2
    return kernel_cost(device, kv_bytes + qo_bytes, flops).seconds


def attention_unit_seconds(
    device: DeviceSpec, shape: ModelShape, regime: Regime, option: Option, rules: EngineRules = NATIVE,
    unstructured_format: str = "bitmap",
) -> float:
    """Input norm, q/k/v/o at the run shape (under vLLM all query heads, the pruned ones zero) and the attention
    itself; 0 when dropped (the norm goes with the block, as in allocator.model.surgery). Unstructured options run
    in `unstructured_format` in every regime."""
    run = run_shape(shape, ATTN, option, rules)
    if not runs(run, ATTN):
        return 0.0
    kernels = _unit_kernels_seconds(device, shape, ATTN, option, tokens(regime), rules, unstructured_format)
    return kernels + attention_core_seconds(device, run, regime)


def mlp_unit_seconds(
    device: DeviceSpec, shape: ModelShape, regime: Regime, option: Option, rules: EngineRules = NATIVE,
    unstructured_format: str = "bitmap",
) -> float:
    """Post-attention norm, gate/up/down for the neurons run (under llama.cpp a dropped MLP runs as a zero MLP of
    rules.zero_mlp neurons) and the SiLU(gate) * up between them; 0 when dropped."""
    neurons = run_shape(shape, MLP, option, rules).intermediate
    if not neurons:
        return 0.0
    m = tokens(regime)
    linears = _unit_kernels_seconds(device, shape, MLP, option, m, rules, unstructured_format)
    return linears + _elementwise(device, 3 * ELEMENT_BYTES * m * neurons)


def cheaper_unstructured_format(
    device: DeviceSpec, shape: ModelShape, patterns: list[SparsityPattern], regime: Regime,
    rules: EngineRules = NATIVE,
) -> str:
    """What space.unstructured_format=auto exports (allocator.core.formats.resolve_unstructured_format): the
    unstructured format this roofline prices cheaper on `device` in `regime` over the space's unstructured
    `patterns`: the geometric mean of the attention and MLP unit times with the unit at each level (the plan's
    levels are not known before the search; a plain sum would let the slowest, least sparse levels, which a
    latency budget rarely picks, decide). The issue roof decides it: csr8 (per stored value) at small decode batches
    and high sparsity where bandwidth is plentiful (an H200), bitmap (fewer bytes, a fixed issue cost) from about
    8 rows on and where bandwidth is scarce. Bitmap on a tie: a CPU runs either decompressed, and bitmap stores
    less."""
    levels = [p.label for p in patterns if p.kind == "unstructured"]

    def log_seconds(fmt: str) -> float:
        return sum(math.log(UNIT_SECONDS[kind](device, shape, regime, level, rules, fmt)) for level in levels
                   for kind in (ATTN, MLP))

    return min(UNSTRUCTURED_FORMATS, key=log_seconds)  # the first (bitmap, the default) on a tie


def fixed_seconds(device: DeviceSpec, shape: ModelShape, regime: Regime) -> float:
    """What no option removes: the embedding rows gathered, the final norm, and lm_head on the last position of
    each sequence (generation keeps only the last logits)."""
    m = tokens(regime)
    embed = _elementwise(device, ELEMENT_BYTES * 2 * m * shape.hidden)
    lm_head = linear_cost(device, None, regime.batch, shape.hidden, shape.vocab).seconds
    return embed + _norm(device, m, shape.hidden) + lm_head


UNIT_SECONDS = {ATTN: attention_unit_seconds, MLP: mlp_unit_seconds}


def regime_costs(
    device: DeviceSpec, shape: ModelShape, options: dict[str, list[int]], regime: Regime, rules: EngineRules = NATIVE,
    unstructured_format: str = "bitmap",
) -> RegimeCosts:
    """One regime's costs. Every regime prices unstructured options in the one format the plan exports
    (`unstructured_format`): a plan for decode_b1 in csr8 runs csr8 at prefill too, and its table says what that costs."""
    unit_ms = {
        kind: clean_curve({k: 1e3 * UNIT_SECONDS[kind](device, shape, regime, k, rules, unstructured_format)
                           for k in kept})
        for kind, kept in options.items()
    }
    fixed_ms = 1e3 * fixed_seconds(device, shape, regime)
    full = {ATTN: shape.num_kv_heads, MLP: shape.intermediate}
    dense_ms = fixed_ms + shape.num_layers * sum(
        1e3 * UNIT_SECONDS[kind](device, shape, regime, width) for kind, width in full.items()
    )
    return RegimeCosts(regime=asdict(regime), fixed_ms=fixed_ms, dense_ms=dense_ms, unit_ms=unit_ms)


def roofline_fingerprint(device: DeviceSpec, dtype: str) -> dict:
    return {"device": device.name, "dtype": deploy_dtype(dtype), "spec": asdict(device)}


def roofline_table(
    device: DeviceSpec, space: Space, regimes: list[Regime], dtype: str
) -> CostTable:
    """The CostTable a measured profile of `device` would give, from its datasheet numbers, for the shapes the
    space's engine runs."""
    shape, options = space.shape, space.options
    layer = option_params(shape, ATTN, shape.num_kv_heads) + option_params(shape, MLP, shape.intermediate)
    weights_gb = ELEMENT_BYTES * (shape.num_layers * layer + 2 * shape.vocab * shape.hidden) / 1e9
    if weights_gb > device.memory_gb:  # priced anyway, as if it fit: the plan may be what makes it fit
        log.warning("dense model (%.1f GB in 16 bits) exceeds %s (%g GB)", weights_gb, device.name, device.memory_gb)
    # The format (and the CUDA-core rate a scalar one is priced at) joins the key only when it is not bitmap, so
    # bitmap tables keep their keys; so does the engine, only when it is not native.
    settings = {"regimes": [asdict(r) for r in regimes], "method": METHOD, **space.format_settings(),
                **runtime_settings(space)}
    if space.unstructured_format in SCALAR_FORMATS:
        settings["scalar_flops"] = scalar_flops(device)
    costs = {r.name: regime_costs(device, shape, options, r, space.rules, space.unstructured_format) for r in regimes}
    fingerprint = roofline_fingerprint(device, dtype)
    return CostTable(device.key, "roofline", fingerprint, asdict(shape), options, settings, costs)
