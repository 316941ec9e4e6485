"""Wall-clock timing with warm-up, interleaved variants (so drift hits all alike) and robust statistics."""

from __future__ import annotations

import random
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
    samples_ms: list[float]  # in round order, so two variants' samples can be paired

    @classmethod
    def of(cls, samples_ms: list[float]) -> "TimingStats":
        a = np.asarray(samples_ms)
        return cls(float(np.median(a)), float(np.percentile(a, 10)), float(np.percentile(a, 90)), list(samples_ms))


def paired_ratio(a: TimingStats, b: TimingStats) -> float:
    """Median over rounds of a/b: samples of one round share the machine's momentary speed, so drift and
    bursts of contention cancel instead of landing on one variant."""
    return float(np.median(np.asarray(a.samples_ms) / np.asarray(b.samples_ms)))


def time_interleaved(
    variants: dict[str, Callable[[], object]], warmup: int, repeats: int, desc: str = "timing"
) -> dict[str, TimingStats]:
    """One call of each variant per round, in a fresh (seeded) order each round so drift within a round does not
    always land on the same variants; the first `warmup` rounds are discarded."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")

    def call_ms(name: str) -> float:
        start = time.perf_counter()
        variants[name]()
        return (time.perf_counter() - start) * 1e3

    return interleaved_samples(list(variants), call_ms, warmup, repeats, desc, "call")


def interleaved_samples(
    names: list[str], sample_ms: Callable[[str], float], warmup: int, repeats: int, desc: str, unit: str
) -> dict[str, TimingStats]:
    """`sample_ms(name)` once per name per round, in a fresh (seeded) order each round; the first `warmup` rounds
    are discarded. The loop of time_interleaved (torch calls) and profilers/llamacpp.py (llama-bench runs)."""
    samples: dict[str, list[float]] = {name: [] for name in names}
    rounds = warmup + repeats
    with tqdm(total=rounds * len(names), desc=desc, unit=unit, leave=False) as bar:
        for r in range(rounds):
            order = list(names)
            random.Random(r).shuffle(order)
            for name in order:
                elapsed = sample_ms(name)
                if r >= warmup:
                    samples[name].append(elapsed)
                bar.update()
    return {name: TimingStats.of(s) for name, s in samples.items()}


def interleaved_schedule(names: list[str], rounds: int, seed: int = 0) -> list[list[str]]:
    """One permutation of `names` per round, seeded: drift within a round does not always land on the same
    variants, and a re-run times them in the same order."""
    rng = random.Random(seed)
    schedule = []
    for _ in range(rounds):
        order = list(names)
        rng.shuffle(order)
        schedule.append(order)
    return schedule


def round_stats(samples: dict[str, list[float]], warmup: int) -> dict[str, TimingStats]:
    """Median and 10th/90th percentiles per variant over its rounds, the first `warmup` discarded."""
    out = {}
    for name, s in samples.items():
        if len(s) <= warmup:
            raise ValueError(f"variant {name!r} has {len(s)} samples, not more than warmup={warmup}")
        out[name] = TimingStats.of(s[warmup:])
    return out
