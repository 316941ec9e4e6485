"""What a person reads and looks at after a run: the allocation table, the scores, an allocation plot."""

from __future__ import annotations

from pathlib import Path

from allocator.core.plan import Plan
from allocator.core.space import (
    ATTN,
    MLP,
    ModelShape,
    Option,
    full_width,
    is_sparse,
    option_params,
    sparse_pattern,
    unit_name,
)


def option_text(shape: ModelShape, kind: str, option: Option) -> str:
    """A width as kept/full, a sparse option by its label."""
    return option if is_sparse(option) else f"{option}/{full_width(shape, kind)}"


def allocation_lines(shape: ModelShape, searched: dict[str, Option], uniform: dict[str, Option]) -> list[str]:
    lines = [f"{'layer':>5}  {'attention':>16}  {'MLP':>16}   {'uniform attn / mlp':>30}"]
    for i in range(shape.num_layers):
        attn, mlp = unit_name(i, ATTN), unit_name(i, MLP)
        lines.append(
            f"{i:>5}  {option_text(shape, ATTN, searched[attn]):>16}  {option_text(shape, MLP, searched[mlp]):>16}   "
            f"{option_text(shape, ATTN, uniform[attn]):>14} / {option_text(shape, MLP, uniform[mlp]):<14}"
        )
    return lines


CPU_PROFILES = ("cpu", "cpu-generic")  # SparseLinear runs dense there (kernels/sparse_linear.py)


def summary_lines(plan: Plan) -> list[str]:
    q, u, p, b = plan.quality, plan.uniform, plan.predicted, plan.budget
    planned = "" if b.target_ms is None else f", planned for {b.target_ms:.1f} ms"
    predicted = ([f"{p.latency_ms:.1f} ms", f"speedup {p.speedup:.2f}x"] if p.latency_ms is not None else
                 ["latency not predicted (no latency table: the budget reads none and none was saved)"])
    predicted.append(f"weights {p.weight_bytes / 2**20:.1f} MiB")
    if p.param_sparsity is not None:  # None only in plans written before these were recorded
        predicted.append(f"parameter sparsity {p.param_sparsity:.3f}")
    if p.memory_bytes is not None:
        predicted.append(f"weights + KV cache {p.memory_bytes / 1e9:.4f} GB")
    engine = "" if plan.runtime is None else f", engine {plan.runtime}"
    lines = [
        f"profile {plan.profile.name} ({plan.profile.source}){engine}, budget {b.label()}{planned}",
        f"predicted ({b.regime}): " + ", ".join(predicted),
    ]
    if plan.unstructured_format != "bitmap":  # bitmap plans print as they did before the choice existed
        lines.append(f"unstructured units exported as {plan.unstructured_format} (space.unstructured_format): "
                     "per-value decode kernels, predicted fast at batch <= 4 and slow at prefill; the latency table "
                     "prices every regime in it")
    if plan.profile.name in CPU_PROFILES and any(is_sparse(o) for o in plan.allocation.values()):
        lines.append("on a CPU sparse units run decompressed (once, at load) at the dense unit's speed: their formats "
                     "shrink the stored weights, not the latency")
    m = plan.measured
    if m is not None:
        error = ("latency not predicted" if m.speedup_prediction_error is None
                 else f"speedup prediction error {m.speedup_prediction_error * 100:+.1f}%")
        lines.append(
            f"measured:  {m.latency_ms:.1f} ms (dense {m.dense_latency_ms:.1f} ms), speedup {m.speedup:.2f}x ({error})"
        )
        if m.verdict is not None:
            lines.append(m.verdict)
        if m.table_note is not None:
            lines.append(f"WARNING: {m.table_note}")
    lines += [
        f"{'':10}{'KL to dense':>12}{'held-out ppl':>14}",
        f"{'dense':10}{0.0:>12.4f}{q.ppl_dense:>14.2f}",
        f"{'uniform':10}{u.kl:>12.4f}{u.ppl_pruned:>14.2f}",
        f"{'searched':10}{q.kl:>12.4f}{q.ppl_pruned:>14.2f}",
    ]
    return lines


def export_lines(run_dir: Path) -> list[str]:
    """Where each export format was written (the model card in each directory says how to load it)."""
    from allocator.model.engines import export_dir, exported_formats

    return [f"export {name:<7} {export_dir(run_dir, name)}/" for name in exported_formats(run_dir)]


def kept_share(shape: ModelShape, kind: str, option: Option) -> float:
    return option_params(shape, kind, option) / option_params(shape, kind, full_width(shape, kind))


FORMAT_COLORS = {"structured": "tab:blue", "unstructured": "tab:green", "nm": "tab:purple", "block": "tab:red"}


def option_family(option: Option) -> str:
    return sparse_pattern(option).kind if is_sparse(option) else "structured"


def plot_allocation(shape: ModelShape, searched: dict[str, Option], uniform: dict[str, Option], path: Path) -> None:
    """Share of each unit's weights kept per layer, coloured by the kind of sparsity (widths, unstructured, N:M,
    block)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    layers = range(shape.num_layers)
    fig, axes = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    families = {option_family(o) for o in searched.values()}
    for ax, kind in ((axes[0], ATTN), (axes[1], MLP)):
        options = [searched[unit_name(i, kind)] for i in layers]
        ax.bar(layers, [kept_share(shape, kind, o) for o in options],
               color=[FORMAT_COLORS[option_family(o)] for o in options])
        shares = [kept_share(shape, kind, uniform[unit_name(i, kind)]) for i in layers]
        ax.step(layers, shares, where="mid", color="tab:orange")
        ax.set_ylabel(f"{kind} kept")
        ax.set_ylim(0, 1.25)  # room for the legend above full-width bars
    handles = [Patch(color=FORMAT_COLORS[f], label=f"searched: {f}") for f in FORMAT_COLORS if f in families]
    axes[0].legend(handles=[*handles, plt.Line2D([], [], color="tab:orange", label="uniform")], loc="upper left", ncol=5,
                   fontsize=8)
    axes[1].set_xlabel("layer")
    fig.suptitle("Share of each unit's weights kept, per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
