"""The model card (README.md) and plan.json every export directory gets, whatever its format: what was pruned, the
predicted and measured speed and quality from the plan, and how to load the directory."""

from __future__ import annotations

from pathlib import Path

from allocator.core.plan import PLAN_FILE, Plan
from allocator.core.space import (
    ATTN,
    MLP,
    ModelShape,
    Option,
    full_width,
    is_sparse,
    unit_name,
)
from allocator.model.surgery import SPARSE_KEY, WIDTHS_KEY, allocation_from_widths

CARD_FILE = "README.md"
FORMAT_TITLES = {
    "native": "native (sparsity-allocator's loader)",
    "dense": "dense (original architecture, pruned weights zeroed)",
    "decilm": "decilm (Nemotron-NAS per-layer widths: transformers, vLLM)",
    "gguf": "gguf (llama.cpp)",
}


def _unit_text(shape: ModelShape, kind: str, option: Option) -> str:
    if is_sparse(option):
        return f"{option} (sparse, full width)"
    if option == 0:
        return "dropped"
    full = full_width(shape, kind)
    return "full" if option == full else f"{option}/{full}"


def pruned_lines(shape: ModelShape, allocation: dict[str, Option]) -> list[str]:
    """The allocation as a markdown table: KV groups and MLP neurons kept per layer."""
    lines = ["| layer | attention (KV groups kept) | MLP (neurons kept) |", "| ---: | :--- | :--- |"]
    for i in range(shape.num_layers):
        attn, mlp = allocation[unit_name(i, ATTN)], allocation[unit_name(i, MLP)]
        lines.append(f"| {i} | {_unit_text(shape, ATTN, attn)} | {_unit_text(shape, MLP, mlp)} |")
    return lines


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def figure_lines(plan: Plan) -> list[str]:
    """Predicted and measured speed and quality, as the plan records them."""
    p, q, b = plan.predicted, plan.quality, plan.budget
    budget = f"- Budget: {b.label()}, searcher {plan.searcher.name}, profile {plan.profile.name} ({plan.profile.source})."
    lines = [budget]
    if p.latency_ms is not None:
        lines.append(f"- Predicted: {_ms(p.latency_ms)} vs dense {_ms(p.dense_latency_ms)}, speedup {p.speedup:.2f}x.")
    else:
        lines.append("- Predicted latency: not predicted (the plan has no latency table).")
    weights = f"- Weights: {p.weight_bytes / 2**20:.1f} MiB as the native format stores them (dense {p.dense_weight_bytes / 2**20:.1f} MiB)"
    if p.param_sparsity is not None:
        weights += f"; {p.param_sparsity:.1%} of the decoder's linear weights removed"
    lines.append(weights + ".")
    m = plan.measured
    if m is not None:
        lines.append(f"- Measured ({m.regime}, native model on {m.device or 'the CPU'}): {_ms(m.latency_ms)} vs dense "
                     f"{_ms(m.dense_latency_ms)}, speedup {m.speedup:.2f}x." + (f" {m.verdict}." if m.verdict else ""))
    elif plan.verify_skipped:
        lines.append(f"- Measured: not verified ({plan.verify_skipped}).")
    else:
        lines.append("- Measured: not verified (`python -m allocator verify run=<run directory>` measures it).")
    lines.append(f"- Quality: KL to dense {q.kl:.4f}; held-out perplexity {q.ppl_pruned:.2f} (dense {q.ppl_dense:.2f}).")
    return lines


def model_card(name: str, out_dir: Path, shape: ModelShape, allocation: dict[str, Option], plan: Plan | None) -> str:
    from allocator.model.engines import format_module

    title = plan.model if plan is not None else "model"
    lines = [f"# {title}, pruned by sparsity-allocator: {FORMAT_TITLES.get(name, name)}", ""]
    if plan is not None:
        lines += ["## Speed and quality", "", *figure_lines(plan), ""]
        lines.append("The figures are the pruned model's as the search scored it and verify measured it (the native "
                     "format); this format computes the same outputs. `plan.json` holds them all.")
        lines.append("")
    lines += ["## What was pruned", "", *pruned_lines(shape, allocation), ""]
    lines += format_notes(name, shape, allocation)
    usage = getattr(format_module(name), "HOW_TO_LOAD", None)
    if usage:
        lines += ["## How to load it", "", usage.replace("{path}", str(out_dir)), ""]
    return "\n".join(lines)


def format_notes(name: str, shape: ModelShape, allocation: dict[str, Option]) -> list[str]:
    """The format module's `card_notes(shape, allocation)` lines (how it lays the allocation out), if it has one."""
    from allocator.model.engines import format_module

    notes = getattr(format_module(name), "card_notes", None)
    return [] if notes is None else [*notes(shape, allocation), ""]


def write_card(out_dir: Path, name: str, shape: ModelShape, plan: Plan | None, config=None) -> None:
    """plan.json (when there is a plan) and README.md into an export directory. `config`: the native model's config,
    whose widths give the allocation when there is no plan."""
    if plan is not None:
        plan.save(out_dir / PLAN_FILE)
        allocation = plan.allocation
    else:
        allocation = allocation_from_widths(getattr(config, WIDTHS_KEY), getattr(config, SPARSE_KEY, None))
    (out_dir / CARD_FILE).write_text(model_card(name, out_dir, shape, allocation, plan))
