"""Write a physically shrunk checkpoint: safetensors + config (with per-layer widths) + tokenizer + plan.json.

This is the `native` export format (allocator/model/engines/native.py), read back by allocator.model.runtime."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from allocator.core.plan import PLAN_FILE, Plan
from allocator.model.engines.layers import save_weights
from allocator.model.surgery import WIDTHS_KEY

WEIGHTS_FILE = "model.safetensors"


def export_checkpoint(model: nn.Module, tokenizer, out_dir: Path, plan: Plan | None) -> None:
    """Weights are cloned contiguous tensors (stitched models share storage with the dense one); a tied lm_head
    is stored once, as the embedding, and re-tied by the loader. Without a plan (a bare allocation exported by a
    benchmark or a test) no plan.json is written."""
    if not hasattr(model.config, WIDTHS_KEY):
        raise ValueError("export_checkpoint needs a model built by allocator.model.surgery (no widths in its config)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = dict(model.state_dict())
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_weights(state, out_dir / WEIGHTS_FILE)
    model.config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if plan is not None:
        plan.save(out_dir / PLAN_FILE)
