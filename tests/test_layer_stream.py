"""The layer-streamed build gives the statistics and the levels the one-pass build gave (the whole model over the
calibration data, every statistic held at once), which is kept here as the oracle; and it holds at most one layer's
Hessians at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from allocator.core.config import SpaceConfig
from allocator.core.space import ATTN, MLP, Space, build_space
from allocator.levels import database
from allocator.levels.compress.calibration_pass import calibration_pass
from allocator.levels.compress.fisher import OutputFisher
from allocator.levels.compress.layer_stream import stream_fisher, stream_layers
from allocator.levels.compress.linear_hessians import INPUT_GROUPS, InputHessians
from allocator.levels.compress.outliers import OutlierNorms
from allocator.levels.sparse_levels import BlockCalls
from allocator.model.surgery import decoder_layers

from .test_calibration_pass import _equal


@pytest.fixture(scope="module")
def calibration(tiny):
    loaded, _ = tiny
    return torch.randint(0, loaded.model.config.vocab_size, (7, 12), generator=torch.Generator().manual_seed(2))


def present_build(model, space, calibration, cfg, root: Path, batch_size: int) -> None:
    """The build before layer streaming: one calibration pass over the whole model holding every unit's
    statistics, then each unit's levels from them (the per-unit level code is shared with the streamed build)."""
    root.mkdir(parents=True)
    todo = space.units
    stats = database.CalibrationStatistics(todo, calibration, cfg)
    calibration_pass(model, calibration, batch_size, [stats.hessians, stats.fisher, stats.calls])
    for unit in todo:
        inputs = database.unit_inputs(model, unit, stats, space.shape, cfg, torch.device("cpu"))
        database.write_unit(root, database.build_unit_levels(inputs))


def assert_same_database(streamed: Path, present: Path, units, rtol: float = 1e-6) -> None:
    """Every level's tensors allclose, every error equal to `rtol` relative."""
    for unit in units:
        got = json.loads((streamed / unit.name / "errors.json").read_text())
        want = json.loads((present / unit.name / "errors.json").read_text())
        assert got.keys() == want.keys(), unit.name
        for option, metrics in want.items():
            for metric, value in metrics.items():
                assert got[option][metric] == pytest.approx(value, rel=rtol, abs=1e-30), (unit.name, option, metric)
        files = sorted(p.name for p in (present / unit.name).glob("*.safetensors"))
        assert files == sorted(p.name for p in (streamed / unit.name).glob("*.safetensors")), unit.name
        for name in files:
            a, b = load_file(streamed / unit.name / name), load_file(present / unit.name / name)
            assert a.keys() == b.keys()
            for key in a:
                assert a[key].dtype == b[key].dtype
                torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=f"{unit.name}/{name}/{key}")


@pytest.mark.parametrize("fisher_sequences", [4, 3])
def test_streamed_statistics_equal_the_one_pass(tiny, calibration, fisher_sequences):
    model = tiny[0].model
    layers = len(decoder_layers(model))
    every = {(layer, kind) for layer in range(layers) for kind in (ATTN, MLP)}

    def collectors():
        return (InputHessians({(layer, key) for layer in range(layers) for key in INPUT_GROUPS}),
                OutputFisher(every, fisher_sequences), BlockCalls(every, fisher_sequences), OutlierNorms(5, 2))

    h1, f1, c1, o1 = collectors()
    calibration_pass(model, calibration, 4, [h1, f1, c1, o1])
    h2, f2, c2, o2 = collectors()
    stream_fisher(model, calibration, 4, f2)
    stream_layers(model, calibration, 4, [h2, c2, o2])
    assert h1.tokens == h2.tokens
    for key in h1.sums:
        torch.testing.assert_close(h2.sums[key], h1.sums[key], rtol=1e-12, atol=0)
    assert f1.count == f2.count
    for key in every:
        torch.testing.assert_close(f2.fisher(*key), f1.fisher(*key), rtol=1e-6, atol=0)
    for key in every:
        got = [(c.args, c.kwargs, c.output) for c in c2.calls[key]]
        assert _equal(got, [(c.args, c.kwargs, c.output) for c in c1.calls[key]]), key
    assert o1.ratios() == o2.ratios()


@pytest.mark.parametrize("kind", ["structured", "mixed"])
def test_streamed_database_equals_the_present_build(tiny, calibration, tmp_path, kind):
    loaded, _ = tiny
    model = loaded.model
    shape = tiny[1].shape
    cfg = SpaceConfig(kind=kind, mlp_step=32, fisher_sequences=3, sparsities=[0.3, 0.6], nm_patterns=["2:4"],
                      block_sparsities=[0.5], block=[16, 16])
    space = build_space(shape, cfg)
    db = database.open_or_build_database(model, space, calibration, "tiny", "random", cfg, tmp_path / "streamed",
                                         batch_size=4)
    present = tmp_path / "present"
    present_build(model, space, calibration, cfg, present, batch_size=4)
    assert_same_database(db.root, present, space.units)


def test_build_holds_one_layers_hessians_at_a_time(tiny, calibration, tmp_path, monkeypatch):
    """The statistics of a layer are freed before the next layer's are gathered."""
    model = tiny[0].model
    cfg = SpaceConfig(kind="mixed", mlp_step=32, fisher_sequences=3, sparsities=[0.5], nm_patterns=["2:4"],
                      block_sparsities=[0.5])
    space = build_space(tiny[1].shape, cfg)
    held: list[set[int]] = []
    original = InputHessians._accumulate

    def spy(self, at):
        hook = original(self, at)

        def wrapped(module, args):
            hook(module, args)
            held.append({layer for layer, _key in self.sums})

        return wrapped

    monkeypatch.setattr(InputHessians, "_accumulate", spy)
    database.open_or_build_database(model, space, calibration, "tiny", "random", cfg, tmp_path, batch_size=4)
    assert held and all(len(layers) == 1 for layers in held)
    assert {next(iter(layers)) for layers in held} == set(range(space.shape.num_layers))


def test_forward_stream_stops_at_the_last_layer_with_work(tiny, calibration, tmp_path):
    """Units of layer 0 only: the top layer runs for the Fisher (forward and recompute, per Fisher batch), not in the
    forward stream; a second open reuses everything and runs nothing."""
    model = tiny[0].model
    cfg = SpaceConfig(mlp_step=32, fisher_sequences=3)
    space = build_space(tiny[1].shape, cfg)
    first = Space(space.shape, [u for u in space.units if u.layer == 0])
    top = []
    handle = decoder_layers(model)[-1].register_forward_hook(lambda *_: top.append(1))
    try:
        db = database.open_or_build_database(model, first, calibration, "tiny", "random", cfg, tmp_path, batch_size=4)
        assert len(top) == 2  # fisher_sequences=3: one Fisher batch
        again = database.open_or_build_database(model, first, calibration, "tiny", "random", cfg, tmp_path,
                                                batch_size=4)
        assert len(top) == 2
    finally:
        handle.remove()
    assert again.errors == db.errors
    assert {p.name for p in db.root.iterdir() if p.is_dir()} == {u.name for u in first.units}


def test_offloaded_build_equals_the_in_memory_build_with_one_layer_resident(tiny, calibration, tmp_path):
    """A model loaded with its decoder layers on the meta device, each materialised from the safetensors checkpoint
    for its turn: the same database as the in-memory model, and never more than one layer holding weights."""
    from allocator.model.offload import load_offloaded

    model = tiny[0].model
    model.save_pretrained(tmp_path / "checkpoint")
    offloaded, weights = load_offloaded(tmp_path / "checkpoint", torch.float32)
    layers = decoder_layers(offloaded)
    assert all(p.is_meta for layer in layers for p in layer.parameters())
    most = []
    hooks = [layer.register_forward_pre_hook(
        lambda *_: most.append(sum(not next(l.parameters()).is_meta for l in layers))) for layer in layers]
    cfg = SpaceConfig(kind="mixed", mlp_step=32, fisher_sequences=3, sparsities=[0.5], nm_patterns=["2:4"],
                      block_sparsities=[0.5])
    space = build_space(tiny[1].shape, cfg)
    try:
        db = database.open_or_build_database(offloaded, space, calibration, "tiny", "random", cfg,
                                             tmp_path / "offloaded", batch_size=4, weights=weights,
                                             offload_activations=True)
    finally:
        for h in hooks:
            h.remove()
    assert most and max(most) == 1
    assert all(p.is_meta for layer in layers for p in layer.parameters())  # emptied again
    reference = database.open_or_build_database(model, space, calibration, "tiny", "random", cfg,
                                                tmp_path / "in-memory", batch_size=4)
    assert_same_database(db.root, reference.root, space.units)
