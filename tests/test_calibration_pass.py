"""One calibration pass gathers every statistic the level database (and OWL) needs, bit for bit what separate passes
over each statistic's own sequences gave, and the database build calls the model once per calibration batch.

The references below are the separate per-statistic passes the one pass replaced (allocator/levels/compress/
hessians.py, fisher.py, linear_hessians.py, outliers.py and sparse_levels.record_block_calls before it), kept here
as the oracle."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from allocator.core.config import SpaceConfig
from allocator.core.space import ATTN, MLP, Space, build_space
from allocator.levels.compress.calibration_pass import GradientCollector, calibration_pass
from allocator.levels.compress.fisher import OutputFisher
from allocator.levels.compress.linear_hessians import INPUT_GROUPS, InputHessians
from allocator.levels.compress.outliers import OutlierNorms, layer_outlier_ratios
from allocator.levels.database import open_or_build_database
from allocator.levels.sparse_levels import BlockCalls
from allocator.model.surgery import BLOCK_ATTRIBUTE, decoder_layers

# --- the separate passes, as they were ----------------------------------------------------------------------


def _forward(model, tokens, batch_size, handles):
    try:
        for start in range(0, len(tokens), batch_size):
            model(tokens[start : start + batch_size], use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def reference_hessians(model, tokens, batch_size):
    """Structured OBS's pair: per layer (o_proj input, down_proj input) Σ xxᵀ."""
    layers = decoder_layers(model)
    attn_h, mlp_h = [None] * len(layers), [None] * len(layers)

    def accumulate(store, idx):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            h = (x.T @ x).double()
            store[idx] = h if store[idx] is None else store[idx].add_(h)

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(accumulate(attn_h, i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(accumulate(mlp_h, i)))
    _forward(model, tokens, batch_size, handles)
    return attn_h, mlp_h


@torch.inference_mode()
def reference_linear_hessians(model, tokens, batch_size):
    layers = decoder_layers(model)
    store = {key: [None] * len(layers) for key in INPUT_GROUPS}
    seen = [0]

    def accumulate(key, idx):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            h = (x.T @ x).to(torch.float64)
            store[key][idx] = h if store[key][idx] is None else store[key][idx].add_(h)
            if key == "qkv" and idx == 0:
                seen[0] += x.shape[0]

        return hook

    handles = [
        layer.get_submodule(hooked).register_forward_pre_hook(accumulate(key, i))
        for i, layer in enumerate(layers)
        for key, (hooked, _readers) in INPUT_GROUPS.items()
    ]
    _forward(model, tokens, batch_size, handles)
    return store, seen[0]


def reference_fisher(model, tokens, batch_size):
    layers = decoder_layers(model)
    outputs = {}

    def keep(key):
        def hook(_module, _args, output):
            output.retain_grad()
            outputs[key] = output

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_hook(keep((i, ATTN))))
        handles.append(layer.mlp.down_proj.register_forward_hook(keep((i, MLP))))
    hidden = model.config.hidden_size
    sums = {(i, kind): torch.zeros(hidden, dtype=torch.float64) for i in range(len(layers)) for kind in (ATTN, MLP)}
    count = 0
    try:
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start : start + batch_size]
            embeds = model.get_input_embeddings()(batch).detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(inputs_embeds=embeds, use_cache=False).logits[:, :-1]
                loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
                loss.backward()
            for key, output in outputs.items():
                sums[key] += output.grad.double().pow(2).sum(dim=(0, 1))
            count += batch[:, 1:].numel()
            outputs.clear()
    finally:
        for handle in handles:
            handle.remove()
    return {key: s / count for key, s in sums.items()}


@torch.inference_mode()
def reference_block_calls(model, tokens, batch_size, kinds):
    layers = decoder_layers(model)
    calls = {key: [] for key in kinds}

    def detached(value):
        if isinstance(value, torch.Tensor):
            return value.detach()
        if isinstance(value, tuple):
            return tuple(detached(v) for v in value)
        return value

    def record(key):
        def hook(_module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            kept = {k: detached(v) for k, v in kwargs.items() if k != "past_key_values"}
            calls[key].append((detached(args), kept, out.detach()))

        return hook

    handles = [
        getattr(layers[layer], BLOCK_ATTRIBUTE[kind]).register_forward_hook(record((layer, kind)), with_kwargs=True)
        for layer, kind in kinds
    ]
    _forward(model, tokens, batch_size, handles)
    return calls


@torch.inference_mode()
def reference_outlier_norms(model, tokens, batch_size):
    layers = decoder_layers(model)
    linears = [[m for m in layer.modules() if isinstance(m, torch.nn.Linear)] for layer in layers]
    sq_norms = {}

    def accumulate(module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        s = x.square().sum(0).double()
        sq_norms[module] = s if module not in sq_norms else sq_norms[module].add_(s)

    handles = [m.register_forward_pre_hook(accumulate) for group in linears for m in group]
    _forward(model, tokens, batch_size, handles)
    return sq_norms


# --- the one pass ---------------------------------------------------------------------------------------------


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


@pytest.fixture(scope="module")
def calibration(tiny):
    loaded, _ = tiny
    return torch.randint(0, loaded.model.config.vocab_size, (7, 12), generator=torch.Generator().manual_seed(1))


# fisher_sequences 4: whole pass batches; 3 and 5: the Fisher and the block calls read part of a batch.
@pytest.mark.parametrize("fisher_sequences", [4, 3, 5])
def test_one_pass_equals_the_separate_passes_bit_for_bit(tiny, calibration, fisher_sequences):
    model = tiny[0].model
    layers = len(decoder_layers(model))
    batch, owl_sequences, owl_chunk = 4, 5, 2
    every = {(layer, kind) for layer in range(layers) for kind in (ATTN, MLP)}
    hessians = InputHessians({(layer, key) for layer in range(layers) for key in INPUT_GROUPS})
    fisher = OutputFisher(every, fisher_sequences)
    calls = BlockCalls(every, fisher_sequences)
    outliers = OutlierNorms(owl_sequences, owl_chunk)
    calibration_pass(model, calibration, batch, [hessians, fisher, calls, outliers])

    linear, tokens = reference_linear_hessians(model, calibration, batch)
    assert hessians.tokens == tokens == calibration.numel()
    for key in INPUT_GROUPS:
        for layer in range(layers):
            assert torch.equal(hessians.hessian(layer, key), linear[key][layer]), (key, layer)
    # Structured OBS reads the same "o" / "down" Hessians that its own pass gave.
    attn_h, mlp_h = reference_hessians(model, calibration, batch)
    for layer in range(layers):
        assert torch.equal(hessians.hessian(layer, "o"), attn_h[layer])
        assert torch.equal(hessians.hessian(layer, "down"), mlp_h[layer])

    measured = calibration[:fisher_sequences]
    expected_fisher = reference_fisher(model, measured, batch)
    assert fisher.count == measured[:, 1:].numel()
    for layer, kind in every:
        assert torch.equal(fisher.fisher(layer, kind), expected_fisher[(layer, kind)]), (layer, kind)

    expected_calls = reference_block_calls(model, measured, batch, every)
    for key in every:
        got = [(c.args, c.kwargs, c.output) for c in calls.calls[key]]
        assert len(got) == math.ceil(fisher_sequences / batch)
        assert _equal(got, expected_calls[key]), key

    expected_norms = reference_outlier_norms(model, calibration[:owl_sequences], owl_chunk)
    assert outliers.sq_norms.keys() == expected_norms.keys()
    assert all(torch.equal(outliers.sq_norms[m], expected_norms[m]) for m in expected_norms)
    assert outliers.ratios() == layer_outlier_ratios(model, calibration[:owl_sequences], batch_size=owl_chunk)


def test_pass_skips_batches_no_collector_reads_and_removes_its_hooks(tiny, calibration):
    model = tiny[0].model
    calls = []
    counter = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        outliers = OutlierNorms(3, 1)
        calibration_pass(model, calibration, 2, [outliers])
        assert len(calls) == 2  # sequences 0-3 in batches of 2; the other two batches are not run
        hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in decoder_layers(model).modules())
        assert hooks == 0
    finally:
        counter.remove()


def test_pass_rejects_bad_input(tiny, calibration):
    model = tiny[0].model

    class Loss(GradientCollector):
        def attach(self, index, layer):
            return []

        def loss(self, logits, tokens):
            return logits.sum()

    with pytest.raises(ValueError, match="one gradient collector"):
        calibration_pass(model, calibration, 2, [Loss(), Loss()])
    with pytest.raises(ValueError, match="batch_size"):
        calibration_pass(model, calibration, 0, [OutlierNorms(None, 1)])
    with pytest.raises(ValueError, match="2-D"):
        calibration_pass(model, calibration[0], 2, [OutlierNorms(None, 1)])
    with pytest.raises(ValueError, match="sequences"):
        OutlierNorms(0, 1)


def test_database_build_runs_each_layer_once_per_calibration_batch(tiny, calibration, tmp_path):
    """The layer-streamed build: each decoder layer runs once per calibration batch in the forward stream, and twice
    per Fisher batch (the forward that saves its input, the recompute the gradient is pulled through)."""
    loaded, space = tiny
    shape = space.shape
    model = loaded.model
    cfg = SpaceConfig(kind="mixed", mlp_step=32, fisher_sequences=3, sparsities=[0.5], nm_patterns=["2:4"],
                      block_sparsities=[0.5])
    space = Space(shape, build_space(shape, cfg).units[:2])  # layer 0's attention and MLP: structured and sparse
    calls = []
    counter = decoder_layers(model)[1].register_forward_hook(lambda *_: calls.append(1))
    try:
        owl = OutlierNorms(5, 2)
        db = open_or_build_database(model, space, calibration, "tiny", "random", cfg, tmp_path, batch_size=4,
                                    also=[owl])
        assert len(calls) == math.ceil(len(calibration) / 4) + 2 * math.ceil(3 / 4)
        assert owl.ratios() == layer_outlier_ratios(model, calibration[:5], batch_size=2)
        assert set(db.errors) == {u.name for u in space.units}
        # Reused: nothing to build, so the outlier collector streams over its own sequences only.
        calls.clear()
        again = OutlierNorms(5, 2)
        open_or_build_database(model, space, calibration, "tiny", "random", cfg, tmp_path, batch_size=4,
                               also=[again])
        assert len(calls) == math.ceil(5 / 4) and again.ratios() == owl.ratios()
    finally:
        counter.remove()


def test_search_setup_gathers_owl_ratios_on_the_database_pass(tmp_path):
    from allocator.app.config import SearchJob
    from allocator.app.search_job import prepare_search
    from allocator.core.config import BudgetConfig, DataConfig, FitnessConfig, ModelConfig, ProfileConfig
    from search.owl import OwlConfig

    job = SearchJob(
        model=ModelConfig(name="tiny-llama", tiny_layers=3),
        data=DataConfig(seq_len=32, calib_sequences=8, eval_sequences=2),
        space=SpaceConfig(mlp_step=32, fisher_sequences=4),
        profile=ProfileConfig(name="cpu-generic"),  # a roofline: nothing timed
        budget=BudgetConfig(speedup=1.3),
        searcher=OwlConfig(),
        fitness=FitnessConfig(sequences=6, batch_size=2),
        cache_dir=str(tmp_path),
    )
    built = prepare_search(job)
    expected = layer_outlier_ratios(built.dense, built.data.calibration[:6], batch_size=2)
    assert built.problem.outlier_ratios == tuple(expected[u.layer] for u in built.space.units)
    reused = prepare_search(job)  # the database is reused: the ratios come from a pass of their own
    assert reused.problem.outlier_ratios == built.problem.outlier_ratios
