"""Wall-clock timing with warm-up, interleaved variants (so drift hits all alike) and robust statistics."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from tqdm import tqdm


@dataclass(frozen=True)
class TimingStats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int

    @classmethod
    def of(cls, samples_ms: list[float]) -> "TimingStats":
        a = np.asarray(samples_ms)
        return cls(float(np.median(a)), float(np.percentile(a, 10)), float(np.percentile(a, 90)), len(a))


def time_interleaved(
    variants: dict[str, Callable[[], object]], warmup: int, repeats: int, desc: str = "timing"
) -> dict[str, TimingStats]:
    """Round-robin over the variants: one call of each per round, the first `warmup` rounds discarded."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    samples: dict[str, list[float]] = {name: [] for name in variants}
    rounds = warmup + repeats
    with tqdm(total=rounds * len(variants), desc=desc, unit="call", leave=False) as bar:
        for r in range(rounds):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                elapsed = (time.perf_counter() - start) * 1e3
                if r >= warmup:
                    samples[name].append(elapsed)
                bar.update()
    return {name: TimingStats.of(s) for name, s in samples.items()}
