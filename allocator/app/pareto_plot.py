"""Plot of a cost/fitness Pareto front (searcher.multi_objective=true) with the budget it was searched under."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_pareto_front(front: list[dict[str, Any]], path: Path, budget: float | None, title: str) -> None:
    """Write a PNG: cost on x, fitness on y. The front is drawn as a step line (for any cost, the best fitness
    reachable at or below it), each point with a marker; the budget, if given, as a vertical line."""
    points = sorted(front, key=lambda p: (p["cost"], p["fitness"]))
    costs = [float(p["cost"]) for p in points]
    values = [float(p["fitness"]) for p in points]
    # The object API with the Agg canvas, not pyplot: no global backend switch, no figure registry to leak into.
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if points:
        ax.step(costs, values, where="post", color="tab:blue", marker="o", label="Pareto front")
    if budget is not None:
        ax.axvline(budget, color="tab:red", linestyle="--", label=f"budget {budget:.4g}")
    ax.set_xlabel("cost")
    ax.set_ylabel("fitness (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if points or budget is not None:
        ax.legend(loc="upper right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
