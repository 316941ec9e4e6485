"""Units' levels built on Ray workers while the layer stream goes on to the next layer.

Once a layer has seen every calibration batch, its units' inputs (the statistics they need and the unit's weights,
as tensors: allocator/levels/unit_levels.py `UnitInputs`) go to Ray tasks, one per unit; the stream then computes
the next layer's statistics while the workers run the OBS / SparseGPT solves, the expensive part. At most one
layer per worker is in flight: before another layer is handed over, the oldest is waited for, so the statistics
held (here and in Ray's object store) stay bounded by about N layers'.

The workers return the level tensors and errors; this process writes each unit (allocator/levels/unit_levels.py
`write_unit`: temporary directory, then an atomic rename) under the database's lock, so the files are written where
the lock is held, whichever node computed them, and an interrupted build leaves no half-written unit.

Every worker runs on the thread count this process builds with (a matmul's sums depend on how many threads split
them; SparseGPT's column loop pins its own count, allocator/levels/compress/sparse_prune.py), so the levels are
bit-identical to the serial build's."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch

from allocator.core.config import RayConfig
from allocator.core.errors import UserInputError
from allocator.core.ray_cluster import connect, ray_module
from allocator.levels.unit_levels import UnitInputs, UnitLevels, build_unit_levels

__all__ = ["RayUnitBuilder"]

CPU = torch.device("cpu")


def _build_on_worker(inputs: UnitInputs, threads: int, device: str) -> UnitLevels:
    """One unit's levels on a Ray worker: the build's thread count, the build's kind of device."""
    torch.set_num_threads(threads)  # Ray starts a worker on its reserved CPUs' count; the build's count rules
    return build_unit_levels(inputs.to(torch.device(device)))


def worker_device(device: torch.device, cfg: RayConfig) -> str:
    """Where the workers build: on the CPU for a CPU build; on their own GPU (Ray gives each task its GPUs as
    cuda:0..) for a GPU build, which needs GPUs reserved per worker."""
    if device.type == "cpu":
        return "cpu"
    if cfg.num_gpus <= 0:
        raise UserInputError(f"device={device} with Ray workers builds levels on the workers' GPUs: set ray.num_gpus "
                             f"(> 0, e.g. 1), not {cfg.num_gpus}, or build on the CPU (device=cpu)")
    return device.type


class RayUnitBuilder:
    """Units' levels computed on Ray workers, handed over one layer at a time (`submit`), each unit passed to `done`
    in submission order as it finishes; `close` waits for the rest, or (after an error) cancels it."""

    def __init__(self, workers: int, cfg: RayConfig, device: torch.device, done: Callable[[UnitLevels], None]) -> None:
        self.device = worker_device(device, cfg)
        ray = ray_module()
        self.workers, self._started = connect(workers, cfg)
        self.threads = torch.get_num_threads()  # the serial build's count (this process builds with it)
        self._task = ray.remote(_build_on_worker).options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
        self._done = done
        self._in_flight: deque[list] = deque()  # per layer handed over: its units' result references

    def submit(self, layer_units: list[UnitInputs]) -> None:
        """Hand one layer's units to the workers, once fewer than `workers` layers are in flight. Their inputs are
        copied into Ray's object store here, so the caller may free its statistics as soon as this returns."""
        while len(self._in_flight) >= self.workers:
            self._finish_oldest()
        if layer_units:
            self._in_flight.append([self._task.remote(u.to(CPU), self.threads, self.device) for u in layer_units])

    def _finish_oldest(self) -> None:
        for ref in self._in_flight.popleft():
            self._done(ray_module().get(ref))

    def close(self, wait: bool = True) -> None:
        """Finish what is in flight (`wait`) or cancel it, then stop the cluster if this builder started it."""
        ray = ray_module()
        try:
            while wait and self._in_flight:
                self._finish_oldest()
        finally:
            for refs in self._in_flight:
                for ref in refs:
                    ray.cancel(ref)
            self._in_flight.clear()
            if self._started:
                ray.shutdown()
