"""llama-bench tokens/s of the dense model's GGUF against a search run's `gguf` export, prefill and decode, dense and
pruned alternating round by round (this machine is shared and noisy), with the speedups the run's llama.cpp table
predicted. JSON under runs/bench/llamacpp/.

    python -m allocator.benchmarks.llamacpp_speed <search run dir> [rounds] [cache_dir]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from allocator.benchmarks.common import spread, write_result
from allocator.core.cache_lock import TMP_PREFIX
from allocator.core.space import ATTN, MLP, unit_name
from allocator.model.engines.gguf import DEFAULT_OUTTYPE, gguf_layout, write_gguf
from allocator.model.engines.llamacpp import DECODE_TOKENS, default_threads
from allocator.model.engines.llamacpp_build import VERSION, llamacpp_bin
from allocator.model.loader import load_model
from allocator.model.runtime import load_plan, load_pruned
from allocator.model.surgery import WIDTHS_KEY
from profilers.llamacpp import export_gguf, time_ggufs
from profilers.regimes import Regime
from profilers.table import load_table


def predicted_speedups(plan, widths: dict[str, list[int]]) -> dict[str, float]:
    """Dense over pruned latency, as the plan's table predicts it, in each of the table's regimes."""
    table = load_table(Path(plan.profile.table))
    out = {}
    for name, costs in table.regimes.items():
        full = {kind: max(costs.unit_ms[kind]) for kind in widths}
        dense = costs.predict_ms({kind: [full[kind]] * len(ks) for kind, ks in widths.items()})
        out[name] = dense / costs.predict_ms(widths)
    return out


def main(run: Path, rounds: int = 9, cache_dir: str = "runs/cache") -> Path:
    plan = load_plan(run)
    if plan.profile.name != "llamacpp":
        print(f"note: {run} was planned on profile {plan.profile.name}, not llamacpp: no llama.cpp prediction")
    model, tokenizer, _ = load_pruned(run)
    dense = load_model(plan.model_spec, cache_dir).model
    recorded = getattr(model.config, WIDTHS_KEY)
    widths = {ATTN: recorded["attn_kv_groups"], MLP: recorded["mlp_neurons"]}
    allocation = {unit_name(i, k): w for k, ws in widths.items() for i, w in enumerate(ws)}
    predicted = predicted_speedups(plan, widths) if plan.profile.name == "llamacpp" else {}
    table = load_table(Path(plan.profile.table)) if predicted else None
    llamacpp_bin(cache_dir)
    pruned = export_gguf(run, model, tokenizer, plan)
    threads = default_threads()
    results = {}
    root = Path(cache_dir) / "engines" / "llamacpp"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f"{TMP_PREFIX}bench-") as tmp:
        dense_path = write_gguf(dense, tokenizer, Path(tmp) / "dense.gguf", DEFAULT_OUTTYPE, "dense")
        for name in ("prefill", "decode_b1"):
            regime = (Regime(**table.regime(name).regime) if table is not None
                      else Regime(name, "prefill" if name == "prefill" else "decode", 1, 512))
            stats = time_ggufs({"dense": dense_path, "pruned": pruned}, regime, 1, rounds, threads, cache_dir,
                               f"llama-bench {name}")
            d, p = np.asarray(stats["dense"].samples_ms), np.asarray(stats["pruned"].samples_ms)
            per_token = regime.length if regime.kind == "prefill" else 1
            ratios = d / p  # paired by round: both models measured in the same moment of the machine's load
            measured = float(np.median(ratios))
            results[name] = {
                "regime": regime.__dict__,
                "dense_ms": spread(d.tolist()),
                "pruned_ms": spread(p.tolist()),
                "dense_tokens_per_s": float(np.median(per_token * 1e3 / d)),
                "pruned_tokens_per_s": float(np.median(per_token * 1e3 / p)),
                "measured_speedup": spread(ratios.tolist()),
                "predicted_speedup": predicted.get(name),
                "target_speedup": plan.budget.speedup if name == plan.budget.regime else None,
                "target_met": (measured >= plan.budget.speedup
                               if name == plan.budget.regime and plan.budget.speedup is not None else None),
            }
            pred = predicted.get(name)
            print(f"{name}: dense {results[name]['dense_tokens_per_s']:.1f} tok/s, pruned "
                  f"{results[name]['pruned_tokens_per_s']:.1f} tok/s, measured {measured:.3f}x (p10-p90 "
                  f"{results[name]['measured_speedup']['p10']:.3f}-{results[name]['measured_speedup']['p90']:.3f}), "
                  f"predicted {'n/a' if pred is None else f'{pred:.3f}x'}"
                  + ("" if results[name]["target_met"] is None else
                     f", target {plan.budget.speedup}x {'MET' if results[name]['target_met'] else 'MISSED'}"))
    layout = gguf_layout(model)
    return write_result("llamacpp", f"speed-{run.name}", {
        "run": str(run),
        "engine": {"llama.cpp": f"b{VERSION.split('.')[0]}", "threads": threads, "outtype": DEFAULT_OUTTYPE,
                   "decode_tokens_per_sample": DECODE_TOKENS},
        "method": "llama-bench -r 1 per model per round, dense and pruned alternating in a seeded order, 1 warm-up "
                  "round discarded; speedup = median over rounds of dense/pruned time",
        "rounds": rounds,
        "allocation": allocation,
        "gguf_layers": [s.__dict__ for s in layout],
        "budget": {"speedup": plan.budget.speedup, "regime": plan.budget.regime},
        "results": results,
    })


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 9,
         sys.argv[3] if len(sys.argv) > 3 else "runs/cache")
