"""Roofline latency model: a kernel costs max(bytes / bandwidth, FLOPs / throughput) plus a launch overhead.

Per weight format it prices one linear; from those it builds a CostTable in the CPU profiler's format, so the
search plans for a device that is not present (source "roofline") exactly as it does with a measured table."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from allocator.core.patterns import SparsityPattern
from allocator.core.space import ATTN, MLP, ModelShape, Option, Unit, is_sparse, option_params, sparse_pattern
from profilers.devices import DeviceSpec
from profilers.regimes import Regime
from profilers.table import CostTable, RegimeCosts, clean_curve

log = logging.getLogger(__name__)

# Part of the table's cache key: a change of the model writes a new table.
METHOD = "roofline v1: max(bytes/bandwidth, flops/throughput) + launch per kernel; 16-bit weights and activations"

ELEMENT_BYTES = 2  # bf16/fp16: these devices serve LLMs in 16 bits whatever dtype the host search loads
FORMATS = ("dense", "structured", "2:4", "bitmap", "csr16")
# Bitmap: one 32-bit mask word per 32-element tile with a 16-bit offset of its values inside its group, and one
# 32-bit absolute offset per 4096-element group (16 bits cannot address a whole matrix). 1/8 + 2/32 + 4/4096 =
# 0.1885 B of metadata per element gives ANCHORS' ideal decode speedups 1.68x / 2.54x / 5.15x at 50 / 70 / 90%.
BITMAP_TILE = 32
BITMAP_GROUP = 4096


def deploy_dtype(dtype: str) -> str:
    """The precision a device table is for: the model's if it is 16-bit, else bf16 (a float32 host model is
    served in bf16 on these devices)."""
    return dtype if dtype in ("bfloat16", "float16") else "bfloat16"


def weight_bytes_per_element(fmt: str, sparsity: float) -> float:
    """Bytes read per element of the original dense weight matrix."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1)")
    density = 1.0 - sparsity
    if fmt == "dense":
        if sparsity:
            raise ValueError(f"format 'dense' has sparsity 0, not {sparsity}")
        return ELEMENT_BYTES
    if fmt == "structured":  # a smaller dense matrix
        return ELEMENT_BYTES * density
    if fmt == "2:4":  # per 4 elements: 2 values and 2 two-bit indices = 4.5 B per 8 B dense
        if abs(sparsity - 0.5) > 1e-9:
            raise ValueError(f"format '2:4' has sparsity 0.5, not {sparsity}")
        return (2 * ELEMENT_BYTES + 4 / 8) / 4
    if fmt == "bitmap":
        return ELEMENT_BYTES * density + 1 / 8 + 2 / BITMAP_TILE + 4 / BITMAP_GROUP
    if fmt == "csr16":  # a value and a 16-bit column index per nonzero (row pointers: per row, negligible)
        return (ELEMENT_BYTES + 2) * density
    raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(FORMATS)}")


def ideal_decode_speedup(fmt: str, sparsity: float) -> float:
    """Decode at M = 1 reads every weight once and is memory bound: the speedup is the ratio of weight bytes."""
    return ELEMENT_BYTES / weight_bytes_per_element(fmt, sparsity)


@dataclass(frozen=True)
class KernelCost:
    bytes: float
    flops: float
    seconds: float
    bound: str  # "memory" or "compute": which roof the kernel sits under


def kernel_cost(device: DeviceSpec, nbytes: float, flops: float) -> KernelCost:
    memory_s, compute_s = nbytes / device.bandwidth, flops / device.flops
    bound = "memory" if memory_s >= compute_s else "compute"
    return KernelCost(nbytes, flops, max(memory_s, compute_s) + device.launch_s, bound)


def linear_cost(
    device: DeviceSpec, fmt: str, m: int, in_features: int, out_features: int, sparsity: float = 0.0
) -> KernelCost:
    """y = x W^T for M rows of x with W (out x in) stored in `fmt`. Structured sparsity removes output rows (fewer
    FLOPs, smaller output); 2:4 halves the FLOPs on sparse tensor cores; bitmap and CSR expand to dense tiles
    before the MMA, so they save bytes only."""
    weight = weight_bytes_per_element(fmt, sparsity) * in_features * out_features
    flops = 2.0 * m * in_features * out_features
    out = out_features
    if fmt == "structured":
        flops *= 1.0 - sparsity
        out = round(out_features * (1.0 - sparsity))
    elif fmt == "2:4" and device.sparse_tensor_cores:
        flops *= 0.5
    activations = ELEMENT_BYTES * m * (in_features + out)
    return kernel_cost(device, weight + activations, flops)


def linear_seconds(
    device: DeviceSpec, fmt: str, m: int, in_features: int, out_features: int, sparsity: float = 0.0
) -> float:
    """Seconds of one linear in `fmt`: the per-format price the sparse options will be costed with."""
    return linear_cost(device, fmt, m, in_features, out_features, sparsity).seconds


def _dense(device: DeviceSpec, m: int, in_features: int, out_features: int) -> float:
    return linear_seconds(device, "dense", m, in_features, out_features) if in_features and out_features else 0.0


def pattern_linear_seconds(device: DeviceSpec, pattern: SparsityPattern, m: int, in_features: int, out_features: int) -> float:
    """A linear pruned to `pattern`, priced in the format it is exported as: unstructured as bitmap, 2:4 as 2:4,
    other N:M as bitmap at their density (their kernel expands to dense tiles too), block sparsity as a dense
    product over the kept blocks."""
    if pattern.kind == "nm" and (pattern.n, pattern.m) == (2, 4):
        fmt = "2:4"
    elif pattern.kind == "block":
        fmt = "structured"
    else:
        fmt = "bitmap"
    return linear_seconds(device, fmt, m, in_features, out_features, pattern.sparsity)


def _linears(device: DeviceSpec, m: int, option: Option):
    """Prices a unit's linears: dense (at their structured width) or in the sparse option's format."""
    if not is_sparse(option):
        return lambda i, o: _dense(device, m, i, o)
    pattern = sparse_pattern(option)
    return lambda i, o: pattern_linear_seconds(device, pattern, m, i, o)


def _elementwise(device: DeviceSpec, nbytes: float) -> float:
    return kernel_cost(device, nbytes, 0.0).seconds


def _norm(device: DeviceSpec, m: int, hidden: int) -> float:
    return _elementwise(device, ELEMENT_BYTES * (2 * m * hidden + hidden))  # read x, write y, read the weight


def tokens(regime: Regime) -> int:
    """Rows every linear sees: all prompt tokens in prefill, one new token per sequence in decode."""
    return regime.batch * regime.length if regime.kind == "prefill" else regime.batch


def attention_core_seconds(device: DeviceSpec, shape: ModelShape, regime: Regime, kept: int) -> float:
    """Scores and weighted values for `kept` KV groups. Decode streams the KV cache (K and V, 16 bits each);
    prefill is fused (flash) attention: Q, K, V, O once through memory, causal half of the score/value FLOPs."""
    if kept == 0:
        return 0.0
    heads = kept * shape.heads_per_group
    kv_bytes = regime.batch * regime.length * kept * shape.head_dim * 2 * ELEMENT_BYTES
    if regime.kind == "decode":
        flops = 2 * 2 * regime.batch * heads * regime.length * shape.head_dim
        return kernel_cost(device, kv_bytes, flops).seconds
    qo_bytes = regime.batch * regime.length * heads * shape.head_dim * 2 * ELEMENT_BYTES
    flops = 2 * 2 * regime.batch * heads * regime.length * regime.length * shape.head_dim / 2
    return kernel_cost(device, kv_bytes + qo_bytes, flops).seconds


def attention_unit_seconds(device: DeviceSpec, shape: ModelShape, regime: Regime, option: Option) -> float:
    """Input norm, q/k/v/o for the kept KV groups and the attention itself; 0 when dropped (the norm goes with the
    block, as in allocator.model.surgery)."""
    if option == 0:
        return 0.0
    kept = shape.num_kv_heads if is_sparse(option) else option
    m, hidden = tokens(regime), shape.hidden
    q, kv = kept * shape.heads_per_group * shape.head_dim, kept * shape.head_dim
    linear = _linears(device, m, option)
    linears = linear(hidden, q) + 2 * linear(hidden, kv) + linear(q, hidden)
    return _norm(device, m, hidden) + linears + attention_core_seconds(device, shape, regime, kept)


def mlp_unit_seconds(device: DeviceSpec, shape: ModelShape, regime: Regime, option: Option) -> float:
    """Post-attention norm, gate/up/down for the kept neurons and the SiLU(gate) * up between them; 0 when dropped."""
    if option == 0:
        return 0.0
    kept = shape.intermediate if is_sparse(option) else option
    m, hidden = tokens(regime), shape.hidden
    linear = _linears(device, m, option)
    linears = 2 * linear(hidden, kept) + linear(kept, hidden)
    return _norm(device, m, hidden) + linears + _elementwise(device, 3 * ELEMENT_BYTES * m * kept)


def fixed_seconds(device: DeviceSpec, shape: ModelShape, regime: Regime) -> float:
    """What no option removes: the embedding rows gathered, the final norm, and lm_head on the last position of
    each sequence (generation keeps only the last logits)."""
    m = tokens(regime)
    embed = _elementwise(device, ELEMENT_BYTES * 2 * m * shape.hidden)
    return embed + _norm(device, m, shape.hidden) + _dense(device, regime.batch, shape.hidden, shape.vocab)


UNIT_SECONDS = {ATTN: attention_unit_seconds, MLP: mlp_unit_seconds}


def regime_costs(device: DeviceSpec, shape: ModelShape, options: dict[str, list[int]], regime: Regime) -> RegimeCosts:
    unit_ms = {
        kind: clean_curve({k: 1e3 * UNIT_SECONDS[kind](device, shape, regime, k) for k in kept})
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
    device: DeviceSpec, shape: ModelShape, units: list[Unit], regimes: list[Regime], dtype: str
) -> CostTable:
    """The CostTable a measured profile of `device` would give, from its datasheet numbers (structured options)."""
    layer = option_params(shape, ATTN, shape.num_kv_heads) + option_params(shape, MLP, shape.intermediate)
    weights_gb = ELEMENT_BYTES * (shape.num_layers * layer + 2 * shape.vocab * shape.hidden) / 1e9
    if weights_gb > device.memory_gb:  # priced anyway, as if it fit: the plan may be what makes it fit
        log.warning("dense model (%.1f GB in 16 bits) exceeds %s (%g GB)", weights_gb, device.name, device.memory_gb)
    options = {ATTN: list(units[0].options), MLP: list(units[1].options)}  # every layer shares its kind's options
    settings = {"regimes": [asdict(r) for r in regimes], "method": METHOD}
    costs = {r.name: regime_costs(device, shape, options, r) for r in regimes}
    fingerprint = roofline_fingerprint(device, dtype)
    return CostTable(device.key, "roofline", fingerprint, asdict(shape), options, settings, costs)
