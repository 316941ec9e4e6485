"""Timers and probes of the GPU profiler: CUDA-graph timers (and a CPU stand-in with the same interface), how many
L2-rotated weight copies a timed step needs, and probes of the device, driver and software that a measurement is
valid for. Device-agnostic scheduling and statistics are in profilers/timing.py; the profiler in profilers/gpu.py.

Imports neither transformers nor the model packages, so the kernel benchmark can time with it alone."""

from __future__ import annotations

import gc
import importlib.metadata
import re
import time
from pathlib import Path
from typing import Callable, Protocol

import torch

from allocator.core.errors import UserInputError
from profilers.devices import DEVICES, name_matches
from profilers.table import cpu_name

MAX_ROTATIONS = 1024  # bounds graph capture time for tiny models (whose copies would otherwise number thousands)
MEMORY_FRACTION = 0.6  # of free device memory for one group of variants; the rest for graph pools and activations
WARMUP_STEPS = 2  # eager runs before capture: lazy allocations (cuBLAS workspaces, caches) must precede it
WARMUP_REPLAYS = 3


def rotation_count(l2_bytes: int, bytes_per_copy: int, override: int = 0, limit: int = MAX_ROTATIONS) -> int:
    """Copies to rotate through so their total exceeds 2x L2: by the time a copy is read again, twice the cache's
    size has streamed past and evicted it. `override` > 0 is taken as is; no L2 (CPU timer) needs no copies."""
    if override < 0:
        raise ValueError(f"l2_rotations={override} must be >= 0 (0: from the L2 size)")
    if override:
        return override
    if l2_bytes <= 0:
        return 1
    if bytes_per_copy <= 0:
        return limit
    return min(limit, 2 * l2_bytes // bytes_per_copy + 1)



def gpu_fingerprint(
    device: str, cuda: str | None, driver: str | None, torch_version: str, triton: str | None, dtype: str
) -> dict:
    """What makes a measurement valid: a table measured under one of these never stands for another."""
    return {
        "device": device,
        "driver": f"CUDA {cuda or 'none'} / driver {driver or 'unknown'}",
        "torch": torch_version,
        "triton": triton,
        "dtype": dtype,
    }


def parse_driver_version(text: str) -> str | None:
    """The version in /proc/driver/nvidia/version ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15 ...")."""
    match = re.search(r"Kernel Module\s+([0-9][0-9.]*)", text)
    return match.group(1) if match else None


# ---- environment probes ----

def _package_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # pynvml missing or no NVML: fall back to the kernel module's own report
        try:
            return parse_driver_version(Path("/proc/driver/nvidia/version").read_text())
        except OSError:
            return None


def current_fingerprint(device: torch.device, dtype: str) -> dict:
    if device.type == "cuda":
        name, cuda, driver = torch.cuda.get_device_name(device), torch.version.cuda, driver_version()
    else:
        name, cuda, driver = cpu_name(), None, None
    return gpu_fingerprint(name, cuda, driver, torch.__version__, _package_version("triton", "pytorch-triton"), dtype)


def cuda_device_named(name: str) -> torch.device | None:
    """The first CUDA device that reports `name` (what DeviceSpec.name holds) or a name of its family
    (profilers.devices.name_matches: "NVIDIA H200 NVL" for "NVIDIA H200"), or None."""
    if not torch.cuda.is_available():
        return None
    for i in range(torch.cuda.device_count()):
        if name_matches(name, torch.cuda.get_device_name(i)):
            return torch.device("cuda", i)
    return None


def require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise UserInputError(f"{what} needs a CUDA GPU, but torch.cuda.is_available() is False on this machine "
                             f"(torch {torch.__version__}, {build})")


def cuda_device_for_profile(profile: str) -> torch.device | None:
    """The CUDA device that verifying a plan of `profile` must time on; None when the profile is no GPU (timed on
    this CPU as before). Raises, naming why, when it is a GPU that cannot be timed here."""
    spec = DEVICES.get(profile)
    if spec is None or not spec.is_gpu:
        return None
    require_cuda(f"verifying a plan for profile {profile} ({spec.name})")
    device = cuda_device_named(spec.name)
    if device is None:
        found = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        raise UserInputError(f"verifying a plan for profile {profile} needs {spec.name}; this machine has {found}")
    return device


# ---- timers: CUDA graphs + events on a GPU, perf_counter on CPU ----

Sampler = Callable[[], float]  # runs the prepared steps once, returns ms per step


class Timer(Protocol):
    device: torch.device
    l2_bytes: int

    def prepare(self, steps: list[Callable[[], object]]) -> Sampler: ...
    def state(self) -> dict[str, float | None]: ...
    def memory_budget(self) -> int | None: ...
    def release(self) -> None: ...


class CpuTimer:
    """No graphs, no L2 rotation: the same pipeline as on a GPU, for tests and machines without one."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.l2_bytes = 0

    def prepare(self, steps: list[Callable[[], object]]) -> Sampler:
        for step in steps:
            step()

        def sample() -> float:
            start = time.perf_counter()
            for step in steps:
                step()
            return (time.perf_counter() - start) * 1e3 / len(steps)

        return sample

    def state(self) -> dict[str, float | None]:
        return {"clock_mhz": None, "temperature_c": None}

    def memory_budget(self) -> int | None:
        return None

    def release(self) -> None:
        gc.collect()


class CudaTimer:
    """Captures all steps as one CUDA graph; a sample is one replay timed by CUDA events, divided by the steps."""

    def __init__(self, device: torch.device) -> None:
        require_cuda("timing on CUDA")
        self.device = device
        self.l2_bytes = int(torch.cuda.get_device_properties(device).L2_cache_size)
        self._probes = {"clock_mhz": torch.cuda.clock_rate, "temperature_c": torch.cuda.temperature}

    def prepare(self, steps: list[Callable[[], object]]) -> Sampler:
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # the copies share shapes: one step initializes for all
                for _ in range(WARMUP_STEPS):
                    steps[0]()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    for step in steps:
                        step()
            except RuntimeError as exc:
                raise RuntimeError(f"CUDA graph capture of the forward step failed on {self.device}: {exc}") from exc
            for _ in range(WARMUP_REPLAYS):
                graph.replay()
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def sample() -> float:
            with torch.cuda.device(self.device):
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
            return start.elapsed_time(end) / len(steps)

        sample.keep_alive = (graph, steps)  # type: ignore[attr-defined]  # the graph reads the steps' tensors
        return sample

    def state(self) -> dict[str, float | None]:
        """SM clock and temperature; they need pynvml, so None (and not asked again) where it is missing."""
        out: dict[str, float | None] = {}
        for key, probe in list(self._probes.items()):
            try:
                out[key] = float(probe(self.device))
            except Exception:
                self._probes.pop(key)
        return {k: out.get(k) for k in ("clock_mhz", "temperature_c")}

    def memory_budget(self) -> int | None:
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(MEMORY_FRACTION * free)

    def release(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()


def make_timer(device: str | torch.device) -> Timer:
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            require_cuda("timing on cuda")
            device = torch.device("cuda", torch.cuda.current_device())
        return CudaTimer(device)
    if device.type == "cpu":
        return CpuTimer()
    raise ValueError(f"device {device} is not supported; valid: cuda, cuda:<index>, cpu")
