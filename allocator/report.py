"""What a person reads and looks at after a run: the allocation table, the scores, an allocation plot."""

from __future__ import annotations

from pathlib import Path

from allocator.space import ATTN, MLP, ModelShape


def allocation_lines(shape: ModelShape, widths: dict[str, list[int]], uniform: dict[str, list[int]]) -> list[str]:
    lines = [f"{'layer':>5}  {'attn KV groups':>14}  {'MLP neurons':>11}   {'uniform attn/mlp':>16}"]
    for i in range(shape.num_layers):
        lines.append(
            f"{i:>5}  {widths['attn_kv_groups'][i]:>6}/{shape.num_kv_heads:<7}  "
            f"{widths['mlp_neurons'][i]:>5}/{shape.intermediate:<5}   "
            f"{uniform['attn_kv_groups'][i]:>7}/{uniform['mlp_neurons'][i]:<8}"
        )
    return lines


def summary_lines(plan: dict) -> list[str]:
    q, u, p, b = plan["quality"], plan["uniform"], plan["predicted"], plan["budget"]
    parts = []
    if b.get("target_ms") is not None:
        parts.append(f"{b['target_ms']:.1f} ms")
    if b.get("sparsity") is not None:
        parts.append(f"{b['sparsity']:.0%} of weights removed")
    if b.get("memory_gb") is not None:
        parts.append(f"{b['memory_gb']} GB (batch {b['memory_batch']} x {b['memory_context']} tokens of KV cache)")
    budget = " and ".join(parts)
    lines = [
        f"profile {plan['profile']['name']} ({plan['profile']['source']}), regime {b['regime']}, budget {budget}",
        f"predicted: {p['latency_ms']:.1f} ms, speedup {p['speedup']:.2f}x, weights {p['weight_bytes'] / 2**20:.1f} MiB, "
        f"parameter sparsity {p['param_sparsity']:.3f}, weights + KV cache {p['memory_bytes'] / 1e9:.4f} GB",
    ]
    m = plan.get("measured")
    if m:
        lines += [
            f"measured:  {m['latency_ms']:.1f} ms (dense {m['dense_latency_ms']:.1f} ms), speedup {m['speedup']:.2f}x "
            f"(speedup prediction error {m['speedup_prediction_error'] * 100:+.1f}%)",
            m["verdict"],
        ]
    lines += [
        f"{'':10}{'KL to dense':>12}{'held-out ppl':>14}",
        f"{'dense':10}{0.0:>12.4f}{q['ppl_dense']:>14.2f}",
        f"{'uniform':10}{u['kl']:>12.4f}{u['ppl_pruned']:>14.2f}",
        f"{'searched':10}{q['kl']:>12.4f}{q['ppl_pruned']:>14.2f}",
    ]
    return lines


def plot_allocation(shape: ModelShape, widths: dict[str, list[int]], uniform: dict[str, list[int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = range(shape.num_layers)
    fig, axes = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    for ax, kind, key, full in (
        (axes[0], ATTN, "attn_kv_groups", shape.num_kv_heads),
        (axes[1], MLP, "mlp_neurons", shape.intermediate),
    ):
        ax.bar(layers, [w / full for w in widths[key]], label="searched", color="tab:blue")
        ax.step(layers, [w / full for w in uniform[key]], where="mid", color="tab:orange", label="uniform")
        ax.set_ylabel(f"{kind} kept")
        ax.set_ylim(0, 1.05)
    axes[0].legend(loc="lower right")
    axes[1].set_xlabel("layer")
    fig.suptitle("Fraction kept per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
