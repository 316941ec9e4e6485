"""`native`: this project's checkpoint (allocator/model/export.py), the pruned shapes as they are and sparse units in
their compressed formats; `allocator.model.runtime.load_pruned` loads it (the Triton kernels run the sparse units on
a GPU)."""

from __future__ import annotations

from allocator.model.engines import EXPORT_FORMATS
from allocator.model.export import export_checkpoint

HOW_TO_LOAD = """\
Needs sparsity-allocator (plain transformers cannot build per-layer widths):

```python
from allocator.model.runtime import load_pruned
model, tokenizer, plan = load_pruned("{path}")
```

Exactly the model the search scored: each layer at its own width, sparse units in their compressed formats
(run by the Triton kernels on a GPU; decompressed once on a CPU)."""

EXPORT_FORMATS.register("native")(export_checkpoint)
