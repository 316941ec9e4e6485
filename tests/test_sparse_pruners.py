"""Tests for sparsity patterns/masks, the magnitude/Wanda/SparseGPT pruners and per-linear Hessian collection."""

from __future__ import annotations

import math

import pytest
import torch

from allocator.core.patterns import SparsityPattern, pruned_count, select_mask
from allocator.levels.compress import sparse_prune
from allocator.levels.compress.calibration_pass import calibration_pass
from allocator.levels.compress.linear_hessians import INPUT_GROUPS, InputHessians
from allocator.levels.compress.sparse_prune import (
    PRUNERS,
    PrunedWeight,
    output_error,
    prune_sparsegpt,
    sparsegpt_levels,
)

UNSTRUCTURED50 = SparsityPattern("unstructured", 0.5)
NM24 = SparsityPattern("nm", n=2, m=4)
BLOCK50 = SparsityPattern("block", 0.5, block=(4, 8))


def _data(d_out: int, d_in: int, n_tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random weight and correlated, unevenly scaled calibration inputs X (n_tokens, d_in), float64."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(d_in, dtype=torch.float64) + 0.4 * torch.randn(d_in, d_in, generator=gen, dtype=torch.float64)
    scale = 0.2 + 2 * torch.rand(d_in, generator=gen, dtype=torch.float64)
    x = torch.randn(n_tokens, d_in, generator=gen, dtype=torch.float64) @ mix * scale
    w = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    return w, x


def _check_pattern(mask: torch.Tensor, pattern: SparsityPattern, per_row: bool = True) -> None:
    rows, cols = mask.shape
    if pattern.kind == "unstructured":
        if per_row:
            assert torch.all((~mask).sum(1) == pruned_count(pattern.sparsity, cols))
        else:
            assert int((~mask).sum()) == pruned_count(pattern.sparsity, rows * cols)
    elif pattern.kind == "nm":
        assert torch.all(mask.reshape(rows, cols // pattern.m, pattern.m).sum(-1) <= pattern.n)
    else:
        br, bc = pattern.block
        tiles = mask.reshape(rows // br, br, cols // bc, bc).permute(0, 2, 1, 3).reshape(-1, br * bc)
        assert torch.all(tiles.all(1) | ~tiles.any(1))  # every tile entirely kept or entirely pruned
        assert int((~tiles.any(1)).sum()) == pruned_count(pattern.sparsity, tiles.shape[0])


# --- patterns -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "label"),
    [
        (SparsityPattern("unstructured", 0.7), "unstructured70"),
        (SparsityPattern("unstructured", 0.625), "unstructured62.5"),
        (SparsityPattern("unstructured", 0.0), "unstructured0"),
        (SparsityPattern("nm", n=2, m=4), "2:4"),
        (SparsityPattern("nm", n=4, m=8), "4:8"),
        (SparsityPattern("block", 0.5), "block16x16-50"),
        (SparsityPattern("block", 0.3, block=(32, 8)), "block32x8-30"),
    ],
)
def test_label_parse_round_trip(pattern: SparsityPattern, label: str) -> None:
    assert pattern.label == label
    assert SparsityPattern.parse(label) == pattern
    assert hash(SparsityPattern.parse(label)) == hash(pattern)


def test_nm_sparsity_is_derived() -> None:
    assert SparsityPattern("nm", n=2, m=4).sparsity == 0.5
    assert SparsityPattern("nm", 0.25, n=3, m=4).sparsity == 0.25  # a consistent explicit value is accepted
    assert SparsityPattern("block", 0.5, block=[8, 8]).block == (8, 8)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "dense", "sparsity": 0.5}, "kind"),
        ({"kind": "unstructured"}, "sparsity"),
        ({"kind": "unstructured", "sparsity": 1.5}, r"sparsity.*\[0, 1\]"),
        ({"kind": "unstructured", "sparsity": -0.1}, "sparsity"),
        ({"kind": "unstructured", "sparsity": True}, "sparsity"),
        ({"kind": "nm", "n": 0, "m": 4}, r"n must be in \[1, m=4\]"),
        ({"kind": "nm", "n": 5, "m": 4}, "n must be"),
        ({"kind": "nm", "n": 2, "m": 0}, "m must be"),
        ({"kind": "nm", "sparsity": 0.7, "n": 2, "m": 4}, "sparsity"),
        ({"kind": "block", "sparsity": 0.5, "block": (0, 16)}, "block"),
        ({"kind": "block", "sparsity": 0.5, "block": (16,)}, "block"),
        ({"kind": "unstructured", "sparsity": 0.5, "n": 4, "m": 8}, "n and m"),
        ({"kind": "nm", "n": 2, "m": 4, "block": (8, 8)}, "block"),
    ],
)
def test_pattern_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SparsityPattern(**kwargs)


@pytest.mark.parametrize("label", ["", "dense", "unstructured", "2:", "2-4", "block16-50", "unstructured150", "0:4"])
def test_parse_rejects_bad_labels(label: str) -> None:
    with pytest.raises(ValueError):
        SparsityPattern.parse(label)


# --- masks ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    [
        UNSTRUCTURED50,
        SparsityPattern("unstructured", 0.37),
        NM24,
        SparsityPattern("nm", n=1, m=8),
        BLOCK50,
        SparsityPattern("block", 0.3, block=(2, 4)),
    ],
    ids=lambda p: p.label,
)
def test_select_mask_is_exact(pattern: SparsityPattern) -> None:
    scores = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    scores[0] = 1.0  # all ties in one row: counts must stay exact
    mask = select_mask(scores, pattern)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    _check_pattern(mask, pattern)
    if pattern.kind == "unstructured":
        _check_pattern(select_mask(scores, pattern, granularity="matrix"), pattern, per_row=False)
    # Highest scores are the ones kept: any kept element of a row beats any pruned one (unstructured, per row).
    if pattern.kind == "unstructured":
        for r in range(1, 8):
            assert scores[r][mask[r]].min() >= scores[r][~mask[r]].max()


def test_select_mask_keeps_top_blocks() -> None:
    scores = torch.zeros(4, 8)
    scores[:2, 4:] = 5.0  # the single best 2x4 tile
    mask = select_mask(scores, SparsityPattern("block", 0.75, block=(2, 4)))
    assert mask[:2, 4:].all() and int(mask.sum()) == 8


def test_select_mask_shape_errors() -> None:
    with pytest.raises(ValueError, match="m=4"):
        select_mask(torch.randn(4, 6), NM24)
    with pytest.raises(ValueError, match="block"):
        select_mask(torch.randn(4, 12), BLOCK50)
    with pytest.raises(ValueError, match="granularity"):
        select_mask(torch.randn(4, 8), UNSTRUCTURED50, granularity="column")  # type: ignore[arg-type]


# --- pruners --------------------------------------------------------------------------------------------------

PATTERNS = [UNSTRUCTURED50, NM24, BLOCK50]


@pytest.mark.parametrize("method", sorted(PRUNERS))
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.label)
def test_pruners_obey_pattern_and_report_exact_error(method: str, pattern: SparsityPattern) -> None:
    w, x = _data(16, 48, 300)
    h = x.T @ x
    res = PRUNERS[method](w.float(), h, pattern, tokens=x.shape[0])
    assert isinstance(res, PrunedWeight)
    assert res.weight.dtype == torch.float32 and res.weight.shape == w.shape
    assert torch.all(res.weight[~res.mask] == 0)
    _check_pattern(res.mask, pattern, per_row=True)
    if method != "sparsegpt":  # no weight update
        assert torch.equal(res.weight[res.mask], w.float()[res.mask])
    direct = float((x @ (w.float().double() - res.weight.double()).T).square().sum())
    assert res.error == pytest.approx(direct, rel=1e-9)
    assert output_error(w.float(), res.weight, h) == res.error


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.label)
def test_sparsegpt_beats_wanda_and_magnitude(pattern: SparsityPattern) -> None:
    w, x = _data(24, 64, 400, seed=2)
    h = x.T @ x
    errors = {name: fn(w, h, pattern, tokens=400).error for name, fn in PRUNERS.items()}
    assert errors["sparsegpt"] < errors["wanda"]
    assert errors["sparsegpt"] < errors["magnitude"]


def test_sparsegpt_blocks_and_precision() -> None:
    """Block boundaries (blocksize < in) and float32 vs float64 sweeps give the same quality."""
    w, x = _data(12, 40, 300, seed=3)
    h = x.T @ x
    ref = prune_sparsegpt(w, h, UNSTRUCTURED50, tokens=300, blocksize=128, sweep_dtype=torch.float64)
    for blocksize in (8, 13):
        res = prune_sparsegpt(w, h, UNSTRUCTURED50, tokens=300, blocksize=blocksize, sweep_dtype=torch.float64)
        _check_pattern(res.mask, UNSTRUCTURED50)  # telescoping per-block counts keep rows exact
        assert res.error < 1.5 * ref.error
    res32 = prune_sparsegpt(w, h, NM24, tokens=300, blocksize=10)  # not a multiple of m: rounded down to 8
    res64 = prune_sparsegpt(w, h, NM24, tokens=300, blocksize=10, sweep_dtype=torch.float64)
    _check_pattern(res32.mask, NM24)
    assert res32.error == pytest.approx(res64.error, rel=1e-3)


def test_sparsegpt_at_zero_sparsity_is_identity() -> None:
    w, x = _data(6, 16, 100)
    res = prune_sparsegpt(w, x.T @ x, SparsityPattern("unstructured", 0.0), tokens=100, sweep_dtype=torch.float64)
    assert res.mask.all() and torch.equal(res.weight, w) and res.error == 0.0


def test_sparsegpt_levels_match_single_calls() -> None:
    w, x = _data(16, 48, 300, seed=4)
    h = x.T @ x
    patterns = [UNSTRUCTURED50, SparsityPattern("unstructured", 0.75), NM24, SparsityPattern("nm", n=4, m=8), BLOCK50]
    levels = sparsegpt_levels(w.float(), h, patterns, damp=0.02)
    assert list(levels) == [p.label for p in patterns]
    for p in patterns:
        single = prune_sparsegpt(w.float(), h, p, tokens=300, damp=0.02)
        assert torch.equal(levels[p.label].weight, single.weight)
        assert torch.equal(levels[p.label].mask, single.mask)
        assert levels[p.label].error == single.error
    assert levels["unstructured75"].error > levels["unstructured50"].error
    assert sparsegpt_levels(w, h, []) == {}


def test_sparsegpt_column_loop_runs_on_one_thread_and_restores_the_count(monkeypatch) -> None:
    """The per-column loop runs with COLUMN_LOOP_THREADS CPU threads, torch's count is restored afterwards, and the
    result does not depend on it (each column's update is elementwise, whatever the thread count)."""
    w, x = _data(24, 64, 300, seed=5)
    h = x.T @ x
    seen = []
    real = torch.Tensor.addr_

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(self, *args, **kwargs)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(torch.Tensor, "addr_", spy)
        one = sparsegpt_levels(w.float(), h, [UNSTRUCTURED50, NM24], blocksize=16)
        assert seen and set(seen) == {sparse_prune.COLUMN_LOOP_THREADS}
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(sparse_prune, "COLUMN_LOOP_THREADS", 2)
        two = sparsegpt_levels(w.float(), h, [UNSTRUCTURED50, NM24], blocksize=16)
    finally:
        torch.set_num_threads(before)
    for label in one:
        assert torch.equal(one[label].weight, two[label].weight) and one[label].error == two[label].error


@pytest.mark.parametrize("method", sorted(PRUNERS))
def test_dead_inputs(method: str) -> None:
    w, x = _data(8, 32, 200, seed=5)
    dead = [3, 17, 30]
    x[:, dead] = 0.0
    h = x.T @ x
    res = PRUNERS[method](w, h, UNSTRUCTURED50, tokens=200, damp=0.0 if method == "sparsegpt" else 0.01)
    assert math.isfinite(res.error)
    direct = float((x @ (w - res.weight).T).square().sum())
    assert res.error == pytest.approx(direct, rel=1e-9, abs=1e-9)
    if method == "sparsegpt":
        assert torch.all(res.weight[:, dead] == 0)  # free to drop: they never reach the outputs
    if method == "wanda":
        assert not res.mask[:, dead].any()  # zero activation norm scores lowest


def test_pruner_validation() -> None:
    w, x = _data(4, 8, 20)
    h = x.T @ x
    fn = PRUNERS["sparsegpt"]
    with pytest.raises(ValueError, match="hessian must have shape"):
        fn(w, h[:4, :4], UNSTRUCTURED50, tokens=20)
    with pytest.raises(ValueError, match="tokens"):
        fn(w, h, UNSTRUCTURED50, tokens=0)
    with pytest.raises(ValueError, match="damp"):
        fn(w, h, UNSTRUCTURED50, tokens=20, damp=-1.0)
    with pytest.raises(ValueError, match="pattern"):
        fn(w, h, "2:4", tokens=20)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="m=8"):
        fn(w[:, :6], h[:6, :6], SparsityPattern("nm", n=2, m=8), tokens=20)
    with pytest.raises(ValueError, match="positive definite|singular"):
        fn(w, torch.ones(8, 8, dtype=torch.float64), UNSTRUCTURED50, tokens=20, damp=0.0)


# --- Hessian collection ---------------------------------------------------------------------------------------


def test_input_hessians_match_manual(tiny) -> None:
    loaded, space = tiny
    model = loaded.model
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (3, 10), generator=gen)
    n_layers = len(model.model.layers)
    collector = InputHessians({(layer, key) for layer in range(n_layers) for key in INPUT_GROUPS})
    calibration_pass(model, tokens, 2, [collector])
    assert collector.tokens == tokens.numel()
    assert all(collector.hessian(layer, key).dtype == torch.float64 for layer in range(n_layers) for key in INPUT_GROUPS)
    hs = {key: [collector.hessian(layer, key) for layer in range(n_layers)] for key in INPUT_GROUPS}

    # Manual: capture module OUTPUTS in one full-batch forward pass and rebuild each projection's input.
    layer = model.model.layers[1]
    outs: dict[str, torch.Tensor] = {}

    def save(name: str):
        def hook(_m, _args, out):
            outs[name] = out.detach().reshape(-1, out.shape[-1]).double()

        return hook

    mods = {
        "ln1": layer.input_layernorm,
        "ln2": layer.post_attention_layernorm,
        "gate": layer.mlp.gate_proj,
        "up": layer.mlp.up_proj,
        "o": layer.self_attn.o_proj,
    }
    handles = [m.register_forward_hook(save(n)) for n, m in mods.items()]
    try:
        with torch.no_grad():
            model(tokens, use_cache=False)
    finally:
        for hd in handles:
            hd.remove()

    def gram(x: torch.Tensor) -> torch.Tensor:
        return x.T @ x

    def close(a: torch.Tensor, b: torch.Tensor) -> None:
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))

    close(hs["qkv"][1], gram(outs["ln1"]))
    close(hs["gate_up"][1], gram(outs["ln2"]))
    act = layer.mlp.act_fn(outs["gate"].float()).double() * outs["up"]
    close(hs["down"][1], gram(act))
    wo = layer.self_attn.o_proj.weight.detach().double()  # o_proj output y = x Woᵀ, so Σ yᵀy = Wo H Woᵀ
    close(wo @ hs["o"][1] @ wo.T, gram(outs["o"]))
