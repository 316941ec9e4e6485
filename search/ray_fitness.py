"""The KL fitness on Ray workers: each generation's or batch's candidates are scored by N actors at once.

Each actor holds a replica of the dense model, the level store (it reads levels from the same files) and a
`StitchedKLFitness` of its own, with its own bounded unit cache and prefix states; the pool and its dense
log-probabilities are computed once here and shipped once through Ray's object store. Scores are deterministic per
candidate (same tokens, same dtype, same thread count, and a candidate's layers give the same result whichever
earlier candidate's prefix they start from), and they are returned in the order asked, so a search on N workers
finds exactly what the serial search finds. The cluster is started or joined by allocator/core/ray_cluster.py (the
database build's workers use the same one); Ray is imported only when workers are asked for."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from allocator.core.config import FitnessConfig, RayConfig
from allocator.core.ray_cluster import connect, ray_module, wants_ray
from allocator.core.space import Space
from allocator.model.placement import input_device, on_cpu
from allocator.model.surgery import LevelSource
from search.fitness import Fitness
from search.fitness_engine import StitchedKLFitness, dense_log_probs, torch_threads

GB = 1e9


class ScoringWorker:
    """One Ray actor's engine (built as ray.remote(ScoringWorker)); everything it gets arrives once, at start."""

    def __init__(
        self, dense: nn.Module, space: Space, source: LevelSource, pool: torch.Tensor, dense_logp: torch.Tensor,
        batch_size: int, cache_bytes: float, threads: int, device: str = "cpu",
    ) -> None:
        torch.set_num_threads(threads)  # Ray starts a worker on its reserved CPUs' count; the search's count rules
        # The replica arrives on the CPU; "cuda" is the GPU Ray reserved for this actor (its CUDA_VISIBLE_DEVICES).
        # The engine moves the pool and log-probabilities to where the replica is.
        self.engine = StitchedKLFitness(
            dense.to(device), space, source, pool, batch_size=batch_size, cache_bytes=cache_bytes, threads=threads,
            dense_logp=dense_logp,
        )

    def score(self, choices: list[tuple[int, ...]], n_sequences: int) -> list[float]:
        return self.engine._score(choices, n_sequences)

    def stats(self) -> dict[str, Any]:
        cache = self.engine.cache
        return {"threads": torch.get_num_threads(), "unit_builds": cache.builds, "unit_evictions": cache.evictions,
                "cache_bytes": cache.bytes, "layers_computed": self.engine.layers_computed,
                "layers_reused": self.engine.layers_reused}


class RayKLFitness(Fitness):
    """StitchedKLFitness's scores, computed on Ray actors; token accounting, memo and trace stay here."""

    def __init__(
        self, dense: nn.Module, space: Space, source: LevelSource, pool: torch.Tensor, cfg: FitnessConfig,
        workers: int, ray_cfg: RayConfig, dense_logp: torch.Tensor | None = None,
    ) -> None:
        super().__init__(seq_len=pool.shape[1], pool_sequences=pool.shape[0])
        ray = ray_module()
        n, self._started = connect(workers, ray_cfg)
        self.threads = cfg.threads if cfg.threads > 0 else torch.get_num_threads()
        # Workers score where the driver's dense model is: on a GPU of their own when it was placed on one (the
        # search job checks that each worker reserves one, ray.num_gpus), else on their CPUs.
        device = "cuda" if input_device(dense).type == "cuda" else "cpu"
        if dense_logp is None:
            with torch_threads(self.threads):  # as the serial engine computes them
                dense_logp = dense_log_probs(dense, pool, cfg.batch_size)
        self._layer_units = [[u for u, unit in enumerate(space.units) if unit.layer == layer]
                             for layer in range(space.shape.num_layers)]
        # Shipped as CPU tensors (a pickled CUDA tensor would name the driver's GPU); each worker places its replica.
        shared = [ray.put(x) for x in (on_cpu(dense), space, source, pool.cpu(), dense_logp.cpu())]
        actor = ray.remote(ScoringWorker).options(num_cpus=ray_cfg.num_cpus, num_gpus=ray_cfg.num_gpus)
        self.actors = [actor.remote(*shared, cfg.batch_size, cfg.cache_gb * GB, self.threads, device)
                       for _ in range(n)]
        ray.get([a.stats.remote() for a in self.actors])  # fail here, not mid-search, if a worker cannot start

    @property
    def parallelism(self) -> int:
        return len(self.actors)

    def _score(self, choices: list[tuple[int, ...]], n_sequences: int) -> list[float]:
        """Candidates sorted by layer keys (as the serial engine orders them) and cut into one contiguous run per
        worker, so each worker's candidates share prefixes; the values go back in the asked order."""
        ray = ray_module()
        keys = [tuple(tuple(c[u] for u in units) for units in self._layer_units) for c in choices]
        order = sorted(range(len(choices)), key=lambda i: keys[i])
        runs = _split(order, len(self.actors))
        futures = [a.score.remote([choices[i] for i in run], n_sequences) for a, run in zip(self.actors, runs) if run]
        values: list[float] = [0.0] * len(choices)
        for run, scored in zip([r for r in runs if r], ray.get(futures)):
            for i, value in zip(run, scored):
                values[i] = value
        return values

    def worker_stats(self) -> list[dict[str, Any]]:
        return ray_module().get([a.stats.remote() for a in self.actors])

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "workers": len(self.actors), "threads_per_worker": self.threads}

    def close(self) -> None:
        ray = ray_module()
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._started:
            ray.shutdown()


def _split(order: Sequence[int], n: int) -> list[list[int]]:
    """`order` cut into n contiguous runs whose lengths differ by at most one."""
    size, extra = divmod(len(order), n)
    runs, start = [], 0
    for k in range(n):
        end = start + size + (k < extra)
        runs.append(list(order[start:end]))
        start = end
    return runs


def kl_fitness(
    dense: nn.Module, space: Space, source: LevelSource, pool: torch.Tensor, cfg: FitnessConfig, workers: int = 0,
    ray_cfg: RayConfig | None = None, dense_logp: torch.Tensor | None = None,
) -> Fitness:
    """The KL fitness of a search: in this process, or on Ray workers when workers > 1 or a cluster address is given.
    Candidates are scored where `dense` is; `dense_logp`, the pool's dense log-probabilities when the caller computed
    them (on a dispatched model, allocator/model/placement.py)."""
    ray_cfg = ray_cfg or RayConfig()
    if wants_ray(workers, ray_cfg):
        return RayKLFitness(dense, space, source, pool, cfg, workers, ray_cfg, dense_logp)
    return StitchedKLFitness(
        dense, space, source, pool, batch_size=cfg.batch_size, cache_bytes=cfg.cache_gb * GB, threads=cfg.threads,
        dense_logp=dense_logp,
    )
