"""The roofline's figures for the sparse formats, read off the format registry (allocator.core.formats).

python -m allocator.benchmarks.roofline  →  runs/bench/roofline/formats.json

For every sparse option of the default mixed space (unstructured 10-90% as bitmap, 2:4 and 4:8 as N:M, 16x16
blocks at 25/50/75% as BSR), and the unstructured ones again as csr8 ("<label>/csr8", space.unstructured_format;
its FLOPs at the CUDA-core rate), in 16 bits:
  - bytes per element of a 4096x4096 linear (values and metadata, as the exported checkpoint stores them) and the
    ideal decode speedup, the ratio of weight bytes to dense;
  - the roofline's predicted whole-model speedup on an H100 with every unit at that option (Llama-3-8B and
    SmolLM2-135M; decode at batch 1 and 16 over a 512-token context, prefill of 512 tokens). Nothing is measured."""

from __future__ import annotations

from allocator.benchmarks.common import write_result
from allocator.core.config import SpaceConfig
from allocator.core.formats import format_choice
from allocator.core.space import ATTN, MLP, ModelShape, full_width, sparse_patterns
from profilers import roofline
from profilers.devices import DEVICES
from profilers.regimes import Regime

SHAPES = {
    "llama3-8b": ModelShape(num_layers=32, hidden=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                            intermediate=14336, vocab=128256),
    # SmolLM2-135M's config.json (the embedded model).
    "smollm2-135m": ModelShape(num_layers=30, hidden=576, num_heads=9, num_kv_heads=3, head_dim=64,
                               intermediate=1536, vocab=49152),
}
REGIMES = [Regime("decode_b1", "decode", 1, 512), Regime("decode_b16", "decode", 16, 512),
           Regime("prefill", "prefill", 1, 512)]
DEVICE = "h100"
LINEAR = (4096, 4096)
# Single linears (out, in) priced alone at decode (M rows of x), on these devices: the figures the static kernel
# benchmark (allocator.benchmarks.kernel_static, H200 rates for sm_90) predicts for the same shapes.
LINEARS = {"4096x4096": (4096, 4096), "4096x14336": (4096, 14336)}
LINEAR_DEVICES = ("h100", "h200")
LINEAR_MS = (1, 16)


def linear_speedups(pattern: object, fmt: str) -> dict:
    """{device: {linear: {"m<M>": dense / sparse roofline time of one call}}}, launch included."""
    out: dict = {}
    for key in LINEAR_DEVICES:
        device = DEVICES[key]
        out[key] = {
            name: {f"m{m}": roofline.linear_cost(device, None, m, cols, rows).seconds
                   / roofline.linear_cost(device, pattern, m, cols, rows, format_choice(pattern, fmt)).seconds
                   for m in LINEAR_MS}
            for name, (rows, cols) in LINEARS.items()
        }
    return out


def model_seconds(shape: ModelShape, regime: Regime, option: object | None, unstructured: str = "bitmap") -> float:
    """Every unit at `option` (None: dense), unstructured options in `unstructured`, as the roofline prices it."""
    device = DEVICES[DEVICE]
    units = {kind: full_width(shape, kind) if option is None else option for kind in (ATTN, MLP)}
    per_layer = sum(roofline.UNIT_SECONDS[kind](device, shape, regime, units[kind],
                                                    unstructured_format=unstructured) for kind in (ATTN, MLP))
    return roofline.fixed_seconds(device, shape, regime) + shape.num_layers * per_layer


def main() -> None:
    patterns = sparse_patterns(SpaceConfig(kind="mixed"))
    # Every option in its default format, and the unstructured ones also in csr8 (space.unstructured_format), as
    # "<label>/csr8": what a plan exporting csr8 is priced at in each regime.
    rows = [(p, p.label, "bitmap") for p in patterns]
    rows += [(p, f"{p.label}/csr8", "csr8") for p in patterns if p.kind == "unstructured"]
    per_element = {
        label: {
            "bytes_per_element": roofline.weight_bytes_per_element(p, *LINEAR, fmt=format_choice(p, fmt)),
            "ideal_decode_speedup": roofline.ideal_decode_speedup(p, *LINEAR, fmt=format_choice(p, fmt)),
        }
        for p, label, fmt in rows
    }
    linears = {label: linear_speedups(p, fmt) for p, label, fmt in rows}
    speedups = {
        name: {
            r.name: {label: model_seconds(shape, r, None) / model_seconds(shape, r, p.label, fmt)
                     for p, label, fmt in rows}
            for r in REGIMES
        }
        for name, shape in SHAPES.items()
    }
    header = f"{'option':>21} {'B/elem':>7} {'ideal':>6}" + "".join(
        f" {name[:9] + ' ' + r.name:>22}" for name in SHAPES for r in REGIMES)
    print(f"{DEVICE} roofline, 16-bit; bytes per element of a {LINEAR[0]}x{LINEAR[1]} linear; whole-model speedups")
    print(header)
    for _, label, _ in rows:
        row = per_element[label]
        cells = "".join(f" {speedups[name][r.name][label]:>22.2f}" for name in SHAPES for r in REGIMES)
        print(f"{label:>21} {row['bytes_per_element']:>7.4f} {row['ideal_decode_speedup']:>6.2f}{cells}")
    print(f"single-linear speedups over dense (roofline, launch included), M = {', '.join(map(str, LINEAR_MS))}")
    print(f"{'option':>21}" + "".join(f" {d + ' ' + n + ' m' + str(m):>22}" for d in LINEAR_DEVICES for n in LINEARS
                                      for m in LINEAR_MS))
    for _, label, _ in rows:
        print(f"{label:>21}" + "".join(f" {linears[label][d][n][f'm{m}']:>22.2f}" for d in LINEAR_DEVICES
                                       for n in LINEARS for m in LINEAR_MS))
    write_result("roofline", "formats", {
        "command": "python -m allocator.benchmarks.roofline",
        "method": roofline.METHOD,
        "device": DEVICE,
        "dtype": str(roofline.DTYPE).removeprefix("torch."),
        "linear": list(LINEAR),
        "per_element": per_element,
        "regimes": [r.name for r in REGIMES],
        "model_speedup": speedups,
        "linear_speedup": linears,
    })


if __name__ == "__main__":
    main()
