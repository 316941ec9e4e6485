"""What each engine's shapes cost (space.runtime), from the memory model and the H100 roofline. Nothing is measured.

python -m allocator.benchmarks.runtime_padding  →  runs/bench/runtime/padding.json, and the README's tables

Per model shape (SmolLM2-135M, Llama-3-8B) and engine, for every attention option the engine offers: the weight
bytes of one layer's attention (16 bits), its KV cache per token, and its H100 roofline time per layer (prefill of
512 tokens, decode at batch 1 over 512 tokens); and the price of llama.cpp's zero MLP for a dropped MLP."""

from __future__ import annotations

from allocator.benchmarks.common import write_result
from allocator.benchmarks.roofline import SHAPES
from allocator.core.config import Runtime, SpaceConfig
from allocator.core.memory import kv_bytes, unit_weight_bytes
from allocator.core.space import ATTN, MLP, ModelShape, build_space, run_shape
from profilers import roofline
from profilers.devices import DEVICES
from profilers.regimes import Regime

REGIMES = [Regime("prefill", "prefill", 1, 512), Regime("decode_b1", "decode", 1, 512)]
DEVICE = "h100"
BYTES = roofline.ELEMENT_BYTES


def option_row(shape: ModelShape, runtime: Runtime, kind: str, option: int) -> dict:
    space = build_space(shape, SpaceConfig(runtime=runtime))
    run = run_shape(shape, kind, option, space.rules)
    seconds = roofline.UNIT_SECONDS[kind]
    return {
        "option": option,
        "query_heads": run.num_heads if kind == ATTN else None,
        "kv_heads": run.num_kv_heads if kind == ATTN else None,
        "neurons": run.intermediate if kind == MLP else None,
        "weight_bytes": unit_weight_bytes(shape, kind, option, BYTES, space.rules),
        "kv_bytes_per_token": kv_bytes(shape, option, 1, 1, BYTES, space.rules) if kind == ATTN else 0,
        "us_per_layer": {r.name: 1e6 * seconds(DEVICES[DEVICE], shape, r, option, space.rules) for r in REGIMES},
    }


def main() -> None:
    result: dict = {"device": DEVICE, "dtype_bytes": BYTES, "regimes": [r.name for r in REGIMES], "models": {}}
    for name, shape in SHAPES.items():
        model: dict = {}
        for runtime in Runtime:
            space = build_space(shape, SpaceConfig(runtime=runtime))
            model[str(runtime)] = {
                "attention": [option_row(shape, runtime, ATTN, k) for k in space.options[ATTN]],
                "mlp_dropped": option_row(shape, runtime, MLP, 0),
            }
        result["models"][name] = model
    path = write_result("runtime", "padding", result)
    for name, model in result["models"].items():
        print(f"\n{name}: one layer's attention per engine ({DEVICE} roofline, 16-bit)")
        print("| KV groups kept | engine | query heads run | weights (KiB) | KV cache (B/token) | prefill µs | decode µs |")
        print("|---|---|---|---|---|---|---|")
        for runtime, rows in model.items():
            for row in rows["attention"]:
                us = row["us_per_layer"]
                print(f"| {row['option']} | {runtime} | {row['query_heads']} | {row['weight_bytes'] / 1024:.0f} | "
                      f"{row['kv_bytes_per_token']} | {us['prefill']:.2f} | {us['decode_b1']:.2f} |")
        for runtime, rows in model.items():
            row = rows["mlp_dropped"]
            print(f"dropped MLP, {runtime}: {row['neurons']} neurons run, {row['weight_bytes'] / 1024:.0f} KiB, "
                  f"prefill {row['us_per_layer']['prefill']:.2f} µs, decode {row['us_per_layer']['decode_b1']:.2f} µs")
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
