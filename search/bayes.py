"""Model-based search with Optuna (TPE, CMA-ES, GP; NSGA-II for a cost/fitness Pareto front), resumable from storage.

Two parametrisations. `param=levels`: every trial suggests one option index per unit (within a trust region around
the DP solution), is repaired into the budget and scored on the real fitness. `param=spdy` (SPDY's idea): a trial
suggests a sensitivity coefficient per group of layers, the proxy errors are rescaled by them and DP solves the
rescaled knapsack, so every trial is a feasible allocation on the budget's edge and the sampler searches a
handful of dimensions instead of one per unit. The study lives in an Optuna storage (a SQLite file for search
jobs), so a killed run continues where it stopped."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from allocator.core.config import check_choice
from allocator.core.errors import UserInputError
from search.base import (
    Allocation,
    AllocationProblem,
    ConfiguredSearcher,
    SearcherConfig,
    allocation_from,
    check_int_option,
    register_searcher,
    repair,
)
from search.dp import DPSearcher
from search.fitness import Fitness
from search.uniform import UniformSearcher


class Sampler(StrEnum):
    """Optuna's model-based sampler for a single-objective study."""

    tpe = "tpe"
    cmaes = "cmaes"
    gp = "gp"


class Param(StrEnum):
    """What a trial suggests: one option per unit ("levels") or SPDY's per-unit coefficients ("spdy")."""

    levels = "levels"
    spdy = "spdy"

# Config fields that do not change what a trial means: a study may be resumed with other values of these.
_NOT_IN_STUDY_KEY = ("name", "max_tokens", "max_seconds", "n_trials", "storage", "study_name", "heartbeat_seconds",
                     "confirm_top", "confirm_tokens", "batch_trials")


@dataclass
class BayesConfig(SearcherConfig):
    name: str = "bayes"
    # Model-based sampler for the single-objective search: tpe, cmaes or gp (ignored when multi_objective).
    sampler: Sampler = Sampler.tpe
    # Total trials the study should have, counting complete trials already in storage.
    n_trials: int = 64
    # Tokens per trial evaluation (rounded up to whole sequences by the fitness).
    trial_tokens: int = 2048
    # Random trials before the model-based sampler takes over.
    startup_trials: int = 16
    # Minimise (cost, fitness) with NSGA-II and report the Pareto front; the budget still bounds every point.
    multi_objective: bool = False
    population_size: int = 16  # NSGA-II
    # SQLAlchemy URL, e.g. sqlite:///run/study.db; empty = in memory (nothing to resume).
    storage: str = ""
    # Empty = derived from a hash of the problem, the seed and the options above, so a resume must be the same search.
    study_name: str = ""
    # Enqueue the DP solution of the additive proxy and the uniform baseline (the same kept fraction in every unit)
    # as the first trials of a new study.
    warm_start: bool = True
    # Search each unit within this many options of the DP solution of the proxy (a trust region: in tens of
    # dimensions a model-based sampler learns little from a few hundred trials over the full range); 0 = full range.
    radius: int = 2
    # Workers beat every this many seconds; a RUNNING trial silent for twice as long belonged to a dead worker and
    # is failed, so a killed run resumes and several workers can share one study (RDB storage only).
    heartbeat_seconds: int = 30
    # What a trial suggests: "levels" (an option per unit) or "spdy" (log2 error coefficients per layer group,
    # solved by DP); spdy_groups consecutive-layer groups per unit kind, coefficients in ±spdy_range.
    param: Param = Param.levels
    spdy_groups: int = 6
    spdy_range: float = 2.0
    # Staged confirmation (single objective): the confirm_top best distinct trials are re-scored on confirm_tokens
    # and the best of those is returned, since the best of many scores on few sequences is partly luck. Its tokens
    # are kept back from max_tokens when the bound is larger than them. 0 = return the best trial as scored.
    confirm_top: int = 4
    confirm_tokens: int = 4096
    # Trials asked of the sampler at once, scored together (on `workers` Ray workers in parallel) and told back in
    # order. 1 is Optuna's sequential loop, where each trial's sampler has seen every earlier one; a batch of B
    # samples B trials from the same history, a different (batched) search, so the result depends on B, never on
    # the number of workers: workers=N with batch_trials=B finds exactly what workers=0 with batch_trials=B does.
    batch_trials: int = 1

    def validate(self) -> None:
        super().validate()
        check_choice("searcher.sampler", self.sampler, Sampler)
        check_choice("searcher.param", self.param, Param)
        if self.param == "spdy" and self.multi_objective:
            raise UserInputError("searcher.param=spdy puts every trial on the budget's edge, so it has no cost/fitness "
                                 "front: use searcher.param=levels with searcher.multi_objective=true")
        if not (isinstance(self.spdy_range, (int, float)) and 0 < self.spdy_range <= 10):
            raise UserInputError(f"searcher.spdy_range={self.spdy_range!r} must be in (0, 10] (log2 of a coefficient)")
        minimums = {"n_trials": 1, "trial_tokens": 1, "startup_trials": 0, "population_size": 2, "heartbeat_seconds": 1,
                    "radius": 0, "spdy_groups": 1, "confirm_top": 0, "confirm_tokens": 1, "batch_trials": 1}
        for field, low in minimums.items():
            check_int_option(self, field, low)
        for field in ("multi_objective", "warm_start"):
            if not isinstance(getattr(self, field), bool):
                raise UserInputError(f"searcher.{field}={getattr(self, field)!r} must be true or false")
        for field in ("storage", "study_name"):
            if not isinstance(getattr(self, field), str):
                raise UserInputError(f"searcher.{field}={getattr(self, field)!r} must be a string (empty = default)")


def problem_digest(problem: AllocationProblem) -> str:
    """Hash of everything that defines the problem: a stored study is only resumed for the same one."""
    h = hashlib.sha256()
    h.update(repr((problem.unit_names, problem.options, problem.budget)).encode())
    for arr in (*problem.costs, *problem.errors):
        h.update(np.ascontiguousarray(arr, dtype=np.float64).tobytes())
    return h.hexdigest()


def _warm_starts(problem: AllocationProblem) -> list[tuple[int, ...]]:
    """The DP optimum of the additive proxy and the uniform baseline (distinct, skipping any that cannot be built).
    The uniform start is the same kept fraction in every unit, not the proxy's best same option per kind
    (uniform_best): that one shares the DP's trust in the proxy across kinds, while the same fraction everywhere is
    a point the proxy did not choose and, on SmolLM2 at 70% sparsity, far better on real text."""
    out: list[tuple[int, ...]] = []
    for searcher in (DPSearcher(), UniformSearcher()):
        try:
            choice = searcher.search(problem).choice
        except ValueError:  # e.g. no same-kept-fraction allocation fits (InfeasibleBudget): no warm start from it
            continue
        if choice not in out:
            out.append(choice)
    return out


@register_searcher
class BayesSearcher(ConfiguredSearcher):
    stochastic = True
    baseline = False
    uses_fitness = True
    Config = BayesConfig

    def _suggest(self, trial: optuna.Trial, problem: AllocationProblem, center: tuple[int, ...] | None) -> list[int]:
        """One option index per unit: absolute, or an offset within `radius` of the DP solution (clipped); with
        param=spdy, the DP solution of the proxy rescaled by the trial's group coefficients."""
        if self.cfg.param == "spdy":
            r = float(self.cfg.spdy_range)
            groups = spdy_groups(problem, self.cfg.spdy_groups)
            log2 = {g: trial.suggest_float(g, -r, r) for g in dict.fromkeys(groups)}
            return list(spdy_choice(problem, groups, log2))
        if center is None:
            return [trial.suggest_int(name, 0, len(opts) - 1) for name, opts in zip(problem.unit_names, problem.options)]
        r = self.cfg.radius
        return [
            min(max(c + trial.suggest_int(name, -r, r), 0), len(opts) - 1)
            for name, opts, c in zip(problem.unit_names, problem.options, center)
        ]

    def _params_of(
        self, problem: AllocationProblem, choice: Sequence[int], center: tuple[int, ...] | None
    ) -> dict[str, int] | None:
        """The trial parameters that suggest `choice`, or None if it lies outside the trust region (spdy: only the
        DP solution, at every coefficient 1)."""
        if self.cfg.param == "spdy":
            groups = dict.fromkeys(spdy_groups(problem, self.cfg.spdy_groups))
            return {g: 0.0 for g in groups} if tuple(choice) == DPSearcher().search(problem).choice else None
        if center is None:
            return dict(zip(problem.unit_names, choice))
        offsets = [j - c for j, c in zip(choice, center)]
        if any(abs(o) > self.cfg.radius for o in offsets):
            return None
        return dict(zip(problem.unit_names, offsets))

    def _storage(self) -> optuna.storages.BaseStorage | None:
        if not self.cfg.storage:
            return None  # in memory
        beat = self.cfg.heartbeat_seconds
        return optuna.storages.RDBStorage(self.cfg.storage, heartbeat_interval=beat, grace_period=2 * beat)

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        cfg = self.cfg
        if cfg.multi_objective:
            return optuna.samplers.NSGAIISampler(population_size=cfg.population_size, seed=seed)
        if cfg.sampler == "tpe":
            return optuna.samplers.TPESampler(n_startup_trials=cfg.startup_trials, seed=seed)
        if cfg.sampler == "cmaes":
            return optuna.samplers.CmaEsSampler(n_startup_trials=cfg.startup_trials, seed=seed)
        return optuna.samplers.GPSampler(n_startup_trials=cfg.startup_trials, seed=seed)

    def _study_key(self, problem: AllocationProblem, seed: int) -> dict[str, Any]:
        opts = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in _NOT_IN_STUDY_KEY}
        return {"problem": problem_digest(problem), "seed": seed, **opts}

    def search(self, problem: AllocationProblem, seed: int = 0, fitness: Fitness | None = None) -> Allocation:
        fitness = self.require_fitness(fitness)
        problem.check_feasible()
        cfg = self.cfg
        key = self._study_key(problem, seed)
        key_json = json.dumps(key, sort_keys=True)
        study_name = cfg.study_name or "bayes-" + hashlib.sha256(key_json.encode()).hexdigest()[:16]
        directions = ["minimize", "minimize"] if cfg.multi_objective else ["minimize"]
        center = DPSearcher().search(problem).choice if cfg.radius and cfg.param == "levels" else None

        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one INFO line per trial otherwise
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = self._storage()
                study = optuna.create_study(
                    storage=storage, sampler=self._sampler(seed), study_name=study_name,
                    directions=directions, load_if_exists=True,
                )
                new = self._prepare(study, key, key_json)
                if new and cfg.warm_start:
                    for choice in _warm_starts(problem):
                        params = self._params_of(problem, choice, center)
                        if params is not None:
                            study.enqueue_trial(params)
                n_run = self._optimize(study, storage, problem, seed, fitness, center)
        finally:
            optuna.logging.set_verbosity(verbosity)

        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            raise RuntimeError(f"searcher bayes: no trial of study {study_name!r} completed (every score was not finite)")
        info: dict[str, Any] = {
            "study_name": study_name,
            "storage": cfg.storage,
            "n_trials_total": len(complete),
            "n_trials_this_run": n_run,
            "sampler": "nsga2" if cfg.multi_objective else cfg.sampler,
        }
        if cfg.multi_objective:
            front = pareto_front(problem, study.best_trials)
            info["pareto_front"] = front
            best = min(front, key=lambda p: (p["fitness"], p["cost"]))["choice"]
        else:
            best, info["confirmed"] = self._confirm(complete, fitness)
        return allocation_from(problem, best, self.name, **info, **fitness.summary())

    def _confirm_reserve(self, fitness: Fitness) -> int:
        """Tokens kept back for confirmation: all of it, or none when the token bound is not larger."""
        cfg = self.cfg
        need = 0 if cfg.multi_objective else cfg.confirm_top * fitness.sequences_for(cfg.confirm_tokens) * fitness.seq_len
        return need if 0 < need < cfg.max_tokens else 0

    def _confirm(self, complete: Sequence[FrozenTrial], fitness: Fitness) -> tuple[list[int], list[dict[str, Any]]]:
        """The best of the confirm_top best distinct trials re-scored on confirm_tokens (as many as the bounds
        afford, in screening order), with what each scored; the best trial as screened if none could be."""
        cfg = self.cfg
        screened: dict[tuple[int, ...], float] = {}
        for t in sorted(complete, key=_fitness_of):
            screened.setdefault(tuple(t.user_attrs["choice"]), _fitness_of(t))
        top = list(screened)[: cfg.confirm_top]
        one = fitness.sequences_for(cfg.confirm_tokens) * fitness.seq_len
        affordable = max(0, (cfg.max_tokens - fitness.tokens_spent) // one) if cfg.max_tokens else len(top)
        top = top[: 0 if fitness.exhausted() else affordable]
        if len(top) < 2:
            return list(next(iter(screened))), []
        values = fitness.score(top, cfg.confirm_tokens)
        rows = [{"choice": list(c), "screened": screened[c], "confirmed": v} for c, v in zip(top, values)]
        best = min(rows, key=lambda r: r["confirmed"])
        fitness.note_best(best["choice"], best["confirmed"], cfg.confirm_tokens)
        return best["choice"], rows

    def _prepare(self, study: optuna.Study, key: dict[str, Any], key_json: str) -> bool:
        """Check a loaded study is this search, fail trials a killed run left RUNNING; True if the study is new."""
        trials = study.get_trials(deepcopy=False)
        stored = study.user_attrs.get("search_key")
        if stored is None and not trials:
            study.set_user_attr("search_key", key_json)
            return True
        if stored != key_json:
            theirs = json.loads(stored) if stored else {}
            diff = sorted(k for k in key.keys() | theirs.keys() if key.get(k) != theirs.get(k))
            raise UserInputError(
                f"searcher.study_name={study.study_name!r} in storage {self.cfg.storage!r} holds a different search "
                f"(differs in: {', '.join(diff) or 'everything'}); use another study_name or storage"
            )
        # Trials of workers that died (no heartbeat within the grace period) are failed: they neither count nor
        # steer the sampler. Live workers' running trials are left alone, so several workers can share the study.
        optuna.storages.fail_stale_trials(study)
        return False

    def _optimize(
        self, study: optuna.Study, storage: optuna.storages.BaseStorage | None, problem: AllocationProblem, seed: int,
        fitness: Fitness, center: tuple[int, ...] | None,
    ) -> int:
        """Run the trials still missing; returns how many ran in this call."""
        cfg = self.cfg
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        # Same repaired choice, same tokens: the fitness is deterministic, so reuse the score, spending nothing.
        seen: dict[tuple[int, ...], float] = {tuple(t.user_attrs["choice"]): _fitness_of(t) for t in complete}
        best = min(seen.values(), default=math.inf)
        fitness.begin(max_tokens=cfg.max_tokens, max_seconds=cfg.max_seconds)
        if complete:  # the incumbent a resumed run starts from, at no tokens spent in this run
            t = min(complete, key=_fitness_of)
            fitness.note_best(t.user_attrs["choice"], best, cfg.trial_tokens)
        remaining = max(0, cfg.n_trials - len(complete))
        # Trials stop where the confirmation's tokens begin (a trial starts only if it fits before them).
        trial_limit = cfg.max_tokens - self._confirm_reserve(fitness)
        one_trial = fitness.sequences_for(cfg.trial_tokens) * fitness.seq_len
        bar = tqdm(total=remaining, desc="bayes", unit="trial", leave=False)
        ran = [0]

        def choose(trial: optuna.Trial) -> tuple[int, ...]:
            raw = self._suggest(trial, problem, center)
            choice = repair(problem, raw, np.random.default_rng([seed, trial.number]))  # deterministic per trial
            trial.set_user_attr("choice", list(choice))
            trial.set_user_attr("cost", problem.cost_of(choice))
            return choice

        def result(trial: optuna.Trial, choice: tuple[int, ...], value: float) -> float | list[float]:
            if math.isfinite(value):  # a non-finite value makes Optuna record the trial as failed
                trial.set_user_attr("fitness", value)
                seen[choice] = value
            return [problem.cost_of(choice), value] if cfg.multi_objective else value

        def objective(trial: optuna.Trial) -> float | list[float]:
            choice = choose(trial)
            if choice in seen:
                value = seen[choice]
                trial.set_user_attr("cached", True)
            else:
                value = float(fitness.score([choice], cfg.trial_tokens)[0])
            return result(trial, choice, value)

        def should_stop(study: optuna.Study) -> bool:
            # Other workers may complete trials too: n_trials bounds the study, not this worker.
            done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            out_of_trial_tokens = cfg.max_tokens > 0 and fitness.tokens_spent + one_trial > trial_limit
            return fitness.exhausted() or out_of_trial_tokens or done >= cfg.n_trials

        def record(trial: FrozenTrial) -> None:
            nonlocal best
            ran[0] += 1
            bar.update()
            if trial.state == TrialState.COMPLETE and _fitness_of(trial) < best:
                best = _fitness_of(trial)
                fitness.note_best(trial.user_attrs["choice"], best, cfg.trial_tokens)

        def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
            record(trial)
            if should_stop(study):
                study.stop()

        def run_batch(size: int) -> None:
            """Ask `size` trials, score their new choices together, tell them in the order asked."""
            with warnings.catch_warnings():  # Optuna warns that heartbeats go with study.optimize: _heartbeats beats
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
                trials = [study.ask() for _ in range(size)]
            with _heartbeats(storage, [t._trial_id for t in trials]):
                choices = [choose(t) for t in trials]
                cached = [c in seen for c in choices]
                fresh = list(dict.fromkeys(c for c in choices if c not in seen))
                scored = dict(zip(fresh, fitness.score(fresh, cfg.trial_tokens))) if fresh else {}
            for trial, choice, was_seen in zip(trials, choices, cached):
                if was_seen or choice in seen:  # scored before, or earlier in this batch
                    trial.set_user_attr("cached", True)
                value = seen[choice] if was_seen else float(scored[choice])
                told = result(trial, choice, value)
                finite = math.isfinite(value)
                record(study.tell(trial, told if finite else None, state=None if finite else TrialState.FAIL))

        if remaining and cfg.batch_trials == 1:
            # study.optimize (not ask/tell) so Optuna keeps each trial's heartbeat while it runs.
            study.optimize(objective, n_trials=remaining, callbacks=[after_trial], gc_after_trial=False)
        while remaining and cfg.batch_trials > 1 and not should_stop(study):
            done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            size = min(cfg.batch_trials, cfg.n_trials - done, remaining - ran[0])
            if cfg.max_tokens > 0:  # no trial that the token bound could not pay for, were all of them new
                size = min(size, (trial_limit - fitness.tokens_spent) // one_trial)
            if size < 1:
                break
            run_batch(size)
        bar.close()
        return ran[0]


@contextmanager
def _heartbeats(storage: optuna.storages.BaseStorage | None, trial_ids: Sequence[int]) -> Iterator[None]:
    """Beat for every trial of a batch while it is scored, as study.optimize does for its one trial, so other
    workers sharing the study do not fail them as stale (RDB storage with a heartbeat only)."""
    interval = storage.get_heartbeat_interval() if isinstance(storage, optuna.storages.RDBStorage) else None
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            for trial_id in trial_ids:
                storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def spdy_groups(problem: AllocationProblem, n_groups: int) -> list[str]:
    """Each unit's coefficient group: its kind and which of `n_groups` runs of consecutive units of that kind it
    falls in (units are in layer order)."""
    by_kind: dict[str, list[int]] = {}
    for u, kind in enumerate(problem.unit_kinds):
        by_kind.setdefault(kind, []).append(u)
    out = [""] * problem.n_units
    for kind, units in by_kind.items():
        for rank, u in enumerate(units):
            out[u] = f"{kind}.g{rank * min(n_groups, len(units)) // len(units)}"
    return out


def spdy_choice(problem: AllocationProblem, groups: Sequence[str], log2_coefficients: dict[str, float]) -> tuple[int, ...]:
    """The DP optimum of the proxy with each unit's errors scaled by 2**coefficient of its group."""
    scale = {g: 2.0 ** c for g, c in log2_coefficients.items()}
    scaled = dataclasses.replace(problem, errors=tuple(e * scale[g] for e, g in zip(problem.errors, groups)))
    return DPSearcher().search(scaled).choice


def _fitness_of(trial: FrozenTrial) -> float:
    return float(trial.user_attrs["fitness"])


def pareto_front(problem: AllocationProblem, trials: Sequence[FrozenTrial]) -> list[dict[str, Any]]:
    """Distinct non-dominated points, by cost: {"choice", "cost", "fitness"}."""
    points: dict[tuple[int, ...], dict[str, Any]] = {}
    for t in trials:
        choice = tuple(int(j) for j in t.user_attrs["choice"])
        points[choice] = {"choice": list(choice), "cost": problem.cost_of(choice), "fitness": _fitness_of(t)}
    return sorted(points.values(), key=lambda p: (p["cost"], p["fitness"]))
