"""Why candidates are scored on calibration text the level database never saw.

The database's OBS reconstruction is fitted to its calibration blocks, so a pruned model looks better there than
on any other text; and consecutive blocks cover only a few documents. This benchmark scores the DP allocation and
allocations around it (DP on the proxy with random SPDY-style coefficients per group of layers) by KL to dense on
(a) the database's own calibration blocks (where the fitness pool first came from), (b) the blocks right after
them (unseen, consecutive), (c) the fitness pool (unseen, spread over the calibration-side text) and (d) held-out
blocks spread over all held-out documents, and reports how well (a)-(c) rank the candidates as (d) does (Spearman).

python -m allocator.benchmarks.fitness_bias [n_candidates]  →  runs/bench/fitness/bias.json
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
from scipy.stats import spearmanr
from tqdm import tqdm

from allocator.app.search_job import prepare_search
from allocator.benchmarks.common import write_result
from allocator.benchmarks.search_config import search_job
from allocator.benchmarks.searchers import benchmark_heldout, heldout_quality
from allocator.model.calibration_data import build_calibration_data
from allocator.model.surgery import build_pruned_model
from search.bayes import spdy_choice, spdy_groups
from search.fitness_engine import dense_log_probs

SPDY_GROUPS = 6
LOG2_RANGE = 2.0


def main(n_candidates: int = 12) -> dict:
    cfg = search_job([])
    setup = prepare_search(cfg, fitness_pool=True)
    n, calib = cfg.fitness.sequences, cfg.data.calib_sequences
    after = build_calibration_data(replace(cfg.data, calib_sequences=calib + n), setup.tokenizer).calibration[calib:]
    texts = {
        "database_calibration": setup.data.calibration[:n],
        "unseen_consecutive": after,
        "fitness_pool": setup.data.fitness,
        "heldout": benchmark_heldout(cfg, setup.tokenizer),
    }
    batch = cfg.fitness.batch_size
    dense_logp = {name: dense_log_probs(setup.dense, tokens, batch) for name, tokens in texts.items()}
    problem = setup.problem
    groups = spdy_groups(problem, SPDY_GROUPS)
    rng = np.random.default_rng(0)
    rows = []
    for i in tqdm(range(n_candidates), desc="candidates", unit="cand"):
        log2 = {g: 0.0 if i == 0 else float(rng.uniform(-LOG2_RANGE, LOG2_RANGE)) for g in dict.fromkeys(groups)}
        choice = spdy_choice(problem, groups, log2)
        labels = {u.name: u.options[j] for u, j in zip(setup.space.units, choice)}
        model = build_pruned_model(setup.dense, setup.space.shape, labels, setup.db.source)
        quality = {name: heldout_quality(model, dense_logp[name], tokens, batch) for name, tokens in texts.items()}
        rows.append({"candidate": "dp" if i == 0 else f"spdy-{i}", "choice": list(choice), "proxy_error": problem.error_of(choice),
                     **{f"kl_{name}": q["kl"] for name, q in quality.items()}, "heldout_ppl": quality["heldout"]["ppl"]})
    heldout = [r["kl_heldout"] for r in rows]
    summary = {
        f"spearman_{name}_vs_heldout": float(spearmanr([r[f"kl_{name}"] for r in rows], heldout).statistic)
        for name in texts if name != "heldout"
    }
    for name in texts:
        summary[f"median_kl_{name}"] = float(np.median([r[f"kl_{name}"] for r in rows]))
    result = {"settings": {"n_candidates": n_candidates, "spdy_groups": SPDY_GROUPS, "log2_range": LOG2_RANGE,
                           "sequences": {name: int(t.shape[0]) for name, t in texts.items()}, "seq_len": cfg.data.seq_len},
              "summary": summary, "candidates": rows}
    write_result("fitness", "bias", result)
    print({k: round(v, 4) for k, v in summary.items()})
    return result


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
