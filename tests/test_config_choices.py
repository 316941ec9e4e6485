"""Choice fields are typed: Hydra rejects a bad value at compose time, naming the valid ones; Python-built configs
are checked by the same enums."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from allocator.app.config import register_configs
from allocator.core.config import SpaceConfig
from allocator.core.errors import UserInputError
from allocator.core.space import sparse_patterns

CONF = Path(__file__).resolve().parent.parent / "conf"

CHOICES = [
    (["space.kind=foo"], "structured, unstructured, nm, mixed"),
    (["space.pruner=obs"], "sparsegpt, wanda, magnitude"),
    (["space.error_metric=l2"], "fisher, relative, absolute"),
    (["space.runtime=tgi"], "native, vllm, llamacpp"),
    (["searcher=bayes", "searcher.sampler=tp"], "tpe, cmaes, gp"),
    (["searcher=bayes", "searcher.param=coeffs"], "levels, spdy"),
    (["searcher=evo", "searcher.init=best"], "dp, uniform"),
]


def compose_search(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return OmegaConf.to_object(compose("search", overrides=overrides))


@pytest.mark.parametrize("overrides,valid", CHOICES)
def test_hydra_rejects_a_bad_choice_at_compose_time(overrides, valid):
    with pytest.raises(ConfigCompositionException) as info:
        compose_search(overrides)
    assert valid in str(info.value.__cause__)


def test_a_good_choice_composes_to_its_enum():
    job = compose_search(["space=mixed", "space.pruner=wanda", "searcher=evo", "searcher.init=uniform"])
    assert (job.space.kind, job.space.pruner, job.searcher.init) == ("mixed", "wanda", "uniform")
    assert compose_search(["space.runtime=vllm"]).space.runtime == "vllm"
    assert compose_search([]).space.runtime == "native"


def test_a_python_config_with_a_bad_choice_fails_in_one_line():
    with pytest.raises(UserInputError, match=r"space.kind='foo' is unknown; valid: structured, unstructured, nm, mixed"):
        sparse_patterns(SpaceConfig(kind="foo"))
