"""What a GPU campaign (allocator.benchmarks.gpu_campaign) measured, put where the project reads it, on this machine.

- the measured latency tables into profilers/tables/ (the h200 profile finds them there: `source: measured`);
- runs/bench/kernels/<gpu>-campaign.json and .png: the decode benchmark, each row beside the static SASS
  prediction of the same kernel (runs/bench/kernels/static/sm<arch>.json) and its roofline fraction;
- runs/bench/gpu/<gpu>-campaign.json: environment, ceilings, smoke test and CUDA test results, every verify point
  with the measured table's prediction and the datasheet roofline's (profilers.roofline) beside the measurement,
  and the measured tables against the roofline, regime by regime;
- runs/bench/gpu/<gpu>-verify.png: predicted against measured latency, both predictors.

python -m allocator.benchmarks.gpu_report DIR [DIR ...]  (each a campaign's --out, e.g. unpacked from campaign.tar.gz;
  a file in a later one replaces the same file in an earlier one)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

from allocator.benchmarks.gpu_campaign import MODELS, model_space, profile_config
from allocator.benchmarks.gpu_campaign import allocations as campaign_allocations
from allocator.benchmarks.kernels import BASELINE, plot_speedups, result_name
from allocator.core.atomic_io import write_json_atomic
from allocator.core.space import ATTN, MLP, unit_name
from profilers.devices import DEVICES
from profilers.gpu import gpu_regimes
from profilers.registry import TABLES_DIR
from profilers.roofline import roofline_table
from profilers.table import CostTable, load_table

BENCH = Path("runs/bench")


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def static_key(row: dict) -> str | None:
    """The static benchmark's variant name for a kernel benchmark row (None: not compiled there)."""
    pct = round(row["sparsity"] * 100)
    if row["kernel"] == "triton-bitmap":
        return f"bitmap{pct}"
    if row["kernel"] == "triton-csr8":
        return f"csr8-{pct}"
    if row["kernel"] == "triton-nm-2:4":
        return "nm2:4"
    if row["kernel"] == "triton-bsr-16x16":
        return f"bsr16x16-{pct}"
    return None


def join_static(rows: list[dict], static: dict | None) -> list[dict]:
    """Each measured row with the static prediction of the same kernel, shape and M, where one was compiled."""
    by_key = {(r["variant"], tuple(r["shape"]), r["m"]): r for r in (static or {}).get("rows", [])}
    out = []
    for row in rows:
        match = by_key.get((static_key(row), tuple(row["shape"]), row["M"])) if row["kernel"] != BASELINE else None
        out.append({**row, "static_predicted_speedup": match and match["predicted_speedup_vs_cublas"],
                    "static_bound_by": match and match["bound_by"]})
    return out


def progress_counts(log: Path) -> dict | None:
    """Outcomes counted off pytest's progress dots in a log (a run stopped before it wrote its JUnit XML)."""
    if not log.is_file():
        return None
    marks = "".join(re.sub(r"\s*\[\s*\d+%\]$", "", line) for line in log.read_text().replace("\r", "\n").splitlines()
                    if re.fullmatch(r"[.sFExX]+(\s*\[\s*\d+%\])?", line.strip()))
    return {"passed": marks.count("."), "skipped": marks.count("s"), "failed": marks.count("F"),
            "errors": marks.count("E"), "source": f"progress marks in {log.name} (no JUnit XML: the run was cut short)"}


def test_summary(xml_path: Path) -> dict | None:
    if not xml_path.is_file():
        return progress_counts(xml_path.with_name("tests.log"))
    suite = ET.parse(xml_path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failures = [{"test": f"{case.get('classname')}::{case.get('name')}", "message": (bad.get("message") or "")[:500]}
                for case in suite.iter("testcase") for bad in case if bad.tag in ("failure", "error")]
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"failed": failures}


def roofline_of(name: str) -> CostTable:
    return roofline_table(DEVICES["h200"], model_space(name), gpu_regimes(profile_config(False)), "bfloat16")


def table_vs_roofline(measured: CostTable, roofline: CostTable) -> dict:
    """Per regime: dense and fixed time, and each kind's dense unit (its costliest option) per layer, measured vs
    roofline."""
    out = {}
    for regime, m in measured.regimes.items():
        r = roofline.regime(regime)
        units = {}
        for kind in m.unit_ms:
            pairs = [(m.unit_ms[kind][o], r.unit_ms[kind][o]) for o in m.unit_ms[kind] if o in r.unit_ms[kind]]
            full_m, full_r = max(pairs, key=lambda p: p[0])
            units[kind] = {"measured_dense_unit_ms": full_m, "roofline_dense_unit_ms": full_r}
        out[regime] = {"dense_ms": [m.dense_ms, r.dense_ms], "fixed_ms": [m.fixed_ms, r.fixed_ms],
                       "dense_roofline_over_measured": r.dense_ms / m.dense_ms, "units": units}
    return out


def timed_allocations(rows: list[dict], recorded: dict[str, dict]) -> dict[str, dict]:
    """Every verified model's allocations: as verify.json recorded them, or rebuilt (campaigns before verify.json
    kept every model's held only the last model's; allocations() is deterministic: the committed plans, uniform and
    seeded random ones)."""
    return {name: recorded.get(name) or campaign_allocations(name, model_space(name))
            for name in {r["model"] for r in rows}}


def with_roofline(rows: list[dict], allocations: dict[str, dict[str, dict]]) -> list[dict]:
    """Each verify row with the roofline's prediction of the same allocation beside the measured table's."""
    tables = {name: roofline_of(name) for name in allocations}
    out = []
    for row in rows:
        name = row["model"]
        alloc = allocations[name][row["allocation"]]
        layers = MODELS[name]["num_hidden_layers"]
        widths = {kind: [alloc[unit_name(i, kind)] for i in range(layers)] for kind in (ATTN, MLP)}
        predicted = tables[name].regime(row["regime"]).predict_ms(widths)
        out.append({**row, "roofline_ms": predicted, "roofline_error": predicted / row["measured_ms"] - 1.0})
    return out


def plot_verify(rows: list[dict], path: Path, gpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5), squeeze=False)
    for ax, model in zip(axes[0], dict.fromkeys(r["model"] for r in rows)):
        pts = [r for r in rows if r["model"] == model]
        ms = [r["measured_ms"] for r in pts]
        ax.scatter(ms, [r["predicted_ms"] for r in pts], s=14, label="measured table")
        ax.scatter(ms, [r["roofline_ms"] for r in pts], s=14, marker="x", label="datasheet roofline")
        lo, hi = min(ms) * 0.8, max(max(ms), max(r["roofline_ms"] for r in pts)) * 1.2
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8)
        ax.fill_between([lo, hi], [lo * 0.95, hi * 0.95], [lo * 1.05, hi * 1.05], color="grey", alpha=0.2,
                        label="±5%")
        ax.set(xscale="log", yscale="log", xlabel="measured ms (CUDA graph, median)", ylabel="predicted ms",
               title=f"{model}: {len(pts)} allocation x regime points")
        ax.legend(fontsize=8)
    fig.suptitle(f"end-to-end latency on {gpu}: predicted vs measured")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    print(f"wrote {path}")


def report(runs: list[Path], tables_dir: Path = TABLES_DIR, bench: Path = BENCH) -> dict:
    """`runs`: campaign directories, later ones taking precedence for a file they both hold (a second call that
    re-ran some steps)."""
    (bench / "gpu").mkdir(parents=True, exist_ok=True)

    def find(name: str) -> Path:
        return next((r / name for r in reversed(runs) if (r / name).exists()), runs[-1] / name)

    probe = _load(find("probe.json")) or {}
    gpu = probe.get("gpu", "unknown-gpu")
    stem = result_name(gpu, False)
    copied = []
    tables = sorted(p for r in runs for p in (r / "tables").glob("*--*.json"))
    tables_dir.mkdir(parents=True, exist_ok=True)
    for path in tables:
        table = load_table(path)
        if table.source == "measured" and not path.name.endswith(".partial.json"):
            target = tables_dir / path.name.split("--", 1)[1]
            shutil.copy(path, target)
            copied.append(str(target))
    kernels = _load(find("kernels.json"))
    if kernels:
        arch = "".join(map(str, probe.get("capability", [9, 0])))
        rows = join_static(kernels["results"], _load(bench / "kernels" / "static" / f"sm{arch}.json"))
        path = bench / "kernels" / f"{stem}-campaign.json"
        write_json_atomic(path, {**kernels, "results": rows})
        plot_speedups(rows, (4096, 14336), path.with_suffix(".png"),
                      f"4096x14336 bf16 on {gpu}: speedup vs cuBLAS (dotted: bytes roofline)")
    verify = _load(find("verify.json"))
    smoke = _load(find("smoke.json"))
    result = {
        "probe": probe, "ceilings": _load(find("ceilings.json")),
        "steps": {str(r): (_load(r / "campaign.json") or {}).get("steps") for r in runs},
        "smoke": smoke and {**{k: smoke[k] for k in ("checks", "failed", "tolerance")},
                            "failures": [r for r in smoke["rows"] if r["status"] != "ok"]},
        "tests": {str(r): test_summary(r / "tests.xml") for r in runs if (r / "tests.log").is_file()},
        "tables": copied,
    }
    if verify:
        allocations = timed_allocations(verify["rows"], verify["allocations"])
        rows = with_roofline(verify["rows"], allocations)
        result["verify"] = rows
        result["allocations"] = allocations
        plot_verify(rows, bench / "gpu" / f"{stem}-verify.png", gpu)
    result["table_vs_roofline"] = {}
    for path in tables:
        name = path.name.split("--", 1)[0]
        if name in MODELS:
            result["table_vs_roofline"][name] = table_vs_roofline(load_table(path), roofline_of(name))
    occupancy = _load(find("occupancy.json"))
    if occupancy:
        write_json_atomic(bench / "gpu" / f"{stem}-occupancy.json", {"probe": probe, **occupancy})
    write_json_atomic(bench / "gpu" / f"{stem}-campaign.json", result)
    print(f"wrote {bench / 'gpu' / f'{stem}-campaign.json'}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m allocator.benchmarks.gpu_report", description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="the campaigns' --out directories; a later one's file replaces an earlier one's")
    report(parser.parse_args(argv).runs)


if __name__ == "__main__":
    main()
