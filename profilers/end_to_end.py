"""End-to-end latency of whole models in one regime, timed interleaved so they share the machine's state."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from profilers.gpu import device_copy, time_models
from profilers.gpu_timing import make_timer
from profilers.regimes import Regime, forward_call
from profilers.timing import TimingStats, time_interleaved


def measure_models(models: dict[str, nn.Module], regime: Regime, warmup: int, repeats: int) -> dict[str, TimingStats]:
    calls = {name: forward_call(model, regime) for name, model in models.items()}
    return time_interleaved(calls, warmup, repeats, desc=f"end-to-end {regime.name}")


def measure_models_gpu(
    models: dict[str, nn.Module], regime: Regime, warmup: int, repeats: int,
    device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, l2_rotations: int = 0,
) -> dict[str, TimingStats]:
    """Each model copied onto `device` in `dtype` and timed as the GPU profiler times its variants: a CUDA-graph
    step (decode over a fixed KV context of regime.length, or a prefill) over L2-rotated weight copies,
    interleaved, medians. The first model is kept resident; device="cpu" runs the same path without graphs."""
    timer = make_timer(device)  # a clear error where CUDA is not available
    build = {name: partial(device_copy, model, timer.device, dtype) for name, model in models.items()}
    stats, _ = time_models(build, regime, timer, warmup, repeats, l2_rotations,
                           desc=f"end-to-end {regime.name} on {timer.device}")
    return stats
