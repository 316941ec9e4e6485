"""Levels on disk, loaded on demand: a fitness engine whose unit cache holds only two unit modules (or none) scores
exactly what the unbounded engine scores, reading evicted levels back from the level database."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from allocator.app.config import SearchJob
from allocator.app.search_job import prepare_search, validate_search_job
from allocator.core.config import (
    BudgetConfig,
    DataConfig,
    FitnessConfig,
    ModelConfig,
    RayConfig,
    SpaceConfig,
)
from allocator.core.errors import UserInputError
from search.evo import EvoConfig
from search.fitness_engine import StitchedKLFitness


def tiny_sparsity_job(cache_dir) -> SearchJob:
    # A parameter budget needs no latency table: nothing is profiled on this shared CPU.
    return SearchJob(
        model=ModelConfig(name="tiny-llama", tiny_layers=3),
        data=DataConfig(seq_len=32, calib_sequences=8, eval_sequences=2),
        space=SpaceConfig(mlp_step=32, fisher_sequences=3),
        budget=BudgetConfig(speedup=None, sparsity=0.4),
        searcher=EvoConfig(),
        fitness=FitnessConfig(sequences=4, batch_size=2),
        cache_dir=str(cache_dir),
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return prepare_search(tiny_sparsity_job(tmp_path_factory.mktemp("cache")))


def candidates(space, n: int, seed: int) -> list[tuple[int, ...]]:
    """Random candidates, then children of the first (shared prefixes, so reused layer inputs are exercised too)."""
    rng = np.random.default_rng(seed)
    drawn = [tuple(int(rng.integers(len(u.options))) for u in space.units) for _ in range(n)]
    return drawn + [drawn[0][:2] + c[2:] for c in drawn[1:]]


def module_sizes(engine: StitchedKLFitness, space) -> list[int]:
    """Own bytes of every unit module that is not the dense one and not dropped (those cost nothing)."""
    sizes = []
    for u, unit in enumerate(space.units):
        for j in range(len(unit.options)):
            size = engine.cache.own_bytes(engine._build_unit(u, j))
            if size:
                sizes.append(size)
    return sizes


def test_a_cache_of_two_unit_modules_scores_exactly_what_the_unbounded_engine_scores(setup):
    space, source, pool = setup.space, setup.db.source, setup.data.fitness
    unbounded = StitchedKLFitness(setup.dense, space, source, pool, batch_size=2)
    sizes = module_sizes(unbounded, space)
    # Room for two of the smallest modules (a larger one is kept alone or, the largest, not at all): never more than
    # two are kept, while a candidate needs up to six.
    two = 2 * min(sizes)
    assert max(sizes) > two and len(sizes) > 2
    tiny = StitchedKLFitness(setup.dense, space, source, pool, batch_size=2, cache_bytes=two)
    nothing = StitchedKLFitness(setup.dense, space, source, pool, batch_size=2, cache_bytes=0)
    choices = candidates(space, 8, seed=3)
    for tokens in (32, 4 * 32):  # one sequence, then the whole pool
        expected = unbounded.score(choices, tokens)
        # Exact equality, not a tolerance: an evicted module is rebuilt from the same level file (the same
        # weights), and every pass runs on the same thread count, so the same float operations run on the same
        # numbers in the same order.
        assert tiny.score(choices, tokens) == expected
        assert nothing.score(choices, tokens) == expected
    assert len([s for _, s in tiny.cache.entries.values() if s]) <= 2 and tiny.cache.bytes <= two
    assert tiny.cache.evictions > 0 and tiny.cache.builds > unbounded.cache.builds  # levels were read back
    assert unbounded.cache.evictions == 0 and nothing.cache.bytes == 0


def test_default_cache_holds_the_whole_tiny_space_and_bad_values_fail_in_one_line(setup, tmp_path):
    engine = StitchedKLFitness(setup.dense, setup.space, setup.db.source, setup.data.fitness,
                               cache_bytes=FitnessConfig().cache_gb * 1e9)
    engine.score(candidates(setup.space, 6, seed=5), 64)
    assert engine.cache.evictions == 0
    job = tiny_sparsity_job(tmp_path)
    for fitness, message in (
        (FitnessConfig(cache_gb=-1.0), "fitness.cache_gb=-1.0 must be a number of GB >= 0"),
        (FitnessConfig(threads=-2), "fitness.threads=-2 must be an integer >= 0"),
    ):
        job.fitness = fitness
        with pytest.raises(UserInputError, match=message):
            validate_search_job(job)
    job.fitness = FitnessConfig(sequences=4, batch_size=2)
    for change, message in (
        ({"workers": -1}, "workers=-1 must be an integer >= 0"),
        ({"ray": RayConfig(num_cpus=0)}, "ray.num_cpus=0 must be > 0"),
    ):
        with pytest.raises(UserInputError, match=message):
            validate_search_job(replace(job, **change))
