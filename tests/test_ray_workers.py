"""Candidates scored on Ray workers: every fitness-driven searcher finds exactly what it finds serially (allocation,
fitness, tokens and incumbent trace), in process against a Ray cluster started here (`ray start --head` on this
machine, joined by address) and through the CLI (`workers=2` starts a local cluster of its own)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from allocator.core.config import RayConfig
from search import make_searcher
from search.bayes import BayesConfig
from search.evo import EvoConfig
from search.fitness_engine import StitchedKLFitness
from search.random_search import RandomConfig
from search.tyr import TyrConfig

from .conftest import REPO, run_cli
from .test_fitness_cache import candidates, tiny_sparsity_job

# Token authentication (Ray's default; the token in ~/.ray/auth_token) on for the head and for this driver, set before
# Ray is imported because Ray reads it then; no usage report from a cluster that must not reach outside the machine.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A 2-CPU Ray head on this machine (loopback only, no dashboard, no usage report), stopped by its process group."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # the head is up once a driver can join it
            try:
                ray.init(address=address, logging_level=logging.WARNING)
                break
            except Exception:
                if time.monotonic() > deadline or head.poll() is not None:
                    raise
                time.sleep(2)
        yield address
    finally:
        ray.shutdown()
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=90)


@pytest.fixture(scope="module")
def engines(cluster, tmp_path_factory):
    """The tiny search's setup, its serial engine, and the same engine on two Ray workers found by address."""
    from allocator.app.search_job import prepare_search
    from search.ray_fitness import kl_fitness

    job = tiny_sparsity_job(tmp_path_factory.mktemp("cache"))
    setup = prepare_search(job)
    serial = kl_fitness(setup.dense, setup.space, setup.db.source, setup.data.fitness, job.fitness)
    parallel = kl_fitness(setup.dense, setup.space, setup.db.source, setup.data.fitness, job.fitness, workers=0,
                          ray_cfg=RayConfig(address=cluster))
    yield setup, serial, parallel
    parallel.close()


def test_workers_score_exactly_the_serial_values(engines):
    setup, serial, parallel = engines
    assert isinstance(serial, StitchedKLFitness) and parallel.parallelism == 2  # the cluster's 2 CPUs, 1 each
    choices = candidates(setup.space, 7, seed=11)
    for tokens in (32, 128):
        assert parallel._score(choices, parallel.sequences_for(tokens)) == serial._score(
            choices, serial.sequences_for(tokens))
    stats = parallel.worker_stats()
    assert [s["threads"] for s in stats] == [serial.threads] * 2 and all(s["layers_computed"] for s in stats)


def comparable(info: dict) -> dict:
    """What a search reports, less wall time and the worker count that only the Ray fitness reports."""
    out = {k: v for k, v in info.items() if k not in ("seconds", "workers", "threads_per_worker")}
    out["trace"] = [{k: v for k, v in row.items() if k != "seconds"} for row in info["trace"]]
    return out


@pytest.mark.parametrize("cfg", [
    EvoConfig(generations=3, offspring=4, stage_tokens=[32, 128], stage_survivors=[2, 1]),
    TyrConfig(strides=[2, 1], stage_generations=[2, 2], offspring=3, stage_tokens=[64], stage_survivors=[1]),
    RandomConfig(samples=9, sample_tokens=32, max_tokens=7 * 32),
    BayesConfig(n_trials=10, startup_trials=4, trial_tokens=32, confirm_top=2, confirm_tokens=64, batch_trials=4),
], ids=["evo", "tyr", "random", "bayes-batched"])
def test_searchers_on_workers_find_exactly_the_serial_result(engines, cfg):
    setup, serial, parallel = engines
    searcher = make_searcher(cfg)
    alone = searcher.search(setup.problem, seed=3, fitness=serial)
    spread = searcher.search(setup.problem, seed=3, fitness=parallel)
    assert spread.choice == alone.choice
    assert comparable(spread.info) == comparable(alone.info)  # bayes: its confirmed scores; the others: "fitness"
    assert alone.info["evaluations"] > 4


def plan_and_trace(result: subprocess.CompletedProcess) -> tuple[dict, dict]:
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = Path(result.stdout.strip().splitlines()[-1].removeprefix("run directory: "))
    return json.loads((run_dir / "plan.json").read_text()), json.loads((run_dir / "search_trace.json").read_text())


def test_cli_evo_on_two_workers_returns_exactly_the_serial_result(tmp_path):
    common = ["search", "model=tiny-llama", "model.tiny_layers=3", f"cache_dir={tmp_path / 'cache'}",
              "data.seq_len=32", "data.calib_sequences=8", "data.eval_sequences=2", "space.mlp_step=32",
              "space.fisher_sequences=3", "budget=sparsity", "budget.sparsity=0.4", "searcher=evo",
              "searcher.generations=4", "searcher.offspring=4", "searcher.stage_tokens=[32,128]",
              "searcher.stage_survivors=[2,1]", "fitness.sequences=4", "fitness.batch_size=2", "score.kl_sequences=4",
              "export.formats=[]", "verify=false"]
    serial, serial_trace = plan_and_trace(run_cli(*common, cwd=tmp_path))
    workers, workers_trace = plan_and_trace(run_cli(*common, "workers=2", cwd=tmp_path))
    assert workers_trace["workers"] == 2 and "workers" not in serial_trace and serial_trace["evaluations"] > 4
    assert comparable(workers_trace) == comparable(serial_trace)
    assert workers["allocation"] == serial["allocation"]
    for key in ("fitness", "tokens_spent", "evaluations", "proxy_error"):
        assert workers["searcher"][key] == serial["searcher"][key], key
    assert workers["quality"] == serial["quality"]
