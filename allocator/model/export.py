"""Write a physically shrunk checkpoint: safetensors + config (with per-layer widths) + tokenizer + plan.json."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from allocator.core.plan import PLAN_FILE, Plan
from allocator.model.surgery import WIDTHS_KEY

WEIGHTS_FILE = "model.safetensors"


def export_checkpoint(model: nn.Module, tokenizer, out_dir: Path, plan: Plan | None) -> None:
    """Weights are cloned contiguous tensors (stitched models share storage with the dense one); a tied lm_head
    is stored once, as the embedding, and re-tied by the loader. Without a plan (a bare allocation exported by a
    benchmark or a test) no plan.json is written."""
    if not hasattr(model.config, WIDTHS_KEY):
        raise ValueError("export_checkpoint needs a model built by allocator.model.surgery (no widths in its config)")
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().contiguous().clone() for name, t in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, out_dir / WEIGHTS_FILE)
    model.config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if plan is not None:
        plan.save(out_dir / PLAN_FILE)
