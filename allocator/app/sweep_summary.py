"""One table, one plot and the per-device allocation differences for a `search -m` sweep directory.

Written by a Hydra callback at the end of the sweep (registered in conf/search.yaml) and by
`python -m allocator summarize <sweep dir>`, which also works on an interrupted sweep: runs without a readable
plan.json are listed as missing (with the reason an unreadable one gives).
"""

from __future__ import annotations

import itertools
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from allocator.core.atomic_io import write_json_atomic
from allocator.core.plan import PLAN_FILE, Plan, PlanError

PLAN = PLAN_FILE
OVERRIDES = Path(".hydra") / "overrides.yaml"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
UNIT_NAME = re.compile(r"^layer(\d+)\.(\w+)$")  # allocator.core.space.unit_name
TOP_LAYERS = 3


class SummarizeSweep(Callback):
    """Hydra callback: summarise the sweep directory once every job has returned."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            summary = summarize_sweep(sweep_dir)
        except Exception as exc:  # the runs themselves are saved; a summary bug must not turn the sweep into a failure
            print(f"warning: sweep summary failed: {exc!r}; retry: python -m allocator summarize {sweep_dir}",
                  file=sys.stderr)
            return
        print(render_markdown(summary))


def summarize_sweep(sweep_dir: Path) -> dict:
    """Read every `<run>/plan.json` under `sweep_dir`; write summary.json, summary.md and sweep.png there."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    # Every Hydra job writes .hydra/overrides.yaml first thing; a path in an override (cache_dir=/a/b) nests the
    # job's directory below its <num>_<overrides> name, so look at any depth.
    found = {p.parent.parent for p in sweep_dir.glob(f"**/{OVERRIDES}")} | {p.parent for p in sweep_dir.glob(f"*/{PLAN}")}
    run_dirs = sorted(found, key=lambda d: _job_order(d.relative_to(sweep_dir)))
    expected = _expected_jobs(sweep_dir)
    if not run_dirs and expected is None:
        raise FileNotFoundError(f"{sweep_dir} holds no sweep runs (no */{PLAN} or */{OVERRIDES})")
    names = {d: d.relative_to(sweep_dir).as_posix() for d in run_dirs}
    overrides = {names[d]: _read_overrides(d) for d in run_dirs}
    varying = _varying_keys([*overrides.values(), *(expected or [])])
    plans, unreadable = {}, {}
    for d in run_dirs:
        if (d / PLAN).is_file():
            try:
                plans[names[d]] = Plan.load(d / PLAN)
            except PlanError as exc:  # one bad file must not hide the other runs
                unreadable[names[d]] = str(exc)
    rows = sorted((_row(names[d], overrides[names[d]], plans[names[d]], varying, _option_fractions(d, plans))
                   for d in run_dirs if names[d] in plans),
                  key=lambda r: (r["profile"], _budget_key(r["budget"]), r["job"] if r["job"] is not None else -1))
    missing = [{"run": name, "overrides": overrides[name],
                "reason": f"unreadable plan.json: {unreadable[name]}" if name in unreadable else "no plan.json"}
               for name in names.values() if name not in plans]
    started = {frozenset(o) for o in overrides.values()}
    missing += [{"run": None, "overrides": job, "reason": "not started"}
                for job in expected or [] if frozenset(job) not in started]
    summary = {
        "sweep_dir": str(sweep_dir),
        "varying_overrides": sorted(varying),
        "rows": rows,
        "missing": missing,
        "allocation_differences": allocation_differences(rows),
    }
    write_json_atomic(sweep_dir / "summary.json", summary)
    (sweep_dir / "summary.md").write_text(render_markdown(summary))
    plot_sweep(rows, sweep_dir / "sweep.png")
    return summary


# --- reading runs -------------------------------------------------------------------------------------------------


def _job_number(name: str) -> int | None:
    num = name.split("_", 1)[0]
    return int(num) if num.isdigit() else None


def _job_order(relative: Path) -> tuple[int, str]:
    num = _job_number(relative.parts[0])
    return (sys.maxsize if num is None else num, relative.as_posix())


def _read_overrides(run_dir: Path) -> list[str]:
    path = run_dir / OVERRIDES
    return [str(o) for o in yaml.safe_load(path.read_text()) or []] if path.is_file() else []


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _varying_keys(jobs: list[list[str]]) -> set[str]:
    """Override keys whose value is not the same in every job: what tells the runs apart."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for o in job:
            values.setdefault(_key(o), set()).add(o)
    return {k for k, v in values.items() if len(v) > 1 or any(k not in {_key(o) for o in job} for job in jobs)}


def _shown_elsewhere(key: str) -> bool:
    """Profile and budget have columns of their own (read from the plan, which also covers their defaults)."""
    return key in ("profile", "profile.name", "budget") or key.startswith("budget.")


def _expected_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """Every job the basic sweeper was asked for (from multirun.yaml), so jobs an interrupt never started show up."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    hydra_cfg = OmegaConf.load(path).hydra
    if hydra_cfg.sweeper.get("_target_") != BASIC_SWEEPER:
        return None  # other sweepers choose their jobs as they go
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (hydra_cfg.sweeper.get("params") or {}).items()]
    choices: dict[str, list[str]] = {}  # same expansion as BasicSweeper.split_arguments
    for o in OverridesParser.create().parse_overrides([*params, *hydra_cfg.overrides.task]):
        key = o.get_key_element()
        if o.is_sweep_override():
            if not o.is_discrete_sweep():
                return None
            choices[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            choices[key] = [f"{key}={o.get_value_element_as_str()}"]
    return [list(job) for job in itertools.product(*choices.values())]


def _option_fractions(run_dir: Path, plans: dict[str, Plan]) -> dict[str, dict[str, float]]:
    """Per unit, the share of its weights each option keeps, from the run's problem.json; without one (structured
    runs only), each width over the widest kept anywhere in the sweep."""
    problem = run_dir / "problem.json"
    if problem.is_file():
        units = json.loads(problem.read_text())["units"]
        shares = {u["name"]: u.get("kept_fraction") or [o / u["options"][-1] for o in u["options"]] for u in units}
        return {u["name"]: {str(o): f for o, f in zip(u["options"], shares[u["name"]])} for u in units}
    full: dict[str, int] = {}
    for plan in plans.values():
        for name, kept in plan.allocation.items():
            full[name] = max(full.get(name, 0), kept)
    return {name: {str(k): k / width if width else 0.0 for k in range(width + 1)} for name, width in full.items()}


def kept_fractions(allocation: dict[str, int | str], fractions: dict[str, dict[str, float]]) -> dict[str, list[float]]:
    """Per unit kind ("attn", "mlp"), the kept share of each layer's weights in layer order."""
    by_kind: dict[str, dict[int, float]] = {}
    for name, kept in allocation.items():
        m = UNIT_NAME.match(name)
        if m:
            by_kind.setdefault(m.group(2), {})[int(m.group(1))] = fractions.get(name, {}).get(str(kept), 0.0)
    return {kind: [layers[i] for i in sorted(layers)] for kind, layers in sorted(by_kind.items())}


def _row(name: str, overrides: list[str], plan: Plan, varying: set[str], fractions: dict[str, dict[str, float]]) -> dict:
    b, p, q, u, m = plan.budget, plan.predicted, plan.quality, plan.uniform, plan.measured
    return {
        "run": name,  # relative to the sweep directory
        "job": _job_number(name),
        "overrides": overrides,
        "other_overrides": [o for o in overrides if _key(o) in varying and not _shown_elsewhere(_key(o))],
        "profile": plan.profile.name,
        "source": plan.profile.source,
        "budget": {k: getattr(b, k) for k in BUDGET_FIELDS},
        "budget_label": b.label(),
        "predicted_speedup": p.speedup,
        "predicted_latency_ms": p.latency_ms,
        "measured_speedup": None if m is None else m.speedup,
        "measured_latency_ms": None if m is None else m.latency_ms,
        "verdict": None if m is None else m.verdict,
        "target_met": None if m is None else m.target_met,
        "verify_skipped": plan.verify_skipped,  # e.g. a GPU profile searched on a machine without that GPU
        "kl": q.kl,
        "ppl_dense": q.ppl_dense,
        "ppl": q.ppl_pruned,
        "uniform_kl": u.kl,
        "uniform_ppl": u.ppl_pruned,
        "uniform_predicted_speedup": u.predicted_speedup,
        "weight_bytes": p.weight_bytes,
        "param_sparsity": p.param_sparsity,
        "kept_fraction": kept_fractions(plan.allocation, fractions),
    }


# What tells budgets apart (summary.json's rows keep these; headroom and the planned target are how it was met).
BUDGET_FIELDS = ("speedup", "latency_ms", "sparsity", "memory_gb", "memory_batch", "memory_context", "regime")


def _budget_key(budget: dict) -> tuple:
    """Budgets of one kind from loose to tight (a lower latency or memory target is tighter)."""
    memory: tuple = (0.0, 0, 0)
    if budget.get("memory_gb") is not None:  # a larger KV cache (batch x context) in the same GB is tighter
        memory = (-budget["memory_gb"], budget.get("memory_batch") or 0, budget.get("memory_context") or 0)
    if budget.get("sparsity") is not None:
        return (2, "", budget["sparsity"], memory)
    if budget.get("speedup") is not None:
        return (0, budget.get("regime") or "", budget["speedup"], memory)
    if budget.get("latency_ms") is not None:
        return (1, budget.get("regime") or "", -budget["latency_ms"], memory)
    return (3, "", 0.0, memory)  # memory only


# --- comparing devices ----------------------------------------------------------------------------------------------


def allocation_differences(rows: list[dict]) -> list[dict]:
    """For every pair of runs with the same budget (and other overrides) but different profiles: per unit kind, the
    mean absolute difference of the kept fraction per layer and the layers that differ most."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((_budget_key(r["budget"]), tuple(r["other_overrides"])), []).append(r)
    out = []
    for (key, other), group in sorted(groups.items()):
        for a, b in itertools.combinations(group, 2):
            if a["profile"] == b["profile"]:
                continue
            kinds = {}
            for kind in sorted(set(a["kept_fraction"]) & set(b["kept_fraction"])):
                fa, fb = a["kept_fraction"][kind], b["kept_fraction"][kind]
                diffs = [x - y for x, y in zip(fa, fb)]
                order = sorted(range(len(diffs)), key=lambda i: -abs(diffs[i]))
                kinds[kind] = {
                    "mean_abs_diff": sum(map(abs, diffs)) / len(diffs) if diffs else 0.0,
                    "max_abs_diff": max(map(abs, diffs), default=0.0),
                    "most_different_layers": [
                        {"layer": i, "kept": {a["profile"]: fa[i], b["profile"]: fb[i]}}
                        for i in order[:TOP_LAYERS] if abs(diffs[i]) > 1e-9
                    ],
                }
            out.append({"budget": a["budget_label"], "other_overrides": list(other),
                        "profiles": [a["profile"], b["profile"]], "runs": [a["run"], b["run"]], "kinds": kinds})
    return out


# --- rendering ------------------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def render_markdown(summary: dict) -> str:
    rows = summary["rows"]
    other = any(r["other_overrides"] for r in rows)
    head = ["profile", "source", "budget", *(["overrides"] if other else []), "pred. speedup", "pred. ms",
            "measured speedup", "verdict", "KL", "ppl", "uniform ppl", "weights MiB", "param sparsity", "job"]
    lines = [f"# Sweep summary: {summary['sweep_dir']}", "", "| " + " | ".join(head) + " |",
             "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [
            r["profile"], r["source"] or "—", r["budget_label"], *([" ".join(r["other_overrides"])] if other else []),
            _fmt(r["predicted_speedup"], ".3f"), _fmt(r["predicted_latency_ms"], ".2f"),
            _fmt(r["measured_speedup"], ".3f"),
            r["verdict"] or ("not verified" if r.get("verify_skipped") else "—"), _fmt(r["kl"], ".4f"), _fmt(r["ppl"], ".2f"),
            _fmt(r["uniform_ppl"], ".2f"),
            _fmt(None if r["weight_bytes"] is None else r["weight_bytes"] / 2**20, ".1f"),
            _fmt(r["param_sparsity"], ".3f"), r["run"] if r["job"] is None else r["job"],
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    if summary["missing"]:
        lines += ["", "## Missing runs", ""]
        lines += [f"- {m['run'] or '(no directory)'}: {m['reason']} ({' '.join(m['overrides'])})"
                  for m in summary["missing"]]
    lines += ["", "## Allocation differences between profiles at the same budget", ""]
    if not summary["allocation_differences"]:
        lines.append("No budget was run on more than one profile.")
    else:
        lines += ["| budget | profiles | unit | mean abs diff of kept fraction | layers that differ most |",
                  "|---|---|---|---|---|"]
        for d in summary["allocation_differences"]:
            budget = " ".join([d["budget"], *d["other_overrides"]])
            for kind, k in d["kinds"].items():
                layers = ", ".join(
                    f"L{x['layer']} (" + " vs ".join(f"{v:.2f}" for v in x["kept"].values()) + ")"
                    for x in k["most_different_layers"]
                ) or "identical"
                lines.append(f"| {budget} | {' vs '.join(d['profiles'])} | {kind} | {k['mean_abs_diff']:.3f} | {layers} |")
    return "\n".join(lines) + "\n"


def _series(rows: list[dict]) -> dict[str, list[dict]]:
    """One line per profile (and per value of any other swept override), ordered along the front."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(" ".join([r["profile"], *r["other_overrides"]]), []).append(r)
    # runs without a latency table (a parameter or memory budget) predicted no speedup: they have no place on it
    return {k: sorted((r for r in v if r["predicted_speedup"] is not None), key=lambda r: r["predicted_speedup"])
            for k, v in out.items()}


def _shared_budget(rows: list[dict]) -> tuple | None:
    """The budget run on the most profiles (the tightest of those on ties: allocations differ most there)."""
    profiles: dict[tuple, set[str]] = {}
    for r in rows:
        profiles.setdefault(_budget_key(r["budget"]), set()).add(r["profile"])
    return max(profiles, key=lambda k: (len(profiles[k]), k), default=None)


def plot_sweep(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (front, layers) = plt.subplots(1, 2, figsize=(13, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    series = _series(rows)
    for (label, runs), colour in zip(series.items(), itertools.cycle(colours)):
        front.plot([r["predicted_speedup"] for r in runs], [r["ppl"] for r in runs], "o-", color=colour, label=label)
        uni = sorted((r for r in runs if r["uniform_ppl"] is not None and r["uniform_predicted_speedup"] is not None),
                     key=lambda r: r["uniform_predicted_speedup"])
        if uni:
            front.plot([r["uniform_predicted_speedup"] for r in uni], [r["uniform_ppl"] for r in uni], "x--",
                       color=colour, alpha=0.8, label=f"{label} uniform")
    dense = next((r["ppl_dense"] for r in rows if r["ppl_dense"] is not None), None)
    if dense is not None:
        front.axhline(dense, color="grey", linestyle=":", label="dense")
    ppls = [v for r in rows for v in (r["ppl"], r["uniform_ppl"]) if v]
    if ppls and max(ppls) / min(ppls) > 10:  # tight budgets blow perplexity up; keep the loose end readable
        front.set_yscale("log")
    front.set_xlabel("predicted speedup")
    front.set_ylabel("held-out perplexity")
    front.set_title("Quality vs predicted speedup (dashed: uniform, same budget)")
    if rows:
        front.legend(fontsize="small")

    shared = _shared_budget(rows)
    at_shared = [r for r in rows if _budget_key(r["budget"]) == shared]
    kind = "mlp" if any("mlp" in r["kept_fraction"] for r in at_shared) else next(
        (k for r in at_shared for k in r["kept_fraction"]), None)
    for (label, runs), colour in zip(series.items(), itertools.cycle(colours)):
        run = next((r for r in runs if _budget_key(r["budget"]) == shared and kind in r["kept_fraction"]), None)
        if run is not None:
            kept = run["kept_fraction"][kind]
            layers.plot(range(len(kept)), kept, "o-", drawstyle="steps-mid", color=colour, alpha=0.8, label=label)
    layers.set_ylim(0, 1.05)
    layers.xaxis.set_major_locator(MaxNLocator(integer=True))
    layers.set_xlabel("layer")
    layers.set_ylabel(f"{kind or 'MLP'} kept fraction")
    layers.set_title(f"Per-layer allocation at {at_shared[0]['budget_label']}" if at_shared else "no finished runs")
    if at_shared:
        layers.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    """`python -m allocator summarize <sweep dir>`."""
    if len(argv) != 1:
        print("usage: python -m allocator summarize <sweep dir>", file=sys.stderr)
        return 2
    try:
        summary = summarize_sweep(Path(argv[0]))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render_markdown(summary))
    print(f"wrote summary.json, summary.md, sweep.png in {argv[0]}")
    return 0
