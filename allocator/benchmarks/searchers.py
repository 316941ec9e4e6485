"""Every searcher on SmolLM2 at equal forward-token budgets: held-out perplexity and KL vs tokens spent, and wall time.

Two budgets: the default structured speedup (1.5x prefill on the CPU profile) and 50% parameter sparsity. Searchers
that score real candidates (random, bayes, tyr, evo) get the same token bound; their counts (generations, trials,
samples) are set high so that the bound is what stops them. Their incumbents at 1/8, 1/4, 1/2 and all of the tokens
are evaluated on held-out text, giving quality-vs-tokens curves; dp, uniform, uniform_best and owl spend no forward
tokens. Results are saved after every searcher with its config; a re-run skips the searchers whose config is unchanged
(the proxy-only ones: whose config and allocation are unchanged).

python -m allocator.benchmarks.searchers [max_tokens]  →  runs/bench/searchers/smollm2.json and smollm2.png
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from allocator.app.search_job import SearchSetup, prepare_search
from allocator.benchmarks.common import write_result
from allocator.benchmarks.search_config import search_job
from allocator.levels.compress.outliers import layer_outlier_ratios
from allocator.model.calibration_data import load_documents, split_documents, spread_blocks
from allocator.model.surgery import build_pruned_model
from search import SEARCHERS, make_searcher
from search.fitness_engine import StitchedKLFitness, dense_log_probs

BUDGETS = {"speedup_1.5": [], "sparsity_0.5": ["budget=sparsity", "budget.sparsity=0.5"]}
SEARCHER_ORDER = ("uniform", "uniform_best", "owl", "dp", "random", "bayes", "tyr", "evo")
UNBOUNDED = {"generations": 10**6, "n_trials": 10**6, "samples": 10**6, "stage_generations": [10**6] * 3}
# Non-default settings per searcher: bayes searches SPDY coefficients (a few dimensions) rather than one level per
# unit, which its 48 trials at this token budget cannot cover.
SETTINGS = {"bayes": {"param": "spdy"}}
CHECKPOINTS = (1 / 8, 1 / 4, 1 / 2, 1.0)
# Held-out sequences of 256 tokens, spread over all held-out documents: perplexities of 16 consecutive sequences
# differ by several percent between text samples, more than the searchers differ.
HELDOUT_SEQUENCES = 64
OUT = Path("runs/bench/searchers/smollm2.json")


@torch.inference_mode()
def heldout_quality(model: nn.Module, dense_logp: torch.Tensor, tokens: torch.Tensor, batch: int = 4) -> dict:
    """Perplexity of the held-out text and mean per-token KL(dense ‖ model) on it, in one pass."""
    nll = kl = 0.0
    for start in range(0, len(tokens), batch):
        chunk = tokens[start : start + batch]
        logq = F.log_softmax(model(chunk).logits.float(), dim=-1)
        nll -= logq[:, :-1].gather(-1, chunk[:, 1:, None]).sum().item()
        kl += F.kl_div(logq, dense_logp[start : start + batch].float(), log_target=True, reduction="sum").item()
    return {"ppl": math.exp(nll / tokens[:, 1:].numel()), "kl": kl / tokens.numel()}


def benchmark_heldout(cfg, tokenizer) -> torch.Tensor:
    """HELDOUT_SEQUENCES blocks spread over all held-out documents (the search job's consecutive blocks cover a
    handful of them)."""
    _, heldout_docs = split_documents(load_documents(cfg.data), cfg.data.heldout_fraction)
    return spread_blocks(heldout_docs, tokenizer, cfg.data.seq_len, HELDOUT_SEQUENCES)


def searcher_config(name: str, max_tokens: int):
    cls = SEARCHERS.get(name)
    cfg = cls.Config(name=name, max_tokens=max_tokens if cls.uses_fitness else 0)
    return replace(cfg, **{k: v for k, v in UNBOUNDED.items() if hasattr(cfg, k)}, **SETTINGS.get(name, {}))


def run_budget(label: str, overrides: list[str], max_tokens: int, saved: dict) -> dict:
    cfg = search_job(overrides)
    setup: SearchSetup = prepare_search(cfg, fitness_pool=True)
    heldout, pool = benchmark_heldout(cfg, setup.tokenizer), setup.data.fitness
    dense_logp = dense_log_probs(setup.dense, heldout, cfg.fitness.batch_size)
    fitness = StitchedKLFitness(setup.dense, setup.space, setup.db.source, pool, cfg.fitness.batch_size)
    results = saved["results"].setdefault(label, {})
    evaluated: dict[tuple[int, ...], dict] = {}

    def quality(choice: list[int] | tuple[int, ...]) -> dict:
        key = tuple(choice)
        if key not in evaluated:
            labels = {u.name: u.options[j] for u, j in zip(setup.space.units, key)}
            evaluated[key] = heldout_quality(build_pruned_model(setup.dense, setup.space.shape, labels, setup.db.source),
                                             dense_logp, heldout)
        return evaluated[key]

    for name in SEARCHER_ORDER:
        config = asdict(searcher_config(name, max_tokens))
        same_config = results.get(name, {}).get("config") == config
        if same_config and SEARCHERS.get(name).uses_fitness:
            print(f"[{label}] {name}: already measured with this config, skipped")
            continue
        problem = setup.problem
        if name == "owl":
            ratios = layer_outlier_ratios(setup.dense, setup.data.calibration[: cfg.fitness.sequences],
                                          batch_size=cfg.fitness.batch_size)
            problem = replace(problem, outlier_ratios=tuple(ratios[u.layer] for u in setup.space.units))
        searcher = make_searcher(searcher_config(name, max_tokens))
        start = time.perf_counter()
        found = searcher.search(problem, seed=cfg.seed, fitness=fitness if searcher.uses_fitness else None)
        seconds = time.perf_counter() - start
        # The proxy-only searchers take seconds, so they are re-run: a rule that changed under an unchanged config
        # (uniform became the same kept fraction in every unit) shows as a different allocation and is re-measured.
        if same_config and results[name].get("choice") == list(found.choice):
            print(f"[{label}] {name}: the same allocation as already measured, skipped")
            continue
        entry = {
            "config": config,
            "seconds": seconds,
            "tokens_spent": found.info.get("tokens_spent", 0),
            "evaluations": found.info.get("evaluations", 0),
            "cost": found.cost,
            "budget": problem.budget,
            "proxy_error": found.error,
            "choice": list(found.choice),
            "final": quality(found.choice),
        }
        if searcher.uses_fitness:
            trace = found.info["trace"]
            curve = []
            for share in CHECKPOINTS:
                at = [t for t in trace if t["tokens_spent"] <= share * max_tokens] or trace[:1]
                curve.append({"tokens": int(share * max_tokens), "fitness": at[-1]["fitness"], **quality(at[-1]["choice"])})
            entry["curve"] = curve
        results[name] = entry
        print(f"[{label}] {name}: held-out ppl {entry['final']['ppl']:.2f}, KL {entry['final']['kl']:.4f}, "
              f"{entry['tokens_spent']} tokens, {seconds:.0f} s")
        write_result("searchers", OUT.stem, saved)  # after every searcher: an interrupted run resumes
    return results


def plot(saved: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [b for b in BUDGETS if b in saved.get("results", {})]
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4.5), squeeze=False)
    for ax, label in zip(axes[0], budgets):
        res = saved["results"][label]
        for i, (name, entry) in enumerate(res.items()):
            color = f"C{i}"
            if "curve" in entry:
                ax.plot([c["tokens"] for c in entry["curve"]], [c["ppl"] for c in entry["curve"]], "o-", color=color, label=name)
            else:
                ax.axhline(entry["final"]["ppl"], color=color, linestyle="--", label=f"{name} (no tokens)")
        # Zoomed on the competitive searchers (within 25% of DP): their differences are a few percent.
        values = [c["ppl"] for e in res.values() for c in e.get("curve", [])] + [e["final"]["ppl"] for e in res.values()]
        if "dp" in res:
            ax.set_ylim(0.98 * min(values), 1.25 * res["dp"]["final"]["ppl"])
        ax.set_xscale("log")
        ax.set_xlabel("forward tokens spent by the search")
        ax.set_ylabel("held-out perplexity (searchers above the top: off scale)")
        ax.set_title(f"SmolLM2-135M, {label}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(max_tokens: int = 98304) -> dict:
    settings = {"max_tokens": max_tokens, "searchers": list(SEARCHER_ORDER), "checkpoints": list(CHECKPOINTS),
                "heldout_sequences": HELDOUT_SEQUENCES, "heldout": "spread over all held-out documents",
                "fitness_pool": "spread over the calibration-side text after the database's blocks"}
    saved: dict = {"settings": settings, "results": {}}
    if OUT.is_file():
        previous = json.loads(OUT.read_text())
        # A searcher added to the list leaves the others' results valid: each is checked against its own config.
        if {**previous.get("settings", {}), "searchers": None} == {**settings, "searchers": None}:
            saved["results"] = previous.get("results", {})
    for label, overrides in BUDGETS.items():
        run_budget(label, overrides, max_tokens, saved)
    write_result("searchers", OUT.stem, saved)
    plot(saved, OUT.with_suffix(".png"))
    return saved


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
