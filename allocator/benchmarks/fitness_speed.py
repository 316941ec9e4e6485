"""How fast the fitness engine scores a SmolLM2 candidate, against a naive stitch-and-forward of the same tokens.

Candidates are what evolution scores: children of the DP allocation, each a few level moves away. Three ways:
- naive: build_pruned_model from the database (copy + disk reads) and kl_to_dense (a dense forward per score);
- engine without prefix reuse: in-place swaps from in-memory levels, cached dense log-probs;
- engine: the same plus reuse of the layers before the first one that differs from a recent candidate.

python -m allocator.benchmarks.fitness_speed [n_candidates] [tokens]  →  runs/bench/fitness/smollm2_engine_vs_naive.json
"""

from __future__ import annotations

import sys
import time

import numpy as np

from allocator.app.search_job import prepare_search
from allocator.benchmarks.common import spread, write_result
from allocator.benchmarks.search_config import search_job
from allocator.model.quality import kl_to_dense
from allocator.model.surgery import build_pruned_model
from search import make_searcher
from search.dp import DPConfig
from search.evo import LevelMover
from search.fitness_engine import StitchedKLFitness


def main(n_candidates: int = 12, tokens: int = 1024) -> dict:
    cfg = search_job([])
    setup = prepare_search(cfg, fitness_pool=True)
    problem = setup.problem
    parent = make_searcher(DPConfig()).search(problem).choice
    rng = np.random.default_rng(0)
    mover = LevelMover(problem)
    children = [mover.mutate(parent, rng, max_moves=3) for _ in range(n_candidates)]
    pool = setup.data.fitness
    n_seq = -(-tokens // pool.shape[1])
    engines = {
        "engine": StitchedKLFitness(setup.dense, setup.space, setup.db.source, pool, prefix_reuse=True),
        "engine_no_prefix_reuse": StitchedKLFitness(
            setup.dense, setup.space, setup.db.source, pool, prefix_reuse=False
        ),
    }
    seconds: dict[str, list[float]] = {name: [] for name in ("naive", *engines)}
    values: dict[str, list[float]] = {name: [] for name in seconds}
    for engine in engines.values():  # the parent is scored first, as evolution does; it is not timed
        engine.score([parent], tokens)
    for child in children:
        labels = {u.name: u.options[j] for u, j in zip(setup.space.units, child)}
        start = time.perf_counter()
        model = build_pruned_model(setup.dense, setup.space.shape, labels, setup.db.source)
        values["naive"].append(kl_to_dense(setup.dense, {"m": model}, pool[:n_seq], cfg.fitness.batch_size)["m"])
        seconds["naive"].append(time.perf_counter() - start)
        for name, engine in engines.items():
            start = time.perf_counter()
            values[name].append(engine.score([child], tokens)[0])
            seconds[name].append(time.perf_counter() - start)
    reuse = engines["engine"]
    result = {
        "what": "seconds to score one evolution child of the DP allocation (KL to dense) on the same tokens",
        "model": cfg.model.name,
        "tokens_per_candidate": n_seq * pool.shape[1],
        "candidates": n_candidates,
        "seconds": {name: spread(s) for name, s in seconds.items()},
        "speedup_vs_naive": {
            name: spread([n / e for n, e in zip(seconds["naive"], seconds[name])]) for name in engines
        },
        "max_abs_kl_difference_vs_naive": {
            name: max(abs(a - b) for a, b in zip(values["naive"], values[name])) for name in engines
        },
        "layers_reused_share": reuse.layers_reused / max(1, reuse.layers_reused + reuse.layers_computed),
    }
    write_result("fitness", "smollm2_engine_vs_naive", result)
    for name in engines:
        print(f"{name}: {result['speedup_vs_naive'][name]['median']:.2f}x faster than naive "
              f"({result['seconds'][name]['median']:.2f} s vs {result['seconds']['naive']['median']:.2f} s)")
    return result


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
