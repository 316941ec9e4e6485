"""The fitness engine: its in-place, prefix-reusing KL equals a freshly stitched model's KL, and it counts tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from allocator.model.quality import kl_to_dense
from allocator.model.surgery import build_pruned_model, leading_levels
from search.fitness_engine import StitchedKLFitness


@pytest.fixture(scope="module")
def engine_setup(tiny):
    loaded, space = tiny
    shape = space.shape
    torch.manual_seed(0)
    pool = torch.randint(0, loaded.model.config.vocab_size, (6, 24))
    return loaded.model, space, leading_levels(loaded.model, shape), pool


def naive_kl(dense, shape, units, source, choice, tokens) -> float:
    model = build_pruned_model(dense, shape, {u.name: u.options[j] for u, j in zip(units, choice)}, source)
    return kl_to_dense(dense, {"m": model}, tokens, batch_size=4)["m"]


def random_choices(units, n, seed):
    rng = np.random.default_rng(seed)
    return [tuple(int(rng.integers(len(u.options))) for u in units) for _ in range(n)]


@pytest.mark.parametrize("reuse", [True, False])
def test_engine_matches_fresh_stitch(engine_setup, reuse):
    dense, space, source, pool = engine_setup
    shape, units = space.shape, space.units
    engine = StitchedKLFitness(dense, space, source, pool, batch_size=4, prefix_reuse=reuse)
    choices = random_choices(units, 6, seed=1)
    # Children of one parent: share prefixes, so reuse has something to reuse.
    parent = choices[0]
    children = [parent[:4] + c[4:] for c in choices[1:]]
    got = engine.score([parent, *children], tokens=4 * pool.shape[1])
    # Dense log-probs are cached in float16: agreement to a few 1e-3 relative.
    for choice, value in zip([parent, *children], got):
        assert value == pytest.approx(naive_kl(dense, shape, units, source, choice, pool[:4]), rel=3e-3)
    if reuse:
        assert engine.layers_reused > 0
        exact = StitchedKLFitness(dense, space, source, pool, batch_size=4, prefix_reuse=False)
        assert got == pytest.approx(exact.score([parent, *children], tokens=4 * pool.shape[1]), rel=1e-5)
    else:
        assert engine.layers_reused == 0


def test_dense_choice_scores_zero_and_tokens_are_counted(engine_setup):
    dense, space, source, pool = engine_setup
    units = space.units
    engine = StitchedKLFitness(dense, space, source, pool, batch_size=4)
    full = tuple(u.options.index(u.full) for u in units)
    engine.begin(max_tokens=3 * pool.shape[1])
    assert engine.score([full], tokens=1)[0] == pytest.approx(0.0, abs=1e-4)  # float16 dense cache
    assert engine.tokens_spent == pool.shape[1]  # one whole sequence
    engine.score([full], tokens=1)  # memo: free
    assert engine.tokens_spent == pool.shape[1] and not engine.exhausted()
    engine.score(random_choices(units, 2, seed=3), tokens=pool.shape[1])
    assert engine.tokens_spent == 3 * pool.shape[1] and engine.exhausted()
    # More tokens than the pool has: capped at the pool.
    assert engine.sequences_for(10**9) == pool.shape[0]
