"""SparseGPT's per-column loop: one CPU thread against torch's thread count, on one real SmolLM2 unit.

    python -m allocator.benchmarks.sparsegpt_threads [--layer 0] [--rounds 2]

Gathers layer `--layer`'s input Hessians with the layer stream (the default run's calibration text), then times
`sparsegpt_levels` on each MLP linear of that layer at the default space's nine sparsities, with the column loop on
COLUMN_LOOP_THREADS=1 and on torch's thread count, alternating (rounds), and checks the levels are identical.
JSON: runs/bench/database_build/sparsegpt_threads.json."""

from __future__ import annotations

import argparse
import time

import torch

from allocator.benchmarks.common import spread, write_result
from allocator.core.config import DataConfig, ModelConfig, SpaceConfig
from allocator.core.patterns import SparsityPattern
from allocator.levels.compress import sparse_prune
from allocator.levels.compress.layer_stream import stream_layers
from allocator.levels.compress.linear_hessians import InputHessians
from allocator.levels.sparse_levels import HESSIAN_OF
from allocator.model.calibration_data import build_calibration_data
from allocator.model.loader import load_model
from allocator.model.surgery import decoder_layers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-cache", default="runs/cache")
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    loaded = load_model(ModelConfig(), args.model_cache)
    data = build_calibration_data(DataConfig(), loaded.tokenizer)
    names = ("gate_proj", "up_proj", "down_proj")
    hessians = InputHessians({(args.layer, HESSIAN_OF[n]) for n in names})
    stream_layers(loaded.model, data.calibration, 8, [hessians], layers=args.layer + 1)
    mlp = decoder_layers(loaded.model)[args.layer].mlp
    patterns = [SparsityPattern("unstructured", s) for s in SpaceConfig().sparsities]
    threads = torch.get_num_threads()
    seconds: dict[str, list[float]] = {"loop_1_thread": [], f"loop_{threads}_threads": []}
    results = {}
    for _ in range(args.rounds):
        for label, loop in ((f"loop_{threads}_threads", threads), ("loop_1_thread", 1)):
            sparse_prune.COLUMN_LOOP_THREADS = loop
            start = time.perf_counter()
            out = {n: sparse_prune.sparsegpt_levels(getattr(mlp, n).weight.detach(),
                                                    hessians.hessian(args.layer, HESSIAN_OF[n]), patterns)
                   for n in names}
            seconds[label].append(time.perf_counter() - start)
            results[label] = out
    first, second = results.values()
    identical = all(torch.equal(first[n][k].weight, second[n][k].weight) for n in names for k in first[n])
    result = {
        "what": f"SparseGPT levels of SmolLM2 layer {args.layer}'s MLP (gate/up/down, {len(patterns)} sparsities)",
        "seconds": {k: spread(v) for k, v in seconds.items()},
        "identical_levels": identical, "torch_threads": threads,
    }
    print(result)
    write_result("database_build", "sparsegpt_threads", result)


if __name__ == "__main__":
    main()
