"""End-to-end latency of whole models in one regime, timed interleaved so they share the machine's state."""

from __future__ import annotations

from torch import nn

from profilers.regimes import Regime, forward_call
from profilers.timing import TimingStats, time_interleaved


def measure_models(models: dict[str, nn.Module], regime: Regime, warmup: int, repeats: int) -> dict[str, TimingStats]:
    calls = {name: forward_call(model, regime) for name, model in models.items()}
    return time_interleaved(calls, warmup, repeats, desc=f"end-to-end {regime.name}")
