"""Sparse options on SmolLM2: DP over SparseGPT levels vs uniform SparseGPT at 50% parameter sparsity, and a
mixed-space plan exported in its compressed formats, reloaded and checked against the stitched model's logits.

python -m allocator.benchmarks.sparse_space  →  runs/bench/sparse/smollm2.json

Part 1 (`space=unstructured budget=sparsity budget.sparsity=0.5`): every unit prunable to 10..90% by SparseGPT;
`dp` minimises the summed Fisher-weighted block-output errors under the weight budget; `uniform` is the classic
uniform SparseGPT, the same kept fraction in every unit (here every unit 50%, recorded in its "levels");
`uniform_best` the best same level per unit kind by the proxy. Held-out perplexity and KL for each.
Part 2 (`space=mixed budget=memory budget.memory_gb=0.4`): DP over widths, dropped blocks, unstructured, N:M and
block levels under a memory budget that counts each format's stored bytes (at decode on SmolLM2's small matrices
an H100 is launch-bound, so there a latency budget picks widths and dropped blocks: sparse formats pay in bytes).
The plan is exported in its compressed formats, reloaded with `load_pruned` and its logits compared with the
stitched (masked) model's on held-out text. Results are saved after each part."""

from __future__ import annotations

import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

from allocator.app.search_job import prepare_search
from allocator.benchmarks.common import write_result
from allocator.benchmarks.search_config import search_job
from allocator.benchmarks.searchers import heldout_quality
from allocator.core.formats import export_format, format_choice
from allocator.core.space import is_sparse, sparse_pattern
from allocator.model.export import export_checkpoint
from allocator.model.runtime import load_pruned
from allocator.model.sparse_export import build_deployable
from allocator.model.surgery import build_pruned_model
from kernels import ops
from kernels.sparse_linear import SparseLinear
from search import SEARCHERS
from search.fitness_engine import dense_log_probs

OUT = Path("runs/bench/sparse/smollm2.json")
UNSTRUCTURED = ["space=unstructured", "budget=sparsity", "budget.sparsity=0.5", "profile=h100"]
MIXED = ["space=mixed", "space.sparsities=[0.5,0.6,0.7,0.8]", "profile=h100", "budget=memory"]


def dp_vs_uniform() -> dict:
    cfg = search_job(UNSTRUCTURED)
    setup = prepare_search(cfg)
    dense_logp = dense_log_probs(setup.dense, setup.data.heldout, cfg.fitness.batch_size)
    allocations = {
        "dp": SEARCHERS.get("dp")().search(setup.problem).labels(setup.problem),
        "uniform": SEARCHERS.get("uniform")().search(setup.problem).labels(setup.problem),
        "uniform_best": SEARCHERS.get("uniform_best")().search(setup.problem).labels(setup.problem),
    }
    out = {}
    for name, allocation in allocations.items():
        model = build_pruned_model(setup.dense, setup.space.shape, allocation, setup.db.source)
        out[name] = {
            **heldout_quality(model, dense_logp, setup.data.heldout),
            "levels": dict(Counter(allocation.values())),
        }
        print(f"{name}: held-out ppl {out[name]['ppl']:.2f}, KL {out[name]['kl']:.4f}")
    out["dense_ppl"] = heldout_quality(setup.dense, dense_logp, setup.data.heldout)["ppl"]
    return {"overrides": UNSTRUCTURED, "results": out}


def mixed_export(memory_gb: float) -> dict:
    overrides = [*MIXED, f"budget.memory_gb={memory_gb}"]
    cfg = search_job(overrides)
    setup = prepare_search(cfg)
    allocation = SEARCHERS.get("dp")().search(setup.problem).labels(setup.problem)
    with torch.inference_mode():
        return check_export(setup, allocation, overrides)


def check_export(setup, allocation: dict, overrides: list[str]) -> dict:
    """Export the deployable model, reload it and compare its logits with the stitched model's."""
    stitched = build_pruned_model(setup.dense, setup.space.shape, allocation, setup.db.source)
    fmt = setup.space.unstructured_format
    deployed = build_deployable(setup.dense, setup.space.shape, allocation, setup.db.source, unstructured_format=fmt)
    full = {u.name: u.full for u in setup.space.units}
    formats = Counter(
        export_format(sparse_pattern(o), format_choice(sparse_pattern(o), fmt))[0] if is_sparse(o) else "dense" if o == full[n] else "dropped" if o == 0
        else "structured" for n, o in allocation.items()
    )
    with tempfile.TemporaryDirectory() as tmp:
        export_checkpoint(deployed, setup.tokenizer, Path(tmp), None)  # weights only: no plan to write
        reloaded, _, _ = load_pruned(tmp)
    tokens = setup.data.heldout[:4]
    want = stitched(tokens).logits.float()
    got = reloaded(tokens).logits.float()
    linears = Counter(type(m.compressed()).__name__ for m in reloaded.modules() if isinstance(m, SparseLinear))
    result = {
        "overrides": overrides,
        "options": dict(Counter(str(o) for o in allocation.values())),
        "units_by_format": dict(formats),
        "reloaded_sparse_linears": dict(linears),
        "backend": ops.backend("cpu"),
        "logits_max_abs_diff": float((got - want).abs().max()),
        "logits_max_abs": float(want.abs().max()),
        "argmax_agreement": float((got.argmax(-1) == want.argmax(-1)).float().mean()),
    }
    print(json.dumps(result, indent=1))
    return result


def main(memory_gb: float = 0.4) -> dict:
    saved: dict = json.loads(OUT.read_text()) if OUT.is_file() else {}
    saved.pop("created", None), saved.pop("environment", None)
    if "unstructured_sparsity_0.5" not in saved:
        saved["unstructured_sparsity_0.5"] = dp_vs_uniform()
        write_result("sparse", OUT.stem, saved)
    saved[f"mixed_memory_{memory_gb}gb"] = mixed_export(memory_gb)
    write_result("sparse", OUT.stem, saved)
    return saved


if __name__ == "__main__":
    main(*(float(a) for a in sys.argv[1:]))
