"""The Optuna searcher: feasible under every sampler, deterministic per seed, bounded by tokens, resumable."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

import search.bayes  # noqa: F401  (registers "bayes")
from allocator.app.pareto_plot import plot_pareto_front
from allocator.core.errors import UserInputError
from search.base import SEARCHERS, AllocationProblem, make_searcher
from search.bayes import BayesConfig, BayesSearcher
from search.dp import DPConfig
from search.fitness import ProxyFitness

REPO = Path(__file__).resolve().parent.parent
SEQ = 64  # ProxyFitness's default seq_len: trial_tokens=SEQ is one sequence per evaluation


def make_problem(seed: int = 0, n_units: int = 8, n_opts: int = 5, tightness: float = 0.5) -> AllocationProblem:
    """Costs rising and errors falling with the option index (like kept widths), budget mid-range."""
    rng = np.random.default_rng(seed)
    costs = [np.sort(rng.uniform(0, 10, n_opts)) for _ in range(n_units)]
    errors = [np.sort(rng.uniform(0, 5, n_opts))[::-1].copy() for _ in range(n_units)]
    low, high = sum(c[0] for c in costs), sum(c[-1] for c in costs)
    return AllocationProblem(
        unit_names=tuple(f"u{i}" for i in range(n_units)),
        unit_kinds=tuple("attn" if i % 2 else "mlp" for i in range(n_units)),
        options=tuple(tuple(range(n_opts)) for _ in range(n_units)),
        costs=tuple(costs),
        errors=tuple(errors),
        budget=float(low + tightness * (high - low)),
    )


def run(problem: AllocationProblem, seed: int = 0, fitness: ProxyFitness | None = None, **cfg):
    cfg.setdefault("trial_tokens", SEQ)
    return make_searcher(BayesConfig(**cfg)).search(problem, seed=seed, fitness=fitness or ProxyFitness(problem))


def test_registered_with_traits() -> None:
    cls = SEARCHERS.get("bayes")
    assert cls is BayesSearcher and cls.Config is BayesConfig
    assert (cls.stochastic, cls.baseline, cls.uses_fitness) == (True, False, True)


@pytest.mark.parametrize("sampler,n_trials", [("tpe", 30), ("cmaes", 30), ("gp", 6)])
def test_every_sampler_respects_the_budget(sampler: str, n_trials: int) -> None:
    problem = make_problem(1, tightness=0.3)
    a = run(problem, seed=3, sampler=sampler, n_trials=n_trials, startup_trials=3, warm_start=False)
    assert a.cost <= problem.budget and a.cost == problem.cost_of(a.choice)
    assert a.info["sampler"] == sampler and a.info["n_trials_total"] == a.info["n_trials_this_run"] == n_trials
    # Repeated choices reuse their score; the best few are confirmed on the whole pool.
    assert a.info["evaluations"] <= n_trials + len(a.info["confirmed"])
    assert a.info["trace"] and a.info["trace"][-1]["fitness"] == a.error  # noise-free: fitness is the error


def test_same_seed_same_result_and_seed_matters() -> None:
    problem = make_problem(2)
    first, again = (run(problem, seed=5, n_trials=24, startup_trials=4, warm_start=False) for _ in range(2))
    def steps(a):  # the incumbent trace without its wall-clock seconds
        return [(t["tokens_spent"], t["choice"], t["fitness"]) for t in a.info["trace"]]

    assert first.choice == again.choice and steps(first) == steps(again)
    other = run(problem, seed=6, n_trials=24, startup_trials=4, warm_start=False)
    assert other.info["study_name"] != first.info["study_name"]  # the seed is part of the derived study name


def test_close_to_the_dp_optimum_and_warm_start_reaches_it() -> None:
    problem = make_problem(3, n_units=6, n_opts=4)
    dp = make_searcher(DPConfig()).search(problem)
    cold = run(problem, seed=0, n_trials=80, startup_trials=10, warm_start=False)
    assert cold.cost <= problem.budget
    assert cold.error <= dp.error * 1.05 + 1e-9
    warm = run(problem, seed=0, n_trials=4, startup_trials=10)  # the DP choice is the first trial
    assert warm.choice == dp.choice and warm.error == pytest.approx(dp.error)


def test_max_tokens_stops_the_search() -> None:
    problem = make_problem(4)
    a = run(problem, n_trials=50, max_tokens=5 * SEQ, warm_start=False)
    assert a.info["tokens_spent"] == 5 * SEQ and a.info["evaluations"] == 5
    assert a.info["n_trials_total"] < 50 and a.cost <= problem.budget


def test_confirmation_rescores_the_best_trials_on_more_tokens_within_the_bound() -> None:
    problem = make_problem(6, n_units=10, tightness=0.4)
    # Screening on one sequence is very noisy; the confirmation's 16 sequences are 4x less so.
    fitness = ProxyFitness(problem, noise=4.0, seed=0)
    a = run(problem, seed=0, fitness=fitness, n_trials=100, startup_trials=8, max_tokens=60 * SEQ,
            confirm_top=3, confirm_tokens=16 * SEQ)
    rows = a.info["confirmed"]
    # 3 x 16 sequences kept back: 12 new trial choices on one sequence each, then 3 confirmations.
    assert len(rows) == 3 and a.info["tokens_spent"] == 60 * SEQ and a.info["evaluations"] == 12 + 3
    assert [r["screened"] for r in rows] == sorted(r["screened"] for r in rows)
    best = min(rows, key=lambda r: r["confirmed"])
    assert list(a.choice) == best["choice"] and fitness.score([a.choice], 16 * SEQ)[0] == best["confirmed"]
    assert problem.error_of(a.choice) < problem.error_of(rows[0]["choice"])  # the luckiest screen was not the best
    assert a.info["trace"][-1]["fitness_tokens"] == 16 * SEQ
    # A bound too small to keep anything back: trials use all of it and the best is returned as screened.
    small = run(problem, seed=0, fitness=ProxyFitness(problem, noise=0.5, seed=2), n_trials=100, max_tokens=6 * SEQ,
                confirm_tokens=16 * SEQ)
    assert small.info["confirmed"] == [] and small.info["tokens_spent"] == 6 * SEQ
    off = run(problem, seed=0, fitness=ProxyFitness(problem, noise=0.5, seed=2), n_trials=12, confirm_top=0)
    assert off.info["confirmed"] == [] and off.info["evaluations"] <= 12


def test_needs_a_fitness() -> None:
    with pytest.raises(ValueError, match="needs a Fitness"):
        make_searcher(BayesConfig()).search(make_problem(), fitness=None)


@pytest.mark.parametrize(
    "field,value",
    [("sampler", "bogus"), ("n_trials", 0), ("n_trials", 2.5), ("trial_tokens", 0), ("startup_trials", -1),
     ("population_size", 1), ("multi_objective", "yes"), ("warm_start", 1), ("storage", None), ("max_tokens", -1),
     ("confirm_top", -1), ("confirm_tokens", 0)],
)
def test_bad_config_names_the_value(field: str, value: object) -> None:
    with pytest.raises(UserInputError, match=rf"searcher\.{field}={value!r}".replace("(", r"\(")):
        make_searcher(BayesConfig(**{field: value}))


def test_multi_objective_front_is_feasible_non_dominated_and_plotted(tmp_path: Path) -> None:
    problem = make_problem(5, tightness=0.6)
    a = run(problem, seed=1, multi_objective=True, n_trials=40, population_size=8)
    front = a.info["pareto_front"]
    assert front and a.info["sampler"] == "nsga2"
    assert [p["cost"] for p in front] == sorted(p["cost"] for p in front)
    for p in front:
        assert p["cost"] == problem.cost_of(p["choice"]) <= problem.budget
        assert p["fitness"] == pytest.approx(problem.error_of(p["choice"]))
    for p in front:
        for q in front:
            dominates = q["cost"] <= p["cost"] and q["fitness"] <= p["fitness"] and q is not p
            assert not (dominates and (q["cost"], q["fitness"]) != (p["cost"], p["fitness"]))
    assert list(a.choice) == min(front, key=lambda p: p["fitness"])["choice"]
    png = tmp_path / "plots" / "pareto.png"
    plot_pareto_front(front, png, problem.budget, "test front")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# The first run: its fitness kills the process on the 7th evaluation, leaving that trial RUNNING in storage.
KILLED_RUN = """
import os, sys
sys.path.insert(0, {repo!r})
import search.bayes
from search.base import make_searcher
from search.bayes import BayesConfig
from search.fitness import ProxyFitness
from tests.test_search_bayes import make_problem

class Killing(ProxyFitness):
    def _score(self, choices, n_sequences):
        if self.evaluations == 6:
            os._exit(1)
        return super()._score(choices, n_sequences)

problem = make_problem(6)
make_searcher(BayesConfig(**{cfg!r})).search(problem, seed=2, fitness=Killing(problem))
"""


def test_killed_study_resumes_from_storage(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    cfg = {"n_trials": 20, "startup_trials": 4, "trial_tokens": SEQ, "storage": storage, "heartbeat_seconds": 1}
    code = textwrap.dedent(KILLED_RUN.format(repo=str(REPO), cfg=cfg))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1, proc.stderr

    (name,) = optuna.get_all_study_names(storage)
    before = optuna.load_study(study_name=name, storage=storage).get_trials()
    kept = {t.number: t.value for t in before if t.state == TrialState.COMPLETE}
    assert len(kept) >= 6 and [t.state for t in before].count(TrialState.RUNNING) == 1

    time.sleep(2.5)  # past the heartbeat grace period: the killed worker's trial is stale
    problem = make_problem(6)
    a = make_searcher(BayesConfig(**cfg)).search(problem, seed=2, fitness=ProxyFitness(problem))
    after = optuna.load_study(study_name=name, storage=storage).get_trials()
    complete = {t.number: t.value for t in after if t.state == TrialState.COMPLETE}
    assert len(complete) == 20 and all(complete[n] == v for n, v in kept.items())
    assert not [t for t in after if t.state == TrialState.RUNNING]  # the dead worker's trial was failed
    assert a.info["study_name"] == name and a.info["n_trials_total"] == 20
    assert a.info["n_trials_this_run"] == 20 - len(kept)
    assert a.cost == problem.cost_of(a.choice) <= problem.budget
    assert a.error == min(complete.values())

    # A second resume has nothing left to run; another problem under the same study name is refused.
    again = make_searcher(BayesConfig(**cfg)).search(problem, seed=2, fitness=ProxyFitness(problem))
    assert again.choice == a.choice and again.info["n_trials_this_run"] == 0
    with pytest.raises(UserInputError, match="different search"):
        make_searcher(BayesConfig(**cfg, study_name=name)).search(make_problem(7), seed=2, fitness=ProxyFitness(problem))


def test_hydra_yaml_composes_to_the_config() -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from allocator.app.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("search", overrides=["searcher=bayes", "searcher.sampler=cmaes", "searcher.n_trials=9"])
    obj = OmegaConf.to_object(cfg.searcher)
    assert isinstance(obj, BayesConfig) and (obj.sampler, obj.n_trials) == ("cmaes", 9)
    assert obj == BayesConfig(sampler="cmaes", n_trials=9)  # and every other option at its default


def test_trust_region_keeps_trials_near_the_dp_solution(tmp_path: Path) -> None:
    problem = make_problem(3, n_units=8, n_opts=7)
    storage = f"sqlite:///{tmp_path / 'r.db'}"
    a = run(problem, n_trials=24, startup_trials=4, radius=1, storage=storage)
    study = optuna.load_study(study_name=a.info["study_name"], storage=storage)
    offsets = [v for t in study.get_trials() for v in t.params.values()]
    assert offsets and all(-1 <= v <= 1 for v in offsets)
    assert study.get_trials()[0].params == dict.fromkeys(problem.unit_names, 0)  # the DP warm start
    full = run(make_problem(3, n_units=8, n_opts=7), n_trials=24, startup_trials=4, radius=0)
    assert full.cost <= problem.budget and a.cost <= problem.budget


def test_spdy_param_searches_coefficients_solved_by_dp() -> None:
    """param=spdy: every trial is DP on rescaled errors (feasible), the first one is DP itself, and a fitness that
    disagrees with the proxy is improved on."""
    from search.bayes import spdy_groups
    from search.dp import DPSearcher

    problem = make_problem(4, n_units=12, tightness=0.4)
    assert spdy_groups(problem, 3) == ["mlp.g0", "attn.g0"] * 2 + ["mlp.g1", "attn.g1"] * 2 + ["mlp.g2", "attn.g2"] * 2
    dp = DPSearcher().search(problem)
    # A fitness whose errors weigh the first units 4x: DP on the proxy is not its optimum.
    skewed = [e * (4.0 if u < 4 else 1.0) for u, e in enumerate(problem.errors)]
    fitness = ProxyFitness(AllocationProblem(problem.unit_names, problem.unit_kinds, problem.options, problem.costs,
                                             tuple(skewed), problem.budget))
    a = run(problem, seed=1, fitness=fitness, param="spdy", spdy_groups=3, n_trials=40, startup_trials=8)
    b = run(problem, seed=1, fitness=ProxyFitness(AllocationProblem(problem.unit_names, problem.unit_kinds,
            problem.options, problem.costs, tuple(skewed), problem.budget)), param="spdy", spdy_groups=3, n_trials=40,
            startup_trials=8)
    assert a.choice == b.choice and problem.fits(a.choice)
    assert fitness.score([a.choice], SEQ)[0] < fitness.score([dp.choice], SEQ)[0]
    with pytest.raises(UserInputError, match="searcher.param='grid'"):
        BayesConfig(param="grid").validate()
    with pytest.raises(UserInputError, match="no cost/fitness front"):
        BayesConfig(param="spdy", multi_objective=True).validate()


class SlowProxy(ProxyFitness):
    """The proxy fitness, taking `delay` seconds per batch: long enough for heartbeats to beat while it scores."""

    def __init__(self, problem: AllocationProblem, delay: float) -> None:
        super().__init__(problem)
        self.delay, self.batches = delay, []

    def _score(self, choices, n_sequences):
        self.batches.append(len(choices))
        time.sleep(self.delay)
        return super()._score(choices, n_sequences)


def test_batched_trials_are_scored_together_told_in_order_and_kept_alive(tmp_path: Path) -> None:
    problem = make_problem(8)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    fitness = SlowProxy(problem, delay=1.5)
    cfg = {"n_trials": 13, "startup_trials": 4, "batch_trials": 4, "confirm_top": 0, "warm_start": False}
    a = run(problem, seed=1, fitness=fitness, storage=storage, heartbeat_seconds=1, **cfg)
    # 13 trials in batches of 4, 4, 4, 1 (fewer when a batch repeats a choice): each batch is one call of the fitness.
    assert len(fitness.batches) == 4 and all(n <= size for n, size in zip(fitness.batches, [4, 4, 4, 1]))
    (name,) = optuna.get_all_study_names(storage)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    assert [t.number for t in trials] == list(range(13)) and all(t.state == TrialState.COMPLETE for t in trials)
    # Every trial beat while its batch was scored, so workers sharing the study would not fail it as stale.
    with sqlite3.connect(tmp_path / "study.db") as db:
        beaten = {row[0] for row in db.execute("SELECT trial_id FROM trial_heartbeats")}
    assert beaten == {t._trial_id for t in trials}
    assert a.info["n_trials_this_run"] == 13 and a.cost <= problem.budget and a.error == min(t.value for t in trials)
    # The result depends on the batch size alone: the same batches again give the same search.
    again = run(problem, seed=1, fitness=ProxyFitness(problem), **cfg)
    assert again.choice == a.choice and [t["choice"] for t in again.info["trace"]] == [
        t["choice"] for t in a.info["trace"]]
    # Under a token bound, no batch is larger than what is left to pay for.
    bounded = run(problem, seed=1, fitness=ProxyFitness(problem), max_tokens=6 * SEQ, **cfg)
    assert bounded.info["tokens_spent"] <= 6 * SEQ and bounded.info["n_trials_this_run"] <= 6
